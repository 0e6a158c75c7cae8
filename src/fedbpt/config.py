"""The site's flags: one definition for the client script, the standalone loop and job.py.

The flags of the published FedBPT example keep their names and meanings; ours are added beside them.
Validation here needs neither torch nor NVFlare, so a bad flag fails before any model loads.
"""

from __future__ import annotations

import argparse
import os
import shlex
from dataclasses import asdict, dataclass, fields

from .tasks import TASKS, get_task

DEFAULT_TASK = "sst2"
DEFAULT_MODEL = "roberta-large"
DEFAULT_PROMPT_TOKENS = 50
DEFAULT_K_SHOT = 16
DEFAULT_LOCAL_ITER = 8
DEFAULT_LOCAL_POPSIZE = 5
DEFAULT_NUM_USERS = 10
AUTO = "auto"
SITE_SLOT = "{site}"  # in --data_dir: replaced by the site's name


@dataclass
class ClientConfig:
    task_name: str = DEFAULT_TASK
    model_name: str = DEFAULT_MODEL
    n_prompt_tokens: int = DEFAULT_PROMPT_TOKENS
    intrinsic_dim: int | None = None  # None: the server's
    k_shot: int = DEFAULT_K_SHOT
    device: str = "auto"
    seed: int = 42
    loss_type: str = "ce"
    cat_or_add: str = "add"
    local_iter: int = DEFAULT_LOCAL_ITER
    local_popsize: int = DEFAULT_LOCAL_POPSIZE
    num_users: int = DEFAULT_NUM_USERS
    iid: int = 1
    alpha_dir: float = 1.0
    perturb: int = 1
    perturb_rate: float = 0.5
    perturb_scope: str = "text"
    eval_clients: str = "site-1"
    llama_causal: int = 0
    model_type: str = "auto"
    gguf_file: str | None = None
    data_dir: str | None = None
    sigma: float = 1.0
    alpha: float = 1.0
    batch_size: int | str = AUTO
    token_budget: int | str = AUTO
    dtype: str = AUTO
    verbalizer_space: int = 0
    random_stream: str = "per_site"
    label_scale: float = 20.0
    prompt_at: str = "auto"
    prompt_scale: str = "bbt"
    rho: float = 1.0

    @property
    def evaluators(self) -> list[str]:
        return [s.strip() for s in self.eval_clients.split(",") if s.strip()]

    def to_argv(self) -> list[str]:
        """The command-line flags that reproduce this config (what goes into ``app_config``)."""
        argv = []
        for k, v in asdict(self).items():
            if v is not None:
                argv += [f"--{k}", str(v)]
        return argv

    def to_app_config(self) -> str:
        return " ".join(shlex.quote(a) for a in self.to_argv())


_HELP = {
    "task_name": f"task: {', '.join(TASKS)}",
    "model_name": "Hugging Face hub id or local model directory (masked LM, causal LM or sentence encoder)",
    "n_prompt_tokens": "L, number of soft-prompt tokens",
    "intrinsic_dim": "d, dimension of the searched vector z (default: the server's intrinsic_dim)",
    "k_shot": "examples per class in the train pool, and as many again in the dev pool (all sites together)",
    "device": "cpu, cuda, cuda:N or auto",
    "seed": "job seed: data pools, site shards, projection and search streams derive from it",
    "loss_type": "ce, hinge (margin 2) or perf (-accuracy)",
    "cat_or_add": "add A z to the placeholder embeddings, or put it in their place (cat)",
    "local_iter": "local CMA-ES generations per round",
    "local_popsize": "candidates per local generation",
    "num_users": "sites the data is split over (named site-1..site-N); 1: each site uses all of its own data",
    "iid": "1: IID split; 0: Dirichlet(--alpha_dir) label skew",
    "alpha_dir": "Dirichlet concentration of the non-IID split",
    "perturb": "1: fitness = loss(clean) / loss(perturbed copy)",
    "perturb_rate": "probability that a token of the perturbed copy is replaced by a random one",
    "perturb_scope": "text: replace text tokens only; all: every attended token (the public example)",
    "eval_clients": "comma-separated sites that score the global prompt on the test split each round",
    "llama_causal": "published-example flag: decoder-only models are always read at the last position",
    "model_type": "auto (from the model config), mlm, causal or encoder",
    "gguf_file": "GGUF weights file inside --model_name (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)",
    "data_dir": "folder with train.*, dev.*|validation.*, test.* (.tsv/.csv/.jsonl, HF column names); "
    "{site} in it becomes the site's name",
    "sigma": "sigma0 in the projection scale alpha * std(embeddings) / (sqrt(d) * sigma0)",
    "alpha": "alpha in the projection scale",
    "batch_size": "most sequences in one forward pass (auto: 128 on the CPU; on CUDA the token budget decides)",
    "token_budget": "most tokens (sequences x padded length) in one forward pass (auto: sized for the device)",
    "dtype": "model weights: auto (float16 on CUDA, float32 on the CPU), float32, bfloat16 or float16",
    "verbalizer_space": "masked LMs: 1 reads the space-prefixed label word (e.g. 'Ġgreat'), 0 the bare one",
    "random_stream": "per_site: a search stream per (seed, site, round); shared: one search stream for every site "
    "and round, and a new perturbed copy each round (the public example)",
    "label_scale": "sentence encoders: class score = cosine similarity x this",
    "prompt_at": "where A z is added: embeddings (the embeddings block's output, BBT's place), word_embeddings "
    "(the input embeddings) or auto (embeddings, but word_embeddings for decoder-only models)",
    "prompt_scale": "bbt: the projection scale is alpha * std(embeddings) / (sqrt(d) * sigma0); relative: a "
    "first-round prompt moves each placeholder row by --rho of its norm where it enters (measured on the model)",
    "rho": "with --prompt_scale relative: a first-round prompt's share of a placeholder row's norm",
}

