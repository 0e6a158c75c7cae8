"""The README's NVFlare commands, run as written: job creation, the committed job folder, the simulator."""

from __future__ import annotations

import filecmp
import importlib.machinery
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, readme_block, run, sandbox, set_vars
from fedbpt.config import parse_args
from fedbpt.standalone import ServerConfig, run_federation

pytestmark = pytest.mark.slow


def test_committed_job_folder_is_what_the_readme_command_writes(tmp_path):
    root = sandbox(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    commands = readme_block("gpu-run").splitlines()
    script = "\n".join(line for line in commands if not line.startswith("nvflare simulator"))  # no GPU here
    proc = run(script, root, home, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    generated, committed = root / "jobs" / "fedbpt", REPO / "jobs" / "fedbpt"
    assert differences(generated, committed) == [], "regenerate jobs/fedbpt with the README's command"
    client = (generated / "app" / "config" / "config_fed_client.conf").read_text()
    assert "--model_name roberta-large" in client and "--k_shot 200" in client
    server = (generated / "app" / "config" / "config_fed_server.conf").read_text()
    assert re.search(r"min_clients = 10\b", server) and re.search(r"num_rounds = 200\b", server)
    assert re.search(r"seed = 1234\b", server)


def differences(a: Path, b: Path) -> list[str]:
    out = []
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    out += [f"only in generated: {x}" for x in cmp.left_only] + [f"only in committed: {x}" for x in cmp.right_only]
    out += [f"differs: {x}" for x in filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)[1]]
    for sub in cmp.common_dirs:
        out += differences(a / sub, b / sub)
    return out


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory, tiny_roberta) -> tuple[Path, Path]:
    """The README's CPU quickstart, 2 sites and 2 rounds on the tiny model, through the template commands
    and NVFlare's simulator: the sandbox root and the server's run directory."""
    tmp_path = tmp_path_factory.mktemp("cpu-run")
    root = sandbox(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    workspace = tmp_path / "workspace"
    script = set_vars(readme_block("cpu-run"), ROUNDS="2", N_CLIENTS="2", MODEL_DIR=str(tiny_roberta),
                      WORKSPACE=str(workspace))  # fmt: skip
    proc = run(script, root, home, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root, workspace / "server" / "simulate_job"


def test_readme_cpu_variant_runs_in_the_simulator(cpu_run, tmp_path):
    root, run_dir = cpu_run
    nvflare_rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in nvflare_rows] == [0, 1]
    for row in nvflare_rows:
        assert row["sites"] == ["site-1", "site-2"] and row["dropped"] == {} and row["missing"] == []
        assert 0.0 <= row["dev_acc"] <= 1.0 and 0.0 <= row["test_acc"] <= 1.0
        assert 0 < max(row["bytes_up"]) and 0 < row["bytes_down"]
        assert row["attended_tokens"] <= row["padded_tokens"] <= 1.05 * row["attended_tokens"]
    assert nvflare_rows[1]["sigma"] == pytest.approx(nvflare_rows[0]["next_sigma"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["best_round"] in (0, 1)
    for name in ("best_prompt.npz", "final_prompt.npz"):
        with np.load(run_dir / name) as prompt:
            assert prompt["soft_prompt"].shape == (int(prompt["n_prompt_tokens"]), 32)  # L x H of the tiny model
            np.testing.assert_allclose(prompt["soft_prompt"].reshape(-1), prompt["z"] @ projection_of(prompt),
                                       rtol=1e-4, atol=1e-6)  # fmt: skip
    with np.load(run_dir / "fedbpt_state.npz") as state:
        assert int(state["round"]) == 2
    assert list((run_dir / "tb_events").glob("site-1/events.out.tfevents.*")), "no TensorBoard events"
    server_events = server_scalars(run_dir / "tb_events" / "simulator_server")  # the simulator's server name
    for key in ("dev_acc", "test_acc", "dev_loss", "sigma"):
        assert [step for step, _ in server_events[key]] == [r["round"] for r in nvflare_rows]
        assert [value for _, value in server_events[key]] == pytest.approx([r[key] for r in nvflare_rows], rel=1e-6)

    # the standalone loop runs the same site and server code: same flags and seed, same global mean
    client_conf = (root / "jobs" / "fedbpt_cpu" / "app" / "config" / "config_fed_client.conf").read_text()
    cfg = parse_args(shlex.split(re.search(r'app_config = "(.*)"', client_conf).group(1)))
    seen = []  # on_round sees each round's start, the decoded reports and the state the server moved to
    rows = run_federation(cfg, ServerConfig(num_rounds=2), str(tmp_path / "standalone"),
                          on_round=lambda start, reports, new: seen.append((start, reports, new)))  # fmt: skip
    assert [(start.round, len(reports), new.round) for start, reports, new in seen] == [(0, 2, 1), (1, 2, 2)]
    np.testing.assert_array_equal(seen[1][0].mean, seen[0][2].mean)
    with np.load(run_dir / "fedbpt_state.npz") as state, np.load(tmp_path / "standalone" / "fedbpt_state.npz") as alone:
        np.testing.assert_allclose(alone["mean"], state["mean"], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(seen[-1][2].mean, alone["mean"])
        assert float(alone["sigma"]) == pytest.approx(float(state["sigma"]), rel=1e-6)
    assert [r["dev_acc"] for r in rows] == pytest.approx([r["dev_acc"] for r in nvflare_rows])


STAND_INS = {"mlflow": ("mlflow", "mlflow.entities", "mlflow.tracking", "mlflow.tracking.client"), "wandb": ("wandb",)}
RECEIVERS = {"mlflow": "MLflowReceiver", "wandb": "WandBReceiver"}


@pytest.mark.parametrize("tracking", ["mlflow", "wandb"])
def test_tracking_receivers_take_the_recipes_arguments(tracking, tmp_path, monkeypatch):
    """NVFlare's own MLflow and W&B receivers, built by add_experiment_tracking with the recipe's arguments,
    listen to the template's events. Where the package is not installed, stand-in modules let the real
    receiver class be imported and built (what it then does with the package is not run here)."""
    import types

    from fedbpt.nvflare_recipe import TRACKING_EVENTS, FedBPTRecipe

    receiver_module = f"nvflare.app_opt.tracking.{tracking}.{tracking}_receiver"
    if importlib.util.find_spec(tracking) is None:
        for name in STAND_INS[tracking]:
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            for attr in ("Metric", "Param", "RunTag", "MlflowClient"):
                setattr(module, attr, object)
            monkeypatch.setitem(sys.modules, name, module)
        monkeypatch.delitem(sys.modules, receiver_module, raising=False)
    try:
        FedBPTRecipe(name="tracked", site_args="--task_name sst2", tracking=tracking).export(str(tmp_path))
    finally:
        if importlib.util.find_spec(tracking) is None:
            sys.modules.pop(receiver_module, None)  # it was imported against the stand-ins
    server = json.loads((tmp_path / "tracked" / "app" / "config" / "config_fed_server.json").read_text())
    receiver = next(c for c in server["components"] if c["id"] == "receiver")
    assert receiver["path"] == f"{receiver_module}.{RECEIVERS[tracking]}"
    assert receiver["args"]["events"] == TRACKING_EVENTS
    if tracking == "wandb":
        assert receiver["args"]["wandb_args"] == {"project": "tracked", "name": "tracked"}
    else:
        assert receiver["args"]["kw_args"]["experiment_name"] == "tracked-experiment"


def server_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """The (step, value) points of every scalar the server wrote to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(p.step, p.value) for p in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_recipe_in_simenv_reaches_the_template_flows_global_mean(cpu_run, tiny_roberta, tmp_path):
    """The README's `python job.py --env sim` line, with the quickstart's site flags and seed: the recipe
    (FedBPTRecipe in SimEnv) reaches the template flow's global mean, sigma and dev accuracies."""
    root, template_dir = cpu_run
    quickstart, recipe = readme_block("cpu-run"), readme_block("recipe-run")
    app_config = re.search(r'app_config="([^"]*)"', quickstart).group(1)
    site_flags = re.search(r'^SITE_FLAGS="([^"]*)"$', recipe, re.M).group(1)
    assert site_flags == app_config.replace("${SEED}", "1234").replace("${N_CLIENTS}", "2")  # the same flags

    workspace = tmp_path / "simulation"
    sim = next(line for line in recipe.splitlines() if line.startswith("python job.py --env sim "))
    assert sim.count("--workspace /tmp/nvflare/simulation") == 1
    variables = [line for line in quickstart.splitlines() if line.startswith(("MODEL_DIR=", "DATA_DIR="))]
    head = [*variables, *recipe.splitlines()[:2]]  # MODEL_DIR, DATA_DIR, ROUNDS and SITE_FLAGS
    script = set_vars("\n".join([*head, sim]), ROUNDS="2", MODEL_DIR=str(tiny_roberta))
    script = script.replace("--workspace /tmp/nvflare/simulation", f"--workspace {workspace}")
    home = tmp_path / "home"
    home.mkdir()
    proc = run(script, root, home, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    run_dir = workspace / "fedbpt" / "server" / "simulate_job"
    assert f"outputs: {run_dir} (metrics.jsonl" in proc.stdout  # job.py says where the outputs are
    with np.load(template_dir / "fedbpt_state.npz") as template, np.load(run_dir / "fedbpt_state.npz") as recipe_state:
        difference = np.abs(recipe_state["mean"] - template["mean"]).max()
        print(f"recipe vs template: global mean max |difference| {difference:.3g} after 2 rounds")
        assert int(recipe_state["round"]) == int(template["round"]) == 2
        assert difference <= 1e-6
        assert float(recipe_state["sigma"]) == pytest.approx(float(template["sigma"]), rel=1e-6)
    rows = [metrics_rows(template_dir), metrics_rows(run_dir)]
    assert [r["dev_acc"] for r in rows[1]] == pytest.approx([r["dev_acc"] for r in rows[0]])
    assert [r["sites"] for r in rows[1]] == [["site-1", "site-2"]] * 2
    assert list((run_dir / "tb_events").glob("site-1/events.out.tfevents.*")), "no TensorBoard events"

    # the README's --export line writes the same job as a folder, with the same site command
    export = readme_block("recipe-export").strip()
    script = set_vars("\n".join([*head, export]), ROUNDS="2", MODEL_DIR=str(tiny_roberta))
    proc = run(script, root, home, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = json.loads((root / "jobs" / "fedbpt_recipe" / "app" / "config" / "config_fed_client.json").read_text())
    command = client["executors"][0]["executor"]["args"]["command"]
    assert command[3:] == shlex.split(site_flags.replace("${MODEL_DIR}", str(tiny_roberta)).replace(
        "${DATA_DIR}", str((root / "data" / "sst2").resolve())))  # fmt: skip


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def projection_of(prompt) -> np.ndarray:
    from fedbpt.search import projection

    size = int(prompt["n_prompt_tokens"]) * int(prompt["hidden_size"])
    return projection(int(prompt["seed"]), prompt["z"].shape[0], size, float(prompt["projection_scale"]))


def job_py(*args: str, cwd: Path = REPO, timeout: int = 120) -> subprocess.CompletedProcess:
    """``python job.py ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, str(REPO / "job.py"), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})  # fmt: skip


def test_recipe_exports_the_template_components(tmp_path):
    """job.py's FedBPTRecipe builds the job the template builds: same workflow and components; NVFlare's
    own --export --export-dir write it."""
    out = tmp_path / "export"
    site_flags = "--task_name sst2 --intrinsic_dim 64 --seed 7 --device cpu --num_users 3"
    proc = job_py("--export", "--export-dir", str(out), "--n_clients", "3", "--num_rounds", "4", "--patience", "2",
                  "--step_rule", "example", "--", *shlex.split(site_flags))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    app = out / "fedbpt" / "app"
    server = json.loads((app / "config" / "config_fed_server.json").read_text())
    workflow = server["workflows"][0]
    assert workflow["path"] == "fedbpt.nvflare_components.FedBPTScatterAndGather"
    assert {k: workflow["args"][k] for k in ("min_clients", "num_rounds", "patience")} == {
        "min_clients": 3, "num_rounds": 4, "patience": 2}  # fmt: skip
    components = {c["id"]: c for c in server["components"]}
    template = (REPO / "job_templates" / "fedbpt" / "config_fed_server.conf").read_text()
    for cid, component in components.items():
        assert f'id = "{cid}"' in template and f'path = "{component["path"]}"' in template
    assert components["persistor"]["args"] == {"intrinsic_dim": 64, "seed": 7}
    assert components["aggregator"]["args"] == {"step_rule": "example"}
    client = json.loads((app / "config" / "config_fed_client.json").read_text())
    command = client["executors"][0]["executor"]["args"]["command"]
    assert command[2:] == ["custom/fedbpt_train.py", *shlex.split(site_flags)]
    assert (app / "custom" / "fedbpt" / "nvflare_components.py").exists()


def test_job_py_rejects_bad_flags_naming_them(tmp_path):
    proc = job_py("--export", "--export-dir", str(tmp_path), "--", "--k_shot", "0")
    assert proc.returncode != 0 and "--k_shot must be >= 1" in proc.stderr
    proc = job_py("--export_dir", str(tmp_path))  # the flag before the recipe: says what replaced it
    assert proc.returncode == 2 and "--export_dir is now NVFlare's own --export --export-dir DIR" in proc.stderr
    proc = job_py("--env", "prod", "--", "--num_users", "1")
    assert proc.returncode == 2 and "--env prod needs --startup_kit DIR" in proc.stderr
    proc = job_py("--num_rounds", "0")
    assert proc.returncode == 2 and "--num_rounds must be >= 1, got 0" in proc.stderr
    proc = job_py("--export-dir", str(tmp_path))
    assert proc.returncode == 2 and "--export-dir needs --export" in proc.stderr
    proc = job_py("--restore_after", "-1")
    assert proc.returncode == 2 and "--restore_after must be a whole number >= 0, got -1" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_job_py_keeps_n_clients_and_num_users_consistent(tmp_path):
    """Two sites of a --num_users 10 split would train on 20% of the pool: job.py makes the two agree, or
    stops naming both."""
    spec = importlib.util.spec_from_file_location("fedbpt_job", REPO / "job.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    resolve_sites = job.resolve_sites
    flags = ["--task_name", "sst2"]
    assert resolve_sites(None, flags) == (2, [*flags, "--num_users", "2"])  # the sites' own default would be 10
    assert resolve_sites(3, flags) == (3, [*flags, "--num_users", "3"])
    assert resolve_sites(None, [*flags, "--num_users", "4"]) == (4, [*flags, "--num_users", "4"])
    assert resolve_sites(None, [*flags, "--num_users=4"])[0] == 4
    assert resolve_sites(5, [*flags, "--num_users", "1"]) == (5, [*flags, "--num_users", "1"])  # site-local data
    with pytest.raises(ValueError, match="--n_clients 3 differs from the sites' --num_users 4"):
        resolve_sites(3, [*flags, "--num_users", "4"])

    proc = job_py("--export", "--export-dir", str(tmp_path), "--n_clients", "2", "--", "--num_users", "10")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last == (
        "job.py: error: --n_clients 2 differs from the sites' --num_users 10: the sites would train on 2 of 10 "
        "shards (20% of the pool); give both the same value (or --num_users 1: each site uses all of its own "
        "--data_dir)"
    )
    assert list(tmp_path.iterdir()) == []

    proc = job_py("--export", "--export-dir", str(tmp_path), "--", "--num_users", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = tmp_path / "fedbpt" / "app" / "config"
    workflow = json.loads((config / "config_fed_server.json").read_text())["workflows"][0]
    assert workflow["args"]["min_clients"] == 3 and json.loads((tmp_path / "fedbpt" / "meta.json").read_text())[
        "min_clients"] == 3  # fmt: skip


def test_tracking_without_its_package_is_a_one_line_error(tmp_path):
    missing = [name for name in ("mlflow", "wandb") if importlib.util.find_spec(name) is None]
    if not missing:
        pytest.skip("mlflow and wandb are both installed")
    proc = job_py("--tracking", missing[0], "--export", "--export-dir", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"job.py: error: --tracking {missing[0]}: {missing[0]} is not installed. Please install it using "
        f"`pip install {missing[0]}`"
    )
    assert list(tmp_path.iterdir()) == []
