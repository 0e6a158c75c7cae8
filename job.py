"""The FedBPT job through NVFlare's Job API: the forward-compatible twin of job_templates/fedbpt.

NVFlare 2.9 marks job templates, `nvflare job create` and `nvflare simulator` as deprecated; this script
builds the same job (the same server components and site script) with `FedJob`. Server settings are its
flags; the site flags (those of `app_config`, see the README) follow `--`.

    python job.py --export_dir ./jobs/fedbpt_api --min_clients 2 --num_rounds 5 -- --task_name sst2 ...
    python job.py --workspace /tmp/nvflare/fedbpt_api --n_clients 2 --num_rounds 5 -- --task_name sst2 ...

The first writes a job folder for `nvflare simulator`, `nvflare job submit` or a production kit; the
second runs the job in NVFlare's simulator right away.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent / "src"
sys.path.insert(0, str(SRC))

from fedbpt.config import parse_args  # noqa: E402
from fedbpt.privacy import UploadPrivacy  # noqa: E402
from fedbpt.search import COVARIANCES, MAX_STEP, STEP_RULES  # noqa: E402

DEFAULT_INTRINSIC_DIM = 500  # the template's, and the paper's


def build_job(server: argparse.Namespace, app_config: str):
    """A FedJob with the template's components: FedBPT ScatterAndGather, persistor, generator, aggregator."""
    from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
    from nvflare.job_config.api import FedJob
    from nvflare.job_config.script_runner import FrameworkType, ScriptRunner

    from fedbpt.nvflare_components import (
        FedBPTAggregator,
        FedBPTPersistor,
        FedBPTScatterAndGather,
        FedBPTShareableGenerator,
    )

    job = FedJob(name=server.name, min_clients=server.min_clients)
    workflow = FedBPTScatterAndGather(
        patience=server.patience,
        min_clients=server.min_clients,
        num_rounds=server.num_rounds,
        wait_time_after_min_received=0,
        ignore_result_error=True,
        persistor_id="persistor",
        aggregator_id="aggregator",
        shareable_generator_id="shareable_generator",
    )
    job.to_server(workflow, id="scatter_and_gather")
    job.to_server(FedBPTPersistor(server.intrinsic_dim, server.sigma, server.seed, server.covariance), id="persistor")
    job.to_server(FedBPTShareableGenerator(), id="shareable_generator")
    job.to_server(FedBPTAggregator(step_rule=server.step_rule, max_step=server.max_step), id="aggregator")
    job.to_server(TBAnalyticsReceiver(events=["fed.analytix_log_stats", "analytix_log_stats"]), id="receiver")
    job.to_server(str(SRC))  # app/custom gets src/ as `nvflare job create -sd ./src` copies it
    runner = ScriptRunner(
        script=str(SRC / "fedbpt_train.py"),
        script_args=app_config,
        launch_external_process=True,
        framework=FrameworkType.NUMPY,  # the default (PyTorch) would silently drop numpy params
    )
    job.to_clients(runner, tasks=["train"])
    if server.clip_norm > 0:  # optional privacy for uploads, as the template's filters with clip_norm > 0
        from nvflare.job_config.defs import FilterType

        from fedbpt.nvflare_privacy import ClipAndNoiseUpdate, RecordBroadcastMean

        job.to_clients(RecordBroadcastMean(), filter_type=FilterType.TASK_DATA, tasks=["train"])
        upload = ClipAndNoiseUpdate(server.clip_norm, server.noise_multiplier)
        job.to_clients(upload, filter_type=FilterType.TASK_RESULT, tasks=["train"])
    job.to_clients(str(SRC))
    return job


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="fedbpt", help="job name")
    parser.add_argument("--export_dir", help="write the job folder here instead of running it")
    parser.add_argument("--workspace", default="/tmp/nvflare/fedbpt_api", help="simulator workspace")
    parser.add_argument("--n_clients", type=int, default=2, help="simulated sites (site-1..site-N)")
    parser.add_argument("--min_clients", type=int, help="site results to wait for each round (default: n_clients)")
    parser.add_argument("--num_rounds", type=int, default=200)
    parser.add_argument("--seed", type=int, help="job seed (default: the sites' --seed)")
    parser.add_argument("--intrinsic_dim", type=int, help="d (default: the sites' --intrinsic_dim, else 500)")
    parser.add_argument("--max_step", type=float, default=MAX_STEP,
                        help="refuse a site whose step is longer than this many honest (no-signal) steps")  # fmt: skip
    parser.add_argument("--sigma", type=float, default=1.0, help="initial global step size")
    parser.add_argument("--step_rule", choices=STEP_RULES, default="eq6")
    parser.add_argument("--covariance", choices=COVARIANCES, default="diag")
    parser.add_argument("--patience", type=int, default=0, help="early stop after N rounds without a better dev loss")
    parser.add_argument("--clip_norm", type=float, default=0.0,
                        help="sites clip their update (local mean - received mean) to this norm (0: off)")  # fmt: skip
    parser.add_argument("--noise_multiplier", type=float, default=0.0,
                        help="sites add N(0, (this x clip_norm)^2) to each coordinate of their update")  # fmt: skip
    split = argv.index("--") if "--" in argv else len(argv)
    server = parser.parse_args(argv[:split])
    site_argv = argv[split + 1 :]
    try:
        site = parse_args(site_argv)  # fail here, naming the flag, rather than in every site process
    except (ValueError, FileNotFoundError) as e:
        parser.error(f"site flag: {e}")
    try:
        UploadPrivacy(server.clip_norm, server.noise_multiplier)
    except ValueError as e:
        parser.error(f"--{e}")
    server.min_clients = server.min_clients or server.n_clients
    server.seed = site.seed if server.seed is None else server.seed
    server.intrinsic_dim = server.intrinsic_dim or site.intrinsic_dim or DEFAULT_INTRINSIC_DIM
    if site.intrinsic_dim is not None and server.intrinsic_dim != site.intrinsic_dim:
        parser.error(
            f"--intrinsic_dim {server.intrinsic_dim} differs from the sites' --intrinsic_dim {site.intrinsic_dim}"
        )

    job = build_job(server, shlex.join(site_argv))
    if server.export_dir:
        job.export_job(server.export_dir)
        print(f"wrote {Path(server.export_dir) / server.name}")
    else:
        job.simulator_run(server.workspace, n_clients=server.n_clients, threads=server.n_clients)


if __name__ == "__main__":
    main()
