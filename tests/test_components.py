"""The NVFlare glue without a running system: what the generator sends, how the aggregator reads results,
and when the workflow stops early."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from conftest import REPO
from fedbpt.nvflare_components import (
    FedBPTAggregator,
    FedBPTScatterAndGather,
    FedBPTShareableGenerator,
    wire_bytes,
)
from fedbpt.search import LocalResult, ServerState, decode_down, encode_down, encode_up, init_state, server_update


def context(state) -> FLContext:
    ctx = FLContext()
    ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(state.to_arrays(), {}), private=True, sticky=False)
    return ctx


def test_generator_sends_only_the_public_part_of_the_state():
    state = init_state(500, 0.7, seed=3)
    sent = from_shareable(FedBPTShareableGenerator().learnable_to_shareable(make_model_learnable(state.to_arrays(), {}),
                                                                            FLContext()))  # fmt: skip
    assert sorted(sent.data) == ["cov", "mean"] and sent.meta["sigma"] == pytest.approx(0.7)
    assert all(a.dtype == np.float32 and a.shape == (500,) for a in sent.data.values())
    received = decode_down(sent.data, sent.meta)
    np.testing.assert_array_equal(received.mean, state.mean)


def test_aggregator_rejects_malformed_results():
    aggregator = FedBPTAggregator()
    ctx = context(init_state(8, 1.0, 1))
    good_params, good_meta = encode_up(LocalResult(np.ones(8), 0.5, np.ones(3), popsize=5))
    good = FLModelUtils.to_shareable(FLModel(params=good_params, meta=good_meta, metrics={"dev_loss": 0.5}))
    no_fitness = FLModelUtils.to_shareable(FLModel(params=good_params, meta={"sigmas": [1.0]}))
    assert aggregator.accept(good, ctx) is True
    assert aggregator.accept(no_fitness, ctx) is False
    assert len(aggregator.reports) == 1 and aggregator.reports[0].result.fitness == pytest.approx(0.5)
    assert aggregator.reports[0].bytes_up > 8 * 4


def site_result(site: str, params: dict, meta: dict, metrics: dict | None = None, rc=None):
    shareable = FLModelUtils.to_shareable(FLModel(params=params, meta=meta, metrics=metrics or {}))
    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    if rc is not None:
        shareable.set_return_code(rc)
    return shareable


def described_result(tmp_path, monkeypatch):
    """An aggregator writing into tmp_path, the state it starts from, and a site's result with its description."""
    import fedbpt.nvflare_components as components

    monkeypatch.setattr(components, "run_dir", lambda fl_ctx: str(tmp_path))
    params, meta = encode_up(LocalResult(np.full(8, 0.1), 0.5, np.ones(3), popsize=5))
    description = {"model_name": "m", "task_name": "sst2", "seed": 1, "n_prompt_tokens": 2, "hidden_size": 4,
                   "projection_scale": 0.5, "intrinsic_dim": 8, "k_shot": 8, "num_labels": 2}  # fmt: skip
    return FedBPTAggregator(), init_state(8, 1.0, 1), params, meta, description


def test_aggregator_names_every_site_it_leaves_out(tmp_path, monkeypatch):
    """A site that reported an error, sent a malformed result or failed its task is named with why in the
    metrics row; a site heard from before that does not answer is named as missing."""
    aggregator, state, params, meta, description = described_result(tmp_path, monkeypatch)
    good = {**meta, "fingerprint": "f00d", "description": description}
    metrics = {"dev_loss": 0.5, "dev_acc": 0.5, "n_dev": 4.0}
    for site in ("site-1", "site-2", "site-3", "site-4"):
        assert aggregator.accept(site_result(site, params, good, metrics), context(state))
    state = _state_after(aggregator, state)
    assert aggregator.descriptions["site-1"] == description  # kept: a later result may come without one

    ctx = context(state)
    assert aggregator.accept(site_result("site-1", params, {**meta, "fingerprint": "f00d"}, metrics), ctx)
    assert not aggregator.accept(site_result("site-2", {}, {"error": "site-2 cannot take part: no data"}), ctx)
    assert not aggregator.accept(site_result("site-3", params, {"sigmas": [1.0]}), ctx)  # no fitness
    aggregator.refuse("site-4", "its task ended with EXECUTION_EXCEPTION")  # what the workflow reports
    aggregator.aggregate(ctx)
    row = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["sites"] == ["site-1"] and row["missing"] == []
    assert row["dropped"] == {
        "site-2": "the site stopped: site-2 cannot take part: no data",
        "site-3": "malformed result: site result lacks ['fitness']",
        "site-4": "its task ended with EXECUTION_EXCEPTION",
    }
    with np.load(tmp_path / "final_prompt.npz") as prompt:  # written from the first site's description
        assert str(prompt["model_name"]) == "m" and prompt["soft_prompt"].shape == (2, 4)

    state = _state_after(aggregator, state, [("site-1", metrics)])
    row = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["missing"] == ["site-2", "site-3", "site-4"]


