"""NVFlare glue for the server: a persistor, a shareable generator and an aggregator for ScatterAndGather.

The global model that ScatterAndGather carries from round to round is the whole server search state
(``search.ServerState`` as a dict of arrays). The persistor creates it and checkpoints it; the
shareable generator sends the sites only its small public part (mean, sigma, covariance); the
aggregator reads the state from the context, runs ``server.aggregate_round`` and returns the next one.
No torch, no transformers: the server never sees the model.
"""

from __future__ import annotations

import os
import time

from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, AnalyticsDataType
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor
from nvflare.app_common.abstract.shareable_generator import ShareableGenerator
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.decomposers import common_decomposers
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather
from nvflare.fuel.utils import fobs

from .search import COVARIANCES, MAX_STEP, STEP_RULES, ServerState, decode_up, encode_down, init_state, load_state
from .server import STATE_FILE, Guard, RunRecorder, SiteReport, aggregate_round, check_measurement

# The global figures of each round that the aggregator sends to TensorBoard (the same tags as the sites'
# scalars, so that TensorBoard draws the server's curve beside each site's).
SERVER_SCALARS = ("dev_acc", "test_acc", "dev_loss", "sigma")
# What a late answer's row entry keeps: its figures for the prompt of the round it answered.
LATE_FIGURES = ("dev_loss", "dev_acc", "n_dev", "test_loss", "test_acc", "n_test")


def wire_bytes(shareable: Shareable) -> int:
    """Size of a message as NVFlare serialises it for the wire."""
    common_decomposers.register()  # numpy arrays need their decomposer; registering twice is harmless
    return len(fobs.dump_to_bytes(shareable))


def _broadcast(state: ServerState) -> Shareable:
    params, meta = encode_down(state)
    return DXO(DataKind.WEIGHTS, data=params, meta=meta).to_shareable()


def run_dir(fl_ctx: FLContext) -> str:
    """The server's run directory (what ``nvflare job download`` returns)."""
    return fl_ctx.get_engine().get_workspace().get_result_root(fl_ctx.get_job_id())


def _state(learnable: ModelLearnable) -> ServerState:
    return ServerState.from_arrays(learnable[ModelLearnableKey.WEIGHTS])


class FedBPTPersistor(ModelPersistor):
    """Creates the initial search state (z = 0) and checkpoints the whole state every round.

    A restarted job resumes from the checkpoint in its run directory; ``resume_from`` starts a new job
    from another run's ``fedbpt_state.npz``.
    """

    def __init__(self, intrinsic_dim: int = 500, sigma: float = 1.0, seed: int = 42, covariance: str = "diag",
                 resume_from: str = ""):  # fmt: skip
        super().__init__()
        if covariance not in COVARIANCES:
            raise ValueError(f"persistor covariance must be one of {COVARIANCES}, got {covariance!r}")
        self.intrinsic_dim, self.sigma, self.seed = int(intrinsic_dim), float(sigma), int(seed)
        self.covariance, self.resume_from = covariance, resume_from

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        checkpoint = os.path.join(run_dir(fl_ctx), STATE_FILE)
        for path in (checkpoint, self.resume_from):
            if path and os.path.exists(path):
                state = load_state(path)
                self.log_info(fl_ctx, f"resuming the FedBPT search from {path} (round {state.round})")
                break
        else:
            if self.resume_from:
                raise FileNotFoundError(f"persistor resume_from {self.resume_from!r}: no such checkpoint")
            state = init_state(self.intrinsic_dim, self.sigma, self.seed, self.covariance)
        if state.dim != self.intrinsic_dim:
            raise ValueError(f"checkpoint has intrinsic_dim {state.dim}, the job asks for {self.intrinsic_dim}")
        return make_model_learnable(weights=state.to_arrays(), meta_props={})

    def save_model(self, model: ModelLearnable, fl_ctx: FLContext) -> None:
        RunRecorder(run_dir(fl_ctx)).save_state(_state(model))


