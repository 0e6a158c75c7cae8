"""Optional privacy for uploads: the clip-and-noise rule, the NVFlare filters on real messages, the job
template and job.py that configure them, the standalone loop, and once through the simulator."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from conftest import REPO
from fedbpt.nvflare_components import _broadcast
from fedbpt.nvflare_privacy import BROADCAST_MEAN, ClipAndNoiseUpdate, RecordBroadcastMean
from fedbpt.privacy import UploadPrivacy, privatize
from fedbpt.search import LocalResult, decode_up, encode_up, init_state


def test_an_update_longer_than_clip_norm_is_shortened_to_it_and_keeps_its_direction():
    rng = np.random.default_rng(0)
    received = rng.normal(size=50)
    update = rng.normal(size=50)
    update *= 10.0 / np.linalg.norm(update)  # norm 10
    sent, done = privatize(received + update, received, UploadPrivacy(clip_norm=2.5), rng)
    assert done == {"update_norm": pytest.approx(10.0), "clip_factor": pytest.approx(0.25), "noise_std": 0.0}
    np.testing.assert_allclose(sent - received, 0.25 * update, rtol=1e-12, atol=1e-12)
    short = 0.1 * update  # norm 1 < 2.5: left as it is
    sent, done = privatize(received + short, received, UploadPrivacy(clip_norm=2.5), rng)
    np.testing.assert_allclose(sent, received + short, rtol=0, atol=1e-12)
    assert done["clip_factor"] == 1.0


def test_the_noise_has_standard_deviation_noise_multiplier_times_clip_norm():
    rng = np.random.default_rng(1)
    d, privacy = 40_000, UploadPrivacy(clip_norm=3.0, noise_multiplier=0.2)
    received, update = np.zeros(d), np.full(d, 1.0)  # norm 200: clipped to 3
    sent, done = privatize(received + update, received, privacy, rng)
    noise = sent - update * done["clip_factor"]
    assert done["noise_std"] == pytest.approx(0.6)
    assert noise.std() == pytest.approx(0.6, rel=0.02)  # the estimate's standard error is 0.35%
    assert abs(noise.mean()) < 4 * 0.6 / np.sqrt(d)
    assert np.linalg.norm(noise) == pytest.approx(0.6 * np.sqrt(d), rel=0.02)  # vs the update's 3.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"clip_norm": -1.0}, "clip_norm must be a finite number >= 0, got -1.0"),
        ({"clip_norm": float("inf")}, "clip_norm must be a finite number >= 0, got inf"),
        ({"clip_norm": 0.0, "noise_multiplier": 0.5}, "noise_multiplier > 0 needs clip_norm > 0"),
    ],
)
def test_bad_privacy_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        UploadPrivacy(**kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        ClipAndNoiseUpdate(**kwargs)


def site_answer(local_mean: np.ndarray, fitness: float = 0.4):
    params, meta = encode_up(LocalResult(local_mean, fitness, np.full(4, 0.9), popsize=5))
    return FLModelUtils.to_shareable(FLModel(params=params, meta=meta, metrics={"dev_loss": 0.5, "n_dev": 8.0}))


def through_filters(state, local_mean, result_filter: ClipAndNoiseUpdate):
    """A task as the site's NVFlare client runs it: data filters, (the search), result filters, one context."""
    ctx = FLContext()
    task = _broadcast(state)
    assert RecordBroadcastMean().process(task, ctx) is task  # the task data goes on unchanged
    np.testing.assert_array_equal(ctx.get_prop(BROADCAST_MEAN), state.mean.astype(np.float32))
    return decode_up(*_params_meta(result_filter.process(site_answer(local_mean), ctx)))


def _params_meta(shareable):
    dxo = from_shareable(shareable)
    return dxo.data, dxo.meta


def test_the_filters_clip_and_noise_the_update_in_a_real_message():
    d = 20_000
    rng = np.random.default_rng(2)
    state = init_state(d, 1.0, seed=1)
    state.mean = rng.normal(size=d)  # the broadcast mean
    update = rng.normal(size=d) * 0.5  # norm about 70.7
    received = state.mean.astype(np.float32).astype(np.float64)
    local = received + update

    clipped = through_filters(state, local, ClipAndNoiseUpdate(clip_norm=5.0))
    step = clipped.mean - received
    assert np.linalg.norm(step) == pytest.approx(5.0, rel=1e-4)  # float32 on the wire
    assert step @ update / (np.linalg.norm(step) * np.linalg.norm(update)) > 0.9999  # same direction
    assert clipped.fitness == pytest.approx(0.4) and clipped.sigmas.tolist() == pytest.approx([0.9] * 4)

    noised = through_filters(state, local, ClipAndNoiseUpdate(clip_norm=5.0, noise_multiplier=0.01, seed=3))
    noise = noised.mean - received - step
    assert noise.std() == pytest.approx(0.05, rel=0.03)  # 0.01 x 5.0; standard error of the estimate 0.5%
    assert np.linalg.norm(noise) == pytest.approx(0.05 * np.sqrt(d), rel=0.03)  # 7.07, beside the step's 5.0

    off = through_filters(state, local, ClipAndNoiseUpdate())  # the template's default: clip_norm = 0
    np.testing.assert_array_equal(off.mean, local.astype(np.float32))


