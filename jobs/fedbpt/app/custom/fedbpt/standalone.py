"""The federated loop in one process, without NVFlare: the same site and server code, one shared model.

For fast experiments and benchmarks: every simulated site reuses one loaded model, and messages go
through the same encode/decode (float32) path as on the wire, so a run matches the NVFlare job with
the same flags and seed.

    python -m fedbpt.standalone --run_dir /tmp/fedbpt-run --num_rounds 20 -- --task_name sst2 ...
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .blackbox import BlackBox
from .client import FedBPTClient, blackbox_config, load_task_data
from .config import ClientConfig, parse_args
from .data import site_index
from .privacy import UploadPrivacy, privatize
from .search import COVARIANCES, STEP_RULES, ServerState, decode_down, decode_up, encode_down, encode_up, init_state
from .server import Guard, RunRecorder, SiteReport, add_guard_flags, aggregate_round

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    """The server keys of config_fed_server.conf that shape the search."""

    num_rounds: int = 200
    intrinsic_dim: int = 500  # the sites' --intrinsic_dim, when they give one, must equal it
    sigma: float = 1.0
    step_rule: str = "eq6"
    covariance: str = "diag"
    patience: int = 0  # stop after this many rounds without a better dev loss (0: never)
    guard: Guard = field(default_factory=Guard)  # selection of the best round, and the restore


def run_federation(
    cfg: ClientConfig,
    server: ServerConfig,
    run_dir: str,
    blackbox: BlackBox | None = None,
    num_sites: int | None = None,
    on_round: Callable[[ServerState, list[SiteReport], ServerState], None] | None = None,
    privacy: UploadPrivacy | None = None,
) -> list[dict]:
    """Run ``server.num_rounds`` rounds over sites site-1..site-K (K = ``num_sites`` or ``--num_users``);
    writes the same outputs as the NVFlare job into ``run_dir`` and returns the metrics rows.

    ``on_round(state, reports, next_state)``, if given, sees every round's starting state, the sites'
    reports as decoded and the state the server moves to: for measurements that must not change the run.
    ``privacy``, if enabled, clips and noises every upload as the job's ClipAndNoiseUpdate filter does
    (with noise seeded by the job seed, site and round, so that a run can be repeated)."""
    blackbox = blackbox or BlackBox(blackbox_config(cfg))
    data = load_task_data(cfg, with_test=bool(cfg.evaluators))
    sites = [FedBPTClient(cfg, f"site-{i + 1}", blackbox, data) for i in range(num_sites or cfg.num_users)]
    state = init_state(cfg.intrinsic_dim or server.intrinsic_dim, server.sigma, cfg.seed, server.covariance)
    recorder = RunRecorder(run_dir, server.guard)
    rows = []
    for _ in range(server.num_rounds):
        t0 = time.perf_counter()
        start = decode_down(*encode_down(state))
        reports = []
        for site in sites:
            result, metrics = site.run_round(start)
            description = site.description()
            params, meta = encode_up(result)
            if privacy is not None and privacy.enabled:  # what the filter does to the message, on the site
                rng = np.random.default_rng([cfg.seed, site_index(site.site, len(sites)), start.round, 0x9D])
                params["mean"] = privatize(params["mean"], start.mean, privacy, rng)[0].astype(np.float32)
            reports.append(
                SiteReport(
                    site.site,
                    decode_up(params, meta),
                    metrics,
                    fingerprint=site.blackbox.fingerprint,
                    description={} if start.knows(site.site, description) else description,
                )
            )
        previous = state
        state, row = aggregate_round(state, reports, server.step_rule, expected=[s.site for s in sites],
                                     guard=server.guard)  # fmt: skip
        if on_round is not None:
            on_round(previous, reports, state)
        row["seconds"] = round(time.perf_counter() - t0, 3)
        recorder.record(row, state, state.known_descriptions().get(state.fingerprint_site))
        recorder.save_state(state)
        rows.append(row)
        if server.patience and previous.round - state.best_round >= server.patience:
            log.info("no better dev loss for %d rounds: stopping after round %d", server.patience, previous.round)
            break
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True, help="where metrics.jsonl, summary.json and prompts go")
    parser.add_argument("--num_rounds", type=int, default=ServerConfig.num_rounds)
    parser.add_argument("--intrinsic_dim", type=int, default=ServerConfig.intrinsic_dim,
                        help="d of the search state (the sites' --intrinsic_dim wins where given)")  # fmt: skip
    parser.add_argument("--server_sigma", type=float, default=ServerConfig.sigma, help="initial global step size")
    parser.add_argument("--step_rule", choices=STEP_RULES, default=ServerConfig.step_rule)
    parser.add_argument("--covariance", choices=COVARIANCES, default=ServerConfig.covariance)
    parser.add_argument("--patience", type=int, default=0, help="early stop after N rounds without a better dev loss")
    add_guard_flags(parser)
    parser.add_argument("--clip_norm", type=float, default=0.0, help="clip each upload's update to this norm (0: off)")
    parser.add_argument("--noise_multiplier", type=float, default=0.0,
                        help="add N(0, (this x clip_norm)^2) to each coordinate of each upload's update")  # fmt: skip
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        guard = Guard(args.selection, args.confidence, args.restore_after, args.restore_shrink)
        privacy = UploadPrivacy(args.clip_norm, args.noise_multiplier)
    except ValueError as e:
        parser.error(f"--{str(e).removeprefix('aggregator ')}")
    server = ServerConfig(num_rounds=args.num_rounds, intrinsic_dim=args.intrinsic_dim, sigma=args.server_sigma,
                          step_rule=args.step_rule, covariance=args.covariance, patience=args.patience,
                          guard=guard)  # fmt: skip
    run_federation(parse_args(argv[split + 1 :]), server, args.run_dir, privacy=privacy)


if __name__ == "__main__":
    main()
