"""The job on real NVFlare systems, as docs/deployment.md runs it: NVFlare's POC
mode and a deployment provisioned from the repository's project.yml, each on a free loopback port, with
the job submitted, awaited and downloaded through the admin CLI. Each test stops exactly the processes
it started (by process id) and removes what they wrote, also when an assertion fails."""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, REPO_SST2, readme_block, run, sandbox, set_vars
from systems import System, command_of, free_port, listening_addresses, poc_bind_loopback

pytestmark = pytest.mark.slow

OUTPUTS = ("metrics.jsonl", "summary.json", "best_prompt.npz")
SERVICE = re.compile(r"nvflare\.private\.fed\.app\.(server|client)\.(server|client)_train")


def build_job(block: str, tmp_path: Path, home: Path, page: str = "README.md", **values: str) -> Path:
    """Run a block of a page that writes a job folder (minus any simulator line) in a sandbox copy; returns
    the sandbox root."""
    root = sandbox(tmp_path)
    script = set_vars(readme_block(block, page), **values)
    script = "\n".join(line for line in script.splitlines() if not line.startswith("nvflare simulator"))
    proc = run(script, root, home, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


def assert_loopback_only(system: System) -> None:
    addresses = listening_addresses(system.pids())
    assert addresses, "no listening socket found for the system's processes"
    for address in addresses:
        host = address.rsplit(":", 1)[0]
        assert ipaddress.ip_address(host).is_loopback, f"an NVFlare process listens on {address}"


def submit_and_download(system: System, job: Path, out: Path, *kit: str) -> tuple[str, Path]:
    """``nvflare job submit``, ``job wait`` and ``job download``; returns the job id and its server run dir."""
    job_id = system.data("job", "submit", "-j", str(job), *kit)["job_id"]
    waited = system.data("job", "wait", job_id, "--timeout", "300", *kit, timeout=330)
    assert waited["status"] == "FINISHED:COMPLETED", waited
    system.run("job", "download", job_id, "-o", str(out), *kit)
    return job_id, out / job_id / "workspace"


def check_outputs(run_dir: Path, sites: list[str], rounds: int) -> list[dict]:
    for name in OUTPUTS:
        assert (run_dir / name).is_file(), f"{name} is not in the download: {sorted(p.name for p in run_dir.iterdir())}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(rounds))
    for row in rows:
        assert row["sites"] == sites and row["dropped"] == {} and row["missing"] == []
        assert 0.0 <= row["dev_acc"] <= 1.0 and 0.0 <= row["test_acc"] <= 1.0
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == rounds
    with np.load(run_dir / "best_prompt.npz") as prompt:
        assert prompt["z"].shape == (200,) and prompt["soft_prompt"].shape == (10, 32)  # d; L x H of the tiny model
    return rows


def stop_services(system: System, stop: tuple[str, ...]) -> None:
    """Stop the system with NVFlare's own command, check that its services exit by themselves, then kill
    what is left (the start scripts' watchdogs sleep up to 5 s before they notice) by process id."""
    services = [pid for pid in system.pids() if SERVICE.search(command_of(pid))]
    assert services, "no NVFlare service process found"
    system.run(*stop, timeout=120)
    assert system.wait_gone(services, 60) == [], "NVFlare services still running after the stop command"
    system.kill_all()
    assert system.pids() == []


def test_poc_runs_the_cpu_job(tmp_path, tiny_roberta):
    system = System(tmp_path / "system")
    poc = tmp_path / "poc"
    try:
        root = build_job("cpu-run", tmp_path, system.home, ROUNDS="2", N_CLIENTS="2", MODEL_DIR=str(tiny_roberta),
                         WORKSPACE=str(tmp_path / "unused"))  # fmt: skip
        system.run("poc", "config", "-pw", str(poc))
        system.run("poc", "prepare", "-n", "2", "--force")
        prod = poc / "example_project" / "prod_00"
        poc_bind_loopback(prod, free_port())
        system.run("poc", "start", timeout=180)
        assert_loopback_only(system)

        job_id, run_dir = submit_and_download(system, root / "jobs" / "fedbpt_cpu", tmp_path / "results")
        check_outputs(run_dir, ["site-1", "site-2"], rounds=2)
        assert (poc / "jobs-storage" / job_id).is_dir()  # NVFlare keeps the job inside the POC workspace

        stop_services(system, ("poc", "stop"))
        system.run("poc", "clean")
    finally:
        system.close(poc)
    assert not poc.exists()


def recipe_script(block: str, page: str, line: str, **values: str) -> str:
    """A block's variable lines (NAME=...) and its one line that starts with ``line``, values set."""
    lines = set_vars(readme_block(block, page), **values).splitlines()
    chosen = [x for x in lines if x.startswith(line)]
    assert len(chosen) == 1, f"{page} <!-- {block} --> has {len(chosen)} lines starting {line!r}"
    return "\n".join([*(x for x in lines if re.match(r"^[A-Z_]+=", x)), chosen[0]])


def printed_outputs(stdout: str) -> Path:
    """The run directory that job.py printed."""
    match = re.search(r"^outputs: (\S+) \(", stdout, re.M)
    assert match, f"job.py did not say where the outputs are:\n{stdout[-3000:]}"
    return Path(match.group(1))


def test_recipe_runs_on_poc(tmp_path, tiny_roberta):
    """The README's `python job.py --env poc` line: PocEnv provisions, starts, runs 2 rounds, downloads and
    stops the POC system by itself. With --poc_project: a project whose server is localhost on a free port
    (loopback only), sites site-1 and site-2, and the repository's project admin."""
    system = System(tmp_path / "system")
    poc = tmp_path / "poc"
    system.env["NVFLARE_POC_WORKSPACE"] = str(poc)
    try:
        project = yaml.safe_load((REPO / "project.yml").read_text())
        server = next(p for p in project["participants"] if p["type"] == "server")
        server["fed_learn_port"] = free_port()
        project["participants"] = [server, *({"name": f"site-{i}", "type": "client", "org": "sites"} for i in (1, 2)),
                                   *(p for p in project["participants"] if p["type"] == "admin")]  # fmt: skip
        (tmp_path / "poc_project.yml").write_text(yaml.safe_dump(project))
        root = sandbox(tmp_path)
        quickstart = [x for x in readme_block("cpu-run").splitlines() if x.startswith(("MODEL_DIR=", "DATA_DIR="))]
        script = recipe_script("recipe-run", "README.md", "python job.py --env poc ", ROUNDS="2")
        script = set_vars("\n".join([*quickstart, script]), MODEL_DIR=str(tiny_roberta))
        script = script.replace(" -- ", f" --poc_project {tmp_path / 'poc_project.yml'} -- ", 1)

        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=root, env=system.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        addresses, services = set(), set()
        while proc.poll() is None:  # while job.py runs the system: where do its processes listen?
            pids = system.pids()
            services |= {pid for pid in pids if SERVICE.search(command_of(pid))}
            addresses |= listening_addresses(pids)
            time.sleep(2)
        stdout = proc.stdout.read()
        assert proc.returncode == 0, stdout[-5000:]
        assert services and addresses, "no NVFlare service seen while job.py ran"
        for address in addresses:
            assert ipaddress.ip_address(address.rsplit(":", 1)[0]).is_loopback, f"a POC process listens on {address}"

        print(stdout[-1000:])
        check_outputs(printed_outputs(stdout), ["site-1", "site-2"], rounds=2)
        assert system.wait_gone(sorted(services), 60) == [], "job.py left POC services running"
        assert f"its workspace {poc} is kept" in stdout
        system.kill_all()  # what the start scripts' watchdogs left, by process id
        assert system.pids() == []
    finally:
        system.close(poc)
    assert not poc.exists()


def test_production_kits_run_the_job_on_site_local_data(tmp_path, tiny_roberta):
    system = System(tmp_path / "system")
    prov = tmp_path / "prov"
    try:
        project = yaml.safe_load((REPO / "project.yml").read_text())
        server = next(p for p in project["participants"] if p["type"] == "server")
        sites = sorted(p["name"] for p in project["participants"] if p["type"] == "client")
        admin = next(p["name"] for p in project["participants"] if p["type"] == "admin")
        assert server["name"] == "localhost" and sites == ["hospital-a", "hospital-b"]
        server["fed_learn_port"] = free_port()  # the only change to the committed file
        (tmp_path / "project.yml").write_text(yaml.safe_dump(project))
        system.run("provision", "-p", str(tmp_path / "project.yml"), "-w", str(prov))
        kits = prov / "fedbpt" / "prod_00"

        # the server keeps its job store and snapshots in the temporary folder, not in /tmp/nvflare
        local = kits / "localhost" / "local"
        resources = (local / "resources.json.default").read_text().replace("/tmp/nvflare/", f"{prov}/")
        (local / "resources.json").write_text(resources)

        # each site its own SST-2 folder: different halves of the repository's training sample, and the
        # test set (dev.tsv) only at hospital-a, the evaluator
        data = tmp_path / "site-data"
        header, *rows = (REPO_SST2 / "train.tsv").read_text().splitlines(keepends=True)
        for i, site in enumerate(sites):
            (data / site).mkdir(parents=True)
            (data / site / "train.tsv").write_text(header + "".join(rows[i::2]))
        shutil.copy(REPO_SST2 / "dev.tsv", data / "hospital-a")

        root = build_job("prod-job", tmp_path, system.home, "docs/deployment.md", ROUNDS="2",
                         MODEL_DIR=str(tiny_roberta), SITE_DATA=str(data))  # fmt: skip
        for name in ("localhost", *sites):
            system.start([str(kits / name / "startup" / "start.sh")], tmp_path / f"{name}.log")
        kit = ("--startup-kit", str(kits / admin))
        for _ in range(120):
            status = json.loads(system.run("system", "status", *kit, check=False) or "{}")
            if sorted(c["client_name"] for c in status.get("data", {}).get("clients", [])) == sites:
                break
        else:
            pytest.fail("the sites did not register with the server:\n" + "\n".join(system.log[-3:]))
        assert_loopback_only(system)

        _, run_dir = submit_and_download(system, root / "jobs" / "fedbpt_prod", tmp_path / "results", *kit)
        rows = check_outputs(run_dir, sites, rounds=2)
        assert all(r["test_acc"] is not None for r in rows)  # hospital-a scored the test set

        # the sites trained on their own data: the same broadcast prompt (z = 0 in round 0) scores
        # differently on their dev pools, drawn from their own folders; only hospital-a loaded a test set
        logs = {site: (tmp_path / f"{site}.log").read_text() for site in sites}
        assert re.search(r"hospital-a: 32 train examples .*, 32 dev, 872 test", logs["hospital-a"])
        assert re.search(r"hospital-b: 32 train examples .*, 32 dev, no test", logs["hospital-b"])
        dev_loss = {site: dev_losses(run_dir / "tb_events" / site) for site in sites}
        assert sorted(dev_loss["hospital-a"]) == sorted(dev_loss["hospital-b"]) == [0, 1]
        assert abs(dev_loss["hospital-a"][0] - dev_loss["hospital-b"][0]) > 1e-4, dev_loss

        # the recipe on the same system, as docs/deployment.md runs it: its exported folder through
        # `nvflare job submit`, then `job.py --env prod` (ProdEnv); both reach the template job's global mean
        values = {"ROUNDS": "2", "MODEL_DIR": str(tiny_roberta), "SITE_DATA": str(data), "KITS": str(kits)}
        block = readme_block("prod-recipe", "docs/deployment.md")
        assert f"nvflare job submit -j ./jobs/fedbpt_prod_recipe --startup-kit ${{KITS}}/{admin}" in block
        prefix = "".join(f"{name}={value}\n" for name, value in values.items())
        export = recipe_script("prod-recipe", "docs/deployment.md", "python job.py --name fedbpt_prod_recipe ")
        proc = run(prefix + export, root, system.home, timeout=120)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        _, recipe_dir = submit_and_download(system, root / "jobs" / "fedbpt_prod_recipe", tmp_path / "results", *kit)
        check_outputs(recipe_dir, sites, rounds=2)

        prod = recipe_script("prod-recipe", "docs/deployment.md", "python job.py --env prod ")
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", prefix + prod], cwd=root, env=system.env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        print(proc.stdout[-1000:])
        prod_env_dir = printed_outputs(proc.stdout)
        check_outputs(prod_env_dir, sites, rounds=2)
        with np.load(run_dir / "fedbpt_state.npz") as template:
            for other in (recipe_dir, prod_env_dir):
                with np.load(other / "fedbpt_state.npz") as state:
                    np.testing.assert_allclose(state["mean"], template["mean"], rtol=0, atol=1e-6)

        stop_services(system, ("system", "shutdown", "all", "--force", *kit))
    finally:
        system.close(prov)
    assert not prov.exists()


def dev_losses(tb_dir: Path) -> dict[int, float]:
    """A site's dev loss per round, from the TensorBoard events that the server received."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("dev_loss")}
