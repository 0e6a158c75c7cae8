"""Where should a sentence encoder take the prompt? FedBPT IID on a second task, at both places.

    python benchmarks/prompt_place.py                  # Yelp polarity, 2 places x 8 rounds, about 40 minutes here

The accuracy benchmark compares the two places (``--prompt_at embeddings``: the embeddings block's output,
BBT's place; ``word_embeddings``: the input embeddings) on SST-2. This script runs the case of a new user on
another task: all-MiniLM-L6-v2, Yelp polarity, 4 sites, 16 examples per class, 10 prompt tokens, d = 200,
popsize 5, 4 local generations, perturbed fitness, 8 rounds, seed 1; the pooled dev loss and accuracy
and the test accuracy of each round's broadcast prompt, at each place.

Data: the 1,000 Yelp test reviews of ``../shared/data/yelp_polarity`` (TextFooler's subset; lowercased
and tokenised, see its SOURCE.md), shuffled with seed 0: 100 per class form the training file the k-shot
pools are drawn from, the other 800 are the test set (``--test_limit`` of them are scored each round).
Writes ``benchmarks/results/prompt_place.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from accuracy import RESULTS, minilm, prepare
from fedbpt.config import ClientConfig
from fedbpt.standalone import ServerConfig, run_federation

YELP = Path(__file__).resolve().parents[2] / "shared" / "data" / "yelp_polarity" / "test_1k_textfooler.txt"
SETTING = dict(task_name="yelpp", num_users=4, k_shot=16, n_prompt_tokens=10, intrinsic_dim=200, local_iter=4,
               local_popsize=5, perturb=1, eval_clients="site-1", device="cpu", seed=1)  # fmt: skip


def yelp_folder(out: Path, test_limit: int) -> Path:
    """train.jsonl (100 reviews per class) and test.jsonl (up to ``test_limit`` of the others)."""
    rows = [line.split(" ", 1) for line in YELP.read_text(encoding="utf-8").splitlines() if line.strip()]
    order = np.random.default_rng(0).permutation(len(rows))
    train, test, taken = [], [], {0: 0, 1: 0}
    for i in order:
        label, text = int(rows[i][0]), rows[i][1]
        if taken[label] < 100:
            taken[label] += 1
            train.append({"text": text, "label": label})
        else:
            test.append({"text": text, "label": label})
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("test", test[:test_limit])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--test_limit", type=int, default=400)
    parser.add_argument("--places", default="embeddings,word_embeddings")
    parser.add_argument("--out", type=Path, default=RESULTS / "prompt_place.json")
    args = parser.parse_args()
    if not YELP.exists():
        raise SystemExit(f"{YELP} not found: this benchmark reads Yelp polarity from ../shared/data")
    prepare()
    results = {"setting": {**SETTING, "rounds": args.rounds, "test_examples": args.test_limit}, "places": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = yelp_folder(Path(tmp) / "yelp", args.test_limit)
        for place in args.places.split(","):
            cfg = ClientConfig(**SETTING, **minilm(), data_dir=str(data), prompt_at=place)
            t0 = time.perf_counter()
            rows = run_federation(cfg, ServerConfig(num_rounds=args.rounds, intrinsic_dim=200), str(Path(tmp) / place))
            summary = json.loads((Path(tmp) / place / "summary.json").read_text())
            results["places"][place] = {
                "dev_loss": [r["dev_loss"] for r in rows],
                "dev_acc": [r["dev_acc"] for r in rows],
                "test_acc": [r["test_acc"] for r in rows],
                "best_round": summary["best_round"],
                "seconds": round(time.perf_counter() - t0, 1),
            }
            args.out.write_text(json.dumps(results, indent=1))
    print(f"\n{'place':<16} {'round':>5} {'dev loss':>9} {'dev acc':>8} {'test acc':>9}")
    for place, r in results["places"].items():
        for i, (dl, da, ta) in enumerate(zip(r["dev_loss"], r["dev_acc"], r["test_acc"])):
            mark = " <- best dev" if i == r["best_round"] else ""
            print(f"{place:<16} {i:>5} {dl:>9.4f} {da:>8.4f} {ta:>9.4f}{mark}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
