"""Print a run's per-round table and plot its dev and test accuracy.

    python benchmarks/plot_metrics.py /tmp/nvflare/fedbpt_cpu/server/simulate_job --out figs/cpu_variant.png

Reads ``metrics.jsonl`` from the run directory (the server's run dir of an NVFlare job, or the
``--run_dir`` of the standalone loop), writes the figure and, beside it, the same table as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} not found: give the run directory that holds metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(rows: list[dict]) -> str:
    names = [("round", 5), ("dev loss", 9), ("dev acc", 8), ("test acc", 9), ("sigma", 8), ("up B", 6), ("down B", 7)]
    lines = [" ".join(f"{name:>{width}}" for name, width in names) + f" {'s':>6}"]
    for r in rows:
        test = f"{r['test_acc']:.4f}" if r.get("test_acc") is not None else "-"
        lines.append(
            f"{r['round']:>5} {r['dev_loss']:>9.4f} {r['dev_acc']:>8.4f} {test:>9} {r['sigma']:>8.4f} "
            f"{max(r.get('bytes_up') or [0]):>6} {r.get('bytes_down', 0):>7} {r.get('seconds', 0):>6.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="PNG to write (JSON goes beside it)")
    parser.add_argument("--title", default="FedBPT run")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = load_rows(args.run_dir)
    print(table(rows))
    rounds = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(rounds, [r["dev_acc"] for r in rows], marker="o", label="dev accuracy (sites' dev shards)")
    if any(r.get("test_acc") is not None for r in rows):
        ax.plot(rounds, [r.get("test_acc") for r in rows], marker="s", label="test accuracy (evaluator site)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
