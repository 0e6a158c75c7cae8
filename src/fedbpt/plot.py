"""A run's accuracy and step size per round, as a table and a PNG.

    PYTHONPATH=src python -m fedbpt.plot /tmp/nvflare/fedbpt_cpu/server/simulate_job --out figs/cpu_variant.png

Reads ``metrics.jsonl`` (and ``summary.json``, for the selected round) from the run directory: the
server's run dir of an NVFlare job or the ``--run_dir`` of the standalone loop. The upper panel shows the
dev accuracy (the sites' dev shards) and the test accuracy (evaluator sites) of the prompt broadcast in
each round, with the round selected on the dev loss marked; the lower one the step size sigma. The table
is printed and written as JSON beside the PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "fedbpt.plot"
NEEDED = ("round", "dev_loss", "dev_acc", "sigma")  # every metrics row has these; test_acc where evaluated


def load_rows(run_dir: Path) -> list[dict]:
    """The run's metrics rows; a missing or foreign file is a ValueError that names it."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"RUN_DIR {run_dir}: no such directory")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file; give the run directory that holds metrics.jsonl (<workspace>/server/simulate_job "
            "for the simulator, the --run_dir of fedbpt.standalone)"
        )
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number}: not JSON ({e.msg})") from None
        missing = [k for k in NEEDED if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{path} line {number}: not a FedBPT metrics row (it lacks {', '.join(missing)})")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rounds in it yet")
    return rows


def selected_round(run_dir: Path, rows: list[dict]) -> int:
    """The round whose prompt the run keeps as best: summary.json's, else the lowest dev loss (as the server)."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        best = json.loads(summary.read_text()).get("best_round")
        if isinstance(best, int) and any(r["round"] == best for r in rows):
            return best
    return min(rows, key=lambda r: r["dev_loss"])["round"]


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


def figure(rows: list[dict], best: int, title: str = "FedBPT run"):
    """A matplotlib Figure: accuracy per round with the selected round marked (upper panel), sigma (lower)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r["round"] for r in rows]
    chosen = next(r for r in rows if r["round"] == best)
    fig, (acc, sig) = plt.subplots(2, 1, figsize=(6, 4.8), sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    acc.plot(rounds, [r["dev_acc"] for r in rows], marker="o", label="dev accuracy (sites' dev shards)")
    tested = [r for r in rows if r.get("test_acc") is not None]
    if tested:
        acc.plot([r["round"] for r in tested], [r["test_acc"] for r in tested], marker="s",
                 label="test accuracy (evaluator sites)")  # fmt: skip
    acc.axvline(best, color="gray", ls="--", lw=1)
    value = chosen.get("test_acc") if chosen.get("test_acc") is not None else chosen["dev_acc"]
    what = "test" if chosen.get("test_acc") is not None else "dev"
    acc.plot([best], [value], marker="*", ms=16, color="crimson", ls="none",
             label=f"selected on dev loss: round {best}, {what} acc {value:.4f}")  # fmt: skip
    acc.set_ylabel("accuracy")
    acc.set_title(title)
    acc.grid(alpha=0.3)
    acc.legend(fontsize=8)
    sig.plot(rounds, [r["sigma"] for r in rows], marker=".", color="tab:green")
    sig.axvline(best, color="gray", ls="--", lw=1)
    sig.set_ylabel("sigma")
    sig.set_xlabel("round")
    sig.grid(alpha=0.3)
    sig.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=formatter)
    parser.add_argument("run_dir", type=Path, help="the run directory that holds metrics.jsonl")
    parser.add_argument("--out", type=Path, help="the PNG to write (default: RUN_DIR/metrics.png); JSON goes beside")
    parser.add_argument("--title", default="FedBPT run")
    args = parser.parse_args(argv)
    out = args.out or args.run_dir / "metrics.png"
    try:
        if out.suffix.lower() != ".png":
            raise ValueError(f"--out {out}: give a file name ending in .png")
        rows = load_rows(args.run_dir)
        best = selected_round(args.run_dir, rows)
        print(table(rows))
        fig = figure(rows, best, args.title)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
        import matplotlib.pyplot as plt

        plt.close(fig)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    except (ValueError, OSError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"selected round {best}; wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