_CHOICES = {
    "task_name": list(TASKS),
    "loss_type": ["ce", "hinge", "perf"],
    "cat_or_add": ["add", "cat"],
    "iid": [0, 1],
    "perturb": [0, 1],
    "perturb_scope": ["text", "all"],
    "llama_causal": [0, 1],
    "model_type": ["auto", "mlm", "causal", "encoder"],
    "dtype": [AUTO, "float32", "bfloat16", "float16"],
    "verbalizer_space": [0, 1],
    "random_stream": ["per_site", "shared"],
    "prompt_at": ["auto", "embeddings", "word_embeddings"],
    "prompt_scale": ["bbt", "relative"],
}


def int_or_auto(value: str) -> int | str:
    """A flag value that is a whole number or ``auto``."""
    if value == AUTO:
        return AUTO
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="FedBPT site: federated black-box prompt tuning", exit_on_error=False)
    for f in fields(ClientConfig):
        kind = {"int": int, "int | None": int, "int | str": int_or_auto, "float": float}.get(str(f.type), str)
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=_HELP[f.name],
                            choices=_CHOICES.get(f.name))  # fmt: skip
    return parser


def parse_args(argv: list[str] | None = None) -> ClientConfig:
    """The site's flags; a bad one raises ValueError (or FileNotFoundError) with a message that names it."""
    try:
        args, unknown = build_parser().parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise ValueError(str(e)) from None
    if unknown:
        unknown_flags = " ".join(unknown)
        raise ValueError(f"unrecognized arguments in app_config: {unknown_flags} (see the flag table in docs/flags.md)")
    cfg = ClientConfig(**vars(args))
    validate(cfg)
    return cfg


def validate(cfg: ClientConfig) -> None:
    """Reject flag values that cannot work, naming the flag."""
    get_task(cfg.task_name)
    positive = ("n_prompt_tokens", "intrinsic_dim", "k_shot", "local_iter", "num_users", "batch_size", "token_budget")
    for name in positive:
        if getattr(cfg, name) not in (None, AUTO) and getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.local_popsize < 2:
        raise ValueError(f"--local_popsize must be >= 2 for CMA-ES, got {cfg.local_popsize}")
    if not 0.0 <= cfg.perturb_rate <= 1.0:
        raise ValueError(f"--perturb_rate must be in [0, 1], got {cfg.perturb_rate}")
    for name in ("alpha_dir", "sigma", "alpha", "label_scale", "rho"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(cfg, name)}")
    if cfg.data_dir is not None and SITE_SLOT not in cfg.data_dir and not os.path.isdir(cfg.data_dir):
        raise FileNotFoundError(f"--data_dir {cfg.data_dir!r}: no such directory")


def site_data_dir(data_dir: str | None, site: str) -> str | None:
    """``--data_dir`` for one site: ``{site}`` in it becomes the site's name (one job, each site's own folder)."""
    if data_dir is None or SITE_SLOT not in data_dir:
        return data_dir
    resolved = data_dir.replace(SITE_SLOT, site)
    if not os.path.isdir(resolved):
        raise FileNotFoundError(f"--data_dir {data_dir!r} is {resolved!r} for {site}: no such directory")
    return resolved
