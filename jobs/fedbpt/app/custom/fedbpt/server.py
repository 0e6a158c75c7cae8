"""The server's side of a round, with no federation framework in it: check the sites' results, update the
global search, keep the best prompt by validation loss, and write the run's outputs.

numpy only (no torch, no transformers): the NVFlare aggregator and the standalone loop both call it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field, replace

import numpy as np

from .search import MAX_STEP, LocalResult, ServerState, check_result, projection, save_state, update_with_clipping

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STATE_FILE = "fedbpt_state.npz"
BEST_PROMPT_FILE = "best_prompt.npz"
FINAL_PROMPT_FILE = "final_prompt.npz"
# Metrics a site reports about the prompt it received; the counts weight the site's dev and test figures.
COUNTS = ("n_train", "n_dev", "n_test")
LOSSES = ("dev_loss", "test_loss")
SCORES = ("dev_acc", "test_acc")  # accuracy, or F1 for tasks scored by F1
SELECTIONS = ("bootstrap", "lowest")
BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class Guard:
    """How the server keeps the best prompt, and keeps the search from walking away from it (the aggregator's
    keys of the same names).

    ``selection``: ``bootstrap`` (a round replaces the best one only when a paired bootstrap over the dev
    examples both rounds measured finds its dev loss lower with ``confidence``), or ``lowest`` (any lower
    dev loss wins: the paper's rule). The best round starts as round 0, z = 0: the model without a prompt.
    ``restore_after``: after this many rounds in a row without a lower pooled dev loss than the lowest since
    the best round changed (or since the last restore), the search returns to the prompt that had that lowest
    dev loss, with its step size times ``restore_shrink`` and empty evolution paths (0: never). It goes back to
    where the search was best, which may be a prompt that selection has not (yet) taken as the best one."""

    selection: str = "bootstrap"
    confidence: float = 0.9
    restore_after: int = 4
    restore_shrink: float = 0.5

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"aggregator selection must be one of {SELECTIONS}, got {self.selection!r}")
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"aggregator confidence must be in [0.5, 1), got {self.confidence!r}")
        if not (isinstance(self.restore_after, int) and self.restore_after >= 0):
            raise ValueError(f"aggregator restore_after must be a whole number >= 0, got {self.restore_after!r}")
        if not 0.0 < self.restore_shrink <= 1.0:
            raise ValueError(f"aggregator restore_shrink must be in (0, 1], got {self.restore_shrink!r}")

    def describe(self) -> str:
        """How the best round is chosen and when the search is restored, as summary.json says it."""
        if self.selection == "bootstrap":
            rule = (
                "round 0 (z = 0, no prompt) is the first best round; a later round replaces the best one when its "
                "dev loss is lower on the dev examples both rounds measured, with probability at least "
                f"{self.confidence:g} by a paired bootstrap ({BOOTSTRAP_SAMPLES} resamples) of the per-example "
                "differences; where the sites sent no per-example losses, when its dev loss over those sites is lower"
            )
        else:
            rule = (
                "a round beats the best round so far when its dev loss, weighted by the sites' dev examples, is lower"
                " over the sites whose dev figures both rounds hold"
            )
        rule += " (dev_sites and compared_on in metrics.jsonl; with no site in common, over all of each round's sites)"
        if self.restore_after:
            rule += (
                f"; after {self.restore_after} rounds in a row without a lower dev loss the search returns to the "
                f"prompt with the lowest one, its step size times {self.restore_shrink:g} (restored in metrics.jsonl)"
                "; the final prompt is the one the search would return to when the run ends: of the prompts "
                "broadcast since the best round last changed or the search was last restored, the one with the "
                "lowest dev loss"
            )
        else:
            rule += "; the final prompt is the search's mean after the last round, which no site has measured"
        return rule


def add_guard_flags(parser) -> None:
    """The aggregator's ``Guard`` keys as flags of the same names (``job.py`` and ``fedbpt.standalone``)."""
    parser.add_argument("--selection", choices=SELECTIONS, default=Guard.selection,
                        help="bootstrap: a round replaces the best one only when a paired bootstrap over the dev "
                        "examples finds its dev loss lower with --confidence; lowest: any lower dev loss")  # fmt: skip
    parser.add_argument("--confidence", type=float, default=Guard.confidence, help="see --selection")
    parser.add_argument("--restore_after", type=int, default=Guard.restore_after,
                        help="rounds with no lower dev loss before the search goes back to the prompt with the "
                        "lowest one, where the run also ends (0: off; the final prompt is the last mean)")  # fmt: skip
    parser.add_argument("--restore_shrink", type=float, default=Guard.restore_shrink,
                        help="the step size's factor when the search is restored")  # fmt: skip


@dataclass
class SiteReport:
    """One site's answer in one round: its local search result, the metrics of the prompt it received,
    the fingerprint of its projection and its description (sent with every result)."""

    site: str
    result: LocalResult
    metrics: dict[str, float]
    bytes_up: int = 0
    fingerprint: str = ""
    description: dict = field(default_factory=dict)


def _weighted(reports: list[SiteReport], key: str, weight: str) -> float | None:
    pairs = [(r.metrics[key], r.metrics.get(weight, 1.0)) for r in reports if key in r.metrics]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if pairs and total > 0 else None


def choose_reference(state: ServerState, reports: list[SiteReport], max_step: float = MAX_STEP) -> ServerState:
    """Set what every site must share beyond the server's own seed and intrinsic_dim (the projection, the local
    popsize and generations, the loss type), once: the settings of the most sites among those of the first
    round heard whose reports pass their own checks. Neither arrival order nor a report that fails its checks
    decides; a tie goes to the group with the first site by name, with a warning."""
    if state.local_iter:  # chosen in an earlier round (the checkpoint keeps it)
        return state
    groups: dict[tuple, list[str]] = {}
    for r in reports:
        if check_report(r, state, max_step) is None:
            key = (r.fingerprint, r.result.popsize, int(r.result.sigmas.size), str(r.description.get("loss_type", "")))
            groups.setdefault(key, []).append(r.site)
    if not groups:
        return state
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), min(kv[1])))
    key, sites = ranked[0][0], sorted(ranked[0][1])
    how = f"round {state.round}'s majority, {len(sites)} of {len(reports)} sites: {', '.join(sites)}"
    if len(ranked) > 1 and len(ranked[1][1]) == len(sites):
        how = f"round {state.round}'s first site by name, in a tie of {len(sites)}-site groups: {', '.join(sites)}"
        log.warning("round %d: no majority among the sites' settings; holding every site to %s", state.round, how)
    return replace(state, fingerprint=key[0], fingerprint_site=sites[0], local_popsize=key[1], local_iter=key[2],
                   loss_type=key[3], reference_from=how)  # fmt: skip


