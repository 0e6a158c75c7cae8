"""Tests of fedbpt.data: k-shot pools, site shards, site names and split loading (local files, fake HF)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_SST2, SHARED_DATA, need_shared
from fedbpt.data import (
    Split,
    k_shot_pools,
    load_split,
    site_index,
    site_shards,
    split_dirichlet,
    split_iid,
)
from fedbpt.tasks import get_task


def shared(task_dir: str) -> Path:
    """The full copy of one task's data in ../shared/data, or a clean skip where it is absent."""
    return need_shared(SHARED_DATA / task_dir)


# --- k-shot pools ---------------------------------------------------------------------------------


def test_k_shot_pools_balanced_disjoint_deterministic():
    labels = np.repeat(np.arange(3), [50, 40, 60])
    train, dev = k_shot_pools(labels, k_shot=16, num_labels=3, seed=42)
    assert len(train) == len(dev) == 48
    for c in range(3):
        assert (labels[train] == c).sum() == 16
        assert (labels[dev] == c).sum() == 16
    assert len(np.intersect1d(train, dev)) == 0
    assert len(np.unique(train)) == 48 and len(np.unique(dev)) == 48
    # shuffled order, not grouped by class
    assert not np.all(np.diff(labels[train]) >= 0)
    again_train, again_dev = k_shot_pools(labels, 16, 3, seed=42)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(dev, again_dev)
    other_train, _ = k_shot_pools(labels, 16, 3, seed=43)
    assert set(other_train) != set(train)


def test_k_shot_pools_too_large_k():
    labels = np.array([0] * 40 + [1] * 20)
    with pytest.raises(ValueError, match=r"--k_shot 16 needs 32 examples of class 1 .* only 20; lower --k_shot"):
        k_shot_pools(labels, 16, 2, seed=0)
    # a class with no examples at all also fails
    with pytest.raises(ValueError, match="class 2"):
        k_shot_pools(labels, 4, 3, seed=0)


# --- site shards ----------------------------------------------------------------------------------


def assert_partition(shards: list[np.ndarray], n: int, num_users: int) -> None:
    assert len(shards) == num_users
    assert all(len(s) >= 1 for s in shards)
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(n))


def test_split_iid_partition_and_sizes():
    shards = split_iid(103, 10, seed=1)
    assert_partition(shards, 103, 10)
    assert sorted(len(s) for s in shards) == [10] * 7 + [11] * 3
    for a, b in zip(shards, split_iid(103, 10, seed=1), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="--num_users"):
        split_iid(5, 10, seed=0)
    with pytest.raises(ValueError, match="--num_users"):
        split_iid(5, 0, seed=0)


def test_split_dirichlet_large_alpha_is_near_iid():
    labels = np.repeat([0, 1], 200)
    shards = split_dirichlet(labels, 10, alpha=1e6, seed=0)
    assert_partition(shards, 400, 10)
    for s in shards:
        assert abs(labels[s].mean() - 0.5) < 0.1
        assert 36 <= len(s) <= 44


def test_split_dirichlet_small_alpha_is_skewed_and_deterministic():
    labels = np.repeat([0, 1], 200)
    shards = split_dirichlet(labels, 10, alpha=0.1, seed=0)
    assert_partition(shards, 400, 10)
    majority = [max(labels[s].mean(), 1 - labels[s].mean()) for s in shards]
    assert max(majority) > 0.8
    for a, b in zip(shards, split_dirichlet(labels, 10, alpha=0.1, seed=0), strict=True):
        np.testing.assert_array_equal(a, b)


def test_split_dirichlet_errors():
    labels = np.repeat([0, 1], 4)
    with pytest.raises(ValueError, match="--num_users 10.*--k_shot.*--alpha_dir"):
        split_dirichlet(labels, 10, alpha=0.5, seed=0)
    with pytest.raises(ValueError, match="--alpha_dir"):
        split_dirichlet(labels, 2, alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="--num_users"):
        split_dirichlet(labels, 0, alpha=0.5, seed=0)


def test_site_shards_dispatch():
    labels = np.repeat([0, 1], 20)
    iid = site_shards(labels, 4, iid=True, alpha=0.5, seed=3)
    for a, b in zip(iid, split_iid(40, 4, seed=3), strict=True):
        np.testing.assert_array_equal(a, b)
    skew = site_shards(labels, 4, iid=False, alpha=0.5, seed=3)
    for a, b in zip(skew, split_dirichlet(labels, 4, 0.5, seed=3), strict=True):
        np.testing.assert_array_equal(a, b)


# --- site names -----------------------------------------------------------------------------------


