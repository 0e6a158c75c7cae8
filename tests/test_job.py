"""The README's NVFlare commands, run as written: job creation, the committed job folder, the simulator."""

from __future__ import annotations

import filecmp
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


def test_readme_cpu_variant_runs_in_the_simulator(tmp_path, tiny_roberta):
    root = sandbox(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    workspace = tmp_path / "workspace"
    script = set_vars(readme_block("cpu-run"), ROUNDS="2", N_CLIENTS="2", MODEL_DIR=str(tiny_roberta),
                      WORKSPACE=str(workspace))  # fmt: skip
    proc = run(script, root, home, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    run_dir = workspace / "server" / "simulate_job"
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


def server_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """The (step, value) points of every scalar the server wrote to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(p.step, p.value) for p in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def projection_of(prompt) -> np.ndarray:
    from fedbpt.search import projection

    size = int(prompt["n_prompt_tokens"]) * int(prompt["hidden_size"])
    return projection(int(prompt["seed"]), prompt["z"].shape[0], size, float(prompt["projection_scale"]))


def test_job_api_twin_exports_the_same_components(tmp_path):
    """job.py (NVFlare's Job API) builds the job the template builds: same workflow and components."""
    out = tmp_path / "export"
    site_flags = "--task_name sst2 --intrinsic_dim 64 --seed 7 --device cpu --num_users 3"
    proc = subprocess.run(
        [sys.executable, str(REPO / "job.py"), "--export_dir", str(out), "--n_clients", "3", "--num_rounds", "4",
         "--patience", "2", "--step_rule", "example", "--", *shlex.split(site_flags)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )  # fmt: skip
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


def test_job_api_twin_rejects_bad_site_flags(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "job.py"), "--export_dir", str(tmp_path), "--", "--k_shot", "0"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode != 0 and "--k_shot must be >= 1" in proc.stderr