def _state_after(aggregator, state, answers=()):
    ctx = context(state)
    params, meta = encode_up(LocalResult(np.full(8, 0.1), 0.5, np.ones(3), popsize=5))
    for site, metrics in answers:
        aggregator.accept(site_result(site, params, {**meta, "fingerprint": "f00d"}, metrics), ctx)
    return _state_from(aggregator.aggregate(ctx))


def _state_from(shareable):
    from fedbpt.search import ServerState

    return ServerState.from_arrays(from_shareable(shareable).data)


def test_workflow_tells_the_aggregator_about_failed_tasks():
    workflow = FedBPTScatterAndGather(min_clients=2, num_rounds=2, ignore_result_error=True)
    workflow.aggregator = FedBPTAggregator()
    workflow._current_failed_clients, workflow._current_num_targets = set(), 3
    failed = site_result("site-3", {}, {}, rc=ReturnCode.EXECUTION_EXCEPTION)
    assert workflow._accept_train_result("site-3", failed, FLContext()) is False  # ScatterAndGather ignores it
    assert workflow.aggregator.refused == {"site-3": "its task ended with EXECUTION_EXCEPTION"}


def test_workflow_stops_after_patience_rounds_without_a_better_dev_loss():
    workflow = FedBPTScatterAndGather(patience=2, min_clients=2, num_rounds=50, wait_time_after_min_received=0)
    workflow._start_round = 0
    state = init_state(4, 1.0, 1)
    sites = [LocalResult(np.full(4, 0.1), 1.0, np.ones(2), popsize=4)]
    for current, best in [(0, 0), (1, 1), (2, 1)]:  # round 2 did not beat round 1: one stale round
        state.best_round = best
        state = server_update(state, sites)
        workflow._current_round = current
        workflow.handle_event(AppEventType.ROUND_DONE, context(state))
        assert workflow._num_rounds == 50
    state = server_update(state, sites)  # round 3 did not beat round 1 either: two stale rounds
    workflow._current_round = 3
    workflow.handle_event(AppEventType.ROUND_DONE, context(state))
    assert workflow._num_rounds == 4  # the loop ends after round 3


def test_server_side_imports_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = (
        "import sys; import fedbpt.nvflare_components, fedbpt.server, fedbpt.search, fedbpt.config; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": "src", "PATH": ""}, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert out.stdout.strip() == "[]"


def test_a_site_describes_itself_until_the_broadcast_shows_the_server_holds_its_description(
    tmp_path, monkeypatch, tiny_roberta
):
    """The site script runs three rounds (NVFlare's Client API replaced by lists); the server refuses the first
    result as malformed, so the second broadcast names no description and the site sends it again. The
    server learns it from the second, and keeps it in its state; the third broadcast names it, and the site
    sends none. A server that starts afresh from that state (a restart) writes the prompt files from it,
    with the soft prompt, the model and the hidden size, and the answer is smaller by the description."""
    import sys

    import nvflare.client as flare

    import fedbpt.nvflare_components as components
    import fedbpt_train

    monkeypatch.setattr(components, "run_dir", lambda fl_ctx: str(tmp_path))
    flags = ["--task_name", "sst2", "--model_name", str(tiny_roberta), "--data_dir", str(REPO / "data" / "sst2"),
             "--n_prompt_tokens", "4", "--k_shot", "4", "--device", "cpu", "--seed", "1234", "--local_iter", "2",
             "--local_popsize", "4", "--num_users", "1", "--eval_clients", "", "--perturb", "0"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["fedbpt_train.py", *flags])
    states = [init_state(16, 1.0, 1234)] * 2
    sent = []

    def receive(*a, **k):
        params, meta = encode_down(states[len(sent)])
        return FLModel(params=params, meta=meta)

    for name, value in {"init": lambda *a, **k: None, "get_site_name": lambda: "site-1",
                        "is_running": lambda: len(sent) < 3, "receive": receive,
                        "send": lambda model, *a, **k: sent.append(model)}.items():  # fmt: skip
        monkeypatch.setattr(flare, name, value)
    monkeypatch.setattr(fedbpt_train, "SummaryWriter", lambda: type("W", (), {"add_scalar": lambda *a, **k: None})())

    aggregator = FedBPTAggregator()
    original = flare.send

    def send(model, *a, **k):  # the server's side of each round, as the answers arrive
        original(model)
        if len(sent) == 1:
            model = FLModel(params=model.params, meta={k: v for k, v in model.meta.items() if k != "fitness"},
                            metrics=model.metrics)  # fmt: skip
            malformed = site_result("site-1", model.params, model.meta, model.metrics)
            assert not aggregator.accept(malformed, context(states[0]))  # refused before anything else is read
            assert aggregator.descriptions == {}
        elif len(sent) == 2:
            assert aggregator.accept(site_result("site-1", model.params, model.meta, model.metrics),
                                     context(states[1]))  # fmt: skip
            states.append(ServerState.from_arrays(from_shareable(aggregator.aggregate(context(states[1]))).data))

    monkeypatch.setattr(flare, "send", send)
    fedbpt_train.main()
    assert len(sent) == 3 and ["description" in m.meta for m in sent] == [True, True, False]
    description = sent[1].meta["description"]
    print(f"description on the wire: {len(json.dumps(description))} bytes as JSON")
    assert states[2].known_descriptions() == {"site-1": description}

    restarted = FedBPTAggregator()  # knows nothing but the state
    third = sent[2]
    assert restarted.accept(site_result("site-1", third.params, third.meta, third.metrics), context(states[2]))
    (tmp_path / "final_prompt.npz").unlink()
    restarted.aggregate(context(states[2]))
    with np.load(tmp_path / "final_prompt.npz") as prompt:
        assert str(prompt["model_name"]) == str(tiny_roberta) and int(prompt["hidden_size"]) == 32
        assert prompt["soft_prompt"].shape == (4, 32)
    sizes = [wire_bytes(site_result("site-1", m.params, m.meta, m.metrics)) for m in sent[1:]]
    print(f"answer with the description {sizes[0]} bytes, without {sizes[1]}")
    assert sizes[0] - sizes[1] >= 0.75 * len(json.dumps(description))  # the wire packs it tighter than JSON