def test_site_index():
    assert site_index("site-1", 10) == 0
    assert site_index("site-3", 10) == 2
    assert site_index("site-10", 10) == 9
    for bad in ("siteA", "site-0", "site_1", "site-1x"):
        with pytest.raises(ValueError, match=r"not of the form site-N.*site-1\.\.site-10"):
            site_index(bad, 10)
    with pytest.raises(ValueError, match="site-12 is above --num_users 10; start the simulator with -n"):
        site_index("site-12", 10)


def test_site_local_data_takes_any_site_name():
    """--num_users 1: every site reads its own --data_dir and uses all of it, whatever the site is called."""
    assert [site_index(name, 1) for name in ("hospital-a", "site-7", "lab_b")] == [0, 0, 0]


# --- Split ----------------------------------------------------------------------------------------


def test_split_subset():
    s = Split(texts=[("a",), ("b",), ("c",)], labels=np.array([0, 1, 0]))
    sub = s.subset(np.array([2, 0]))
    assert len(sub) == 2
    assert sub.texts == [("c",), ("a",)]
    assert sub.labels.dtype == np.int64 and sub.labels.tolist() == [0, 0]


# --- loading real shared data ---------------------------------------------------------------------


def test_load_sst2_shared():
    d = shared("sst2")
    task = get_task("sst2")
    train = load_split(task, "train", str(d))
    assert len(train) == 67_349
    assert int(train.labels.sum()) == 37_569
    dev = load_split(task, "dev", str(d))
    assert len(dev) == 872
    assert int(dev.labels.sum()) == 444
    assert dev.labels.dtype == np.int64
    assert all(len(t) == 1 for t in dev.texts)
    assert not any(t[0] != t[0].rstrip() for t in train.texts + dev.texts)
    assert train.texts[0] == ("hide new secretions from the parental units",)


def test_load_unlabelled_test_file_raises(tmp_path: Path):
    # GLUE's test.tsv has no labels (index, sentence): a clear error, not a silent guess
    (tmp_path / "test.tsv").write_text("index\tsentence\n0\tuneasy mishmash of styles and genres .\n")
    with pytest.raises(ValueError, match="no 'label' column"):
        load_split(get_task("sst2"), "test", str(tmp_path))


def test_load_mrpc_rte_snli_shared():
    mrpc = load_split(get_task("mrpc"), "dev", str(shared("mrpc")))
    assert len(mrpc) == 408 and int(mrpc.labels.sum()) == 279
    assert all(len(t) == 2 for t in mrpc.texts)
    # the file quotes these fields pandas-style (a leading """ and inner "" escapes); the parser undoes that
    assert mrpc.texts[0][1] == '" The foodservice pie business does not fit our long-term growth strategy .'
    assert mrpc.texts[1][1].startswith('His wife said he was " 100 percent behind George Bush " and')
    assert len(load_split(get_task("mrpc"), "train", str(shared("mrpc")))) == 3_668
    rte = load_split(get_task("rte"), "dev", str(shared("rte")))
    assert len(rte) == 277 and np.bincount(rte.labels).tolist() == [146, 131]
    snli = load_split(get_task("snli"), "dev", str(shared("snli")))
    assert len(snli) == 9_842 and np.bincount(snli.labels).tolist() == [3_329, 3_235, 3_278]


def test_missing_split_file_names_flag():
    # the repository's SST-2 folder has train and dev only
    with pytest.raises(FileNotFoundError, match=r"no test file in .*sst2: expected one of test\.tsv.*--data_dir"):
        load_split(get_task("sst2"), "test", str(REPO_SST2))


# --- the repository's SST-2 copy (data/sst2) -------------------------------------------------------------


def test_repo_sst2_is_what_its_source_file_says():
    source = (REPO_SST2 / "SOURCE.md").read_text()
    for name in ("train.tsv", "dev.tsv"):
        digest = hashlib.sha256((REPO_SST2 / name).read_bytes()).hexdigest()
        assert re.search(rf"^\| `{name}` \|.*\| `{digest}` \|$", source, re.M), (
            f"{name}: sha256 {digest} not in SOURCE.md"
        )
    task = get_task("sst2")
    train, dev = load_split(task, "train", str(REPO_SST2)), load_split(task, "dev", str(REPO_SST2))
    assert len(train) == 2_000 and np.bincount(train.labels).tolist() == [1_000, 1_000]
    assert len(dev) == 872 and np.bincount(dev.labels).tolist() == [428, 444]
    assert not any(t[0] != t[0].rstrip() or not t[0] for t in train.texts + dev.texts)
    # enough for the README's --k_shot 200: 200 per class for train and as many for dev
    pools = k_shot_pools(train.labels, 200, 2, seed=1234)
    assert [len(p) for p in pools] == [400, 400]
    assert sum(f.stat().st_size for f in REPO_SST2.iterdir()) < 300_000


