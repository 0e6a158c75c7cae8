"""The bad-input table of docs/reliability.md: each input gets an error that names what to fix, quoted in the table, and
every row names the test that checks it (this file, or the end-to-end runs in test_faults.py)."""

from __future__ import annotations

import ast
import re

import numpy as np
import pytest
import torch
from nvflare.apis.fl_context import FLContext

import fedbpt.nvflare_components as components
from conftest import REPO
from fedbpt.blackbox import check_device, resolve_model_path
from fedbpt.config import parse_args, site_data_dir
from fedbpt.data import k_shot_pools, site_index
from fedbpt.nvflare_components import FedBPTAggregator, FedBPTPersistor
from fedbpt.search import init_state, save_state


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: parse_args(["--task_name", "sst3"]), "argument --task_name: invalid choice: 'sst3' (choose from "
         "'sst2', 'yelpp', 'agnews', 'dbpedia', 'mrpc', 'rte', 'snli')"),
        (lambda: parse_args(["--k_shot", "0"]), "--k_shot must be >= 1, got 0"),
        (lambda: parse_args(["--k_shto", "4"]), "unrecognized arguments in app_config: --k_shto 4 (see the flag table "
         "in docs/flags.md)"),
        (lambda: parse_args(["--data_dir", "/no/such/dir"]), "--data_dir '/no/such/dir': no such directory"),
        (lambda: site_data_dir("/no/fedbpt/{site}", "hospital-a"), "--data_dir '/no/fedbpt/{site}' is "
         "'/no/fedbpt/hospital-a' for hospital-a: no such directory"),
        (lambda: resolve_model_path("/no/model"), "--model_name '/no/model': no such model directory (give a Hugging "
         "Face hub id such as roberta-large, or a folder with config.json and the weights)"),
        (lambda: site_index("hospital-a", 2), "site name 'hospital-a' is not of the form site-N (N >= 1); FedBPT "
         "shards the data by site number (name clients site-1..site-2), or, with --num_users 1, each site uses all "
         "of its own --data_dir"),
        (lambda: site_index("site-12", 10), "site-12 is above --num_users 10; start the simulator with -n <= "
         "--num_users or raise --num_users"),
        (lambda: k_shot_pools(np.array([0] * 40 + [1] * 20), 16, 2, 0), "--k_shot 16 needs 32 examples of class 1 "
         "(train pool + dev pool) but the training split has only 20; lower --k_shot"),
    ],
    ids=["task_name", "k_shot", "misspelt_flag", "data_dir", "site_data_dir", "model_name", "site_name",
         "site_number", "k_shot_too_large"],
)  # fmt: skip
def test_site_inputs_get_an_error_that_names_the_flag(call, message):
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        call()
    assert message in str(err.value)


def test_cuda_device_without_cuda_says_use_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as err:
        check_device("cuda:0")
    assert str(err.value) == "--device cuda:0: CUDA is not available on this machine; use --device cpu"


def test_server_inputs_get_an_error_that_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setattr(components, "run_dir", lambda fl_ctx: str(tmp_path / "run"))
    missing = FedBPTPersistor(intrinsic_dim=8, resume_from="/no/such/fedbpt_state.npz")
    with pytest.raises(FileNotFoundError) as err:
        missing.load_model(FLContext())
    assert "persistor resume_from '/no/such/fedbpt_state.npz': no such checkpoint" in str(err.value)

    save_state(str(tmp_path / "other.npz"), init_state(16, 1.0, 1))
    other = FedBPTPersistor(intrinsic_dim=8, resume_from=str(tmp_path / "other.npz"))
    with pytest.raises(ValueError) as err:
        other.load_model(FLContext())
    assert "checkpoint has intrinsic_dim 16, the job asks for 8" in str(err.value)

    with pytest.raises(ValueError) as err:
        FedBPTAggregator(step_rule="eq7")
    assert "aggregator step_rule must be one of ('eq6', 'example'), got 'eq7'" in str(err.value)
    with pytest.raises(ValueError) as err:
        FedBPTAggregator(confidence=1.0)
    assert "aggregator confidence must be in [0.5, 1), got 1.0" in str(err.value)


def test_every_row_of_the_readme_table_is_tested():
    """Each row quotes an error and names tests: the tests exist, and their files hold that very text (as one
    string literal, adjacent literals joined)."""
    text = (REPO / "docs" / "reliability.md").read_text()
    table = re.search(r"<!-- bad-input -->\n(.*?)\n(?:\n|\Z)", text, re.S)
    assert table, "docs/reliability.md has no table marked <!-- bad-input -->"
    rows = [line for line in table.group(1).splitlines()[2:] if line.startswith("|")]
    assert len(rows) >= 15
    for row in rows:
        _, quoted, tests = [cell.strip() for cell in row.strip("|").split(" | ")]
        error = re.match(r"`([^`]+)`", quoted).group(1)  # the first quoted span
        strings = []
        for path, name in re.findall(r"`(tests/\w+\.py)::(\w+)`", tests):
            module = ast.parse((REPO / path).read_text())
            test = next((f for f in module.body if isinstance(f, ast.FunctionDef) and f.name == name), None)
            assert test, f"{path}::{name} does not exist"
            strings += [n.value for n in ast.walk(module) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        assert strings, f"no test named in: {row}"
        assert any(error in s for s in strings), f"the tests named do not assert {error!r}"