def check_report(report: SiteReport, state: ServerState, max_step: float = MAX_STEP,
                 reference: dict | None = None) -> str | None:  # fmt: skip
    """Why a site's report cannot be used, or None: what ``check_measurement`` refuses, or a search result
    that ``search.check_result`` refuses."""
    return check_measurement(report, state, reference) or check_result(report.result, state, max_step)


def check_measurement(report: SiteReport, state: ServerState, reference: dict | None = None) -> str | None:
    """Why a site's figures for the broadcast prompt (dev and test loss and score, example counts) cannot be
    used, or None: settings other than the server's or the run's (so it scored another prompt), or
    implausible figures. ``reference`` is the description of a site with the run's projection."""
    description = report.description
    why = server_mismatch(report, state)
    if why:
        return why
    if state.fingerprint and report.fingerprint != state.fingerprint:
        return projection_mismatch(report, state, reference or {})
    loss_type = str(description.get("loss_type") or state.loss_type)
    if state.loss_type and loss_type != state.loss_type:
        return (
            f"--loss_type {loss_type} differs from --loss_type {state.loss_type} (that of {state.reference_from}): "
            "its dev losses are on another scale"
        )
    for key in LOSSES:
        value = report.metrics.get(key)
        if value is None:
            continue
        if loss_type == "perf":  # -accuracy (or -F1)
            if not (math.isfinite(value) and -1.0 <= value <= 0.0):
                return f"{key} {value!r} is not a number in [-1, 0] (--loss_type perf reports -accuracy)"
        elif not (math.isfinite(value) and value >= 0):
            return f"{key} {value!r} is not a finite, non-negative number"
    for key in SCORES:
        value = report.metrics.get(key)
        if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
            return f"{key} {value!r} is not a number in [0, 1]"
    pool = _pool_size(reference or description)
    for key in COUNTS:
        count = report.metrics.get(key)
        if count is None:
            continue
        if not (math.isfinite(count) and count >= 1 and count == int(count)):
            return f"{key} {count!r} is not a positive number of examples"
        if key != "n_test" and pool and count > pool:
            return f"{key} {int(count)} is more than the {pool} examples of the k-shot pool (k_shot x labels)"
    return None


