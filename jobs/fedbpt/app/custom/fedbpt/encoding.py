"""Tokenisation apart from the model: the task's template around each example with the prompt placeholders
in the token ids, the ``Batch`` of such rows, their random perturbation, and how a generation's rows are
ordered and cut into forward passes.

Every candidate of a generation is scored on every example (clean and perturbed): P x n rows. They go
through the model sorted by length, an example's candidates side by side, in chunks cut where the padding
saved outweighs the fixed cost of one more forward pass, and never over the token budget. No torch module
here runs the model: ``blackbox.py`` does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from .data import Split
from .tasks import Task

PLACEHOLDER_START = 1000  # BBT's prompt tokens: vocabulary ids 1000 .. 1000 + L - 1
_SLOT = re.compile(r"(\{prompt\}|\{mask\}|\{text\d\})")


@dataclass
class Chunk:
    """One forward pass: which candidate and which example each row is, and the rows' padded length."""

    candidates: torch.Tensor  # (B,) int64
    examples: torch.Tensor  # (B,) int64
    length: int  # tokens per row in the forward (the longest row's)
    attended: int  # tokens that are not padding

    def __len__(self) -> int:
        return len(self.examples)


@dataclass
class Batch:
    """Tokenised examples, right-padded, longest first. Its tensors live on one device (``to``); the host
    facts that plan forwards and put rows back in input order (``lengths``, ``index``) stay numpy."""

    ids: torch.Tensor  # (n, T) int64
    attention: torch.Tensor  # (n, T) bool
    prompt: torch.Tensor  # (n, T) bool: the L placeholder positions
    text: torch.Tensor  # (n, T) bool: positions that came from the example's own text
    answer: torch.Tensor  # (n,) int64: where the label word is read
    labels: torch.Tensor  # (n,) int64
    prompt_positions: torch.Tensor | None = None  # (n, L) int64: each row's placeholder positions, in order
    lengths: np.ndarray | None = None  # (n,) attended tokens per row, on the CPU: for planning
    index: np.ndarray | None = None  # (n,) each row's example in the split it was encoded from, on the CPU
    _chunks: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.prompt_positions is None:
            self.prompt_positions = self.prompt.nonzero()[:, 1].view(self.prompt.shape[0], -1)
        if self.lengths is None:
            self.lengths = self.attention.sum(1).cpu().numpy()
        if self.index is None:
            self.index = np.arange(self.ids.shape[0])

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.ids.device

    def to(self, device: torch.device | str) -> Batch:
        """The same rows on ``device`` (moved once; every forward then slices them there)."""
        tensors = {k: getattr(self, k).to(device) for k in _TENSORS}
        return Batch(**tensors, lengths=self.lengths, index=self.index)

    def concat(self, other: Batch) -> Batch:
        """Self's rows, then other's (e.g. the clean examples, then their perturbed copies)."""
        t = max(self.ids.shape[1], other.ids.shape[1])
        padded = {k: torch.cat([_pad(getattr(self, k), t), _pad(getattr(other, k), t)]) for k in _PADDED}
        flat = {k: torch.cat([getattr(self, k), getattr(other, k)]) for k in ("answer", "labels", "prompt_positions")}
        return Batch(**padded, **flat, lengths=np.concatenate([self.lengths, other.lengths]),
                     index=np.concatenate([self.index, other.index]))  # fmt: skip

    def chunks(self, candidates: int, batch_size: int, token_budget: int, overhead: int) -> list[Chunk]:
        """The forward passes that score ``candidates`` prompts on every row (planned once per shape)."""
        key = (candidates, batch_size, token_budget, overhead)
        if key not in self._chunks:
            plan = plan_chunks(self.lengths, candidates, batch_size, token_budget, overhead)
            self._chunks[key] = [
                Chunk(
                    torch.from_numpy(c).to(self.device),
                    torch.from_numpy(e).to(self.device),
                    length,
                    int(self.lengths[e].sum()),
                )  # fmt: skip
                for c, e, length in plan
            ]
        return self._chunks[key]


_PADDED = ("ids", "attention", "prompt", "text")
_TENSORS = (*_PADDED, "answer", "labels", "prompt_positions")


