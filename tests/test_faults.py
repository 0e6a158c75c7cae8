"""Faults survived, through NVFlare's simulator: a site killed during a run, the server killed mid-round and
the job resumed from its checkpoint, a site that sends malformed results, a site whose search dimension
differs from the server's; and the same seed giving the same run. Every simulator is started with a
token in its environment and its processes are killed by id afterwards, also when a test fails."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_SST2, run, sandbox
from fedbpt.config import parse_args
from fedbpt.standalone import ServerConfig, run_federation
from systems import System, alive, command_of, descendants

pytestmark = pytest.mark.slow

DIM = 200


def site_flags(model: Path, num_users: int, **extra: str) -> str:
    flags = {"task_name": "sst2", "model_name": str(model), "data_dir": str(REPO_SST2), "n_prompt_tokens": "10",
             "k_shot": "16", "device": "cpu", "seed": "1234", "local_iter": "4", "local_popsize": "10",
             "num_users": str(num_users), "eval_clients": "site-1", **extra}  # fmt: skip
    return " ".join(f"--{k} {v}" for k, v in flags.items())


class Simulation:
    """A sandbox copy of the repository, jobs made with the README's ``nvflare job create`` command, and
    simulator runs whose processes are all marked (``systems.System``) and killed by id at the end."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.root = sandbox(tmp_path)
        self.system = System(tmp_path / "system")

    def job(self, name: str, app_config: str, app_script: str = "fedbpt_train.py", **server: object) -> Path:
        keys = " ".join(f"{k}={v}" for k, v in {"seed": 1234, "intrinsic_dim": DIM, **server}.items())
        script = (
            "nvflare config -jt ./job_templates\n"
            f'nvflare job create -force -j "./jobs/{name}" -w "fedbpt" -sd "./src" '
            f'-f app/config/config_fed_client.conf app_script="{app_script}" app_config="{app_config}" '
            f"-f app/config/config_fed_server.conf {keys}"
        )
        proc = run(script, self.root, self.system.home, timeout=120)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return self.root / "jobs" / name

    def start(self, job: Path, sites: int, name: str) -> subprocess.Popen:
        """``nvflare simulator`` with one thread per site, in the background; its workspace is tmp/<name>."""
        command = ["nvflare", "simulator", str(job), "-n", str(sites), "-t", str(sites), "-w", str(self.tmp / name)]
        with open(self.tmp / f"{name}.log", "wb") as log:
            return subprocess.Popen(command, env=self.system.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip

    def simulate(self, job: Path, sites: int, name: str, timeout: float = 400) -> int:
        proc = self.start(job, sites, name)
        try:
            return proc.wait(timeout=timeout)
        finally:
            self.kill_tree(proc)

    def run_dir(self, name: str) -> Path:
        return self.tmp / name / "server" / "simulate_job"

    def kill_tree(self, proc: subprocess.Popen) -> None:
        """Kill a simulator and every process under it, by id."""
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    def close(self) -> None:
        self.system.close()


@pytest.fixture
def simulation(tmp_path):
    sim = Simulation(tmp_path)
    try:
        yield sim
    finally:
        sim.close()
    assert sim.system.pids() == [], "processes of the test's simulators are still running"


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wait_for(condition, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the simulator ended (rc {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_job_finishes_all_rounds_when_one_of_three_sites_is_killed(simulation, tiny_roberta):
    # a dead site's failed task counts towards min_clients: wait for the slower live site after it
    job = simulation.job("three", site_flags(tiny_roberta, 3), min_clients=2, num_rounds=4,
                         wait_time_after_min_received=30)  # fmt: skip
    proc = simulation.start(job, 3, "run")
    try:
        metrics = simulation.run_dir("run") / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, proc, 300, "round 0")
        trainers = [pid for pid in descendants(proc.pid) if "custom/fedbpt_train.py" in command_of(pid)
                    and "/site-3/" in os.readlink(f"/proc/{pid}/cwd")]  # fmt: skip
        assert len(trainers) == 1, "site-3's trainer process not found under the simulator"
        os.kill(trainers[0], signal.SIGKILL)
        assert proc.wait(timeout=300) == 0
    finally:
        simulation.kill_tree(proc)
    assert not alive(trainers[0])

    rows = rows_of(simulation.run_dir("run"))
    assert [r["round"] for r in rows] == [0, 1, 2, 3]  # every round ran
    assert rows[0]["sites"] == ["site-1", "site-2", "site-3"]
    for row in rows[1:]:  # killed during round 1
        assert row["sites"] == ["site-1", "site-2"]
        named = {**row["dropped"], **dict.fromkeys(row["missing"], "missing")}
        assert "site-3" in named, row
    print(f"site-3 after its trainer was killed: {rows[1]['dropped'].get('site-3') or 'missing'}")
    with np.load(simulation.run_dir("run") / "fedbpt_state.npz") as state:
        assert int(state["round"]) == 4


def test_server_killed_mid_round_resumes_from_its_checkpoint_losing_at_most_one_round(simulation, tiny_roberta):
    flags = site_flags(tiny_roberta, 2)
    proc = simulation.start(simulation.job("first", flags, min_clients=2, num_rounds=4), 2, "first")
    try:  # the whole system (server and sites) dies while round 2 is under way
        log = simulation.tmp / "first" / "server" / "log.txt"
        wait_for(lambda: log.exists() and "Round 2 started." in log.read_text(), proc, 300, "round 2")
        time.sleep(0.5)
    finally:
        simulation.kill_tree(proc)
    simulation.system.kill_all()
    started = len(re.findall(r"Round \d+ started\.", log.read_text()))
    checkpoint = simulation.run_dir("first") / "fedbpt_state.npz"
    with np.load(checkpoint) as state:
        done = int(state["round"])  # rounds the checkpoint holds
    assert done == 2 and [r["round"] for r in rows_of(simulation.run_dir("first"))] == [0, 1]

    # a new job with the same num_rounds in total starts from the checkpoint and runs what is left
    second = simulation.job("second", flags, min_clients=2, num_rounds=4, resume_from=checkpoint)
    assert simulation.simulate(second, 2, "second") == 0
    assert [r["round"] for r in rows_of(simulation.run_dir("second"))] == [2, 3]
    assert "resuming after round 1: 2 rounds left of num_rounds" in (simulation.tmp / "second" / "server" /
                                                                      "log.txt").read_text()  # fmt: skip
    # the resumed job's own download has the best prompt and its figures, wherever the best round was found
    first_best = json.loads((simulation.run_dir("first") / "summary.json").read_text())
    summary = json.loads((simulation.run_dir("second") / "summary.json").read_text())
    assert summary["best_round"] >= first_best["best_round"] and summary["best_dev_loss"] is not None
    assert summary["best_dev_loss"] <= first_best["best_dev_loss"] and summary["best_test_acc"] is not None
    with np.load(simulation.run_dir("second") / "best_prompt.npz") as best:
        assert int(best["round"]) == summary["best_round"] and best["soft_prompt"].shape == (10, 32)
    print(
        f"resumed job's download: best round {summary['best_round']} (the first job's: {first_best['best_round']}), "
        f"dev loss {summary['best_dev_loss']:.4f}, test acc {summary['best_test_acc']:.4f}, best_prompt.npz"
    )
    lost = started - done  # rounds whose work the crash threw away
    print(f"server killed after {started} rounds started, {done} checkpointed: {lost} round(s) lost")
    assert lost <= 1

    # the same global mean as an uninterrupted run of 4 rounds (the standalone loop equals the simulator:
    # tests/test_job.py), because sites seed their streams from the server's round
    alone = simulation.tmp / "alone"
    run_federation(parse_args(shlex.split(flags)), ServerConfig(num_rounds=4, intrinsic_dim=DIM), str(alone))
    with (
        np.load(simulation.run_dir("second") / "fedbpt_state.npz") as resumed,
        np.load(alone / "fedbpt_state.npz") as ref,
    ):
        assert int(resumed["round"]) == int(ref["round"]) == 4
        np.testing.assert_allclose(resumed["mean"], ref["mean"], rtol=0, atol=1e-6)
        print(f"resumed vs uninterrupted mean: max |difference| {np.abs(resumed['mean'] - ref['mean']).max():.3g}")
        assert float(resumed["sigma"]) == pytest.approx(float(ref["sigma"]), rel=1e-6)
        assert np.linalg.norm(ref["mean"]) > 1.0  # the search moved: the comparison means something


FAULTY_SITE = '''"""Test-only site script: fedbpt_train as shipped, except that site-2 corrupts what it sends:
a NaN mean in its first answer, a mean one element short in its second, a step of 1e6 in every coordinate
in its third."""

import numpy as np
import nvflare.client as flare

import fedbpt_train

send, answers = flare.send, []


def corrupt(model, *args, **kwargs):
    if flare.get_site_name() == "site-2" and "mean" in (model.params or {}):
        mean = model.params["mean"]
        fault = len(answers) % 3
        model.params["mean"] = [np.full_like(mean, np.nan), mean[:-1], mean + np.float32(1e6)][fault]
        answers.append(fault)
    return send(model, *args, **kwargs)


flare.send = corrupt
fedbpt_train.main()
'''


def test_malformed_results_are_left_out_and_named_end_to_end(simulation, tiny_roberta):
    job = simulation.job("faulty", site_flags(tiny_roberta, 2), app_script="faulty_site.py", min_clients=2,
                         num_rounds=3)  # fmt: skip
    (job / "app" / "custom" / "faulty_site.py").write_text(FAULTY_SITE)
    assert simulation.simulate(job, 2, "run") == 0

    rows = rows_of(simulation.run_dir("run"))
    assert [r["round"] for r in rows] == [0, 1, 2]
    reasons = [r["dropped"].get("site-2", "") for r in rows]
    assert reasons[0] == "mean or fitness is not finite"
    assert reasons[1] == ("mean has shape (199,), expected (200,): --intrinsic_dim in app_config must equal "
                          "intrinsic_dim in config_fed_server.conf")  # fmt: skip
    assert reasons[2].startswith("step norm 1.41e+07 is more than 10x the "), reasons[2]
    assert re.fullmatch(r".* the [0-9.]+ that 4 local generations move at sigma [0-9.]+ without signal", reasons[2])
    for row in rows:
        assert row["sites"] == ["site-1"] and list(row["dropped"]) == ["site-2"]
        assert np.isfinite(row["mean_norm"]) and row["mean_norm"] < 100  # the global mean stayed sane
    with np.load(simulation.run_dir("run") / "fedbpt_state.npz") as state:
        assert state["mean"].shape == (DIM,) and np.all(np.isfinite(state["mean"]))


def test_dimension_mismatch_stops_the_job_in_round_0_before_any_site_loads_its_model_naming_both_settings(
    simulation, tiny_roberta
):
    """Every site asks for --intrinsic_dim 50, the server keeps its default 500. What the user needs: the job
    stops in round 0, no site spends the time to load its model, and the error names both settings. The
    seconds it took are printed as a figure, not asserted (they depend on the machine's load)."""
    job = simulation.job("dim", site_flags(tiny_roberta, 2, intrinsic_dim="50"), seed=1234, intrinsic_dim=500,
                         min_clients=2, num_rounds=2)  # fmt: skip
    assert simulation.simulate(job, 2, "run") != 0  # the run aborts
    log = (simulation.tmp / "run" / "server" / "log.txt").read_text()
    started = re.search(r"^(\S+ \S+) - \S+ - INFO - .* Round 0 started\.$", log, re.M)
    failed = re.search(r"^(\S+ \S+) - FedBPTAggregator - ERROR - .* - round 0: no usable site result \((.*)\)$", log,
                       re.M)  # fmt: skip
    assert started and failed, log[-3000:]
    assert "Round 1 started." not in log
    why = failed.group(2)
    trainers = (simulation.tmp / "run.log").read_text()  # the simulator's output, the site scripts' logs in it
    for site in ("site-1", "site-2"):
        assert (f"{site}: the site stopped: {site} cannot take part: --intrinsic_dim 50 in this site's app_config "
                "differs from intrinsic_dim 500 of the server's search state") in why  # fmt: skip
        assert f"fedbpt ERROR: {site} cannot take part: --intrinsic_dim 50" in trainers
    assert f"fedbpt.blackbox INFO: loaded {tiny_roberta}" not in trainers  # no site loaded its model
    seconds = (stamp(failed.group(1)) - stamp(started.group(1))).total_seconds()
    print(f"round 0 started -> job stopped with the sites' reasons: {seconds:.1f} s")


def test_a_job_with_loss_type_perf_runs_every_round_with_every_site(simulation, tiny_roberta):
    """--loss_type perf reports dev loss = -accuracy; min_clients is left to the template (every site)."""
    job = simulation.job("perf", site_flags(tiny_roberta, 2, loss_type="perf"), num_rounds=2)
    assert simulation.simulate(job, 2, "run") == 0
    rows = rows_of(simulation.run_dir("run"))
    assert [r["round"] for r in rows] == [0, 1]
    for row in rows:
        assert row["sites"] == row["dev_sites"] == ["site-1", "site-2"] and row["dropped"] == {}, row
        assert -1.0 <= row["dev_loss"] <= 0.0 and row["dev_loss"] == pytest.approx(-row["dev_acc"])
        assert row["test_acc"] is not None  # the evaluator is in every round
    summary = json.loads((simulation.run_dir("run") / "summary.json").read_text())
    assert summary["best_dev_loss"] == pytest.approx(-summary["best_dev_acc"])
    log = (simulation.tmp / "run" / "server" / "log.txt").read_text()
    assert "min_clients = 0: every round waits for all 2 sites of the job" in log
    print(f"perf: dev loss per round {[round(r['dev_loss'], 4) for r in rows]}, test acc {rows[-1]['test_acc']:.4f}")


def stamp(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f")


def test_same_seed_same_global_means_other_seed_other_means(tmp_path, tiny_roberta):
    """Through the standalone loop, which reaches the simulator's global mean for the same flags
    (tests/test_job.py): the sites' random streams come from the job seed only."""
    flags = site_flags(tiny_roberta, 2, k_shot="8", local_iter="2", local_popsize="5")  # small: a few seconds a run
    cfg = replace(parse_args(shlex.split(flags)), eval_clients="")

    def means(seed: int, name: str) -> list[np.ndarray]:
        seen = []
        run_federation(replace(cfg, seed=seed), ServerConfig(num_rounds=3, intrinsic_dim=DIM), str(tmp_path / name),
                       on_round=lambda start, reports, new: seen.append(new.mean.copy()))  # fmt: skip
        return seen

    first, again, other = means(1234, "first"), means(1234, "again"), means(99, "other")
    assert len(first) == len(again) == len(other) == 3
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    for a, c in zip(first, other):
        assert np.linalg.norm(a - c) > 1.0