class _Engine:
    def __init__(self, sites: int):
        self.sites = sites

    def get_clients(self) -> list[str]:
        return [f"site-{i + 1}" for i in range(self.sites)]


def test_min_clients_left_unset_waits_for_every_site_and_a_smaller_one_is_named_in_a_warning(caplog):
    """The template's default and the workflow's: min_clients = 0, every site the job started. A job that
    sets 2 of 10 sites with no wait for stragglers gets a warning that names both keys."""
    template = (REPO / "job_templates" / "fedbpt" / "config_fed_server.conf").read_text()
    assert re.search(r"^\s*min_clients = 0$", template, re.M)
    workflow = FedBPTScatterAndGather(num_rounds=2, wait_time_after_min_received=0)
    workflow._engine = _Engine(10)
    workflow.resolve_min_clients(FLContext())
    assert workflow._min_clients == 10
    explicit = FedBPTScatterAndGather(min_clients=2, num_rounds=2, wait_time_after_min_received=0)
    explicit._engine = _Engine(10)
    with caplog.at_level(logging.WARNING):
        explicit.resolve_min_clients(FLContext())
    assert explicit._min_clients == 2
    assert "min_clients = 2 of the job's 10 sites and wait_time_after_min_received = 0" in caplog.text
    with pytest.raises(ValueError, match="min_clients must be a whole number >= 0"):
        FedBPTScatterAndGather(min_clients=-1)


def test_a_late_answer_leaves_its_description_and_its_measurement_of_the_earlier_prompt(tmp_path, monkeypatch):
    """site-2 answers round 0 while round 1 runs (its first result): the server learns its description and
    records its dev and test figures for round 0's prompt in round 1's row under late."""
    aggregator, state, params, meta, description = described_result(tmp_path, monkeypatch)
    answer = {**meta, "fingerprint": "f00d", "description": description}
    ctx = context(state)
    ctx.set_prop(AppConstants.CURRENT_ROUND, 1, private=True, sticky=False)
    late = site_result("site-2", params, answer, {"dev_loss": 0.7, "dev_acc": 0.4, "n_dev": 4.0, "test_acc": 0.6})
    late.add_cookie(AppConstants.CONTRIBUTION_ROUND, 0)
    assert aggregator.accept(late, ctx) is False  # its search result belongs to a closed round
    assert aggregator.descriptions["site-2"] == description
    now = site_result("site-1", params, answer, {"dev_loss": 0.5, "dev_acc": 0.5, "n_dev": 4.0})
    now.add_cookie(AppConstants.CONTRIBUTION_ROUND, 1)
    assert aggregator.accept(now, ctx)
    aggregator.aggregate(ctx)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["sites"] == ["site-1"]
    assert row["late"] == {"site-2": {"round": 0, "dev_loss": 0.7, "dev_acc": 0.4, "n_dev": 4.0, "test_acc": 0.6}}
