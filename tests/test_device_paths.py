"""Every path a CUDA run takes, on the pretend device of ``tests/pretend_device.py``: rows that refuse
``.numpy()`` and host indexing as CUDA tensors do. Each path must give the same figures as on the host.

The paths: a site's set-up and a round as an evaluator, the standalone loop, ``fedbpt.predict`` on texts and
with ``--eval``, ``fedbpt.export`` checked against predict through the documented snippet, and the round
that ``benchmarks/throughput.py`` times."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, build_tiny_roberta
from fedbpt import export, predict
from fedbpt.client import FedBPTClient
from fedbpt.config import parse_args
from fedbpt.data import load_file
from fedbpt.standalone import ServerConfig, run_federation
from fedbpt.tasks import get_task
from pretend_device import INDEX_REFUSED, NUMPY_REFUSED, DeviceTensor, on_device, pretend_device

ROUNDS = 2


@pytest.fixture(scope="module")
def lively(tmp_path_factory) -> Path:
    """A tiny RoBERTa whose answers move with the prompt (a default-initialised one barely reads it)."""
    return build_tiny_roberta(tmp_path_factory.mktemp("lively-roberta"), initializer_range=1.0)


def site_flags(model: Path, data: Path, *extra: str) -> list[str]:
    return ["--task_name", "sst2", "--model_name", str(model), "--data_dir", str(data), "--n_prompt_tokens", "5",
            "--intrinsic_dim", "16", "--k_shot", "8", "--device", "cpu", "--seed", "3", "--local_iter", "2",
            "--local_popsize", "4", "--num_users", "2", "--eval_clients", "site-1", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def host_run(lively, sst2_dir, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The standalone loop on the host: what every pretend-device path must reproduce."""
    run_dir = tmp_path_factory.mktemp("host-run")
    rows = run_federation(parse_args(site_flags(lively, sst2_dir)), ServerConfig(num_rounds=ROUNDS), str(run_dir))
    return run_dir, rows


def test_the_pretend_device_refuses_what_cuda_refuses():
    x = on_device(torch.arange(6))
    y = (x * 2).view(2, 3).sum(0)  # results of operations stay on the device
    assert type(y) is DeviceTensor and y.tolist() == [6, 10, 14] and int(y[0]) == 6
    refused = {
        "numpy": lambda: y.numpy(),
        "np.asarray": lambda: np.asarray(y),
        "np.bincount": lambda: np.bincount(x),
        "host[device]": lambda: torch.zeros(6)[x],
        "host.index_select": lambda: torch.zeros(6).index_select(0, x),
        "host[device] = v": lambda: torch.zeros(6).__setitem__(x, 1.0),
    }
    for name, call in refused.items():
        with pytest.raises((TypeError, RuntimeError)) as err:
            call()
        assert str(err.value) in (NUMPY_REFUSED, INDEX_REFUSED), name
    host = y.cpu()  # the way to the host
    assert type(host) is torch.Tensor and host.numpy().tolist() == [6, 10, 14]
    assert type(y[torch.tensor([0, 2])]) is DeviceTensor  # a device tensor indexed by a host index: allowed


def test_site_set_up_and_round_as_evaluator(lively, sst2_dir, monkeypatch):
    cfg = parse_args(site_flags(lively, sst2_dir))
    host = FedBPTClient(cfg, "site-1")
    start = _start(cfg)
    expected, expected_metrics = host.run_round(start)

    device = pretend_device(monkeypatch)
    site = FedBPTClient(cfg, "site-1")
    assert device.batches == 3 and isinstance(site.test.ids, DeviceTensor)  # train, dev and test rows
    result, metrics = site.run_round(start)
    assert metrics["n_test"] == 872 and 0 <= metrics["test_acc"] <= 1
    for key in ("dev_loss", "dev_acc", "test_loss", "test_acc", "local_fitness"):
        assert metrics[key] == pytest.approx(expected_metrics[key], abs=1e-9), key
    np.testing.assert_allclose(result.mean, expected.mean, atol=1e-9)


