"""The frozen model as a black box: prompt z -> class scores, by forward passes only.

A fixed projection A turns z (d floats) into L soft-prompt vectors; a forward hook adds them to (``add``)
or puts them in place of (``cat``) the hidden states of L placeholder tokens that sit in the token ids
themselves. Where the hook sits follows BBT and the paper: on BERT/RoBERTa-family models (masked LMs and
sentence encoders) at the output of the embeddings block (word + position + type embeddings, after its
LayerNorm); on decoder-only models, which have no normalisation there, at the input embeddings. No
Hugging Face modeling code is copied or patched. Every candidate of a generation and every example go
through the model in one batch, chunked by a token budget; only the answer position goes through the LM
head.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from .data import Split
from .search import projection, projection_fingerprint, projection_scale
from .tasks import Task

log = logging.getLogger(__name__)

MODEL_KINDS = ("mlm", "causal", "encoder")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PLACEHOLDER_START = 1000  # BBT's prompt tokens: vocabulary ids 1000 .. 1000 + L - 1
# Where the prompt is added: "embeddings", the embeddings block's output (BBT's place), or
# "word_embeddings", the input-embedding module (the only place a decoder-only model offers).
PROMPT_PLACES = ("auto", "embeddings", "word_embeddings")
# What "auto" means for each kind of model. The sentence encoders' choice is measured: see the README.
AUTO_PLACE = {"mlm": "embeddings", "encoder": "embeddings", "causal": "word_embeddings"}
_SLOT = re.compile(r"(\{prompt\}|\{mask\}|\{text\d\})")


@dataclass
class BlackBoxConfig:
    model_name: str
    task: Task
    n_prompt_tokens: int = 50
    intrinsic_dim: int | None = 500  # None: known only from the server's first message (see use_dim)
    seed: int = 42
    cat_or_add: str = "add"
    model_type: str = "auto"  # mlm | causal | encoder | auto (from the model's config)
    device: str = "cpu"
    dtype: str = "float32"
    sigma: float = 1.0  # sigma0 of the projection scale
    alpha: float = 1.0
    loss_type: str = "ce"
    verbalizer_space: bool = False  # masked LMs: "Ġgreat" instead of the public example's "great"
    batch_size: int = 128  # most sequences in one forward
    token_budget: int = 16384  # most tokens (sequences x padded length) in one forward
    label_scale: float = 20.0  # sentence encoders: class score = cosine similarity x this
    gguf_file: str | None = None
    prompt_at: str = "auto"  # one of PROMPT_PLACES


@dataclass
class Batch:
    """Tokenised examples, right-padded, longest first."""

    ids: torch.Tensor  # (n, T) int64
    attention: torch.Tensor  # (n, T) bool
    prompt: torch.Tensor  # (n, T) bool: the L placeholder positions
    text: torch.Tensor  # (n, T) bool: positions that came from the example's own text
    answer: torch.Tensor  # (n,) int64: where the label word is read
    labels: torch.Tensor  # (n,) int64

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def prompt_positions(self) -> torch.Tensor:
        """(n, L) int64: each row's placeholder positions, in order."""
        n = self.prompt.shape[0]
        return self.prompt.nonzero()[:, 1].view(n, -1)

    def concat(self, other: Batch) -> Batch:
        t = max(self.ids.shape[1], other.ids.shape[1])
        cat = [torch.cat([_pad(a, t), _pad(b, t)]) for a, b in zip(self._padded(), other._padded())]
        return Batch(*cat, answer=torch.cat([self.answer, other.answer]),
                     labels=torch.cat([self.labels, other.labels]))  # fmt: skip

    def _padded(self) -> tuple[torch.Tensor, ...]:
        return self.ids, self.attention, self.prompt, self.text


def _pad(x: torch.Tensor, t: int) -> torch.Tensor:
    return F.pad(x, (0, t - x.shape[1])) if x.shape[1] < t else x


def resolve_model_path(name: str) -> str:
    """A local directory as given, a hub id as given; a path-like name that is missing is an error."""
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(
            f"--model_name {name!r}: no such model directory (give a Hugging Face hub id such as "
            "roberta-large, or a folder with config.json and the weights)"
        )
    return name


