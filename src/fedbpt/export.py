"""Export a run's prompt for use with plain Hugging Face ``transformers``, as a safetensors file.

    PYTHONPATH=src python -m fedbpt.export --prompt RUN_DIR/best_prompt.npz --out prompt.safetensors

Tensors: ``soft_prompt`` (L x H, the rows fedbpt adds), ``placeholder_ids`` (L), ``template_ids`` (the
token ids of the task's template around an example, with -1 where the first text goes and -2 where the
second goes), and the read-out: ``label_ids`` (masked and causal LMs: the label words' token ids) or
``label_embeddings`` (sentence encoders: the normalised label sentences, C x H). The metadata says where
the rows enter (``prompt_at``, ``prompt_start``, ``cat_or_add``), how each text is tokenised
(``text_prefixes``), the model and the label words. The README has a snippet that uses it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from .blackbox import BlackBox
from .data import Split
from .prompt_file import PromptFile, PromptFileError, one_line, open_blackbox, read_prompt

PROG = "fedbpt.export"
FORMAT = "fedbpt-prompt/1"
PROBE = "great"  # a word every tokenizer keeps whole: the text slot of the probe example


def template(bb: BlackBox) -> tuple[list[int], list[str], int]:
    """(template ids with -k for text k, each text's prefix, position of the first prompt row), read off
    BlackBox's own encoding of a probe example, so that the export tokenises as the search did."""
    fields = len(bb.task.text_fields)
    batch = bb.encode(Split(texts=[(PROBE,) * fields], labels=np.zeros(1)))
    n = int(batch.attention[0].sum())
    ids, text, prompt = batch.ids[0, :n].tolist(), batch.text[0, :n].tolist(), batch.prompt[0, :n]
    at = prompt.nonzero()[:, 0]
    start, length = int(at[0]), bb.cfg.n_prompt_tokens
    if at.tolist() != list(range(start, start + length)):
        raise RuntimeError("the prompt rows are not contiguous in the template: fedbpt.export cannot describe it")
    out, runs, i = [], [], 0
    while i < n:
        if not text[i]:
            out.append(ids[i])
            i += 1
            continue
        j = i
        while j < n and text[j]:
            j += 1
        runs.append(ids[i:j])
        out.append(-len(runs))
        i = j
    if len(runs) != fields:
        raise RuntimeError(f"found {len(runs)} text slots in the template of task {bb.task.name}, expected {fields}")
    prefixes = []
    for run in runs:
        prefix = next((p for p in (" ", "") if bb.tokenizer(p + PROBE, add_special_tokens=False)["input_ids"] == run),
                      None)  # fmt: skip
        if prefix is None:
            raise RuntimeError("cannot tell how the template tokenises its texts: fedbpt.export cannot describe it")
        prefixes.append(prefix)
    return out, prefixes, start


def export(prompt: PromptFile, bb: BlackBox, out: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Write the safetensors file; returns its tensors and metadata."""
    from safetensors.torch import save_file

    ids, prefixes, start = template(bb)
    tensors = {
        "soft_prompt": bb.prompts(prompt.z)[0].float().cpu().contiguous(),  # A z exactly as predict computes it
        "placeholder_ids": torch.tensor(bb.placeholder_ids, dtype=torch.int64),
        "template_ids": torch.tensor(ids, dtype=torch.int64),
    }
    if bb.kind == "encoder":
        tensors["label_embeddings"] = bb.label_embeddings.float().cpu().contiguous()
    else:
        tensors["label_ids"] = torch.tensor(bb.label_ids, dtype=torch.int64)
    d = prompt.description
    meta = {
        "format": FORMAT,
        "model_name": bb.cfg.model_name,
        "gguf_file": bb.cfg.gguf_file or "",
        "model_type": bb.kind,
        "task_name": bb.task.name,
        "label_words": json.dumps(list(bb.task.verbalizer)),
        "label_sentences": json.dumps(list(bb.task.label_sentences)),
        "label_scale": repr(float(bb.cfg.label_scale)),
        "prompt_at": bb.prompt_at,
        "prompt_start": str(start),
        "cat_or_add": bb.cfg.cat_or_add,
        "text_prefixes": json.dumps(prefixes),
        "max_length": str(bb.max_length),
        "fingerprint": str(d["fingerprint"]),
        "round": str(prompt.round),
        "source": str(prompt.path),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=meta)
    return tensors, meta


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=formatter)
    parser.add_argument("--prompt", required=True, type=Path, help="a run's best_prompt.npz or final_prompt.npz")
    parser.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    parser.add_argument("--model_name", help="the model (default: the prompt file's model_name)")
    parser.add_argument("--task_name", help="the task (default: the prompt file's task_name)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    try:
        if args.out.suffix != ".safetensors":
            raise ValueError(f"--out {args.out}: give a file name ending in .safetensors")
        prompt = read_prompt(args.prompt)
        bb = open_blackbox(prompt, args.model_name, args.task_name, device="cpu")
        tensors, meta = export(prompt, bb, args.out)
    except (PromptFileError, ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 2
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items())
    how = "added to" if bb.cfg.cat_or_add == "add" else "put in place of"
    print(f"wrote {args.out}: {shapes}; the prompt rows are {how} the {meta['prompt_at']} output from position "
          f"{meta['prompt_start']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
