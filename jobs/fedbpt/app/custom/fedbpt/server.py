"""The server's side of a round, with no federation framework in it: check the sites' results, update the
global search, keep the best prompt by validation loss, and write the run's outputs.

numpy only (no torch, no transformers): the NVFlare aggregator and the standalone loop both call it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace

import numpy as np

from .search import LocalResult, ServerState, check_result, projection, save_state, server_update

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STATE_FILE = "fedbpt_state.npz"
BEST_PROMPT_FILE = "best_prompt.npz"
FINAL_PROMPT_FILE = "final_prompt.npz"


@dataclass
class SiteReport:
    """One site's answer in one round: its local search result and the metrics of the prompt it received."""

    site: str
    result: LocalResult
    metrics: dict[str, float]
    bytes_up: int = 0


def _weighted(reports: list[SiteReport], key: str, weight: str) -> float | None:
    pairs = [(r.metrics[key], r.metrics.get(weight, 1.0)) for r in reports if key in r.metrics]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if pairs and total > 0 else None


def aggregate_round(
    state: ServerState, reports: list[SiteReport], step_rule: str = "eq6", max_step: float = 1e3
) -> tuple[ServerState, dict]:
    """The next global state and this round's metrics row.

    The row describes the prompt that was broadcast this round (``state.mean``): its dev loss and
    accuracy weighted by the sites' dev examples, and its test accuracy where evaluator sites measured
    it. The best prompt is chosen on the dev loss alone, never on test.
    """
    used, dropped = [], []
    for report in reports:
        reason = check_result(report.result, state, max_step)
        if reason:
            log.warning("dropping the result of %s in round %d: %s", report.site, state.round, reason)
            dropped.append(report.site)
        else:
            used.append(report)
    if not used:
        raise RuntimeError(f"round {state.round}: no usable site result (dropped: {dropped})")

    row = {
        "round": state.round,
        "dev_loss": _weighted(used, "dev_loss", "n_dev"),
        "dev_acc": _weighted(used, "dev_acc", "n_dev"),
        "test_loss": _weighted(used, "test_loss", "n_test"),
        "test_acc": _weighted(used, "test_acc", "n_test"),
        "sigma": state.sigma,
        "sites": sorted(r.site for r in used),
        "dropped": sorted(dropped),
        "local_fitness": float(np.mean([r.result.fitness for r in used])),
    }
    if row["dev_loss"] is not None and row["dev_loss"] < state.best_dev_loss:
        state = replace(state, best_round=state.round, best_dev_loss=row["dev_loss"], best_mean=state.mean.copy())
    new_state = server_update(state, [r.result for r in used], step_rule)
    row["next_sigma"] = new_state.sigma
    row["best_round"] = new_state.best_round
    return new_state, row


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
            arrays.update({k: np.asarray(v) for k, v in info.items()})
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