def _pad(x: torch.Tensor, t: int) -> torch.Tensor:
    return F.pad(x, (0, t - x.shape[1])) if x.shape[1] < t else x


def plan_chunks(
    lengths: np.ndarray, candidates: int, batch_size: int, token_budget: int, overhead: int
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Cut the ``candidates x len(lengths)`` rows of a generation into forwards: (candidate ids, example ids,
    padded length) per forward.

    Rows go longest first, an example's candidates side by side (equal lengths). A forward of rows
    [i, j) costs (j - i) * length[i] padded tokens plus ``overhead``, the fixed cost of a forward pass in
    tokens; it holds at most ``batch_size`` rows and ``token_budget`` tokens (a single row longer than the
    budget goes alone). The cuts minimise the total cost exactly (dynamic programming over the sorted rows).
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    examples = np.repeat(order, candidates)
    cands = np.tile(np.arange(candidates), len(order))
    row_len = np.asarray(lengths)[examples].astype(np.int64)
    n = len(row_len)
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        i = np.arange(max(0, j - batch_size), j)
        size = j - i
        tokens = size * row_len[i]
        cost = best[i] + tokens + overhead
        cost[(tokens > token_budget) & (size > 1)] = np.inf
        k = int(np.argmin(cost))
        best[j], cut[j] = cost[k], i[k]
    plan, j = [], n
    while j > 0:
        i = int(cut[j])
        plan.append((cands[i:j], examples[i:j], int(row_len[i])))
        j = i
    return plan[::-1]


class Encoder:
    """The task's template, tokenised for one model: ``encode`` makes a Batch, ``perturb`` a noisy copy."""

    def __init__(self, tokenizer, task: Task, kind: str, n_prompt_tokens: int, max_length: int, vocab_size: int,
                 model_name: str):  # fmt: skip
        self.tokenizer, self.task, self.kind = tokenizer, task, kind
        self.n_prompt_tokens, self.max_length, self.model_name = n_prompt_tokens, max_length, model_name
        self.vocab_size = vocab_size  # the model's embedding rows: random ids and placeholders stay below it
        self.placeholder_ids = [(PLACEHOLDER_START + i) % self.vocab_size for i in range(n_prompt_tokens)]

    def template(self) -> str:
        if self.kind == "mlm":
            return self.task.template
        if self.kind == "causal":
            return self.task.causal_template
        return "{prompt} " + " ".join(f"{{text{i}}}" for i in range(len(self.task.text_fields)))

    def special_wrap(self) -> tuple[list[int], list[int]]:
        """The special ids the tokenizer puts before and after a text (none after, for causal LMs)."""
        plain = self.tokenizer("x", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("x")["input_ids"]
        start = next(i for i in range(len(full)) if full[i : i + len(plain)] == plain)
        after = full[start + len(plain) :] if self.kind != "causal" else []
        return full[:start], after

    def ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def plan(self) -> list[tuple[str, str]]:
        """The template as (slot, content) pieces: ("lit", text) or a slot with the spaces before it."""
        # A literal's trailing space belongs to the next piece: BPE tokenisers fold it into the next word.
        carried, plan = "", []
        for piece in (p for p in _SLOT.split(self.template()) if p):
            if _SLOT.fullmatch(piece):
                plan.append((piece, carried))
                carried = ""
            else:
                stripped = (carried + piece).rstrip(" ")
                plan.append(("lit", stripped))
                carried = (carried + piece)[len(stripped) :]
        return plan

    def encode(self, split: Split) -> Batch:
        """Token ids of the task's template around each example, with the prompt placeholders in them."""
        plan = self.plan()
        head, tail = self.special_wrap()
        literal_ids = {c: self.ids([c])[0] for s, c in plan if s == "lit" and c}
        field_ids = {  # slot -> token ids of that text field for every example
            slot: self.ids([prefix + t[int(slot[5:-1])] for t in split.texts])
            for slot, prefix in plan
            if slot.startswith("{text")
        }
        mask_id = self.tokenizer.mask_token_id
        if self.kind == "mlm" and mask_id is None:
            raise ValueError(f"--model_name {self.model_name}: the tokenizer has no mask token")
        fixed = len(head) + len(tail) + sum(len(literal_ids[c]) for s, c in plan if s == "lit" and c)
        fixed += self.n_prompt_tokens
        fixed += 1 if self.kind == "mlm" else 0  # the mask
        room = self.max_length - fixed
        if room < len(field_ids):
            raise ValueError(
                f"--n_prompt_tokens {self.n_prompt_tokens} leaves no room for the text: the model takes "
                f"{self.max_length} tokens and the prompt, template and special tokens need {fixed}"
            )

        rows, kinds, answers = [], [], []
        n = len(split)
        for i in range(n):
            texts = _truncate([field_ids[s][i] for s in sorted(field_ids)], room)
            by_slot = dict(zip(sorted(field_ids), texts))
            ids, kind = list(head), [0] * len(head)  # kind: 0 other, 1 prompt, 2 text
            answer = -1
            for slot, content in plan:
                if slot == "lit":
                    part, k = literal_ids.get(content, []), 0
                elif slot == "{prompt}":
                    part, k = self.placeholder_ids, 1
                elif slot == "{mask}":
                    if self.kind == "mlm":
                        answer = len(ids)
                        part, k = [mask_id], 0
                    else:
                        part, k = [], 0
                else:
                    part, k = by_slot[slot], 2
                ids += part
                kind += [k] * len(part)
            ids += tail
            kind += [0] * len(tail)
            rows.append(ids)
            kinds.append(kind)
            answers.append(answer if answer >= 0 else len(ids) - 1)

        order = sorted(range(n), key=lambda i: -len(rows[i]))
        t = max((len(r) for r in rows), default=1)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((n, t), pad, dtype=torch.long)
        kind_t = torch.zeros((n, t), dtype=torch.long)
        attention = torch.zeros((n, t), dtype=torch.bool)
        for j, i in enumerate(order):
            ids[j, : len(rows[i])] = torch.tensor(rows[i])
            kind_t[j, : len(rows[i])] = torch.tensor(kinds[i])
            attention[j, : len(rows[i])] = True
        return Batch(
            ids=ids,
            attention=attention,
            prompt=kind_t == 1,
            text=kind_t == 2,
            answer=torch.tensor([answers[i] for i in order], dtype=torch.long),
            labels=torch.as_tensor(np.asarray(split.labels)[order], dtype=torch.long),
            index=np.asarray(order, dtype=np.int64),
        )

    def perturb(self, batch: Batch, rate: float, rng: np.random.Generator, scope: str = "text") -> Batch:
        """A copy with each text token (``scope='all'``: each attended token) replaced by a random
        vocabulary id with probability ``rate``, on the batch's device. ``all`` is the public example's
        choice; it also hits the placeholders, the special tokens and the mask itself."""
        if scope not in ("text", "all"):
            raise ValueError(f"--perturb_scope {scope!r}: choose text or all")
        where = (batch.text if scope == "text" else batch.attention).cpu().numpy()
        hit = where & (rng.random(where.shape) < rate)
        ids = batch.ids.cpu().numpy().copy()
        ids[hit] = rng.integers(0, self.vocab_size, size=int(hit.sum()))
        return replace(batch, ids=torch.from_numpy(ids).to(batch.device), _chunks={})

    def label_ids(self, verbalizer_space: bool) -> list[int]:
        """The first token of each label word (space-prefixed for causal LMs, or when asked)."""
        space = self.kind == "causal" or verbalizer_space
        ids = []
        for word in self.task.verbalizer:
            tokens = self.ids([(" " if space else "") + word])[0]
            if not tokens:
                raise ValueError(f"label word {word!r} is empty for this tokenizer")
            ids.append(tokens[0])
        if len(set(ids)) < len(ids):
            raise ValueError(f"label words {self.task.verbalizer} share a first token for this tokenizer")
        return ids


def _truncate(fields: list[list[int]], room: int) -> list[list[int]]:
    """Cut the longest text field first until all fields fit in ``room`` tokens."""
    fields = [list(f) for f in fields]
    while sum(map(len, fields)) > room:
        longest = max(range(len(fields)), key=lambda i: len(fields[i]))
        excess = sum(map(len, fields)) - room
        fields[longest] = fields[longest][: max(1, len(fields[longest]) - excess)]
        if all(len(f) <= 1 for f in fields):
            break
    return fields