class FedBPTShareableGenerator(ShareableGenerator):
    """Sends the sites the public part of the state; takes the aggregator's next state as the new model."""

    def learnable_to_shareable(self, model: ModelLearnable, fl_ctx: FLContext) -> Shareable:
        return _broadcast(_state(model))

    def shareable_to_learnable(self, shareable: Shareable, fl_ctx: FLContext) -> ModelLearnable:
        return make_model_learnable(weights=from_shareable(shareable).data, meta_props={})


class FedBPTAggregator(Aggregator):
    """Collects the sites' local means and fitnesses and runs the global CMA-ES update on them.

    Every result it cannot use is named in that round's metrics row with the reason: a task that failed,
    a malformed message, an error the site reported, or what ``server.check_report`` refuses. A late answer
    to an earlier round is logged, and its measurement of that round's prompt recorded under ``late``. A site
    heard from before that does not answer is named as missing."""

    def __init__(self, step_rule: str = "eq6", max_step: float = MAX_STEP, selection: str = Guard.selection,
                 confidence: float = Guard.confidence, restore_after: int = Guard.restore_after,
                 restore_shrink: float = Guard.restore_shrink):  # fmt: skip
        super().__init__()
        if step_rule not in STEP_RULES:
            raise ValueError(f"aggregator step_rule must be one of {STEP_RULES}, got {step_rule!r}")
        if not max_step > 0:
            raise ValueError(f"aggregator max_step must be > 0, got {max_step}")
        self.step_rule, self.max_step = step_rule, float(max_step)
        # kept as given too: NVFlare's Job API exports a component's arguments from its attributes
        self.selection, self.confidence = selection, confidence
        self.restore_after, self.restore_shrink = restore_after, restore_shrink
        self.guard = Guard(selection, float(confidence), restore_after, float(restore_shrink))
        self.reports: list[SiteReport] = []  # in the order they arrived
        self.refused: dict[str, str] = {}
        self.descriptions: dict[str, dict] = {}  # each site's latest description heard (the state keeps them too)
        self.known_sites: set[str] = set()
        self.late: dict[str, dict] = {}  # late answers' measurements of an earlier round's prompt
        self.round_started = time.perf_counter()
        self.recorder: RunRecorder | None = None  # made on first use: the run dir is known only then

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == AppEventType.ROUND_STARTED:
            self.round_started = time.perf_counter()

    def refuse(self, site: str, reason: str, fl_ctx: FLContext | None = None) -> None:
        """Leave ``site`` out of this round, and say why in the log and the metrics row."""
        self.known_sites.add(site)
        self.refused[site] = reason
        if fl_ctx is not None:
            self.log_warning(fl_ctx, f"leaving out {site}: {reason}")

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        site = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "?")
        current = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        contributed = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            self.refuse(site, f"its task ended with {shareable.get_return_code()}", fl_ctx)
            return False
        if contributed is not None and contributed != current:
            self.log_warning(fl_ctx, f"{site} answered round {contributed} in round {current}; its search result "
                             "is ignored, its measurement of that round's prompt recorded under late")  # fmt: skip
            self.keep_late(site, int(contributed), shareable, fl_ctx)
            return False
        try:
            model = FLModelUtils.from_shareable(shareable)
            meta = model.meta or {}
            if meta.get("error"):  # "stopped": the site answers every later round with this error too
                self.refuse(site, f"the site {'stopped' if meta.get('stopped', True) else 'failed'}: {meta['error']}",
                            fl_ctx)  # fmt: skip
                return False
            result = decode_up(model.params or {}, meta)
            metrics = {k: float(v) for k, v in (model.metrics or {}).items()}
        except (ValueError, TypeError, KeyError) as e:
            self.refuse(site, f"malformed result: {e}", fl_ctx)
            return False
        if isinstance(meta.get("description"), dict):  # with every result: the latest one wins
            self.descriptions[site] = dict(meta["description"])
        self.known_sites.add(site)
        self.reports.append(SiteReport(site, result, metrics, bytes_up=wire_bytes(shareable),
                                       fingerprint=str(meta.get("fingerprint", "")),
                                       description=self.descriptions.get(site, {})))  # fmt: skip
        return True

    def keep_late(self, site: str, round_: int, shareable: Shareable, fl_ctx: FLContext) -> None:
        """A late answer to round ``round_``: keep its description, and record its valid measurement of that
        round's prompt in the next row under ``late``. That round is closed: its row and selection stand."""
        try:
            model = FLModelUtils.from_shareable(shareable)
            meta = model.meta or {}
            result = decode_up(model.params or {}, meta)
            metrics = {k: float(v) for k, v in (model.metrics or {}).items()}
        except (ValueError, TypeError, KeyError):
            return
        if isinstance(meta.get("description"), dict):
            self.descriptions[site] = dict(meta["description"])
        learnable = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        if "dev_loss" not in metrics or not isinstance(learnable, ModelLearnable):
            return
        state = _state(learnable)
        description = self.descriptions.get(site) or state.known_descriptions().get(site, {})
        report = SiteReport(site, result, metrics, fingerprint=str(meta.get("fingerprint", "")),
                            description=description)  # fmt: skip
        if check_measurement(report, state) is None:
            figures = {k: metrics[k] for k in LATE_FIGURES if k in metrics}
            self.late[site] = {"round": round_, **figures}

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        state = _state(fl_ctx.get_prop(AppConstants.GLOBAL_MODEL))
        reports, refused = self.reports, self.refused
        self.reports, self.refused = [], {}
        try:
            new_state, row = aggregate_round(state, reports, self.step_rule, self.max_step, refused,
                                             expected=sorted(self.known_sites), guard=self.guard)  # fmt: skip
        except RuntimeError as e:
            self.log_error(fl_ctx, str(e))
            raise
        used = set(row["sites"])
        if self.late:
            row["late"], self.late = dict(sorted(self.late.items())), {}
        row.update(
            bytes_up=[r.bytes_up for r in sorted(reports, key=lambda r: r.site) if r.site in used],
            bytes_down=wire_bytes(_broadcast(state)),
            seconds=round(time.perf_counter() - self.round_started, 3),
        )
        self.recorder = self.recorder or RunRecorder(run_dir(fl_ctx), self.guard)
        self.recorder.record(row, new_state, new_state.known_descriptions().get(new_state.fingerprint_site))
        self.send_scalars(row, fl_ctx)
        self.log_info(
            fl_ctx,
            f"round {row['round']}: dev loss {row['dev_loss']:.4f} acc {row['dev_acc']:.4f}"
            + (f", test acc {row['test_acc']:.4f}" if row["test_acc"] is not None else "")
            + f", sigma {row['sigma']:.4g} -> {row['next_sigma']:.4g}, {len(row['sites'])} sites"
            + "".join(f"; left out {site}: {why}" for site, why in row["dropped"].items())
            + (f"; missing {', '.join(row['missing'])}" if row["missing"] else "")
            + (f"; restored to round {row['restored']['to_round']}'s mean" if row["restored"] else ""),
        )
        return DXO(DataKind.WEIGHTS, data=new_state.to_arrays()).to_shareable()

    def reset(self, fl_ctx: FLContext) -> None:
        self.reports, self.refused = [], {}

    def send_scalars(self, row: dict, fl_ctx: FLContext) -> None:
        """The round's global dev and test accuracy, dev loss and sigma as NVFlare analytics events: the
        server's TBAnalyticsReceiver (listening to local "analytix_log_stats" events) writes them into
        <run dir>/tb_events/<server name>/ with the round as the step; no torch needed."""
        engine = fl_ctx.get_engine()
        if engine is None:  # outside a running job: nobody to tell
            return
        with engine.new_context() as ctx:  # the event data does not linger in the round's context
            for key in SERVER_SCALARS:
                if row.get(key) is not None:
                    dxo = create_analytic_dxo(key, float(row[key]), AnalyticsDataType.SCALAR,
                                              global_step=int(row["round"]))  # fmt: skip
                    send_analytic_dxo(self, dxo, ctx, event_type=ANALYTIC_EVENT_TYPE)