def test_the_result_filter_without_its_data_filter_fails_the_task_saying_what_is_missing():
    with pytest.raises(RuntimeError, match="found no broadcast mean: add fedbpt.nvflare_privacy.RecordBroadcastMean"):
        ClipAndNoiseUpdate(clip_norm=1.0).process(site_answer(np.ones(8)), FLContext())
    error = FLModelUtils.to_shareable(FLModel(params={}, meta={"error": "site-1 cannot take part: no data"}))
    assert from_shareable(ClipAndNoiseUpdate(clip_norm=1.0).process(error, FLContext())).meta["error"]  # passes


def test_the_standalone_loop_applies_the_same_rule(tiny_roberta, sst2_dir, tmp_path):
    from fedbpt.config import parse_args
    from fedbpt.search import load_state
    from fedbpt.standalone import ServerConfig, run_federation

    cfg = parse_args(["--task_name", "sst2", "--model_name", str(tiny_roberta), "--data_dir", str(sst2_dir),
                      "--n_prompt_tokens", "4", "--intrinsic_dim", "16", "--k_shot", "4", "--device", "cpu",
                      "--local_iter", "2", "--local_popsize", "4", "--num_users", "2",
                      "--eval_clients", ""])  # fmt: skip
    norms = {}
    for name, privacy in [("plain", None), ("clipped", UploadPrivacy(clip_norm=1e-3)),
                          ("noised", UploadPrivacy(clip_norm=1e-3, noise_multiplier=100.0))]:  # fmt: skip
        run_federation(cfg, ServerConfig(num_rounds=1), str(tmp_path / name), privacy=privacy)
        norms[name] = float(np.linalg.norm(load_state(str(tmp_path / name / "fedbpt_state.npz")).mean))
    # one round from z = 0: the new mean recombines the uploads, so its norm is at most the clip norm
    assert norms["plain"] > 1.0 and 0 < norms["clipped"] <= 1e-3 * (1 + 1e-5)
    assert norms["noised"] > 0.03  # noise of std 0.1 per coordinate, recombined over two sites


def test_job_py_adds_the_filters_only_when_asked(tmp_path):
    site_flags = ["--task_name", "sst2", "--intrinsic_dim", "64", "--device", "cpu", "--num_users", "2"]
    for name, extra in (("private", ["--clip_norm", "2.5", "--noise_multiplier", "0.1"]), ("plain", [])):
        proc = subprocess.run([sys.executable, str(REPO / "job.py"), "--name", name, "--export", "--export-dir",
                               str(tmp_path), *extra, "--", *site_flags], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
    private = json.loads((tmp_path / "private" / "app" / "config" / "config_fed_client.json").read_text())
    [data_chain], [result_chain] = private["task_data_filters"], private["task_result_filters"]
    assert data_chain["filters"] == [{"path": "fedbpt.nvflare_privacy.RecordBroadcastMean", "args": {}}]
    assert result_chain["filters"] == [{"path": "fedbpt.nvflare_privacy.ClipAndNoiseUpdate",
                                        "args": {"clip_norm": 2.5, "noise_multiplier": 0.1}}]  # fmt: skip
    assert data_chain["tasks"] == result_chain["tasks"] == ["train"]
    plain = json.loads((tmp_path / "plain" / "app" / "config" / "config_fed_client.json").read_text())
    assert not plain.get("task_data_filters") and not plain.get("task_result_filters")
    proc = subprocess.run([sys.executable, str(REPO / "job.py"), "--export", "--export-dir", str(tmp_path),
                           "--noise_multiplier", "0.1", "--", *site_flags], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "--noise_multiplier > 0 needs clip_norm > 0" in proc.stderr


def test_the_template_has_the_filters_off_by_default():
    text = (REPO / "job_templates" / "fedbpt" / "config_fed_client.conf").read_text()
    assert 'path = "fedbpt.nvflare_privacy.RecordBroadcastMean"' in text
    assert 'path = "fedbpt.nvflare_privacy.ClipAndNoiseUpdate"' in text
    assert re.search(r"clip_norm = 0\.0\s+noise_multiplier = 0\.0", text)
    for key in ("clip_norm", "noise_multiplier"):  # unique keys, so that `nvflare job create -f` can set them
        assert len(re.findall(rf"(?m)^\s*{key}\b", text)) == 1


@pytest.mark.slow
def test_the_template_filters_clip_every_upload_in_the_simulator(tmp_path, tiny_roberta):
    """The README's CPU commands with clip_norm=0.001 set through `nvflare job create -f`: every site's upload
    moves the global mean by at most 0.001 (it moves by more than 1 without), and the sites log it."""
    from test_job import readme_block, run, sandbox, set_vars

    root = sandbox(tmp_path)
    (tmp_path / "home").mkdir()
    workspace = tmp_path / "workspace"
    script = set_vars(readme_block("cpu-run"), ROUNDS="1", N_CLIENTS="2", MODEL_DIR=str(tiny_roberta),
                      WORKSPACE=str(workspace))  # fmt: skip
    script, n = re.subn(r'app_script="fedbpt_train.py"', 'app_script="fedbpt_train.py" clip_norm=0.001', script)
    assert n == 1
    proc = run(script, root, tmp_path / "home", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = (root / "jobs" / "fedbpt_cpu" / "app" / "config" / "config_fed_client.conf").read_text()
    assert re.search(r"clip_norm = 0\.001\b", client)
    with np.load(workspace / "server" / "simulate_job" / "fedbpt_state.npz") as state:
        assert int(state["round"]) == 1 and 0 < np.linalg.norm(state["mean"]) <= 0.001 * (1 + 1e-5)
    for site in ("site-1", "site-2"):
        log = (workspace / site / "log.txt").read_text()
        assert re.search(r"upload privacy: update norm [\d.]+ clipped by [\d.e-]+ to at most 0.001", log)
