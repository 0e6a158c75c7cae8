"""The FedBPT job through NVFlare's Job Recipe API: the twin of job_templates/fedbpt, run or exported.

NVFlare 2.8+ marks job templates, `nvflare job create` and `nvflare simulator` as deprecated (they still
work, and the README's template flow stays). This script builds the same job (server components and site
script) as a `FedBPTRecipe` and runs it in NVFlare's simulator (`--env sim`, the default), in a POC
system it starts and stops (`--env poc`) or on a running deployment (`--env prod --startup_kit DIR`).
Server keys are its flags; the site flags (the template's `app_config`, see docs/flags.md) follow `--`.

    python job.py --n_clients 2 --num_rounds 5 -- --task_name sst2 --num_users 2 ...
    python job.py --env poc --n_clients 2 --num_rounds 5 -- --task_name sst2 --num_users 2 ...
    python job.py --env prod --startup_kit KIT --num_rounds 5 -- --task_name sst2 --num_users 1 ...
    python job.py --export --export-dir ./jobs --n_clients 2 --num_rounds 5 -- ...   # ./jobs/fedbpt

`--export [--export-dir DIR]` (NVFlare's own flags; default DIR ./fl_job) writes the job folder, for
`nvflare job submit` or `nvflare simulator`, instead of running it.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

SRC = Path(__file__).resolve().parent / "src"
sys.path.insert(0, str(SRC))

from fedbpt.config import build_parser as site_parser  # noqa: E402
from fedbpt.config import parse_args  # noqa: E402
from fedbpt.privacy import UploadPrivacy  # noqa: E402
from fedbpt.search import COVARIANCES, MAX_STEP, STEP_RULES  # noqa: E402
from fedbpt.server import Guard, add_guard_flags  # noqa: E402

DEFAULT_INTRINSIC_DIM = 500  # the template's, and the paper's
DEFAULT_N_CLIENTS = 2
DEFAULT_WORKSPACE = "/tmp/nvflare/simulation"  # SimEnv's own default root; the run goes in <root>/<name>
DEFAULT_EXPORT_DIR = "./fl_job"  # NVFlare's (nvflare.recipe.spec.DEFAULT_EXPORT_DIR)
ENVS = ("sim", "poc", "prod")
TRACKING = ("tensorboard", "mlflow", "wandb")  # FedBPTRecipe's (not imported before the flags are parsed)
OUTPUTS = "metrics.jsonl, summary.json, best_prompt.npz, final_prompt.npz, fedbpt_state.npz, tb_events/"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("where the job runs")
    run.add_argument("--env", choices=ENVS, default="sim",
                     help="sim: NVFlare's simulator; poc: a POC system started and stopped for this job; "
                          "prod: a running deployment, through --startup_kit")  # fmt: skip
    run.add_argument("--name", default="fedbpt", help="job name (and the exported folder's name)")
    run.add_argument("--workspace", default=DEFAULT_WORKSPACE,
                     help="sim: the simulator's workspace root; the run goes in <workspace>/<name>")  # fmt: skip
    run.add_argument("--n_clients", type=int,
                     help="sites (sim, poc: site-1..site-N; default: the sites' --num_users, else 2)")  # fmt: skip
    run.add_argument("--poc_project", help="poc: an NVFlare project.yml for the POC system instead of POC's own")
    run.add_argument("--startup_kit", help="prod: the admin's startup kit folder")
    run.add_argument("--username", help="prod: the admin's name (default: the startup kit's folder name)")
    run.add_argument("--tracking", choices=TRACKING, default="tensorboard",
                     help="where the server writes the scalars (the package must be installed)")  # fmt: skip
    run.add_argument("--export", action="store_true", help="write the job folder instead of running it (NVFlare's)")
    run.add_argument("--export-dir", help="with --export: where the job folder goes (NVFlare's; default ./fl_job)")
    run.add_argument("--export_dir", dest="old_export_dir", help=argparse.SUPPRESS)  # the old flag: say what is new

    server = parser.add_argument_group("server keys (as in config_fed_server.conf)")
    server.add_argument("--min_clients", type=int, help="site results to wait for each round (default: n_clients)")
    server.add_argument("--num_rounds", type=int, default=200)
    server.add_argument("--seed", type=int, help="job seed (default: the sites' --seed)")
    server.add_argument("--intrinsic_dim", type=int, help="d (default: the sites' --intrinsic_dim, else 500)")
    server.add_argument("--sigma", type=float, default=1.0, help="initial global step size")
    server.add_argument("--step_rule", choices=STEP_RULES, default="eq6")
    server.add_argument("--covariance", choices=COVARIANCES, default="diag")
    server.add_argument("--max_step", type=float, default=MAX_STEP,
                        help="refuse a site whose step is longer than this many honest (no-signal) steps")  # fmt: skip
    server.add_argument("--patience", type=int, default=0, help="early stop after N rounds without a better dev loss")
    add_guard_flags(server)
    server.add_argument("--wait_time_after_min_received", type=int, default=0,
                        help="seconds to wait for more results after min_clients arrived")  # fmt: skip
    server.add_argument("--resume_from", default="", help="a fedbpt_state.npz to start from (read by the server)")
    privacy = parser.add_argument_group("privacy for uploads (the keys of config_fed_client.conf's filters)")
    privacy.add_argument("--clip_norm", type=float, default=0.0,
                         help="sites clip their update (local mean - received mean) to this norm (0: off)")  # fmt: skip
    privacy.add_argument("--noise_multiplier", type=float, default=0.0,
                         help="sites add N(0, (this x clip_norm)^2) to each coordinate of their update")  # fmt: skip
    return parser


def resolve_sites(n_clients: int | None, site_argv: list[str]) -> tuple[int, list[str]]:
    """The number of sites and the site flags, made consistent: the sites split the data over
    ``--num_users`` shards, so N sites with more shards than N would train on part of the pool only.

    ``--num_users`` not given: the sites get ``--num_users <n_clients>``. ``--n_clients`` not given: it is
    the sites' ``--num_users`` (2 with ``--num_users 1``, site-local data). Both given and different (other
    than ``--num_users 1``): ValueError naming both."""
    given = site_parser()
    given.set_defaults(num_users=None)
    num_users = given.parse_known_args(site_argv)[0].num_users
    if num_users is None:
        n = DEFAULT_N_CLIENTS if n_clients is None else n_clients
        return n, [*site_argv, "--num_users", str(n)]  # not the sites' default of 10: all the pool, N shards
    if n_clients is None:
        return (DEFAULT_N_CLIENTS if num_users == 1 else num_users), site_argv
    if num_users != 1 and num_users != n_clients:
        used = min(n_clients, num_users)
        share = f"{used} of {num_users} shards ({used / num_users:.0%} of the pool)"
        raise ValueError(
            f"--n_clients {n_clients} differs from the sites' --num_users {num_users}: the sites would train on "
            f"{share}; give both the same value (or --num_users 1: each site uses all of its own --data_dir)"
        )
    return n_clients, site_argv


def make_env(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """SimEnv, PocEnv or ProdEnv from the flags (a bad combination stops with an error naming the flag)."""
    from nvflare.recipe import PocEnv, ProdEnv, SimEnv

    if args.env == "sim":
        return SimEnv(num_clients=args.n_clients, num_threads=args.n_clients, workspace_root=args.workspace)
    if args.env == "poc":
        if not args.poc_project:
            return PocEnv(num_clients=args.n_clients)
        sites, admin = project_sites(args.poc_project, parser)
        if len(sites) < args.min_clients:
            parser.error(f"--poc_project {args.poc_project} has {len(sites)} sites, fewer than --min_clients "
                         f"{args.min_clients}")  # fmt: skip
        return PocEnv(num_clients=len(sites), project_conf_path=os.path.abspath(args.poc_project), username=admin)
    if not args.startup_kit:
        parser.error("--env prod needs --startup_kit DIR (the admin's startup kit of the deployment)")
    if not os.path.isdir(args.startup_kit):
        parser.error(f"--startup_kit {args.startup_kit!r}: no such directory")
    kit = os.path.abspath(args.startup_kit)
    return ProdEnv(startup_kit_location=kit, username=args.username or os.path.basename(kit))


def project_sites(path: str, parser: argparse.ArgumentParser) -> tuple[list[str], str]:
    """The client sites and the project admin of an NVFlare project.yml."""
    import yaml

    try:
        with open(path) as f:
            participants = yaml.safe_load(f)["participants"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        parser.error(f"--poc_project {path!r}: not an NVFlare project file ({e})")
    sites = [p["name"] for p in participants if p.get("type") == "client"]
    admins = [p["name"] for p in participants if p.get("type") == "admin" and p.get("role") == "project_admin"]
    if not sites or not admins:
        parser.error(f"--poc_project {path!r}: needs client sites and a project_admin")
    return sites, admins[0]


def main() -> None:
    argv = sys.argv[1:]
    parser = build_parser()
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    site_argv = argv[split + 1 :]
    if args.old_export_dir is not None:
        parser.error("--export_dir is now NVFlare's own --export --export-dir DIR")
    if args.export_dir is not None and not args.export:
        parser.error("--export-dir needs --export (without it the job runs and nothing is written there)")
    args.export_dir = args.export_dir or DEFAULT_EXPORT_DIR
    check_numbers(args, parser)
    try:
        parse_args(site_argv)  # fail here, naming the flag, rather than in every site process
        args.n_clients, site_argv = resolve_sites(args.n_clients, site_argv)
        site = parse_args(site_argv)
    except (ValueError, FileNotFoundError) as e:
        parser.error(f"site flag: {e}" if "--n_clients" not in str(e) else str(e))
    try:
        UploadPrivacy(args.clip_norm, args.noise_multiplier)
    except ValueError as e:
        parser.error(f"--{e}")
    args.min_clients = args.min_clients or args.n_clients
    args.seed = site.seed if args.seed is None else args.seed
    args.intrinsic_dim = args.intrinsic_dim or site.intrinsic_dim or DEFAULT_INTRINSIC_DIM
    if site.intrinsic_dim is not None and args.intrinsic_dim != site.intrinsic_dim:
        parser.error(
            f"--intrinsic_dim {args.intrinsic_dim} differs from the sites' --intrinsic_dim {site.intrinsic_dim}"
        )

    with warnings.catch_warnings():  # its import takes --export and --export-dir, parsed above: no warning
        warnings.simplefilter("ignore", UserWarning)
        from fedbpt.nvflare_recipe import FedBPTRecipe
    try:
        recipe = FedBPTRecipe(
            name=args.name, min_clients=args.min_clients, num_rounds=args.num_rounds, site_args=site_argv,
            intrinsic_dim=args.intrinsic_dim, sigma=args.sigma, seed=args.seed, covariance=args.covariance,
            step_rule=args.step_rule, max_step=args.max_step, patience=args.patience, selection=args.selection,
            confidence=args.confidence, restore_after=args.restore_after, restore_shrink=args.restore_shrink,
            wait_time_after_min_received=args.wait_time_after_min_received, resume_from=args.resume_from,
            clip_norm=args.clip_norm, noise_multiplier=args.noise_multiplier, tracking=args.tracking,
        )  # fmt: skip
    except ValueError as e:
        parser.error(f"--tracking {args.tracking}: {e}" if args.tracking in str(e) else str(e))
    env = make_env(args, parser)
    if args.export:  # what recipe.execute(env) does with NVFlare's --export, from the flags parsed here
        recipe.export(args.export_dir, env=env)
        print(f"wrote {os.path.join(args.export_dir, args.name)}")
        return
    try:
        run = recipe.run(env)
    except RuntimeError as e:
        sys.exit(f"job.py: the job failed: {e}")
    result = run.get_result(clean_up=False)  # keep the POC workspace: the download lies inside it
    report(args, run.get_job_id(), run.get_status(), result, env)


def check_numbers(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Server flags that cannot work stop here, naming the flag (not later, in the server's log)."""
    for name, low in (("n_clients", 1), ("min_clients", 1), ("num_rounds", 1), ("patience", 0),
                      ("wait_time_after_min_received", 0)):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name} must be >= {low}, got {value}")
    for name in ("sigma", "max_step"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)}")
    try:
        Guard(args.selection, args.confidence, args.restore_after, args.restore_shrink)
    except ValueError as e:
        parser.error(f"--{str(e).removeprefix('aggregator ')}")


def report(args: argparse.Namespace, job_id: str, status: str | None, result: str | None, env) -> None:
    """Say where the outputs are; exit 1 when the job did not complete."""
    if result is None:
        sys.exit(f"job.py: job {job_id} ended without a result (status {status})")
    run_dir = Path(result) / ("server/simulate_job" if args.env == "sim" else "workspace")
    if (status is not None and status != "FINISHED:COMPLETED") or not (run_dir / "summary.json").is_file():
        sys.exit(f"job.py: job {job_id} did not complete (status {status}); its logs are under {result}")
    print(f"job {job_id} finished ({status or 'simulator'})")
    print(f"outputs: {run_dir} ({OUTPUTS})")
    if args.env == "sim":
        print(f"logs: {result}/<site>/log.txt")
    if args.env == "poc":
        print(f"the POC system is stopped; its workspace {env.poc_workspace} is kept (nvflare poc clean removes it)")


if __name__ == "__main__":
    main()