class FedBPTScatterAndGather(ScatterAndGather):
    """ScatterAndGather with an optional early stop: after ``patience`` rounds in which the aggregated dev
    loss did not beat the best round (0: run all ``num_rounds``), and ``min_clients = 0`` (the default): every
    round waits for every site the job started. The other arguments are ScatterAndGather's."""

    def __init__(
        self,
        min_clients: int = 0,
        num_rounds: int = 5,
        start_round: int = 0,
        wait_time_after_min_received: int = 10,
        aggregator_id: str = "aggregator",
        persistor_id: str = "persistor",
        shareable_generator_id: str = "shareable_generator",
        train_task_name: str = "train",
        train_timeout: int = 0,
        ignore_result_error: bool = True,
        patience: int = 0,
    ):
        if not isinstance(min_clients, int) or min_clients < 0:
            raise ValueError(f"min_clients must be a whole number >= 0 (0: every site of the job), got {min_clients!r}")
        # Every argument is spelt out (no **kwargs) so that NVFlare's Job API can export them.
        super().__init__(
            min_clients=max(1, min_clients),  # ScatterAndGather wants >= 1; 0 is resolved when the job starts
            num_rounds=num_rounds,
            start_round=start_round,
            wait_time_after_min_received=wait_time_after_min_received,
            aggregator_id=aggregator_id,
            persistor_id=persistor_id,
            shareable_generator_id=shareable_generator_id,
            train_task_name=train_task_name,
            train_timeout=train_timeout,
            ignore_result_error=ignore_result_error,
        )
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        self.patience = int(patience)
        self.every_site = min_clients == 0

    def start_controller(self, fl_ctx: FLContext) -> None:
        """As ScatterAndGather's, and a job that resumes a search continues its rounds: it starts at the
        checkpoint's round and runs what is left of ``num_rounds`` (NVFlare would restart at round 0)."""
        super().start_controller(fl_ctx)
        self.resolve_min_clients(fl_ctx)
        if self._current_round is not None or not isinstance(self._global_weights, ModelLearnable):
            return  # restored from NVFlare's own snapshot, or no model: ScatterAndGather knows best
        done = _state(self._global_weights).round
        if done:
            self._start_round = done
            self._num_rounds = max(0, self._num_rounds - done)
            fl_ctx.set_prop(AppConstants.START_ROUND, self._start_round, private=True, sticky=True)
            self.log_info(fl_ctx, f"resuming after round {done - 1}: {self._num_rounds} rounds left of num_rounds")

    def resolve_min_clients(self, fl_ctx: FLContext) -> None:
        """``min_clients = 0``: every site the job started, in every round. A smaller number with no wait for
        stragglers closes each round on the fastest sites: say so in the log, naming the keys."""
        sites = len(self._engine.get_clients())
        if self.every_site:
            self._min_clients = max(1, sites)
            self.log_info(fl_ctx, f"min_clients = 0: every round waits for all {sites} sites of the job")
        elif self._min_clients < sites and self._wait_time_after_min_received == 0:
            self.log_warning(
                fl_ctx,
                f"min_clients = {self._min_clients} of the job's {sites} sites and wait_time_after_min_received = 0: "
                f"each round closes on the {self._min_clients} fastest sites and leaves the others' results out (an "
                "evaluator's test accuracy too); set min_clients = 0 for every site, or give "
                "wait_time_after_min_received the seconds to wait for the others",
            )

    def _accept_train_result(self, client_name: str, result: Shareable, fl_ctx: FLContext,
                             is_unknown_task: bool = False) -> bool:  # fmt: skip
        # ScatterAndGather drops a failed task before the aggregator sees it: tell the aggregator who and why.
        rc = result.get_return_code()
        if rc and rc != ReturnCode.OK and not is_unknown_task and hasattr(self.aggregator, "refuse"):
            self.aggregator.refuse(client_name, f"its task ended with {rc}")
        return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task)

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        super().handle_event(event_type, fl_ctx)
        if event_type != AppEventType.ROUND_DONE or not self.patience:
            return
        state = _state(fl_ctx.get_prop(AppConstants.GLOBAL_MODEL))
        evaluated = state.round - 1  # the last round whose broadcast prompt the sites scored
        if evaluated - state.best_round >= self.patience:
            self.log_info(fl_ctx, f"no better dev loss since round {state.best_round}: stopping after this round")
            self._num_rounds = self._current_round - self._start_round + 1  # ScatterAndGather's loop bound
