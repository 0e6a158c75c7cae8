"""Does ranking the sites by their own fitness help FedBPT's server? A paired measurement on real weights.

    python benchmarks/recombination.py                 # 3 seeds, 8 rounds: about 15 minutes on 2 cores

FedBPT's server recombines the K local means with weights by the rank of each site's reported fitness
(DESIGN §2). Each site measures that fitness on its own few examples (8 per site at the benchmark's
setting), so the ranking mixes how good a site's mean is with how easy its shard is. This script runs
FedBPT IID exactly as ``benchmarks/accuracy.py`` does (all-MiniLM-L6-v2, SST-2, 10 sites, 40 examples
per class) and, every round, from the same site reports, scores both recombinations:

- ``rank``: the fitness-rank-weighted mean that FedBPT's server update moves to (the run follows it);
- ``plain``: the unweighted mean of the local means, as FedAvg-BBT would take.

It also scores every site's local mean on the pooled dev set (all sites' dev examples, 80) and gives the
Spearman correlation between the sites' reported fitness and that pooled dev loss: near 1, the ranking
finds the better means; near 0, it weights noise. Test accuracy (GLUE dev, 872) is reported for both
recombinations but selects nothing. Prints a table and writes ``benchmarks/results/recombination.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from accuracy import CENTRAL_POPSIZE, RESULTS, SETTING, Bench, minilm, prepare
from fedbpt.client import load_task_data
from fedbpt.search import ServerState
from fedbpt.server import SiteReport
from fedbpt.standalone import ServerConfig, run_federation


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def run(bench: Bench, seed: int, rounds: int) -> list[dict]:
    """FedBPT IID through the standalone loop, measuring each round's reports without changing the run."""
    cfg = bench.site_config(seed)
    bb = bench.box(seed)
    dev = bb.encode(load_task_data(cfg, with_test=False).dev)
    rows = []

    def measure(state: ServerState, reports: list[SiteReport], new: ServerState) -> None:
        means = np.stack([r.result.mean for r in reports])
        fitness = np.array([r.result.fitness for r in reports])
        site_dev = bb.losses(bb.class_scores(means, dev), dev.labels)
        candidates = np.stack([new.mean, means.mean(0)])  # rank-weighted (where the run goes), plain
        dev_loss = bb.losses(bb.class_scores(candidates, dev), dev.labels)
        test = [bench.test_acc(seed, z) for z in candidates]
        rows.append({
            "round": state.round,
            "spearman_fitness_vs_pooled_dev": spearman(fitness, site_dev),
            "rank_dev_loss": float(dev_loss[0]), "plain_dev_loss": float(dev_loss[1]),
            "rank_test_acc": test[0], "plain_test_acc": test[1],
            "step_rank": float(np.linalg.norm(new.mean - state.mean)),
            "step_plain": float(np.linalg.norm(means.mean(0) - state.mean)),
        })  # fmt: skip
        logging.info("seed %d round %d: %s", seed, state.round, rows[-1])

    with tempfile.TemporaryDirectory() as run_dir:
        run_federation(cfg, ServerConfig(num_rounds=rounds), run_dir, blackbox=bb, on_round=measure)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "recombination.json")
    args = parser.parse_args()
    prepare()

    t0 = time.perf_counter()
    bench = Bench(argparse.Namespace(test_limit=0, rounds=args.rounds), minilm(), SETTING, CENTRAL_POPSIZE)
    runs = {seed: run(bench, seed, args.rounds) for seed in range(1, args.seeds + 1)}
    rows = [r for rs in runs.values() for r in rs]

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in rows]))

    summary = {
        "spearman_fitness_vs_pooled_dev": mean("spearman_fitness_vs_pooled_dev"),
        "rank_dev_loss": mean("rank_dev_loss"), "plain_dev_loss": mean("plain_dev_loss"),
        "plain_better_dev_rounds": sum(r["plain_dev_loss"] < r["rank_dev_loss"] for r in rows),
        "rank_test_acc": mean("rank_test_acc"), "plain_test_acc": mean("plain_test_acc"),
        "plain_better_test_rounds": sum(r["plain_test_acc"] > r["rank_test_acc"] for r in rows),
        "rounds_scored": len(rows),
    }  # fmt: skip
    setting = {**SETTING, "rounds": args.rounds, "seeds": args.seeds, "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "setting": setting, "runs": runs}, indent=1))

    head = ("seed", "round", "spearman", "dev loss rank", "plain", "test acc rank", "plain")
    print("\n" + " ".join(f"{h:>{w}}" for h, w in zip(head, (4, 5, 9, 13, 7, 13, 7))))
    for seed, rs in runs.items():
        for r in rs:
            print(f"{seed:>4} {r['round']:>5} {r['spearman_fitness_vs_pooled_dev']:>9.3f} {r['rank_dev_loss']:>13.4f} "
                  f"{r['plain_dev_loss']:>7.4f} {r['rank_test_acc']:>13.4f} {r['plain_test_acc']:>7.4f}")  # fmt: skip
    s = summary
    print(f"\nmean Spearman(site fitness, pooled dev loss of its mean): {s['spearman_fitness_vs_pooled_dev']:.3f}")
    print(
        f"pooled dev loss: rank-weighted {s['rank_dev_loss']:.4f}, plain {s['plain_dev_loss']:.4f} "
        f"(plain lower in {s['plain_better_dev_rounds']} of {s['rounds_scored']} rounds)"
    )
    print(
        f"test acc: rank-weighted {s['rank_test_acc']:.4f}, plain {s['plain_test_acc']:.4f} "
        f"(plain higher in {s['plain_better_test_rounds']} of {s['rounds_scored']} rounds)"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
