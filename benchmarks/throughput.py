"""The cost of one FedBPT site round through the project's own FedBPTClient, and what it gets of the device.

    python benchmarks/throughput.py --size large --device cuda:0 --baseline 33d3fce   # the paper's shapes, GPU
    python benchmarks/throughput.py --model_name $MODEL_DIR --n_prompt_tokens 10 --intrinsic_dim 200 \\
        --settings auto:auto:auto,float32:128:16384 --baseline 33d3fce                # all-MiniLM-L6-v2, CPU

For each ``dtype:batch_size:token_budget`` setting (``auto`` allowed) it builds a non-evaluator site of the
README's configuration (SST-2, 10 sites, 40 train and 40 dev examples per site, popsize 5, 8 local
generations, perturbation on; L and d as given), runs one round to warm up, then times warm rounds
(``--repeats``, the fastest counts). It counts the forwards and the padded and attended tokens that reach the
model (a hook on the model body, so the count is the same for any code version), and reports TFLOP/s
achieved (2 x non-embedding parameters x padded tokens / time), as a fraction of ``--peak_tflops``, peak
memory, the evaluator's pass over the 872 test examples, and the projected minutes for the README's 200
rounds: 200 x (10 sites x site round + test pass), the sites' work done one after the other on one device.

``--baseline REV`` runs the same round with ``src/fedbpt`` as it is at git revision REV (its own defaults
for what it does not know), in the same process and alternately with the current code, so that the speed-up
is a ratio measured side by side. The model is ``--model_name`` or one built from a config: ``--size large``
(roberta-large's architecture, random weights: the paper's cost, not its accuracy) or ``--size tiny``, with
the real RoBERTa tokenizer. Writes ``--out`` (default ``benchmarks/results/throughput_<device>.json``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import fedbpt  # noqa: E402

TOKENIZER = REPO.parent / "shared" / "data" / "tokenizers" / "roberta-base" / "tokenizer.json"
DATA = [REPO / "data" / "sst2", REPO.parent / "shared" / "data" / "sst2"]
README = ("--task_name sst2 --k_shot 200 --seed 1234 --loss_type ce --cat_or_add add --local_iter 8 --num_users 10 "
          "--iid 1 --local_popsize 5 --perturb 1 --eval_clients site-1")  # fmt: skip
SIZES = {
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
}


def build_roberta(size: str, out: Path) -> Path:
    """A RoBERTa masked LM of ``size`` with random weights and the real tokenizer, saved like a checkpoint."""
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizer

    if not TOKENIZER.exists():
        raise SystemExit(f"--size needs the RoBERTa tokenizer at {TOKENIZER}; or give --model_name")
    tokenizer = RobertaTokenizer(tokenizer_file=str(TOKENIZER))
    config = RobertaConfig(vocab_size=len(tokenizer), max_position_embeddings=514, type_vocab_size=1,
                           layer_norm_eps=1e-5, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           architectures=["RobertaForMaskedLM"], **SIZES[size])  # fmt: skip
    torch.manual_seed(0)
    RobertaForMaskedLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def load_baseline(rev: str, into: Path):
    """``src/fedbpt`` at git revision ``rev`` (or a folder that holds such a ``src/fedbpt``, for a machine
    without the repository's history), imported as the package ``fedbpt_baseline``."""
    if (Path(rev) / "src" / "fedbpt" / "__init__.py").exists():
        into = Path(rev)
    else:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src/fedbpt"], capture_output=True,
                                 check=True)  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    folder = into / "src" / "fedbpt"
    spec = importlib.util.spec_from_file_location("fedbpt_baseline", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])  # fmt: skip
    package = importlib.util.module_from_spec(spec)
    sys.modules["fedbpt_baseline"] = package
    spec.loader.exec_module(package)
    return package


class Site:
    """One site of the README's configuration, built by a given version of the package."""

    def __init__(self, package, argv: list[str], name: str = "site-2"):
        config = importlib.import_module(f"{package.__name__}.config")
        client = importlib.import_module(f"{package.__name__}.client")
        search = importlib.import_module(f"{package.__name__}.search")
        known = {f"--{f}" for f in config.ClientConfig.__dataclass_fields__}
        argv = [a for i, a in enumerate(argv) if _keep(argv, i, known)]
        self.cfg = config.parse_args(argv)
        self.client = client.FedBPTClient(self.cfg, name)
        self.blackbox = self.client.blackbox
        dim = self.cfg.intrinsic_dim
        self.start = search.decode_down(*search.encode_down(search.init_state(dim, 1.0, self.cfg.seed)))
        self.takes_round = "round_" in inspect.signature(self.client.run_round).parameters
        body = self.blackbox.body
        self.params = sum(p.numel() for n, p in body.named_parameters() if "embeddings" not in n)
        self.count = {"forwards": 0, "padded": 0, "attended": 0}
        body.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)  # a masked LM's forward passes it by position
        mask = kwargs.get("attention_mask")
        if ids is not None and mask is not None and ids.shape[-1] > 0:
            self.count["forwards"] += 1
            self.count["padded"] += ids.numel()
            self.count["attended"] += int(mask.sum())

    def round(self) -> float:
        """Seconds for one site round (evaluate the received prompt, then the local search)."""
        sync()
        t0 = time.perf_counter()
        if self.takes_round:
            self.client.run_round(self.start, 1)
        else:
            self.start.round = 1
            self.client.run_round(self.start)
        sync()
        return time.perf_counter() - t0


