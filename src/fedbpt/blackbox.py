"""The frozen model as a black box: prompt z -> class scores, by forward passes only.

A fixed projection A turns z (d floats) into L soft-prompt vectors; a forward hook adds them to (``add``)
or puts them in place of (``cat``) the hidden states of L placeholder tokens that sit in the token ids
themselves. Where the hook sits follows BBT and the paper: on BERT/RoBERTa-family models (masked LMs and
sentence encoders) at the output of the embeddings block (word + position + type embeddings, after its
LayerNorm); on decoder-only models, which have no normalisation there, at the input embeddings. No
Hugging Face modeling code is copied or patched. Every candidate of a generation and every example go
through the model in forwards planned by ``encoding.Batch.chunks``; only the answer position goes through
the LM head, and scores and losses stay on the device until a generation's fitness is complete.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data import Split
from .encoding import Batch, Encoder
from .search import projection, projection_fingerprint, projection_scale, relative_scale
from .tasks import Task

log = logging.getLogger(__name__)

MODEL_KINDS = ("mlm", "causal", "encoder")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Where the prompt is added: "embeddings", the embeddings block's output (BBT's place), or
# "word_embeddings", the input-embedding module (the only place a decoder-only model offers).
PROMPT_PLACES = ("auto", "embeddings", "word_embeddings")
PROMPT_SCALES = ("bbt", "relative")
# The text around which the placeholder rows are measured for --prompt_scale relative: any fixed text does
# (a row's value at the place depends on its token and position, not on the text), and every site uses it.
REFERENCE_TEXT = "a"
# What "auto" means for each kind of model. Masked LMs: the paper's and BBT's place. Sentence encoders: the
# input embeddings, measured on all-MiniLM-L6-v2 (README, Results): there the search reached a lower pooled
# dev loss on SST-2 in all 3 seeds, for FedBPT and FedAvg-BBT alike (16 rounds), and on Yelp polarity
# (0.527 against 0.566). There the same prompt weighs about 7 times more; the price seen was a bumpier
# start (on Yelp the dev loss rose for 2 rounds before falling), which selection on dev absorbs.
AUTO_PLACE = {"mlm": "embeddings", "encoder": "word_embeddings", "causal": "word_embeddings"}
# The fixed cost of one forward pass, in padded tokens: a cut between two forwards must save more padding
# than this. On this project's 2-core CPU a forward of all-MiniLM-L6-v2 costs about the same per token from
# 100 to 8,000 tokens, so cuts are nearly free there. The CUDA figure is an estimate, not a measurement (no
# GPU here): it keeps the README's generations at under 5% padding.
FORWARD_OVERHEAD = {"cpu": 16, "cuda": 256}
CPU_TOKEN_BUDGET = 4096  # tokens per forward on the CPU: larger gains nothing there (see the README)
CPU_BATCH_SIZE = 128
CUDA_BATCH_SIZE = 4096  # rows per forward on CUDA: in effect, the token budget decides


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
    dtype: str = "auto"  # auto: float16 on CUDA, float32 on the CPU (see resolve_dtype)
    sigma: float = 1.0  # sigma0 of the projection scale
    alpha: float = 1.0
    loss_type: str = "ce"
    verbalizer_space: bool = False  # masked LMs: "Ġgreat" instead of the public example's "great"
    batch_size: int | str = "auto"  # most sequences in one forward
    token_budget: int | str = "auto"  # most tokens (sequences x padded length) in one forward
    label_scale: float = 20.0  # sentence encoders: class score = cosine similarity x this
    gguf_file: str | None = None
    prompt_at: str = "auto"  # one of PROMPT_PLACES
    prompt_scale: str = "bbt"  # one of PROMPT_SCALES
    rho: float = 1.0  # prompt_scale relative: a first-round prompt's share of a placeholder row's norm


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


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: float16 on CUDA, float32 elsewhere. Float32 on CUDA computes its matrix products in TF32.

    Why float16 and not bfloat16: CMA-ES uses only the ranking of a generation's candidates, and their
    fitnesses differ by about 1% (mean spread 0.010 on all-MiniLM-L6-v2 at the README's shapes). bfloat16
    keeps 8 significant bits, and its fitness error (up to 0.003) reorders them: Spearman 0.915 on average
    against float32, 0.6 at worst, the same best candidate in 80% of 20 generations. float16's 11
    kept every ranking (1.000, benchmarks/precision.py). Both run at the same speed on tensor cores;
    float16's narrower range is guarded in ``fitness`` and ``evaluate``."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose auto or one of {', '.join(DTYPES)}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if dtype == "auto":
            return torch.float16
    return DTYPES["float32" if dtype == "auto" else dtype]


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
        if cfg.prompt_scale not in PROMPT_SCALES:
            raise ValueError(f"--prompt_scale {cfg.prompt_scale!r}: choose one of {', '.join(PROMPT_SCALES)}")
        self.cfg = cfg
        self.task = cfg.task
        self.device = torch.device(check_device(cfg.device))
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        path = resolve_model_path(cfg.model_name)
        extra = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        self.tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        config = AutoConfig.from_pretrained(path, **extra)
        self.kind = detect_kind(config, cfg.model_type)
        loader = {"mlm": AutoModelForMaskedLM, "causal": AutoModelForCausalLM, "encoder": AutoModel}[self.kind]
        try:
            model = loader.from_pretrained(path, dtype=self.dtype, **extra)
        except ValueError as e:  # transformers: "Unrecognized configuration class ... for this kind of AutoModel"
            if "Unrecognized configuration class" not in str(e):
                raise
            what = {"mlm": "masked-LM", "causal": "causal-LM", "encoder": "base model"}[self.kind]
            raise ValueError(
                f"--model_type {self.kind}: {cfg.model_name} ({getattr(config, 'model_type', '?')}) has no {what} "
                f"class in transformers; give --model_type {' or '.join(k for k in MODEL_KINDS if k != self.kind)}"
            ) from None
        self.model = model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.body = self.model if self.kind == "encoder" else self.model.base_model
        # causal LMs: the body's last hidden state at the answer position goes through the output embeddings.
        # Masked LMs: every family builds its head its own way (lm_head, cls, predictions, DistilBERT's
        # vocab_transform/vocab_layer_norm/vocab_projector, ELECTRA's generator_predictions/generator_lm_head,
        # ModernBERT's head/decoder), so the model's own forward runs, with the body's output narrowed to the
        # answer position (``_narrow``): its logits, computed for that one position only.
        self.head = self.model.get_output_embeddings() if self.kind == "causal" else None
        self._answer: torch.Tensor | None = None  # (B,) answer positions of a masked LM's forward
        if self.kind == "mlm":
            self.body.register_forward_hook(self._narrow)

        embedding = self.model.get_input_embeddings()
        self.hidden = embedding.weight.shape[1]
        self.vocab_size = embedding.weight.shape[0]
        # float64 on the CPU: every site, whatever its device and dtype, gets the same figure
        self.embedding_std = float(embedding.weight.detach().to("cpu", torch.float64).std())
        self.prompt_at, self.place = self._hook_place(cfg.prompt_at)  # the module whose output gets A z
        self._active: tuple[torch.Tensor, torch.Tensor] | None = None  # (prompt positions, prompts) of a forward
        self.place.register_forward_hook(self._inject)
        self.dim: int | None = None
        self.scale, self.fingerprint = None, ""
        self._row_norm: float | None = None  # placeholder rows' mean norm at the place (--prompt_scale relative)
        self.batch_size, self.token_budget = self._chunk_limits(config)
        self.overhead = FORWARD_OVERHEAD["cuda" if self.device.type == "cuda" else "cpu"]
        # (candidate, example) rows through the model: the cost of a search; and the tokens they took
        self.examples_scored = self.padded_tokens = self.attended_tokens = self.forwards = 0
        self.nonfinite_candidates = 0  # candidates given the worst fitness of their generation (see fitness)

        self.encoder = Encoder(self.tokenizer, self.task, self.kind, cfg.n_prompt_tokens, self._max_length(config),
                               self.vocab_size, cfg.model_name)  # fmt: skip
        self.placeholder_ids = self.encoder.placeholder_ids
        self.max_length = self.encoder.max_length
        self.label_ids = self.encoder.label_ids(cfg.verbalizer_space) if self.kind != "encoder" else None
        self._label_index = torch.tensor(self.label_ids or [], dtype=torch.long, device=self.device)
        self.label_embeddings = self._label_embeddings() if self.kind == "encoder" else None
        if self.kind == "mlm":
            self._check_head()
        if cfg.intrinsic_dim is not None:
            self.use_dim(cfg.intrinsic_dim)
        log.info("loaded %s (%s, hidden %d, vocab %d) on %s in %s; prompt added at the %s output; forwards of at "
                 "most %d rows and %d tokens", cfg.model_name, self.kind, self.hidden, self.vocab_size, self.device,
                 str(self.dtype).removeprefix("torch."), self.prompt_at, self.batch_size,
                 self.token_budget)  # fmt: skip

    def _check_head(self) -> None:
        """A masked LM whose forward does not go through its base model, position by position, cannot be read
        at the answer position alone: say so at load time, with the flag that picks another reading."""
        if self.tokenizer.mask_token_id is None:
            raise ValueError(f"--model_name {self.cfg.model_name}: the tokenizer has no mask token (--model_type mlm)")
        ids = torch.tensor([self.encoder.special_wrap()[0] + [self.tokenizer.mask_token_id]], device=self.device)
        with torch.inference_mode():
            self._answer = torch.tensor([ids.shape[1] - 1], device=self.device)
            try:
                logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            finally:
                self._answer = None
        if tuple(logits.shape) != (1, 1, self.vocab_size):
            raise ValueError(
                f"--model_type mlm: {self.cfg.model_name} ({type(self.model).__name__}) gives logits of shape "
                f"{tuple(logits.shape)} when its body's output is cut to the answer position, not one row of "
                f"{self.vocab_size} vocabulary scores; use --model_type causal or encoder if it is one of those"
            )

    def _narrow(self, module, inputs, output):
        """Forward hook on a masked LM's body: only the answer position's hidden state goes on to the head."""
        if self._answer is None:
            return None
        hidden = output[0]
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), self._answer][:, None]
        if isinstance(output, tuple):
            return (picked, *output[1:])
        output["last_hidden_state"] = picked
        return output

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

    def _chunk_limits(self, config) -> tuple[int, int]:
        """``--batch_size`` and ``--token_budget``, with ``auto`` sized for the device.

        On CUDA the budget comes from the free memory: a tenth of it (several site processes may share the
        GPU) over a generous estimate of the activations one token holds in a forward (hidden and
        feed-forward states of a layer, twice over), between 4,096 and 131,072 tokens."""
        cuda = self.device.type == "cuda"
        batch = self.cfg.batch_size if self.cfg.batch_size != "auto" else (CUDA_BATCH_SIZE if cuda else CPU_BATCH_SIZE)
        budget = self.cfg.token_budget
        if budget == "auto":
            if cuda:
                free, _ = torch.cuda.mem_get_info(self.device)
                width = 4 * self.hidden + (getattr(config, "intermediate_size", None) or 4 * self.hidden)
                per_token = 2 * width * torch.finfo(self.dtype).bits // 8
                budget = int(min(131072, max(4096, 2 ** int(np.log2(max(1, 0.1 * free / per_token))))))
            else:
                budget = CPU_TOKEN_BUDGET
        return int(batch), int(budget)

    def use_dim(self, dim: int) -> None:
        """Build the projection A for z of dimension ``dim`` (the server's intrinsic_dim), with BBT's scale.

        The scale is rounded to 4 significant digits so that sites whose float arithmetic differs in the
        last bits (other devices, thread counts or dtypes) still build, and fingerprint, the same A."""
        if dim == self.dim:
            return
        cfg = self.cfg
        self.dim = int(dim)
        if cfg.prompt_scale == "relative":
            scale = relative_scale(self.placeholder_norm(), self.dim, self.hidden, cfg.sigma, cfg.rho)
        else:
            scale = projection_scale(self.embedding_std, self.dim, cfg.sigma, cfg.alpha)
        self.scale = float(f"{scale:.4g}")
        a = projection(cfg.seed, self.dim, cfg.n_prompt_tokens * self.hidden, self.scale)
        self.fingerprint = projection_fingerprint(self._projection_key(), a)
        self.projection = torch.from_numpy(a).to(self.device)

    @torch.inference_mode()
    def placeholder_norm(self) -> float:
        """The mean norm of the rows that A z is added to (or replaces), at the place it enters, with no prompt:
        the task's template around ``REFERENCE_TEXT``, one forward of the model's body, in float64 on the host,
        rounded to 4 significant digits (so that every site gets the same figure). Measured once."""
        if self._row_norm is None:
            batch = self.encode(Split([(REFERENCE_TEXT,) * len(self.task.text_fields)], np.zeros(1)))
            rows = []

            def keep(module, inputs, output):
                rows.append(output[0, batch.prompt_positions[0]].detach().to("cpu", torch.float64))

            handle = self.place.register_forward_hook(keep)
            try:
                self.body(input_ids=batch.ids, attention_mask=batch.attention.long())
            finally:
                handle.remove()
            self._row_norm = float(f"{float(rows[0].norm(dim=-1).mean()):.4g}")
        return self._row_norm

    def _projection_key(self) -> dict:
        """What makes A and how it enters the model. The model enters by its hidden size and the standard
        deviation of its embeddings (in the scale), not by its path, which may differ from site to site.
        ``prompt_scale`` is named only where it is not BBT's (the fingerprints of BBT's scale stay as they were)."""
        key = {"seed": self.cfg.seed, "intrinsic_dim": self.dim, "n_prompt_tokens": self.cfg.n_prompt_tokens,
               "hidden_size": self.hidden, "projection_scale": self.scale, "prompt_at": self.prompt_at,
               "cat_or_add": self.cfg.cat_or_add}  # fmt: skip
        if self.cfg.prompt_scale != "bbt":
            key.update(prompt_scale=self.cfg.prompt_scale, rho=self.cfg.rho)
        return key

    def description(self) -> dict:
        """Enough to turn z into the soft prompt and use it without the federation, and the fingerprint
        that every site of a run must share."""
        return {**self._projection_key(), "model_name": self.cfg.model_name, "model_type": self.kind,
                "task_name": self.task.name, "verbalizer_space": int(self.cfg.verbalizer_space),
                "label_scale": self.cfg.label_scale, "gguf_file": self.cfg.gguf_file,
                "fingerprint": self.fingerprint}  # fmt: skip

    def _max_length(self, config) -> int:
        positions = getattr(config, "max_position_embeddings", None) or 512
        if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
            positions -= 2  # their position ids start after the padding index
        tok_max = self.tokenizer.model_max_length
        return int(min(positions, tok_max if tok_max and tok_max < 1e6 else positions))

    # ------------------------------------------------------------------------------------------
    # Tokenisation (encoding.py), on this model's device

    def encode(self, split: Split) -> Batch:
        """Token ids of the task's template around each example, on the model's device."""
        return self.encoder.encode(split).to(self.device)

    def perturb(self, batch: Batch, rate: float, rng: np.random.Generator, scope: str = "text") -> Batch:
        """A copy with random tokens in place of text tokens (see ``Encoder.perturb``)."""
        return self.encoder.perturb(batch, rate, rng, scope)

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
        """Class scores (P, n, C) of every candidate on every example, on the device, in the forwards that
        ``batch.chunks`` plans (rows of nearly equal length, within the token budget)."""
        if batch.device != self.device:
            batch = batch.to(self.device)
        prompts = self.prompts(z)
        p, n = prompts.shape[0], len(batch)
        self.examples_scored += p * n
        out = None
        for chunk in batch.chunks(p, self.batch_size, self.token_budget, self.overhead):
            self.forwards += 1
            self.padded_tokens += len(chunk) * chunk.length
            self.attended_tokens += chunk.attended
            scores = self._forward(batch, chunk.examples, prompts[chunk.candidates], chunk.length)
            if out is None:
                out = scores.new_empty(p, n, scores.shape[-1])
            out[chunk.candidates, chunk.examples] = scores
        return out

    def overflow_error(self) -> FloatingPointError:
        """What a site says when the prompt it received gives non-finite class scores: every candidate of
        the round is drawn around that prompt, so the site cannot search from it in this dtype."""
        if self.dtype == torch.float16:
            return FloatingPointError(
                f"--dtype float16{' (what auto takes on CUDA)' if self.cfg.dtype == 'auto' else ''}: "
                f"{self.cfg.model_name}'s activations overflow float16's range (non-finite class scores); "
                "use --dtype bfloat16 or float32"
            )
        dtype = str(self.dtype).removeprefix("torch.")
        return FloatingPointError(f"--dtype {dtype}: {self.cfg.model_name} gives non-finite class scores for the "
                                  "received prompt")  # fmt: skip

    def _forward(self, batch: Batch, ex: torch.Tensor, prompts: torch.Tensor, length: int) -> torch.Tensor:
        """Class scores (B, C) of rows ``ex`` of the batch, each with its prompt, cut to ``length`` tokens."""
        ids, attention = batch.ids[ex, :length], batch.attention[ex, :length]
        self._active = (batch.prompt_positions[ex], prompts)
        try:
            if self.kind == "mlm":
                self._answer = batch.answer[ex]
                logits = self.model(input_ids=ids, attention_mask=attention.long()).logits
                return logits[:, 0, self._label_index].float()
            hidden = self.body(input_ids=ids, attention_mask=attention.long()).last_hidden_state
        finally:
            self._active = self._answer = None
        if self.kind == "encoder":
            pooled = _mean_pool(hidden.float(), attention & ~batch.prompt[ex, :length])
            return self.cfg.label_scale * F.normalize(pooled, dim=-1) @ self.label_embeddings.T
        h = hidden[torch.arange(len(ex), device=ex.device), batch.answer[ex]]
        return self.head(h)[:, self._label_index].float()

    def loss_tensor(self, scores: torch.Tensor, labels: torch.Tensor, loss_type: str | None = None) -> torch.Tensor:
        """Loss per candidate (P,) from scores (P, n, C), on the scores' device: ce, hinge (margin 2), perf."""
        loss_type = loss_type or self.cfg.loss_type
        p, n, c = scores.shape
        flat, target = scores.reshape(p * n, c), labels.to(scores.device).repeat(p)
        if loss_type == "ce":
            return F.cross_entropy(flat, target, reduction="none").view(p, n).mean(1).double()
        if loss_type == "hinge":
            return F.multi_margin_loss(flat, target, margin=2.0, reduction="none").view(p, n).mean(1).double()
        if loss_type == "perf":
            return -self.metric_tensor(scores, labels)
        raise ValueError(f"--loss_type {loss_type!r}: choose ce, hinge or perf")

    def losses(self, scores: torch.Tensor, labels: torch.Tensor, loss_type: str | None = None) -> np.ndarray:
        """Loss per candidate (P,) from scores (P, n, C): ce, hinge (margin 2) or perf (-metric)."""
        return self.loss_tensor(scores, labels, loss_type).cpu().numpy()

    def metric_tensor(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Accuracy, or F1 of class 1 for tasks scored by F1, per candidate (P,), on the scores' device."""
        pred = scores.argmax(-1)
        truth = labels.to(pred.device).expand_as(pred)
        if self.task.metric == "f1":
            tp = ((pred == 1) & (truth == 1)).sum(1).double()
            fp = ((pred == 1) & (truth != 1)).sum(1).double()
            fn = ((pred != 1) & (truth == 1)).sum(1).double()
            return 2 * tp / (2 * tp + fp + fn).clamp(min=1)
        return (pred == truth).double().mean(1)

    def metric(self, scores: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        """Accuracy, or F1 of class 1 for tasks scored by F1, per candidate (P,)."""
        return self.metric_tensor(scores, labels).cpu().numpy()

    def evaluate(self, z: np.ndarray, batch: Batch) -> tuple[float, float]:
        """(loss, metric) of one prompt z on a batch of examples."""
        return self.evaluate_examples(z, batch)[:2]

    def evaluate_examples(self, z: np.ndarray, batch: Batch) -> tuple[float, float, np.ndarray]:
        """(loss, metric, each example's loss in the batch's row order) of one prompt z. The loss is the mean
        of the examples' losses, except for ``--loss_type perf`` on a task scored by F1, whose examples get
        no loss of their own (an empty array)."""
        scores = self.class_scores(np.atleast_2d(z), batch)
        finite = torch.isfinite(scores).all()
        per_example = self.example_losses(scores[0], batch.labels)
        head = torch.stack([self.loss_tensor(scores, batch.labels)[0], self.metric_tensor(scores, batch.labels)[0],
                            finite.double()])  # fmt: skip
        both = head if per_example is None else torch.cat([head, per_example])
        values = both.cpu().numpy()  # one copy to the host
        if not values[2]:
            raise self.overflow_error()
        return float(values[0]), float(values[1]), values[3:].copy()

    def example_losses(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Each example's loss (n,) from one prompt's scores (n, C), on the scores' device; None where the
        loss is not a mean over examples (perf on a task scored by F1)."""
        target = labels.to(scores.device)
        loss_type = self.cfg.loss_type
        if loss_type == "ce":
            return F.cross_entropy(scores, target, reduction="none").double()
        if loss_type == "hinge":
            return F.multi_margin_loss(scores, target, margin=2.0, reduction="none").double()
        if loss_type == "perf" and self.task.metric != "f1":
            return -(scores.argmax(-1) == target).double()
        return None

    def fitness(self, z: np.ndarray, rows: Batch, n_clean: int | None = None) -> np.ndarray:
        """Lower is better: the loss on the clean examples, divided by the loss on their perturbed copies
        when ``rows`` holds both (clean first: ``rows = clean.concat(perturbed)``, ``n_clean = len(clean)``).

        Every candidate's clean and perturbed rows go through the model together, and the generation's
        losses leave the device once, at the end. A candidate whose class scores are not finite (float16's
        range overflowed) gets the generation's worst fitness, and is counted in ``nonfinite_candidates``."""
        scores = self.class_scores(z, rows)
        if n_clean is None or n_clean == len(rows):
            values = self.loss_tensor(scores, rows.labels)
        else:
            clean = self.loss_tensor(scores[:, :n_clean], rows.labels[:n_clean])
            noisy = self.loss_tensor(scores[:, n_clean:], rows.labels[n_clean:])
            # perf is -accuracy: a ratio of negatives is meaningless, use the gap
            values = clean - noisy if self.cfg.loss_type == "perf" else clean / noisy.clamp(min=1e-12)
        finite = torch.isfinite(scores.flatten(1)).all(1)
        both = torch.stack([values, finite.double()]).cpu().numpy()  # one copy to the host
        values, ok = both[0], both[1].astype(bool)
        if not ok.all():
            self.nonfinite_candidates += int((~ok).sum())
            values[~ok] = values[ok].max() if ok.any() else np.inf
        return values


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