def server_mismatch(report: SiteReport, state: ServerState) -> str | None:
    """A site whose --seed or --intrinsic_dim differs from the server's own (config_fed_server.conf, or the
    checkpoint it resumed from), by the site's description."""
    mine = report.description
    if mine.get("seed") is not None and int(mine["seed"]) != state.seed:
        return (
            f"its --seed {mine['seed']} differs from the server's seed {state.seed}: give every site's --seed and "
            "seed in config_fed_server.conf the same value (the projection is built from it)"
        )
    if mine.get("intrinsic_dim") is not None and int(mine["intrinsic_dim"]) != state.dim:
        return (
            f"its --intrinsic_dim {mine['intrinsic_dim']} differs from the server's intrinsic_dim {state.dim} "
            "(config_fed_server.conf, or the checkpoint it resumed from)"
        )
    return None


def _pool_size(description: dict) -> int:
    try:
        return int(description["k_shot"]) * int(description["num_labels"])
    except (KeyError, TypeError, ValueError):
        return 0


def projection_mismatch(report: SiteReport, state: ServerState, reference: dict) -> str:
    """A message that names the site's and the run's projection and, where both are described, what differs."""
    mine = report.description
    keys = sorted(k for k in set(mine) | set(reference) if k != "fingerprint" and mine.get(k) != reference.get(k))
    differs = "; ".join(f"{k} {mine.get(k)!r} vs {reference.get(k)!r}" for k in keys)
    return (
        f"its projection (fingerprint {report.fingerprint or 'missing'}) differs from the run's (fingerprint "
        f"{state.fingerprint}, that of {state.reference_from or state.fingerprint_site})"
        + (f": {differs}" if differs else "")
        + "; every site needs the same --seed, --model_name, --n_prompt_tokens, --intrinsic_dim, --sigma, --alpha, "
        "--prompt_at, --prompt_scale and --rho"
    )


def _dev_loss(figures: dict[str, list[float]], sites: list[str]) -> float:
    """The dev loss over ``sites``, weighted by their dev examples; figures: {site: [dev_loss, dev_acc, n_dev]}."""
    total = sum(figures[s][2] for s in sites)
    return sum(figures[s][0] * figures[s][2] for s in sites) / total


def compare_with_best(figures: dict[str, list[float]], examples: dict[str, list[float]], state: ServerState,
                      guard: Guard = Guard()) -> tuple[bool, list[str], float | None]:  # fmt: skip
    """Whether this round's dev figures beat the best round's, the sites compared on, and the bootstrap's
    probability that this round's dev loss is lower (None where no paired test ran).

    Rounds are compared on the sites whose dev figures both hold, so that a round does not win because a
    site with a hard shard was absent; with ``bootstrap`` selection, on those sites' dev examples, paired."""
    if not figures:
        return False, [], None
    if state.best_round < 0:
        return True, sorted(figures), None
    best = json.loads(state.best_sites) if state.best_sites else {}
    common = sorted(set(figures) & set(best))
    if not common:  # nothing in common (or a checkpoint without per-site figures): the rounds as they are
        return _dev_loss(figures, sorted(figures)) < state.best_dev_loss, [], None
    lower = _dev_loss(figures, common) < _dev_loss(best, common)
    if guard.selection == "lowest":
        return lower, common, None
    best_examples = json.loads(state.best_examples) if state.best_examples else {}
    paired = [s for s in common if s in examples and len(examples[s]) == len(best_examples.get(s, ()))]
    if not paired:
        return lower, common, None
    diffs = np.concatenate([np.subtract(examples[s], best_examples[s]) for s in paired])
    p_lower = paired_bootstrap(diffs, np.random.default_rng([state.seed, state.round, 0xB007]))
    return bool(diffs.mean() < 0 and p_lower >= guard.confidence), paired, p_lower


def paired_bootstrap(diffs: np.ndarray, rng: np.random.Generator, samples: int = BOOTSTRAP_SAMPLES) -> float:
    """The fraction of bootstrap resamples of the paired differences (new - best) whose mean is below 0."""
    picks = rng.integers(0, diffs.size, size=(samples, diffs.size))
    return float(np.mean(diffs[picks].mean(axis=1) < 0))


