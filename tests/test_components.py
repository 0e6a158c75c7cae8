"""The NVFlare glue without a running system: what the generator sends, how the aggregator reads results,
and when the workflow stops early."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from fedbpt.nvflare_components import FedBPTAggregator, FedBPTScatterAndGather, FedBPTShareableGenerator
from fedbpt.search import LocalResult, decode_down, encode_up, init_state, server_update


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
