"""Masked LMs of every family the README promises, read at the answer position as the model itself reads it.

Each family builds its head its own way (RoBERTa's ``lm_head``, BERT's ``cls``, ALBERT's ``predictions``,
DistilBERT's three vocab layers, ELECTRA's generator head, ModernBERT's head and decoder); the black box runs
the model's own forward with the body's output cut to the answer position. Tiny models built from each
family's config, with the tiny models' real tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_tokenizer
from fedbpt.blackbox import BlackBox, BlackBoxConfig
from fedbpt.data import load_split
from fedbpt.tasks import get_task

SST2 = get_task("sst2")
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
FAMILIES = {  # family: (config class, model class, config keys beyond the vocabulary and special ids)
    "bert": ("BertConfig", "BertForMaskedLM", SMALL),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", SMALL),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaForMaskedLM", SMALL),
    "distilbert": ("DistilBertConfig", "DistilBertForMaskedLM", dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64)),
    "albert": ("AlbertConfig", "AlbertForMaskedLM", dict(SMALL, embedding_size=16)),
    "electra": ("ElectraConfig", "ElectraForMaskedLM", dict(SMALL, embedding_size=16)),
    "deberta-v2": ("DebertaV2Config", "DebertaV2ForMaskedLM",
                   dict(SMALL, relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"])),
    "modernbert": ("ModernBertConfig", "ModernBertForMaskedLM", dict(SMALL, global_attn_every_n_layers=2,
                                                                     local_attention=16)),
}  # fmt: skip


def build(family: str, out: Path) -> Path:
    """A 2-layer model of ``family``, initialised wide enough (0.5) that its answers move with the prompt."""
    import transformers

    config_name, model_name, keys = FAMILIES[family]
    tokenizer = tiny_tokenizer()
    special = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("pad", "bos", "eos", "cls", "sep")}
    config = getattr(transformers, config_name)(vocab_size=len(tokenizer), max_position_embeddings=130,
                                                initializer_range=0.5, architectures=[model_name], **special,
                                                **keys)  # fmt: skip
    torch.manual_seed(0)
    getattr(transformers, model_name)(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def examples(sst2_dir):
    return load_split(SST2, "dev", str(sst2_dir)).subset(np.arange(12))


@pytest.mark.parametrize("family", FAMILIES)
def test_class_scores_are_the_models_own_logits_at_the_mask(family, examples, tmp_path):
    bb = BlackBox(BlackBoxConfig(model_name=str(build(family, tmp_path / family)), task=SST2, n_prompt_tokens=5,
                                 intrinsic_dim=16, seed=3, batch_size=5))  # fmt: skip
    assert bb.kind == "mlm" and type(bb.model).__name__ == FAMILIES[family][1]
    batch = bb.encode(examples)
    scores = bb.class_scores(np.zeros((1, 16)), batch)[0]  # in forwards of at most 5 rows, cut to their length
    with torch.inference_mode():  # the whole model, every position through its own head, all rows padded
        logits = bb.model(input_ids=batch.ids, attention_mask=batch.attention.long()).logits
    own = logits[torch.arange(len(batch)), batch.answer][:, bb.label_ids]
    assert scores.shape == own.shape == (12, 2)
    torch.testing.assert_close(scores, own.float(), atol=1e-4, rtol=0)
    # and the prompt reaches the model: a prompt as large as the embeddings block's output moves the scores
    moved = bb.class_scores(np.random.default_rng(0).normal(size=(1, 16)) * 30, batch)[0]
    assert (moved - scores).abs().max() > 1e-2


def test_a_model_without_a_masked_lm_class_names_the_model_type_flag(tiny_causal):
    with pytest.raises(ValueError, match=r"^--model_type mlm: .* has no masked-LM class"):
        BlackBox(BlackBoxConfig(model_name=str(tiny_causal), task=SST2, n_prompt_tokens=5, intrinsic_dim=16,
                                model_type="mlm"))  # fmt: skip


def test_a_masked_lm_whose_tokenizer_has_no_mask_token_names_the_model(tmp_path):
    from transformers import AutoTokenizer

    folder = build("bert", tmp_path / "bert")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.mask_token = None
    tokenizer.save_pretrained(folder)
    with pytest.raises(ValueError, match=rf"^--model_name {folder}: the tokenizer has no mask token"):
        BlackBox(BlackBoxConfig(model_name=str(folder), task=SST2, n_prompt_tokens=5, intrinsic_dim=16))