def test_standalone_loop(lively, sst2_dir, host_run, monkeypatch, tmp_path):
    device = pretend_device(monkeypatch)
    rows = run_federation(parse_args(site_flags(lively, sst2_dir)), ServerConfig(num_rounds=ROUNDS), str(tmp_path))
    assert device.batches > 0 and [r["round"] for r in rows] == list(range(ROUNDS))
    for row, expected in zip(rows, host_run[1]):
        for key in ("dev_loss", "test_acc", "mean_norm", "next_sigma"):
            assert row[key] == pytest.approx(expected[key], abs=1e-9), key
    with np.load(tmp_path / "fedbpt_state.npz") as state, np.load(host_run[0] / "fedbpt_state.npz") as want:
        np.testing.assert_allclose(state["mean"], want["mean"], atol=1e-9)


def test_predict_on_texts_and_with_eval(host_run, sst2_dir, monkeypatch, capsys, tmp_path):
    prompt = host_run[0] / "best_prompt.npz"
    texts = [t for (t,) in load_file(get_task("sst2"), sst2_dir / "dev.tsv").texts[:30]]  # lengths differ
    argv = ["--prompt", str(prompt), "--device", "cpu"]
    outputs = {}
    for where in ("host", "device"):
        if where == "device":
            device = pretend_device(monkeypatch)
        assert predict.main([*argv, *texts]) == 0
        table = capsys.readouterr().out
        report = tmp_path / f"{where}.json"
        assert predict.main([*argv, "--eval", str(sst2_dir / "dev.tsv"), "--report", str(report)]) == 0
        outputs[where] = (table, report.read_text(), capsys.readouterr().out)
    assert device.batches == 2
    assert outputs["device"][0] == outputs["host"][0] and outputs["host"][0].count("\n") == 31
    assert outputs["device"][1] == outputs["host"][1] and '"n": 872' in outputs["device"][1]


def export_snippet() -> str:
    """The Python block marked ``<!-- export-snippet -->`` in the README or the page of docs/ that has it."""
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        match = re.search(r"<!-- export-snippet -->\s*```python\n(.*?)```", page.read_text(), re.S)
        if match:
            return match.group(1)
    raise AssertionError("no page has a python block marked <!-- export-snippet -->")


def test_export_agrees_with_predict(host_run, sst2_dir, monkeypatch, capsys, tmp_path):
    device = pretend_device(monkeypatch)
    prompt = host_run[0] / "best_prompt.npz"
    texts = [t for (t,) in load_file(get_task("sst2"), sst2_dir / "dev.tsv").texts[:40]]
    probs = predict.Predictor(*_predictor(prompt)).probabilities([(t,) for t in texts])
    monkeypatch.chdir(tmp_path)
    assert export.main(["--prompt", str(prompt), "--out", "prompt.safetensors"]) == 0
    capsys.readouterr()
    namespace: dict = {}
    exec(compile(export_snippet(), "export-snippet", "exec"), namespace)
    snippet = namespace["predict"](texts).numpy()
    assert device.batches >= 2  # predict's rows, and export's own probe of the template
    np.testing.assert_allclose(snippet, probs, atol=1e-5)


def test_the_round_that_the_throughput_benchmark_times(lively, sst2_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    throughput = pytest.importorskip("throughput")
    device = pretend_device(monkeypatch)
    site = throughput.Site(sys.modules["fedbpt"], throughput.README.split() + [
        "--model_name", str(lively), "--data_dir", str(sst2_dir), "--device", "cpu", "--n_prompt_tokens", "5",
        "--intrinsic_dim", "16", "--k_shot", "40"])  # fmt: skip
    row = throughput.measure(site, repeats=1)
    assert device.batches == 2  # the site's train and dev rows
    # 8 generations of 5 candidates on 8 train rows and their perturbed copies, the final mean, the dev pass
    assert row["forwards"] >= 10 and row["attended_tokens"] > 0 and 1.0 <= row["padded_per_attended"] < 1.5
    throughput.test_pass(site)  # the evaluator's pass, on rows the benchmark encodes itself
    assert device.batches == 3 and len(site.client.test) == 872
    print(f"\nthroughput round on the pretend device: {row['site_round_s']:.2f} s, {row['forwards']} forwards")


def _start(cfg):
    from fedbpt.search import decode_down, encode_down, init_state

    return decode_down(*encode_down(init_state(cfg.intrinsic_dim, 1.0, cfg.seed)))


def _predictor(prompt: Path):
    from fedbpt.prompt_file import open_blackbox, read_prompt

    file = read_prompt(prompt)
    return open_blackbox(file, device="cpu"), file.z
