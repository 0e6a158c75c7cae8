"""FedBPT as an NVFlare Job Recipe: the job template's server components and site script, built in Python.

``FedBPTRecipe`` makes the job that ``job_templates/fedbpt`` makes with ``nvflare job create``: the same
FedBPT ScatterAndGather, persistor, shareable generator and aggregator (from ``nvflare_components``), the
same site script with its flags, the same optional privacy filters, and a tracking receiver. Run it with
``recipe.execute(SimEnv(...) | PocEnv(...) | ProdEnv(...))``, or export it with ``recipe.export(dir)``.

Importing this module imports ``nvflare.recipe.spec``, which takes ``--export`` and ``--export-dir`` out of
``sys.argv``: a script parses its own flags before it imports this module (as ``job.py`` does).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from nvflare.job_config.api import FedJob
from nvflare.job_config.defs import FilterType
from nvflare.job_config.script_runner import FrameworkType, ScriptRunner
from nvflare.recipe.spec import Recipe
from nvflare.recipe.utils import add_experiment_tracking

from .nvflare_components import FedBPTAggregator, FedBPTPersistor, FedBPTScatterAndGather, FedBPTShareableGenerator
from .nvflare_privacy import ClipAndNoiseUpdate, RecordBroadcastMean
from .search import MAX_STEP
from .server import Guard

SRC = Path(__file__).resolve().parents[1]  # what `nvflare job create -sd ./src` copies into app/custom
SITE_SCRIPT = "fedbpt_train.py"
TRACKING = ("tensorboard", "mlflow", "wandb")
# The sites' scalars arrive as "fed." events, the aggregator's global ones as local events: the template's
# receiver listens to both, and so does every receiver here.
TRACKING_EVENTS = ["fed.analytix_log_stats", "analytix_log_stats"]


class FedBPTRecipe(Recipe):
    """The FedBPT job as a Recipe; every argument is a server key of the job template, or a site flag.

    ``site_args`` are the site flags (the template's ``app_config``); ``tracking`` picks the receiver that
    collects the sites' and the server's scalars (tensorboard, mlflow or wandb; the package must be
    installed). Raises ValueError for a bad argument, naming it."""

    def __init__(
        self,
        *,
        name: str = "fedbpt",
        min_clients: int = 0,
        num_rounds: int = 200,
        site_args: str | list[str] = "",
        intrinsic_dim: int = 500,
        sigma: float = 1.0,
        seed: int = 42,
        covariance: str = "diag",
        step_rule: str = "eq6",
        max_step: float = MAX_STEP,
        patience: int = 0,
        selection: str = Guard.selection,
        confidence: float = Guard.confidence,
        restore_after: int = Guard.restore_after,
        restore_shrink: float = Guard.restore_shrink,
        wait_time_after_min_received: int = 0,
        resume_from: str = "",
        clip_norm: float = 0.0,
        noise_multiplier: float = 0.0,
        tracking: str = "tensorboard",
    ):
        if tracking not in TRACKING:
            raise ValueError(f"tracking must be one of {TRACKING}, got {tracking!r}")
        self.min_clients, self.num_rounds = min_clients, num_rounds
        self.site_args = site_args if isinstance(site_args, str) else shlex.join(site_args)
        job = FedJob(name=name, min_clients=max(1, min_clients))  # the job's meta wants >= 1; 0: see the workflow
        workflow = FedBPTScatterAndGather(
            patience=patience,
            min_clients=min_clients,
            num_rounds=num_rounds,
            wait_time_after_min_received=wait_time_after_min_received,
            ignore_result_error=True,
            persistor_id="persistor",
            aggregator_id="aggregator",
            shareable_generator_id="shareable_generator",
        )
        job.to_server(workflow, id="scatter_and_gather")
        job.to_server(FedBPTPersistor(intrinsic_dim, sigma, seed, covariance, resume_from), id="persistor")
        job.to_server(FedBPTShareableGenerator(), id="shareable_generator")
        aggregator = FedBPTAggregator(step_rule=step_rule, max_step=max_step, selection=selection,
                                      confidence=confidence, restore_after=restore_after,
                                      restore_shrink=restore_shrink)  # fmt: skip
        job.to_server(aggregator, id="aggregator")
        job.to_server(str(SRC))  # app/custom gets src/, as `nvflare job create -sd ./src` copies it
        runner = ScriptRunner(
            script=str(SRC / SITE_SCRIPT),
            script_args=self.site_args,
            launch_external_process=True,  # one trainer per site for the whole job: the model loads once
            framework=FrameworkType.NUMPY,  # the default (PyTorch) would silently drop numpy params
        )
        job.to_clients(runner, tasks=["train"])
        if clip_norm > 0:  # optional privacy for uploads: the template's filters, which are off at clip_norm 0
            job.to_clients(RecordBroadcastMean(), filter_type=FilterType.TASK_DATA, tasks=["train"])
            upload = ClipAndNoiseUpdate(clip_norm, noise_multiplier)
            job.to_clients(upload, filter_type=FilterType.TASK_RESULT, tasks=["train"])
        job.to_clients(str(SRC))
        super().__init__(job)
        add_experiment_tracking(self, tracking, tracking_config(tracking, name))


def tracking_config(tracking: str, name: str) -> dict:
    """The receiver's arguments: the template's events for all three; W&B also needs a project name."""
    config: dict = {"events": list(TRACKING_EVENTS)}
    if tracking == "wandb":
        config["wandb_args"] = {"project": name, "name": name}
    return config