def _examples(report: SiteReport) -> list[float] | None:
    """The site's per-example dev losses, if they agree with its dev figures (count and mean)."""
    losses = report.result.dev_losses
    n_dev, dev_loss = report.metrics.get("n_dev"), report.metrics.get("dev_loss")
    if losses.size == 0 or n_dev is None or dev_loss is None or losses.size != int(n_dev):
        return None
    if not (np.all(np.isfinite(losses)) and abs(float(losses.mean()) - dev_loss) <= 1e-3 + 1e-3 * abs(dev_loss)):
        return None
    return losses.tolist()


def guard_search(before: ServerState, after: ServerState, dev_loss: float | None, better: bool,
                 guard: Guard) -> tuple[ServerState, dict | None]:  # fmt: skip
    """The guard's step after the update ``before`` -> ``after``: keep the broadcast prompt with the lowest
    pooled dev loss, count the rounds since that loss was last lowered, and once there are ``restore_after``
    of them send the search back to that prompt with a smaller step and empty evolution paths. Returns the
    state and, when the search was restored, what the row says of it."""
    lowest, stale = (before.lowest_dev_loss, before.lowest_round, before.lowest_mean), before.stale
    if better:  # a new best round: the count starts from it
        lowest, stale = (math.inf, -1, before.mean), 0
    if dev_loss is not None and dev_loss < lowest[0]:
        lowest, stale = (dev_loss, before.round, before.mean.copy()), 0
    else:
        stale += 1
    kept = dict(lowest_dev_loss=lowest[0], lowest_round=lowest[1], lowest_mean=lowest[2], stale=stale)
    if not guard.restore_after or stale < guard.restore_after or lowest[1] < 0:
        return replace(after, **kept), None
    # the restored prompt is measured again next round (the same figure, on the same sites): the count restarts
    restored = replace(after, mean=lowest[2].copy(), sigma=before.sigma * guard.restore_shrink,
                       p_sigma=np.zeros_like(before.p_sigma), p_c=np.zeros_like(before.p_c), cov=before.cov.copy(),
                       path_round=after.round, lowest_dev_loss=math.inf, lowest_round=-1,
                       lowest_mean=np.zeros(0), stale=0, restores=before.restores + 1)  # fmt: skip
    return restored, {"to_round": lowest[1], "after_rounds": stale, "sigma": restored.sigma}


def final_prompt(state: ServerState, restored: dict | None, guard: Guard) -> tuple[np.ndarray, int]:
    """The prompt a run ends with after the round that led to ``state``, and the round that broadcast it.

    With the guard on, a prompt the sites measured: the one the guard sends the search back to, i.e. the
    broadcast prompt with the lowest pooled dev loss since the best round last changed or the search was
    last restored (the last round's own prompt when it is that one). The search's next mean, which no site
    has measured, stays in the checkpoint, where a resumed job goes on from it. With ``restore_after = 0``,
    that next mean (the rule before the guard)."""
    if not guard.restore_after:
        return state.mean, state.round
    if restored:  # the search is back at the prompt with the lowest dev loss
        return state.mean, int(restored["to_round"])
    if state.lowest_round >= 0:
        return state.lowest_mean, state.lowest_round
    if state.best_round >= 0:  # no dev loss measured since the best round changed or the last restore
        return state.best_mean, state.best_round
    return state.mean, state.round


def remember_descriptions(state: ServerState, reports: list[SiteReport]) -> tuple[ServerState, list[SiteReport]]:
    """Keep every site's latest description in the state, and give each report without one the description
    the state holds of its site (a site sends it only when the broadcast shows the server lacks it)."""
    known = state.known_descriptions()
    for r in reports:
        if r.description:
            known[r.site] = r.description
    filled = [r if r.description else replace(r, description=known.get(r.site, {})) for r in reports]
    return replace(state, descriptions=json.dumps(known, sort_keys=True) if known else ""), filled


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)


