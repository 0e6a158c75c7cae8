"""Site flags: the published example's command line parses, bad values fail naming the flag."""

from __future__ import annotations

import re
import shlex

import pytest

from conftest import REPO
from fedbpt.config import ClientConfig, parse_args

PUBLISHED = (
    "--task_name sst2 --n_prompt_tokens 50 --intrinsic_dim 500 --k_shot 200 --device cuda:0 --seed 1234 "
    "--loss_type ce --cat_or_add add --local_iter 8 --num_users 10 --iid 1 --local_popsize 5 --perturb 1 "
    "--model_name roberta-large --eval_clients site-1 --llama_causal 1"
)


def test_published_app_config_parses_with_its_meaning():
    cfg = parse_args(shlex.split(PUBLISHED))
    assert (cfg.task_name, cfg.n_prompt_tokens, cfg.intrinsic_dim, cfg.k_shot) == ("sst2", 50, 500, 200)
    assert (cfg.local_iter, cfg.local_popsize, cfg.num_users, cfg.iid, cfg.perturb) == (8, 5, 10, 1, 1)
    assert cfg.evaluators == ["site-1"] and cfg.llama_causal == 1 and cfg.seed == 1234
    # paper defaults for what the command leaves out
    assert cfg.alpha_dir == 1.0 and cfg.perturb_rate == 0.5 and cfg.sigma == 1.0
    assert cfg.prompt_at == "auto"  # the embeddings block's output for RoBERTa, as in BBT and the paper


def test_intrinsic_dim_comes_from_the_server_unless_given():
    assert parse_args([]).intrinsic_dim is None
    assert parse_args(["--intrinsic_dim", "200"]).intrinsic_dim == 200


def test_committed_job_carries_the_published_flags():
    conf = (REPO / "jobs" / "fedbpt" / "app" / "config" / "config_fed_client.conf").read_text()
    app_config = re.search(r'app_config = "(.*)"', conf).group(1)
    assert parse_args(shlex.split(app_config)) == parse_args(shlex.split(PUBLISHED))


def test_round_trip_through_app_config():
    cfg = ClientConfig(task_name="mrpc", k_shot=4, eval_clients="site-1,site-3", data_dir=None, dtype="bfloat16")
    assert parse_args(shlex.split(cfg.to_app_config())) == cfg
    assert cfg.evaluators == ["site-1", "site-3"]


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--task_name sst3", "--task_name"),
        ("--k_shot 0", "--k_shot must be >= 1"),
        ("--local_popsize 1", "--local_popsize must be >= 2"),
        ("--perturb_rate 1.5", "--perturb_rate must be in"),
        ("--alpha_dir 0", "--alpha_dir must be > 0"),
        ("--data_dir /no/such/dir", "--data_dir '/no/such/dir'"),
        ("--prompt_at mask", "--prompt_at"),
        ("--k_shot", "--k_shot: expected one argument"),
        ("--k_shto 4", "unrecognized arguments in app_config: --k_shto 4"),
    ],
)
def test_bad_values_name_the_flag(flags, message, capsys):
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        parse_args(shlex.split(flags))
    text = str(err.value) + capsys.readouterr().err
    assert message in text
