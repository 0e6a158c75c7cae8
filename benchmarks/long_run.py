"""The README's CPU variant for 200 rounds (the README's round count), in the standalone loop: does the
final prompt stay within 1 point of the one selected on dev, and is that one no worse than no prompt?

    OMP_NUM_THREADS=1 python benchmarks/long_run.py --threads 1                    # both server settings
    python benchmarks/long_run.py --rounds 3 --out /tmp/long.json                  # a smoke run

Setting: the README's CPU variant exactly (SST-2 from ``data/sst2``, all-MiniLM-L6-v2, 2 sites, 16
examples per class in total for train and as many for dev, 10 prompt tokens, ``d = 200``, 4 local
generations of popsize 10, seed 1234, perturbation on), with no evaluator site: the test set (the 872
rows of ``data/sst2/dev.tsv``) scores only the prompt at z = 0, the selected one (``best_prompt.npz``)
and the final one (``final_prompt.npz``). Two server settings, the rest equal:

- ``guard``: the shipped defaults (``selection = "bootstrap"``, ``confidence = 0.9``, ``restore_after = 4``,
  ``restore_shrink = 0.5``);
- ``no_guard``: the rules before them (``selection = "lowest"``, ``restore_after = 0``).

Each run is cached in ``--runs_dir`` (``--resume`` reuses it). Writes ``benchmarks/results/long_run.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import REPO, RESULTS, minilm  # noqa: E402
from fedbpt.blackbox import BlackBox  # noqa: E402
from fedbpt.client import blackbox_config, load_task_data  # noqa: E402
from fedbpt.config import ClientConfig  # noqa: E402
from fedbpt.server import Guard  # noqa: E402
from fedbpt.standalone import ServerConfig, run_federation  # noqa: E402

README_FLAGS = dict(task_name="sst2", n_prompt_tokens=10, intrinsic_dim=200, k_shot=16, device="cpu", seed=1234,
                    local_iter=4, local_popsize=10, num_users=2, iid=1, perturb=1, eval_clients="")  # fmt: skip
SETTINGS = {"guard": Guard(), "no_guard": Guard(selection="lowest", restore_after=0)}


def run(name: str, args, box: BlackBox, cfg: ClientConfig, test) -> dict:
    path = args.runs_dir / f"{name}.json"
    if args.resume and path.exists():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    server = ServerConfig(num_rounds=args.rounds, intrinsic_dim=200, guard=SETTINGS[name])
    with tempfile.TemporaryDirectory(prefix="fedbpt-long-") as run_dir:
        rows = run_federation(cfg, server, run_dir, blackbox=box)
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
        with np.load(Path(run_dir) / "best_prompt.npz") as best, np.load(Path(run_dir) / "final_prompt.npz") as final:
            best_z, final_z = best["z"], final["z"]
    result = {
        "guard": asdict(SETTINGS[name]),
        "rounds": args.rounds,
        "no_prompt_test": box.evaluate(np.zeros(200), test)[1],
        "best_test": box.evaluate(best_z, test)[1],
        "final_test": box.evaluate(final_z, test)[1],
        "best_round": summary["best_round"],
        "best_dev_loss": summary["best_dev_loss"],
        "restored": [r["round"] for r in rows if r.get("restored")],
        "dev_loss": [r["dev_loss"] for r in rows],
        "sigma": [r["sigma"] for r in rows],
        "seconds": round(time.perf_counter() - t0, 1),
        "command": " ".join(["python", *sys.argv]),
    }
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of the settings")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs cached in --runs_dir")
    parser.add_argument("--runs_dir", type=Path, default=RESULTS / "runs_long")
    parser.add_argument("--out", type=Path, default=RESULTS / "long_run.json")
    args = parser.parse_args()
    names = args.settings.split(",")
    if unknown := sorted(set(names) - set(SETTINGS)):
        parser.error(f"--settings: unknown {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = ClientConfig(**README_FLAGS, **minilm(), data_dir=str(REPO / "data" / "sst2"))
    box = BlackBox(blackbox_config(cfg))
    box.use_dim(200)
    test = box.encode(load_task_data(cfg).test)
    results = {name: run(name, args, box, cfg, test) for name in names}
    header = ("setting", "no prompt", "best-dev", "final", "final-best", "best round")
    print("{:<9} {:>9} {:>8} {:>6} {:>10} {:>10} restored".format(*header))
    for name, r in results.items():
        gap = 100 * (r["final_test"] - r["best_test"])
        print(f"{name:<9} {100 * r['no_prompt_test']:>9.2f} {100 * r['best_test']:>8.2f} {100 * r['final_test']:>6.2f} "
              f"{gap:>+10.2f} {r['best_round']:>10} {r['restored']}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"setting": README_FLAGS, "test": "data/sst2/dev.tsv (872)", **results}, indent=1))


if __name__ == "__main__":
    main()