def aggregate_round(
    state: ServerState,
    reports: list[SiteReport],
    step_rule: str = "eq6",
    max_step: float = MAX_STEP,
    refused: dict[str, str] | None = None,
    expected: list[str] | None = None,
    guard: Guard = Guard(),
) -> tuple[ServerState, dict]:
    """The next global state and this round's metrics row.

    ``reports`` come in the order the server heard them; ``refused`` names the sites whose answers the
    transport already refused, with the reason; ``expected`` lists every site the round was sent to.
    The row describes the prompt that was broadcast this round (``state.mean``): its dev loss and accuracy
    weighted by the sites' dev examples, and its test accuracy where evaluator sites measured it. They come
    from every site whose measurement is valid, also when its search result is not (``dev_sites`` names
    them); the search update uses the sites in ``sites``. The best prompt is chosen on the dev loss alone,
    never on test (see ``compare_with_best``), and ``guard`` may send the search back to it (``guard_search``).
    Every site left out is named with why.
    """
    state, reports = remember_descriptions(state, reports)
    state = choose_reference(state, reports, max_step)
    reference = next((r.description for r in reports if r.site == state.fingerprint_site and r.description), None)
    if reference is None and state.fingerprint:
        reference = next((r.description for r in reports if r.fingerprint == state.fingerprint and r.description), {})
    dropped = dict(refused or {})
    measured, used = [], []
    for report in reports:
        reason = check_measurement(report, state, reference)
        if reason is None:
            measured.append(report)
            reason = check_result(report.result, state, max_step)
        if reason:
            log.warning("round %d: leaving out %s: %s", state.round, report.site, reason)
            dropped[report.site] = reason
        else:
            used.append(report)
    heard = {r.site for r in reports} | set(dropped)
    missing = sorted(set(expected or []) - heard)
    if not used:
        why = "; ".join(f"{site}: {reason}" for site, reason in sorted(dropped.items())) or "no site answered"
        raise RuntimeError(f"round {state.round}: no usable site result ({why})")
    used.sort(key=lambda r: r.site)
    measured.sort(key=lambda r: r.site)
    figures = {r.site: [r.metrics["dev_loss"], r.metrics.get("dev_acc", math.nan), r.metrics.get("n_dev", 1.0)]
               for r in measured if "dev_loss" in r.metrics}  # fmt: skip

    row = {
        "round": state.round,
        "dev_loss": _weighted(measured, "dev_loss", "n_dev"),
        "dev_acc": _weighted(measured, "dev_acc", "n_dev"),
        "test_loss": _weighted(measured, "test_loss", "n_test"),
        "test_acc": _weighted(measured, "test_acc", "n_test"),
        "sigma": state.sigma,
        "mean_norm": float(np.linalg.norm(state.mean)),
        "sites": [r.site for r in used],
        "dev_sites": sorted(figures),
        "dropped": dict(sorted(dropped.items())),
        "missing": missing,
        "local_fitness": float(np.mean([r.result.fitness for r in used])),
    }
    # what the sites' forwards cost this round, and how many candidates overflowed (see BlackBox.fitness)
    for key in ("padded_tokens", "attended_tokens", "nonfinite_candidates"):
        if any(key in r.metrics for r in used):
            row[key] = int(sum(r.metrics.get(key, 0) for r in used))
    examples = {r.site: e for r in measured if r.site in figures and (e := _examples(r)) is not None}
    better, row["compared_on"], row["p_better"] = compare_with_best(figures, examples, state, guard)
    if better:
        state = replace(state, best_round=state.round, best_dev_loss=row["dev_loss"], best_mean=state.mean.copy(),
                        best_dev_acc=_number(row["dev_acc"]), best_test_acc=_number(row["test_acc"]),
                        best_sites=json.dumps(figures, sort_keys=True),
                        best_examples=json.dumps(examples, sort_keys=True))  # fmt: skip
    update = update_with_clipping(state, [r.result for r in used], step_rule)
    row["clipped"] = {r.site: round(float(f), 4) for r, f in zip(used, update.clipped) if f < 1.0}
    for site, factor in row["clipped"].items():
        log.warning("round %d: the step of %s was clipped to %.3g of its length", state.round, site, factor)
    new, row["restored"] = guard_search(state, update.state, row["dev_loss"], better, guard)
    if row["restored"]:
        log.warning("round %d: no lower dev loss for %d rounds; the search returns to round %d's prompt with sigma "
                    "%.4g", state.round, row["restored"]["after_rounds"], row["restored"]["to_round"],
                    new.sigma)  # fmt: skip
    row["next_sigma"] = new.sigma
    row["best_round"] = new.best_round
    return new, row


def _figure(value: float) -> float | None:
    """A state figure for JSON: None where not measured (nan) or never set (inf)."""
    return float(value) if math.isfinite(value) else None


