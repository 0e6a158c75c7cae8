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
LOSSES = ("dev_loss", "dev_acc", "test_loss", "test_acc")


@dataclass
class SiteReport:
    """One site's answer in one round: its local search result, the metrics of the prompt it received,
    the fingerprint of its projection and (sent once, kept by the server) its description."""

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


def adopt_reference(state: ServerState, report: SiteReport) -> ServerState:
    """The first site the server hears from sets what every site must share: the projection, the local
    popsize and the number of local generations."""
    if state.fingerprint or not report.fingerprint:
        return state
    return replace(state, fingerprint=report.fingerprint, fingerprint_site=report.site,
                   local_popsize=report.result.popsize, local_iter=int(report.result.sigmas.size))  # fmt: skip


def check_report(report: SiteReport, state: ServerState, max_step: float = MAX_STEP,
                 reference: dict | None = None) -> str | None:  # fmt: skip
    """Why a site's report cannot be used, or None: another projection than the first site's, implausible
    metrics or example counts, or a result that ``search.check_result`` refuses."""
    if state.fingerprint and report.fingerprint != state.fingerprint:
        return projection_mismatch(report, state, reference or {})
    for key in LOSSES:
        value = report.metrics.get(key)
        if value is not None and not (math.isfinite(value) and value >= 0):
            return f"{key} {value!r} is not a finite, non-negative number"
    pool = _pool_size(reference or report.description)
    for key in COUNTS:
        count = report.metrics.get(key)
        if count is None:
            continue
        if not (math.isfinite(count) and count >= 1 and count == int(count)):
            return f"{key} {count!r} is not a positive number of examples"
        if key != "n_test" and pool and count > pool:
            return f"{key} {int(count)} is more than the {pool} examples of the k-shot pool (k_shot x labels)"
    return check_result(report.result, state, max_step)


def _pool_size(description: dict) -> int:
    try:
        return int(description["k_shot"]) * int(description["num_labels"])
    except (KeyError, TypeError, ValueError):
        return 0


def projection_mismatch(report: SiteReport, state: ServerState, reference: dict) -> str:
    """A message that names both sites and, where both described themselves, what differs."""
    mine = report.description
    keys = sorted(k for k in set(mine) | set(reference) if k != "fingerprint" and mine.get(k) != reference.get(k))
    differs = "; ".join(f"{k} {mine.get(k)!r} vs {reference.get(k)!r}" for k in keys)
    return (
        f"its projection (fingerprint {report.fingerprint or 'missing'}) differs from the one of "
        f"{state.fingerprint_site} (fingerprint {state.fingerprint}), the first site heard"
        + (f": {differs}" if differs else "")
        + "; every site needs the same --seed, --model_name, --n_prompt_tokens, --intrinsic_dim, --sigma, --alpha "
        "and --prompt_at"
    )


def aggregate_round(
    state: ServerState,
    reports: list[SiteReport],
    step_rule: str = "eq6",
    max_step: float = MAX_STEP,
    refused: dict[str, str] | None = None,
    expected: list[str] | None = None,
) -> tuple[ServerState, dict]:
    """The next global state and this round's metrics row.

    ``reports`` come in the order the server heard them; ``refused`` names the sites whose answers the
    transport already refused, with the reason; ``expected`` lists every site the round was sent to.
    The row describes the prompt that was broadcast this round (``state.mean``): its dev loss and accuracy
    weighted by the sites' dev examples, and its test accuracy where evaluator sites measured it. The
    best prompt is chosen on the dev loss alone, never on test. Every site left out is named with why.
    """
    for report in reports:
        state = adopt_reference(state, report)
    reference = next((r.description for r in reports if r.site == state.fingerprint_site), {})
    dropped = dict(refused or {})
    used = []
    for report in reports:
        reason = check_report(report, state, max_step, reference)
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

    row = {
        "round": state.round,
        "dev_loss": _weighted(used, "dev_loss", "n_dev"),
        "dev_acc": _weighted(used, "dev_acc", "n_dev"),
        "test_loss": _weighted(used, "test_loss", "n_test"),
        "test_acc": _weighted(used, "test_acc", "n_test"),
        "sigma": state.sigma,
        "mean_norm": float(np.linalg.norm(state.mean)),
        "sites": [r.site for r in used],
        "dropped": dict(sorted(dropped.items())),
        "missing": missing,
        "local_fitness": float(np.mean([r.result.fitness for r in used])),
    }
    # what the sites' forwards cost this round, and how many candidates overflowed (see BlackBox.fitness)
    for key in ("padded_tokens", "attended_tokens", "nonfinite_candidates"):
        if any(key in r.metrics for r in used):
            row[key] = int(sum(r.metrics.get(key, 0) for r in used))
    if row["dev_loss"] is not None and row["dev_loss"] < state.best_dev_loss:
        state = replace(state, best_round=state.round, best_dev_loss=row["dev_loss"], best_mean=state.mean.copy())
    update = update_with_clipping(state, [r.result for r in used], step_rule)
    row["clipped"] = {r.site: round(float(f), 4) for r, f in zip(used, update.clipped) if f < 1.0}
    for site, factor in row["clipped"].items():
        log.warning("round %d: the step of %s was clipped to %.3g of its length", state.round, site, factor)
    row["next_sigma"] = update.state.sigma
    row["best_round"] = update.state.best_round
    return update.state, row


class RunRecorder:
    """Writes a run's outputs into one directory: metrics, summary, prompts (and the checkpoint on request)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        os.makedirs(run_dir, exist_ok=True)
        self._projection: tuple[tuple, np.ndarray] | None = None

    def path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def save_state(self, state: ServerState) -> None:
        tmp = self.path(STATE_FILE + ".tmp")
        save_state(tmp, state)
        os.replace(tmp, self.path(STATE_FILE))  # never a half-written checkpoint

    def record(self, row: dict, state: ServerState, prompt_info: dict | None = None) -> None:
        """Append the round's row, refresh summary.json and the best and final prompt files."""
        with open(self.path(METRICS_FILE), "a") as f:
            f.write(json.dumps(row) + "\n")
        rows = self.rows()
        best = next((r for r in rows if r["round"] == state.best_round), None)
        summary = {
            "rounds": len(rows),
            "best_round": state.best_round,
            "best_dev_loss": best["dev_loss"] if best else None,
            "best_dev_acc": best["dev_acc"] if best else None,
            "best_test_acc": best["test_acc"] if best else None,
            "final_round": rows[-1]["round"],
            "final_dev_acc": rows[-1]["dev_acc"],
            "final_test_acc": rows[-1]["test_acc"],
        }
        with open(self.path(SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=2)
        if state.best_round == row["round"]:
            self._write_prompt(BEST_PROMPT_FILE, state.best_mean, state, prompt_info, state.best_round)
        self._write_prompt(FINAL_PROMPT_FILE, state.mean, state, prompt_info, state.round)

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