def check_device(device: str) -> str:
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device != "cpu" and not device.startswith("mps"):
        raise ValueError(f"--device {device!r}: use cpu, cuda or cuda:N")
    return device


def detect_kind(config, model_type: str = "auto") -> str:
    """mlm, causal or encoder, from ``--model_type`` or the architectures in the model's config."""
    if model_type != "auto":
        if model_type not in MODEL_KINDS:
            raise ValueError(f"--model_type {model_type!r}: choose auto or one of {MODEL_KINDS}")
        return model_type
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "ForMaskedLM" in archs:
        return "mlm"
    if "ForCausalLM" in archs or "LMHeadModel" in archs or getattr(config, "is_decoder", False):
        return "causal"
    if not archs:  # e.g. a config read from a GGUF file: decide by the model family
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )

        family = getattr(config, "model_type", "")
        if family in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            return "mlm"
        if family in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            return "causal"
    return "encoder"


class BlackBox:
    """A frozen language model that scores soft prompts z on tokenised task examples."""

    def __init__(self, cfg: BlackBoxConfig):
        from transformers import (
            AutoConfig,
            AutoModel,
            AutoModelForCausalLM,
            AutoModelForMaskedLM,
            AutoTokenizer,
        )

        if cfg.cat_or_add not in ("add", "cat"):
            raise ValueError(f"--cat_or_add {cfg.cat_or_add!r}: choose add or cat")
        if cfg.prompt_at not in PROMPT_PLACES:
            raise ValueError(f"--prompt_at {cfg.prompt_at!r}: choose one of {', '.join(PROMPT_PLACES)}")
        if cfg.dtype not in DTYPES:
            raise ValueError(f"--dtype {cfg.dtype!r}: choose one of {list(DTYPES)}")
        self.cfg = cfg
        self.task = cfg.task
        self.device = torch.device(check_device(cfg.device))
        path = resolve_model_path(cfg.model_name)
        extra = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        self.tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        config = AutoConfig.from_pretrained(path, **extra)
        self.kind = detect_kind(config, cfg.model_type)
        loader = {"mlm": AutoModelForMaskedLM, "causal": AutoModelForCausalLM, "encoder": AutoModel}[self.kind]
        self.model = loader.from_pretrained(path, dtype=DTYPES[cfg.dtype], **extra).to(self.device).eval()
        self.model.requires_grad_(False)
        if self.kind == "mlm":
            self.body = self.model.base_model
            self.head = getattr(self.model, "lm_head", None) or getattr(self.model, "cls", None)
        elif self.kind == "causal":
            self.body, self.head = self.model.base_model, self.model.get_output_embeddings()
        else:
            self.body, self.head = self.model, None

        embedding = self.model.get_input_embeddings()
        self.hidden = embedding.weight.shape[1]
        self.vocab_size = embedding.weight.shape[0]
        # float64 on the CPU: every site, whatever its device and dtype, gets the same figure
        self.embedding_std = float(embedding.weight.detach().to("cpu", torch.float64).std())
        self.prompt_at, hooked = self._hook_place(cfg.prompt_at)
        self._active: tuple[torch.Tensor, torch.Tensor] | None = None  # (prompt positions, prompts) of a forward
        self.examples_scored = 0  # (candidate, example) pairs through the model: the cost of a search
        hooked.register_forward_hook(self._inject)
        self.dim: int | None = None
        self.scale, self.fingerprint = None, ""
        if cfg.intrinsic_dim is not None:
            self.use_dim(cfg.intrinsic_dim)

        self.special_ids = set(self.tokenizer.all_special_ids)
        self.placeholder_ids = [(PLACEHOLDER_START + i) % self.vocab_size for i in range(cfg.n_prompt_tokens)]
        self.max_length = self._max_length(config)
        self.label_ids = self._label_ids() if self.kind != "encoder" else None
        self.label_embeddings = self._label_embeddings() if self.kind == "encoder" else None
        log.info("loaded %s (%s, hidden %d, vocab %d) on %s; prompt added at the %s output",
                 cfg.model_name, self.kind, self.hidden, self.vocab_size, self.device, self.prompt_at)  # fmt: skip

    def _hook_place(self, prompt_at: str) -> tuple[str, torch.nn.Module]:
        """The resolved ``--prompt_at`` and the module whose output receives the prompt."""
        place = AUTO_PLACE[self.kind] if prompt_at == "auto" else prompt_at
        if place == "word_embeddings":
            return place, self.model.get_input_embeddings()
        block = getattr(self.body, "embeddings", None)
        if not isinstance(block, torch.nn.Module):
            raise ValueError(
                f"--prompt_at embeddings: {self.cfg.model_name} ({type(self.body).__name__}) has no embeddings "
                "block; use --prompt_at word_embeddings"
            )
        return place, block

    def use_dim(self, dim: int) -> None:
        """Build the projection A for z of dimension ``dim`` (the server's intrinsic_dim), with BBT's scale.

        The scale is rounded to 4 significant digits so that sites whose float arithmetic differs in the
        last bits (other devices, thread counts or dtypes) still build, and fingerprint, the same A."""
        if dim == self.dim:
            return
        cfg = self.cfg
        self.dim = int(dim)
        self.scale = float(f"{projection_scale(self.embedding_std, self.dim, cfg.sigma, cfg.alpha):.4g}")
        a = projection(cfg.seed, self.dim, cfg.n_prompt_tokens * self.hidden, self.scale)
        self.fingerprint = projection_fingerprint(self._projection_key(), a)
        self.projection = torch.from_numpy(a).to(self.device)

    def _projection_key(self) -> dict:
        """What makes A and how it enters the model. The model enters by its hidden size and the standard
        deviation of its embeddings (in the scale), not by its path, which may differ from site to site."""
        return {"seed": self.cfg.seed, "intrinsic_dim": self.dim, "n_prompt_tokens": self.cfg.n_prompt_tokens,
                "hidden_size": self.hidden, "projection_scale": self.scale, "prompt_at": self.prompt_at,
                "cat_or_add": self.cfg.cat_or_add}  # fmt: skip

    def description(self) -> dict:
        """Enough to turn z into the soft prompt and use it without the federation, and the fingerprint
        that every site of a run must share."""
        return {**self._projection_key(), "model_name": self.cfg.model_name, "model_type": self.kind,
                "task_name": self.task.name, "verbalizer_space": int(self.cfg.verbalizer_space),
                "label_scale": self.cfg.label_scale, "gguf_file": self.cfg.gguf_file,
                "fingerprint": self.fingerprint}  # fmt: skip

    # ------------------------------------------------------------------------------------------
    # Tokenisation

    def _max_length(self, config) -> int:
        positions = getattr(config, "max_position_embeddings", None) or 512
        if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
            positions -= 2  # their position ids start after the padding index
        tok_max = self.tokenizer.model_max_length
        return int(min(positions, tok_max if tok_max and tok_max < 1e6 else positions))

    def _template(self) -> str:
        if self.kind == "mlm":
            return self.task.template
        if self.kind == "causal":
            return self.task.causal_template
        return "{prompt} " + " ".join(f"{{text{i}}}" for i in range(len(self.task.text_fields)))

    def _special_wrap(self) -> tuple[list[int], list[int]]:
        """The special ids the tokenizer puts before and after a text (none after, for causal LMs)."""
        plain = self.tokenizer("x", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("x")["input_ids"]
        start = next(i for i in range(len(full)) if full[i : i + len(plain)] == plain)
        after = full[start + len(plain) :] if self.kind != "causal" else []
        return full[:start], after

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def _plan(self) -> list[tuple[str, str]]:
        """The template as (slot, content) pieces: ("lit", text) or a slot with the spaces before it."""
        # A literal's trailing space belongs to the next piece: BPE tokenisers fold it into the next word.
        carried, plan = "", []
        for piece in (p for p in _SLOT.split(self._template()) if p):
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
        plan = self._plan()
        head, tail = self._special_wrap()
        literal_ids = {c: self._ids([c])[0] for s, c in plan if s == "lit" and c}
        field_ids = {  # slot -> token ids of that text field for every example
            slot: self._ids([prefix + t[int(slot[5:-1])] for t in split.texts])
            for slot, prefix in plan
            if slot.startswith("{text")
        }
        mask_id = self.tokenizer.mask_token_id
        if self.kind == "mlm" and mask_id is None:
            raise ValueError(f"--model_name {self.cfg.model_name}: the tokenizer has no mask token")
        fixed = len(head) + len(tail) + sum(len(literal_ids[c]) for s, c in plan if s == "lit" and c)
        fixed += self.cfg.n_prompt_tokens
        fixed += 1 if self.kind == "mlm" else 0  # the mask
        room = self.max_length - fixed
        if room < len(field_ids):
            raise ValueError(
                f"--n_prompt_tokens {self.cfg.n_prompt_tokens} leaves no room for the text: the model takes "
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
            answer=torch.tensor([answers[i] for i in order]),
            labels=torch.as_tensor(np.asarray(split.labels)[order], dtype=torch.long),
        )

    def perturb(self, batch: Batch, rate: float, rng: np.random.Generator, scope: str = "text") -> Batch:
        """A copy with each text token (``scope='all'``: each attended token) replaced by a random
        vocabulary id with probability ``rate``. ``all`` is the public example's choice; it also hits
        the placeholders, the special tokens and the mask itself."""
        if scope not in ("text", "all"):
            raise ValueError(f"--perturb_scope {scope!r}: choose text or all")
        where = (batch.text if scope == "text" else batch.attention).numpy()
        hit = where & (rng.random(where.shape) < rate)
        ids = batch.ids.numpy().copy()
        ids[hit] = rng.integers(0, self.vocab_size, size=int(hit.sum()))
        return replace(batch, ids=torch.from_numpy(ids))

    def _label_ids(self) -> list[int]:
        space = self.kind == "causal" or self.cfg.verbalizer_space
        ids = []
        for word in self.task.verbalizer:
            tokens = self._ids([(" " if space else "") + word])[0]
            if not tokens:
                raise ValueError(f"label word {word!r} is empty for this tokenizer")
            ids.append(tokens[0])
        if len(set(ids)) < len(ids):
            raise ValueError(f"label words {self.task.verbalizer} share a first token for this tokenizer")
        return ids

    @torch.inference_mode()
    def _label_embeddings(self) -> torch.Tensor:
        enc = self.tokenizer(list(self.task.label_sentences), return_tensors="pt", padding=True).to(self.device)
        hidden = self.body(**enc).last_hidden_state.float()
        return F.normalize(_mean_pool(hidden, enc["attention_mask"].bool()), dim=-1)

    # ------------------------------------------------------------------------------------------
    # Scoring

    def _inject(self, module, inputs, output):
        if self._active is None:
            return None
        positions, prompts = self._active  # (B, L) placeholder positions, (B, L, H) each row's prompt
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        prompts = prompts.to(output.dtype)
        if self.cfg.cat_or_add == "add":
            output[rows, positions] += prompts
        else:
            output[rows, positions] = prompts
        return output

    def prompts(self, z: np.ndarray) -> torch.Tensor:
        """Soft prompts (P, L, H) for a batch of z (P, d)."""
        z = torch.as_tensor(np.atleast_2d(z), dtype=torch.float32, device=self.device)
        if self.dim is None:
            raise RuntimeError("the projection is not built yet: call use_dim with the server's intrinsic_dim")
        if z.shape[1] != self.dim:
            raise ValueError(f"z has {z.shape[1]} dimensions, the projection takes --intrinsic_dim {self.dim}")
        return (z @ self.projection).view(len(z), self.cfg.n_prompt_tokens, self.hidden)

    @torch.inference_mode()
    def class_scores(self, z: np.ndarray, batch: Batch) -> torch.Tensor:
        """Class scores (P, n, C) of every candidate on every example, in as few forwards as allowed."""
        prompts = self.prompts(z)
        p, n = prompts.shape[0], len(batch)
        self.examples_scored += p * n
        lengths = batch.attention.sum(1)
        out, start, rows = [], 0, p * n
        while start < rows:
            # rows run candidate-major over examples sorted longest first: the chunk's first row is its longest
            t = int(lengths[start % n])
            size = max(1, min(self.cfg.batch_size, self.cfg.token_budget // t, rows - start))
            r = torch.arange(start, start + size)
            out.append(self._forward(batch, r % n, prompts[r // n]))
            start += size
        return torch.cat(out).view(p, n, -1)

    def _forward(self, batch: Batch, ex: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        t = int(batch.attention[ex].sum(1).max())
        dev = self.device
        ids, attention = batch.ids[ex, :t].to(dev), batch.attention[ex, :t].to(dev)
        self._active = (batch.prompt_positions[ex].to(dev), prompts)
        try:
            hidden = self.body(input_ids=ids, attention_mask=attention.long()).last_hidden_state
        finally:
            self._active = None
        if self.kind == "encoder":
            pooled = _mean_pool(hidden.float(), attention & ~batch.prompt[ex, :t].to(dev))
            return self.cfg.label_scale * F.normalize(pooled, dim=-1) @ self.label_embeddings.T
        h = hidden[torch.arange(len(ex), device=dev), batch.answer[ex].to(dev)]
        return self.head(h)[:, self.label_ids].float()

    def losses(self, scores: torch.Tensor, labels: torch.Tensor, loss_type: str | None = None) -> np.ndarray:
        """Loss per candidate (P,) from scores (P, n, C): ce, hinge (margin 2) or perf (-metric)."""
        loss_type = loss_type or self.cfg.loss_type
        p, n, c = scores.shape
        flat, target = scores.reshape(p * n, c), labels.to(scores.device).repeat(p)
        if loss_type == "ce":
            loss = F.cross_entropy(flat, target, reduction="none").view(p, n).mean(1)
        elif loss_type == "hinge":
            loss = F.multi_margin_loss(flat, target, margin=2.0, reduction="none").view(p, n).mean(1)
        elif loss_type == "perf":
            return -self.metric(scores, labels)
        else:
            raise ValueError(f"--loss_type {loss_type!r}: choose ce, hinge or perf")
        return loss.double().cpu().numpy()

    def metric(self, scores: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        """Accuracy, or F1 of class 1 for tasks scored by F1, per candidate (P,)."""
        pred = scores.argmax(-1).cpu()
        truth = labels.cpu().expand_as(pred)
        if self.task.metric == "f1":
            tp = ((pred == 1) & (truth == 1)).sum(1).double()
            fp = ((pred == 1) & (truth != 1)).sum(1).double()
            fn = ((pred != 1) & (truth == 1)).sum(1).double()
            return (2 * tp / (2 * tp + fp + fn).clamp(min=1)).numpy()
        return (pred == truth).double().mean(1).numpy()

    def evaluate(self, z: np.ndarray, batch: Batch) -> tuple[float, float]:
        """(loss, metric) of one prompt z on a batch of examples."""
        scores = self.class_scores(np.atleast_2d(z), batch)
        return float(self.losses(scores, batch.labels)[0]), float(self.metric(scores, batch.labels)[0])

    def fitness(self, z: np.ndarray, clean: Batch, perturbed: Batch | None = None) -> np.ndarray:
        """Lower is better: loss on the clean shard, divided by the loss on its perturbed copy if given.

        Clean and perturbed examples of every candidate go through the model together."""
        if perturbed is None:
            return self.losses(self.class_scores(z, clean), clean.labels)
        n = len(clean)
        scores = self.class_scores(z, clean.concat(perturbed))
        loss_clean = self.losses(scores[:, :n], clean.labels)
        loss_pert = self.losses(scores[:, n:], perturbed.labels)
        if self.cfg.loss_type == "perf":  # -accuracy: a ratio of negatives is meaningless, use the gap
            return loss_clean - loss_pert
        return loss_clean / np.maximum(loss_pert, 1e-12)


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


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