def _fewer_dev_sites(rows: list[dict]) -> dict[str, list[str]]:
    """The rounds whose dev figures lack sites that other rounds of this job hold, with the sites absent."""
    every = set().union(*(r.get("dev_sites", []) for r in rows))
    return {str(r["round"]): sorted(every - set(r["dev_sites"])) for r in rows
            if "dev_sites" in r and every - set(r["dev_sites"])}  # fmt: skip


class RunRecorder:
    """Writes a run's outputs into one directory: metrics, summary, prompts (and the checkpoint on request)."""

    def __init__(self, run_dir: str, guard: Guard = Guard()):
        self.run_dir, self.guard = run_dir, guard
        os.makedirs(run_dir, exist_ok=True)
        self._projection: tuple[tuple, np.ndarray] | None = None

    def path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def save_state(self, state: ServerState) -> None:
        tmp = self.path(STATE_FILE + ".tmp")
        save_state(tmp, state)
        os.replace(tmp, self.path(STATE_FILE))  # never a half-written checkpoint

    def record(self, row: dict, state: ServerState, prompt_info: dict | None = None) -> None:
        """Append the round's row; refresh summary.json and the best and final prompt files from the state,
        which holds the best round also when it was found before a resume."""
        with open(self.path(METRICS_FILE), "a") as f:
            f.write(json.dumps(row) + "\n")
        rows = self.rows()
        final_z, final_round = final_prompt(state, row.get("restored"), self.guard)
        summary = {
            "rounds": len(rows),
            "best_round": state.best_round,
            "best_dev_loss": _figure(state.best_dev_loss),
            "best_dev_acc": _figure(state.best_dev_acc),
            "best_test_acc": _figure(state.best_test_acc),
            "best_dev_sites": sorted(json.loads(state.best_sites)) if state.best_sites else [],
            **self._final_figures(final_round, rows, state),
            "selection": self.guard.describe(),
            "restores": state.restores,
            "rounds_with_fewer_dev_sites": _fewer_dev_sites(rows),
        }
        with open(self.path(SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=2)
        if state.best_round >= 0:  # every round: a resumed job's best may come from the checkpoint
            self._write_prompt(BEST_PROMPT_FILE, state.best_mean, state, prompt_info, state.best_round)
        self._write_prompt(FINAL_PROMPT_FILE, final_z, state, prompt_info, final_round)

    @staticmethod
    def _final_figures(round_: int, rows: list[dict], state: ServerState) -> dict:
        """The final prompt's round and figures: from its round's row, or the state's best figures when it
        is the best prompt of an earlier job (resumed); None where no site measured it (``restore_after = 0``)."""
        row = next((r for r in reversed(rows) if r["round"] == round_), None)
        if row is not None:
            figures = (row["dev_loss"], row["dev_acc"], row["test_acc"])
        elif round_ == state.best_round:
            figures = (state.best_dev_loss, state.best_dev_acc, state.best_test_acc)
        else:
            figures = (math.nan, math.nan, math.nan)
        names = ("final_dev_loss", "final_dev_acc", "final_test_acc")
        return {"final_round": round_, "last_round": rows[-1]["round"],
                **{name: _figure(_number(v)) for name, v in zip(names, figures)}}  # fmt: skip

    def rows(self) -> list[dict]:
        if not os.path.exists(self.path(METRICS_FILE)):
            return []
        with open(self.path(METRICS_FILE)) as f:
            return [json.loads(line) for line in f if line.strip()]

    def _write_prompt(self, name: str, z: np.ndarray, state: ServerState, info: dict | None, round_: int) -> None:
        arrays = {"z": z.astype(np.float32), "seed": np.int64(state.seed), "round": np.int64(round_)}
        if info:  # the sites' description, their projection seed included, wins over the server's record
            arrays.update({k: np.asarray(v) for k, v in info.items() if v is not None})
            length, hidden = int(info["n_prompt_tokens"]), int(info["hidden_size"])
            arrays["soft_prompt"] = (z.astype(np.float32) @ self._matrix(state, info)).reshape(length, hidden)
        tmp = self.path(name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, self.path(name))

    def _matrix(self, state: ServerState, info: dict) -> np.ndarray:
        key = (int(info.get("seed", state.seed)), state.dim, int(info["n_prompt_tokens"]) * int(info["hidden_size"]),
               float(info["projection_scale"]))  # fmt: skip
        if self._projection is None or self._projection[0] != key:
            self._projection = (key, projection(*key))
        return self._projection[1]
