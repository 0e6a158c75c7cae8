"""The sites' random streams: the perturbed copy of a site's train shard, per site and shared."""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import replace

import pytest

from conftest import REPO_SST2
from fedbpt.blackbox import BlackBox
from fedbpt.client import blackbox_config
from fedbpt.config import parse_args
from fedbpt.search import derive_seed
from fedbpt.standalone import ServerConfig, run_federation


def test_perturbation_seeds_change_every_round_and_are_shared_only_when_asked():
    from fedbpt.search import perturbation_seed  # imported here: the test below needs nothing new to fail

    per_site = {perturbation_seed(42, f"site-{s}", r) for s in range(5) for r in range(5)}
    assert len(per_site) == 25 and perturbation_seed(42, "site-1", 3) == derive_seed(42, "site-1", 3)  # as before
    shared = [[perturbation_seed(42, f"site-{s}", r, shared=True) for s in range(5)] for r in range(5)]
    assert all(len(set(seeds)) == 1 for seeds in shared)  # one copy's draws for every site in a round
    assert len({seeds[0] for seeds in shared}) == 5  # and new draws every round


@pytest.mark.parametrize("stream", ["shared", "per_site"])
def test_the_perturbed_copy_changes_every_round_with_either_stream(tmp_path, tiny_roberta, stream):
    """The public example draws a new perturbed copy each round, with one search stream for all sites."""
    flags = (f"--task_name sst2 --model_name {tiny_roberta} --data_dir {REPO_SST2} --n_prompt_tokens 4 --k_shot 4 "
             f"--device cpu --seed 1234 --local_iter 1 --local_popsize 4 --num_users 1 --perturb 1 "
             f"--random_stream {stream}")  # fmt: skip
    cfg = replace(parse_args(shlex.split(flags)), eval_clients="")
    blackbox = BlackBox(blackbox_config(cfg))
    copies, perturb = [], blackbox.perturb

    def recorded(*args, **kwargs):
        batch = perturb(*args, **kwargs)
        copies.append(hashlib.sha256(batch.ids.cpu().numpy().tobytes()).hexdigest()[:12])
        return batch

    blackbox.perturb = recorded
    run_federation(cfg, ServerConfig(num_rounds=3, intrinsic_dim=16), str(tmp_path), blackbox=blackbox)
    print(f"{stream}: the perturbed copy of rounds 0, 1, 2: {copies}")
    assert len(copies) == 3 and len(set(copies)) == 3