def test_repo_sst2_sample_is_reproducible_from_the_full_copy(tmp_path: Path):
    """The recipe in SOURCE.md, run on the full GLUE train file, writes data/sst2/train.tsv byte for byte,
    and dev.tsv is the full copy's."""
    full = shared("sst2")
    recipe = re.search(r"```python\n(.*?)```", (REPO_SST2 / "SOURCE.md").read_text(), re.S).group(1)
    (tmp_path / "train_full.tsv").symlink_to(full / "train.tsv")
    subprocess.run([sys.executable, "-c", recipe], cwd=tmp_path, check=True, timeout=120)
    assert (tmp_path / "train.tsv").read_bytes() == (REPO_SST2 / "train.tsv").read_bytes()
    assert (full / "dev.tsv").read_bytes() == (REPO_SST2 / "dev.tsv").read_bytes()


# --- synthetic files ------------------------------------------------------------------------------


def test_load_csv_and_jsonl(tmp_path: Path):
    task = get_task("mrpc")
    (tmp_path / "train.csv").write_text(
        'label,sentence1,sentence2\n1,"He said ""hi"", twice ",b\r\n0,c,d \n', encoding="utf-8"
    )
    train = load_split(task, "train", str(tmp_path))
    assert train.texts == [('He said "hi", twice', "b"), ("c", "d")]
    assert train.labels.tolist() == [1, 0]
    rows = [
        {"sentence1": "x", "sentence2": "y ", "label": 0},
        {"sentence1": "u", "sentence2": "v", "label": -1},
        {"sentence1": "p", "sentence2": "q", "label": 1},
    ]
    (tmp_path / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    dev = load_split(task, "dev", str(tmp_path))
    assert dev.texts == [("x", "y"), ("p", "q")]
    assert dev.labels.tolist() == [0, 1]


def test_load_file_errors(tmp_path: Path):
    task = get_task("mrpc")
    (tmp_path / "train.csv").write_text("label,sentence1,text\n1,a,b\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"train\.csv has no column 'sentence2'.*columns found: label, sentence1, text"
    ):
        load_split(task, "train", str(tmp_path))
    (tmp_path / "test.tsv").write_text("sentence1\tsentence2\tlabel\na\tb\t2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"test\.tsv: label 2 is out of range"):
        load_split(task, "test", str(tmp_path))
    (tmp_path / "dev.tsv").write_text("sentence1\tsentence2\tlabel\na\tb\t1\n", encoding="utf-8")
    (tmp_path / "validation.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "label": 1}\n')
    with pytest.raises(ValueError, match=r"more than one dev file .*dev\.tsv, validation\.jsonl"):
        load_split(task, "dev", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="--data_dir"):
        load_split(task, "train", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown split"):
        load_split(task, "validation", str(tmp_path))


# --- Hugging Face branch, with a fake `datasets` module (no network in tests) ---------------------


def test_load_hf_drops_negative_labels(monkeypatch: pytest.MonkeyPatch):
    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return {"premise": ["a ", "b", "c"], "hypothesis": ["x", "y", "z"], "label": [2, -1, 0]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    s = load_split(get_task("snli"), "dev")
    assert calls == [("stanfordnlp/snli", None, "validation")]
    assert s.texts == [("a", "x"), ("c", "z")]
    assert s.labels.tolist() == [2, 0]


def test_load_hf_failure_points_to_data_dir(monkeypatch: pytest.MonkeyPatch):
    def load_dataset(path, name, split):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(RuntimeError, match=r"glue/sst2 split 'train'.*--data_dir DIR"):
        load_split(get_task("sst2"), "train")


def test_yelp_literal_newlines_become_spaces(tmp_path: Path):
    """The Yelp files hold "\\n" as two characters; the public example reads them as a space."""
    rows = [{"text": "great food .\\n\\nfriendly staff", "label": 1}, {"text": "cold\\nand slow", "label": 0}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    yelp = load_split(get_task("yelpp"), "train", str(tmp_path))
    assert [t[0] for t in yelp.texts] == ["great food .  friendly staff", "cold and slow"]
    sst2 = [{"sentence": "a\\nb", "label": 1}]  # other tasks keep the text as it is
    (tmp_path / "train.jsonl").write_text(json.dumps(sst2[0]))
    assert load_split(get_task("sst2"), "train", str(tmp_path)).texts == [("a\\nb",)]
