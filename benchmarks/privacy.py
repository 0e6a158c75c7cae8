"""What clipped and noised uploads cost: FedBPT IID on all-MiniLM-L6-v2, at two noise levels beside no noise.

    python benchmarks/privacy.py --resume                  # the measurement (1 seed, 8 rounds; about 15 minutes here)
    python benchmarks/privacy.py --measure_only            # only the honest update norm (no test scoring)
    python benchmarks/privacy.py --rounds 1 --test_limit 50 --runs_dir /tmp/p --out /tmp/p.json   # smoke

The setting is accuracy.py's (``SETTING``: 10 sites, 40 examples per class, d = 200, 10 prompt tokens,
popsize 5, 4 local generations, perturbed fitness), FedBPT IID, seed 1, scored on the 872 SST-2
validation examples at the round selected on dev. First the run without privacy, which also measures
the honest update, ||local mean - received mean||, of every site in every round (on_round sees it without
changing the run). The clip norm is that norm's median (honest updates are all about as long, so
clipping there trims the longer half by a few percent). Each noise level is the noise's expected norm,
noise_std x sqrt(d), as a fraction of the clip norm: 0.5 and 1.0 by default (``--ratios``), i.e.
noise_multiplier = ratio / sqrt(d). At 1.0 an upload is as much noise as update; beyond it the noised
steps reach the server's own bound of three honest steps, which would clip them again.
Writes ``benchmarks/results/privacy.json``; runs are cached in ``benchmarks/results/runs_privacy/``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from accuracy import RESULTS, SETTING, Bench, cached, minilm, prepare
from fedbpt.privacy import UploadPrivacy

SEED = 1
DELTA = 1e-5  # for the Gaussian-mechanism figure in the JSON (no guarantee: see the README)


def norms_recorder(into: list[list[float]]):
    """An on_round callback that keeps, per round, the norm of every site's upload minus the broadcast mean."""

    def on_round(start, reports, new) -> None:
        into.append([float(np.linalg.norm(r.result.mean - start.mean)) for r in reports])

    return on_round


def spread(values: list[float]) -> dict:
    v = np.asarray(values)
    return {"median": float(np.median(v)), "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90)),
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}  # fmt: skip


def gaussian_epsilon(noise_multiplier: float, delta: float = DELTA) -> float:
    """The classical Gaussian-mechanism epsilon of one release of the clipped, noised update, with sensitivity
    2 x clip_norm; the bound itself holds only below 1, so above it the figure shows scale, not a guarantee."""
    return 2 * math.sqrt(2 * math.log(1.25 / delta)) / noise_multiplier


def run(bench: Bench, privacy: UploadPrivacy | None, curve: bool = True) -> dict:
    uploads: list[list[float]] = []
    result = bench.fedbpt(SEED, curve=curve, privacy=privacy, on_round=norms_recorder(uploads))
    return {**result, "upload_norms": uploads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--ratios", default="0.5,1.0", help="noise norm / clip norm of each noise level")
    parser.add_argument("--clip_norm", type=float, help="default: the median honest update norm, measured first")
    parser.add_argument("--measure_only", action="store_true", help="only the run without privacy, no test scoring")
    parser.add_argument("--test_limit", type=int, default=0, help="score only the first N test examples (smoke runs)")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs cached in --runs_dir")
    parser.add_argument("--runs_dir", type=Path, default=RESULTS / "runs_privacy")
    parser.add_argument("--out", type=Path, default=RESULTS / "privacy.json")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    prepare()
    t0 = time.perf_counter()
    bench = Bench(args, minilm(), SETTING, central_popsize=0)
    d = SETTING["intrinsic_dim"]

    if args.measure_only:
        uploads: list[list[float]] = []
        bench.fedbpt(SEED, curve=False, on_round=norms_recorder(uploads))
        honest = spread([n for round_ in uploads for n in round_])
        print(json.dumps({"honest_update_norm": honest, "per_round_median": [float(np.median(r)) for r in uploads]}))
        return

    plain = cached("fedbpt_iid", SEED, args, lambda: run(bench, None))
    honest = spread([n for round_ in plain["upload_norms"] for n in round_])
    clip = args.clip_norm or round(honest["median"], 2)
    levels = {"no privacy": plain}
    for ratio in ratios:
        privacy = UploadPrivacy(clip_norm=clip, noise_multiplier=ratio / math.sqrt(d))
        name = f"fedbpt_iid_clip{clip:g}_noise{ratio:g}"
        levels[f"noise {ratio:g} x clip"] = {
            **cached(name, SEED, args, lambda p=privacy: run(bench, p)),
            "clip_norm": clip, "noise_multiplier": privacy.noise_multiplier, "noise_std": privacy.noise_std,
            # for the mean alone (an example changed: the clipped update may move anywhere in the ball)
            "gaussian_mechanism_epsilon_per_round": gaussian_epsilon(privacy.noise_multiplier),
        }  # fmt: skip
    result = {
        "setting": {**SETTING, "rounds": args.rounds, "seed": SEED, "method": "FedBPT IID", "model": "all-MiniLM-L6-v2",
                    "test": f"SST-2 GLUE dev ({args.test_limit or 872})", "delta": DELTA,
                    "wall_seconds": round(time.perf_counter() - t0, 1)},
        "honest_update_norm": honest,
        "clip_norm": clip,
        "levels": {name: {k: v for k, v in r.items() if k != "curve"} | {"curve": r.get("curve", [])}
                   for name, r in levels.items()},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"honest update norm: median {honest['median']:.3f} (p10 {honest['p10']:.3f}, p90 {honest['p90']:.3f}, "
          f"max {honest['max']:.3f}, {honest['n']} uploads); clip norm {clip:g}")  # fmt: skip
    print(f"\n{'uploads':<18} {'noise std':>9} {'best-dev test':>13} {'final test':>10} {'best round':>10} "
          f"{'last sigma':>10} {'upload norm':>11}")  # fmt: skip
    for name, r in levels.items():
        up = np.median([n for round_ in r["upload_norms"] for n in round_])
        print(f"{name:<18} {r.get('noise_std', 0.0):>9.4f} {r['best_test']:>13.4f} {r['final_test']:>10.4f} "
              f"{r['best_round']:>10} {r['sigma'][-1]:>10.4f} {up:>11.3f}")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
