"""The server's global figures as TensorBoard scalars: the aggregator fires NVFlare analytics events and the
server's TBAnalyticsReceiver (as the job template configures it) writes them into the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContextManager
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver

from conftest import REPO
from fedbpt.nvflare_components import SERVER_SCALARS, FedBPTAggregator
from fedbpt.search import LocalResult, ServerState, encode_up, init_state


class Engine:
    """The two things the aggregator and the receiver need from NVFlare's server engine: contexts that know
    the engine and the server's name, events delivered to the receiver, and the run's workspace."""

    def __init__(self, run_dir: Path, receiver: TBAnalyticsReceiver):
        self.run_dir, self.receiver = run_dir, receiver
        self.manager = FLContextManager(engine=self, identity_name="server", job_id="job")

    def new_context(self):
        return self.manager.new_context()

    def fire_event(self, event_type: str, fl_ctx) -> None:
        self.receiver.handle_event(event_type, fl_ctx)

    def get_workspace(self):
        return self

    def get_run_dir(self, job_id: str) -> str:
        return str(self.run_dir)

    def get_result_root(self, job_id: str) -> str:
        return str(self.run_dir)


def template_receiver_events() -> list[str]:
    """The events the job template's receiver listens to."""
    import re

    text = (REPO / "job_templates" / "fedbpt" / "config_fed_server.conf").read_text()
    return json.loads(re.search(r"events = (\[.*?\])", text).group(1))


def test_global_dev_test_accuracy_dev_loss_and_sigma_land_in_the_run_dir(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    receiver = TBAnalyticsReceiver(events=template_receiver_events())
    engine = Engine(tmp_path, receiver)
    receiver.handle_event(EventType.START_RUN, engine.new_context())
    aggregator = FedBPTAggregator()
    state = init_state(8, 1.0, 1)
    for dev_loss, test_acc in [(0.7, 0.55), (0.6, 0.625), (0.65, 0.6)]:
        ctx = engine.new_context()
        ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(state.to_arrays(), {}), private=True,
                     sticky=False)  # fmt: skip
        for site, step in (("site-1", 0.1), ("site-2", -0.2)):
            params, meta = encode_up(LocalResult(state.mean + step, dev_loss, np.ones(3), popsize=5))
            metrics = {"dev_loss": dev_loss, "dev_acc": 1 - dev_loss, "n_dev": 4.0}
            if site == "site-1":
                metrics.update(test_acc=test_acc, test_loss=1.0, n_test=100.0)
            shareable = FLModelUtils.to_shareable(FLModel(params=params, meta=meta, metrics=metrics))
            shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
            assert aggregator.accept(shareable, ctx)
        state = ServerState.from_arrays(FLModelUtils.from_shareable(aggregator.aggregate(ctx)).params)
    receiver.handle_event(EventType.END_RUN, engine.new_context())

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logdir = tmp_path / "tb_events" / "server"
    assert list(logdir.glob("events.out.tfevents.*")), "no event file from the server"
    events = EventAccumulator(str(logdir))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted(SERVER_SCALARS)
    for key in SERVER_SCALARS:
        points = events.Scalars(key)
        assert [p.step for p in points] == [0, 1, 2]
        assert [p.value for p in points] == pytest.approx([r[key] for r in rows], rel=1e-6)  # float32 on disk
    assert [p.value for p in events.Scalars("test_acc")] == pytest.approx([0.55, 0.625, 0.6])
    assert [p.value for p in events.Scalars("dev_loss")] == pytest.approx([0.7, 0.6, 0.65])