def _keep(argv: list[str], i: int, known: set[str]) -> bool:
    """Drop flags the package version does not know (and their values)."""
    if argv[i].startswith("--"):
        return argv[i] in known
    return i == 0 or argv[i - 1] in known


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(site: Site, repeats: int) -> dict:
    site.round()  # warm-up: lazy initialisation, kernels, the allocator
    times, counts = [], None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        site.count.update(forwards=0, padded=0, attended=0)
        times.append(site.round())
        counts = dict(site.count)
    best = min(times)
    return {"site_round_s": round(best, 3), "site_round_s_all": [round(t, 3) for t in times],
            "forwards": counts["forwards"], "padded_tokens": counts["padded"], "attended_tokens": counts["attended"],
            "padded_per_attended": round(counts["padded"] / counts["attended"], 4),
            "tflops": round(2.0 * site.params * counts["padded"] / best / 1e12, 3)}  # fmt: skip


def test_pass(site: Site) -> float:
    """Seconds for the evaluator's pass over the test set (built once, outside the timing)."""
    client = site.client
    if client.test is None:
        module = importlib.import_module(type(client).__module__)
        client.test = site.blackbox.encode(module.load_task_data(site.cfg).test)
    sync()
    t0 = time.perf_counter()
    site.blackbox.evaluate(site.start.mean, client.test)
    sync()
    return time.perf_counter() - t0


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # the whole process, in GiB


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device)).lower().replace(" ", "_")
    return "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", help="hub id or local folder (default: --size)")
    parser.add_argument("--size", choices=SIZES, default="large", help="a RoBERTa built from a config, random weights")
    parser.add_argument("--settings", default="auto:auto:auto", help="comma-separated dtype:batch_size:token_budget")
    parser.add_argument(
        "--baseline",
        help="git revision whose src/fedbpt runs the same round, side by side (or a "
        "folder holding that revision's src/fedbpt)",
    )
    parser.add_argument("--model_dir", type=Path, help="keep the --size model in this folder (built if absent)")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n_prompt_tokens", type=int, default=50)
    parser.add_argument("--intrinsic_dim", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=2, help="timed warm rounds per setting (the fastest counts)")
    parser.add_argument("--peak_tflops", type=float, default=790.0, help="the device's dense bf16 peak (H200: 790)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = next((d for d in DATA if d.exists()), None)
    if data_dir is None:
        raise SystemExit(f"no SST-2 folder: looked in {', '.join(map(str, DATA))}")
    out = args.out or REPO / "benchmarks" / "results" / f"throughput_{device_name(args.device)}.json"

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model_name
        if model is None:
            folder = args.model_dir or Path(tmp) / f"roberta-{args.size}"
            model = str(folder if (folder / "config.json").exists() else build_roberta(args.size, folder))
        baseline = load_baseline(args.baseline, Path(tmp)) if args.baseline else None
        base_argv = (
            README + f" --model_name {model} --data_dir {data_dir} --device {args.device} "
            f"--n_prompt_tokens {args.n_prompt_tokens} --intrinsic_dim {args.intrinsic_dim}"
        ).split()
        result = {"device": device_name(args.device), "torch": torch.__version__, "model": args.model_name or
                  f"roberta-{args.size} (random weights)", "baseline": args.baseline,
                  "configuration": " ".join(base_argv), "peak_tflops": args.peak_tflops, "settings": []}  # fmt: skip
        old = Site(baseline, base_argv) if baseline else None
        for setting in args.settings.split(","):
            dtype, batch_size, budget = setting.split(":")
            site = Site(fedbpt, base_argv + ["--dtype", dtype, "--batch_size", batch_size, "--token_budget", budget])
            row = {"setting": setting, **measure(site, args.repeats)}
            if old is not None:  # again, right after: the two versions meet the same machine load
                row["baseline"] = measure(old, args.repeats)
                row["baseline_site_round_s"] = row["baseline"]["site_round_s"]
                row["speedup"] = round(row["baseline_site_round_s"] / row["site_round_s"], 3)
            test_s = test_pass(site)
            bb = site.blackbox
            row.update(dtype=str(bb.dtype).removeprefix("torch."), batch_size=bb.batch_size,
                       token_budget=bb.token_budget, tflops_fraction=round(row["tflops"] / args.peak_tflops, 4),
                       peak_mem_gib=peak_memory_gib(), test_pass_s=round(test_s, 3),
                       projected_200_rounds_min=round(200 * (10 * row["site_round_s"] + test_s) / 60, 1))  # fmt: skip
            result["settings"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "baseline"}), flush=True)
            del site
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))

    print(f"\n{'setting':<24} {'s/site-round':>12} {'forwards':>9} {'padded/attended':>16} {'TFLOP/s':>8} "
          f"{'mem GiB':>8} {'200 rounds, min':>16} {'speed-up':>9}")  # fmt: skip
    for row in result["settings"]:
        print(f"{row['setting']:<24} {row['site_round_s']:>12.3f} {row['forwards']:>9} "
              f"{row['padded_per_attended']:>16.3f} {row['tflops']:>8.3f} {row['peak_mem_gib']:>8.2f} "
              f"{row['projected_200_rounds_min']:>16.1f} {row.get('speedup', float('nan')):>9.2f}")  # fmt: skip
        if "baseline" in row:
            b = row["baseline"]
            print(f"{'  baseline ' + args.baseline:<24} {b['site_round_s']:>12.3f} {b['forwards']:>9} "
                  f"{b['padded_per_attended']:>16.3f} {b['tflops']:>8.3f}")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
