"""A site never dies silently, and float16 (CUDA's auto dtype) does not end a job over one candidate.

- any exception while a site joins or runs a round reaches the server with its type, message and place;
  the server names it in metrics.jsonl and its log, and the other sites go on (end to end, through NVFlare);
- a candidate with non-finite class scores gets its generation's worst fitness and is counted per
  site-round; only a received prompt that overflows stops the site, naming --dtype."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import fedbpt_train
from conftest import REPO_SST2
from fedbpt.blackbox import BlackBox
from fedbpt.client import FedBPTClient
from fedbpt.config import parse_args
from fedbpt.search import decode_down, encode_down, init_state
from fedbpt.standalone import ServerConfig, run_federation

LOCAL_ITER = 3


def flags(model, *extra: str) -> list[str]:
    return ["--task_name", "sst2", "--model_name", str(model), "--data_dir", str(REPO_SST2), "--n_prompt_tokens",
            "5", "--intrinsic_dim", "16", "--k_shot", "8", "--device", "cpu", "--seed", "3", "--local_iter",
            str(LOCAL_ITER), "--local_popsize", "4", "--num_users", "2", "--eval_clients", "", *extra]  # fmt: skip


def start_of(dim: int = 16, round_: int = 0):
    return decode_down(*encode_down(replace(init_state(dim, 1.0, 3), round=round_)))


# --- exceptions ----------------------------------------------------------------------------------


class Surprise(Exception):
    """An exception type that no code path expects."""


def test_an_unexpected_exception_while_joining_is_reported_with_its_type_and_place(tiny_roberta, monkeypatch):
    monkeypatch.setattr("sys.argv", ["fedbpt_train.py", *flags(tiny_roberta)])

    def broken(*args, **kwargs):
        raise Surprise("the data loader fell over")

    monkeypatch.setattr(fedbpt_train, "FedBPTClient", broken)
    client, error = fedbpt_train.join("site-2", start_of())
    assert client is None
    assert error.startswith("site-2 cannot take part: the data loader fell over (Surprise at ")
    assert error.endswith(f"tests/test_site_failures.py:{broken.__code__.co_firstlineno + 1} in broken)")


def test_an_unexpected_exception_in_a_round_is_reported_and_the_site_tries_again(tiny_roberta, monkeypatch):
    monkeypatch.setattr("sys.argv", ["fedbpt_train.py", *flags(tiny_roberta)])
    client, error = fedbpt_train.join("site-2", start_of())
    assert error is None
    original, calls = FedBPTClient.run_round, []

    def flaky(self, start):
        calls.append(start.round)
        if len(calls) == 1:
            raise KeyError("missing key")
        return original(self, start)

    monkeypatch.setattr(FedBPTClient, "run_round", flaky)
    done, failure, stopped = fedbpt_train.run_round("site-2", client, start_of(round_=4))
    assert done is None and not stopped
    assert failure.startswith("site-2 failed in round 4: 'missing key' (KeyError at tests/test_site_failures.py:")
    done, failure, stopped = fedbpt_train.run_round("site-2", client, start_of(round_=5))
    assert failure is None and not stopped and calls == [4, 5]
    result, metrics = done
    assert np.isfinite(result.fitness) and metrics["n_train"] > 0


# --- float16 -------------------------------------------------------------------------------------


def test_one_overflowing_candidate_per_generation_is_counted_and_the_round_completes(tiny_roberta, monkeypatch,
                                                                                     tmp_path):  # fmt: skip
    """Candidate 1 of every generation is forced to non-finite scores, on both sites, for 2 rounds."""
    original = BlackBox.class_scores

    def overflowing(self, z, batch):
        scores = original(self, z, batch).clone()  # out of inference mode, so that it can be changed
        if len(z) > 1:  # a generation, not the evaluation of one prompt
            scores[1] = float("inf")
        return scores

    monkeypatch.setattr(BlackBox, "class_scores", overflowing)
    rows = run_federation(parse_args(flags(tiny_roberta, "--dtype", "float16")), ServerConfig(num_rounds=2),
                          str(tmp_path))  # fmt: skip
    assert [r["sites"] for r in rows] == [["site-1", "site-2"]] * 2 and all(not r["dropped"] for r in rows)
    assert [r["nonfinite_candidates"] for r in rows] == [2 * LOCAL_ITER] * 2  # one per generation, per site
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_candidates"] for r in written] == [2 * LOCAL_ITER] * 2
    assert all(np.isfinite(r["local_fitness"]) and np.isfinite(r["dev_loss"]) for r in rows)


def test_an_overflowing_received_prompt_stops_the_site_naming_the_dtype_flag(tiny_roberta, monkeypatch):
    monkeypatch.setattr("sys.argv", ["fedbpt_train.py", *flags(tiny_roberta, "--dtype", "float16")])
    client, _ = fedbpt_train.join("site-2", start_of())
    with torch.no_grad():  # activations beyond float16's 65,504, as some checkpoints reach
        for norm in (m for m in client.blackbox.model.modules() if isinstance(m, torch.nn.LayerNorm)):
            norm.weight.fill_(6e4)
    done, failure, stopped = fedbpt_train.run_round("site-2", client, start_of())
    assert done is None and stopped
    assert failure.startswith(
        f"site-2 cannot take part: --dtype float16: {tiny_roberta}'s activations overflow float16's range "
        "(non-finite class scores); use --dtype bfloat16 or float32 (FloatingPointError at "
    )


# --- end to end, through NVFlare's simulator ----------------------------------------------------

SURPRISED_SITE = '''"""Test-only site script: fedbpt_train as shipped, except that site-2's round 1 raises an exception
of a type no code path expects."""

import fedbpt_train
from fedbpt.client import FedBPTClient


class Surprise(Exception):
    pass


original = FedBPTClient.run_round


def run_round(self, start):
    if self.site == "site-2" and start.round == 1:
        raise Surprise("an unexpected fault")
    return original(self, start)


FedBPTClient.run_round = run_round
fedbpt_train.main()
'''


@pytest.mark.slow
def test_an_unexpected_exception_is_named_by_the_server_in_that_round_and_the_site_returns(tmp_path, tiny_roberta):
    from test_faults import Simulation, rows_of, site_flags

    simulation = Simulation(tmp_path)
    try:
        job = simulation.job("surprise", site_flags(tiny_roberta, 2, k_shot="8", local_iter="2", local_popsize="4"),
                             app_script="surprised_site.py", min_clients=2, num_rounds=3)  # fmt: skip
        (job / "app" / "custom" / "surprised_site.py").write_text(SURPRISED_SITE)
        assert simulation.simulate(job, 2, "run") == 0
        log = (simulation.tmp / "run" / "server" / "log.txt").read_text()
    finally:
        simulation.close()
    assert simulation.system.pids() == []
    rows = rows_of(simulation.run_dir("run"))
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["sites"] for r in rows] == [["site-1", "site-2"], ["site-1"], ["site-1", "site-2"]]
    why = rows[1]["dropped"]["site-2"]
    assert why.startswith("the site failed: site-2 failed in round 1: an unexpected fault (Surprise at "), why
    line = SURPRISED_SITE.splitlines().index('        raise Surprise("an unexpected fault")') + 1
    assert why.endswith(f"surprised_site.py:{line} in run_round)"), why
    assert f"leaving out site-2: {why}" in log
