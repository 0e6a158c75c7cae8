"""Task data: load a split (Hugging Face or local files), draw k-shot pools and shard them across sites.

Splits are named ``train``, ``dev`` (the task's validation split) and ``test``. Which split a run
evaluates on is the caller's choice: a task whose ``test_split`` is ``"validation"`` (GLUE, whose test
labels are hidden) is evaluated on ``load_split(task, "dev")``.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .tasks import Task

SPLITS = ("train", "dev", "test")
_HF_SPLIT = {"train": "train", "dev": "validation", "test": "test"}
_FILE_STEMS = {"train": ("train",), "dev": ("dev", "validation"), "test": ("test",)}
_EXTENSIONS = (".tsv", ".csv", ".jsonl")
# Skewed draws need many resamples: with alpha 0.1, 10 sites and 400 examples, 100 tries still fail for
# ~1.4% of seeds and 1,000 for none of 500; a try costs about 50 microseconds.
_DIRICHLET_TRIES = 1000


@dataclass
class Split:
    """One split of a task: text-field tuples (in ``task.text_fields`` order) and int64 labels."""

    texts: list[tuple[str, ...]]
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.texts) != len(self.labels):
            raise ValueError(f"Split has {len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray | list[int]) -> Split:
        """The examples at positions ``idx``, in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        return Split(texts=[self.texts[i] for i in idx], labels=self.labels[idx])


def load_split(task: Task, split: str, data_dir: str | None = None) -> Split:
    """Load ``split`` ("train", "dev" or "test") of ``task`` from Hugging Face, or from ``data_dir`` if given.

    Rows with a negative label (SNLI's -1 = no gold label) are dropped.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if data_dir is None:
        return _load_hf(task, split)
    return _load_file(task, _find_split_file(Path(data_dir), split))


def load_file(task: Task, path: str | Path) -> Split:
    """One labelled data file of ``task`` in a format ``--data_dir`` accepts (.tsv, .csv or .jsonl with the
    task's Hugging Face column names), e.g. a held-out set to evaluate a prompt on."""
    path = Path(path)
    if path.suffix not in _EXTENSIONS:
        raise ValueError(f"{path}: give a {', '.join(_EXTENSIONS)} file with the columns {_columns(task)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return _load_file(task, path)


def _columns(task: Task) -> str:
    return ", ".join((*task.text_fields, task.label_field))


def _load_hf(task: Task, split: str) -> Split:
    hf_split = _HF_SPLIT[split]
    try:
        import datasets  # heavy import, and only needed when no local files are given

        ds = datasets.load_dataset(task.hf_path, task.hf_name, split=hf_split)
        columns = [list(ds[f]) for f in task.text_fields]
        raw_labels = list(ds[task.label_field])
    except Exception as exc:
        raise RuntimeError(
            f"could not load Hugging Face dataset {_dataset_name(task)} split {hf_split!r} "
            f"({type(exc).__name__}: {exc}); "
            f"without internet access pass --data_dir DIR with local {split}.tsv/.csv/.jsonl files"
        ) from exc
    rows = [tuple(str(c[i]).rstrip() for c in columns) for i in range(len(raw_labels))]
    return _build_split(task, rows, [int(y) for y in raw_labels], f"{_dataset_name(task)} {hf_split}")


def _dataset_name(task: Task) -> str:
    """Hugging Face name of the task's dataset, e.g. ``glue/sst2``."""
    return task.hf_path + (f"/{task.hf_name}" if task.hf_name else "")


def _find_split_file(data_dir: Path, split: str) -> Path:
    expected = [stem + ext for stem in _FILE_STEMS[split] for ext in _EXTENSIONS]
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data_dir {data_dir} is not a directory; it should hold {' or '.join(expected)}")
    found = [data_dir / name for name in expected if (data_dir / name).is_file()]
    if not found:
        raise FileNotFoundError(
            f"no {split} file in {data_dir}: expected one of {', '.join(expected)} (check --data_dir)"
        )
    if len(found) > 1:
        raise ValueError(
            f"more than one {split} file in {data_dir}: {', '.join(p.name for p in found)}; keep exactly one"
        )
    return found[0]


def _load_file(task: Task, path: Path) -> Split:
    if path.suffix == ".jsonl":
        header, records = _read_jsonl(path)
    else:
        header, records = _read_delimited(path)
    if task.label_field not in header:
        raise ValueError(
            f"{path} has no {task.label_field!r} column (columns: {', '.join(header)}); it looks unlabelled, "
            f"so it cannot be used as a {task.name} split"
        )
    for field in task.text_fields:
        if field not in header:
            raise ValueError(
                f"{path} has no column {field!r} needed by task {task.name}; columns found: {', '.join(header)}"
            )
    rows: list[tuple[str, ...]] = []
    labels: list[int] = []
    for line_no, rec in records:
        try:
            labels.append(int(rec[task.label_field]))
        except (TypeError, ValueError):
            raise ValueError(f"{path} line {line_no}: label {rec[task.label_field]!r} is not an integer") from None
        # SST-2 carries a trailing space before the tab and some files end lines with \r.
        rows.append(tuple(str(rec[f]).rstrip() for f in task.text_fields))
    return _build_split(task, rows, labels, str(path))


def _read_delimited(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and (line number, row dict) pairs of a .tsv/.csv file with a header row."""
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with path.open(newline="", encoding="utf-8") as fh:
        # Default quoting undoes the pandas-style "" escapes of MRPC/RTE/SNLI; a quote that does not open
        # a field stays literal, and the GLUE SST-2 files contain no quote character at all.
        reader = csv.reader(fh, delimiter=delimiter)
        header = [h.strip() for h in next(reader, [])]
        records = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{path} line {reader.line_num}: {len(row)} fields but the header has {len(header)}")
            # A stray opening quote would swallow following lines into one field; fail rather than miscount.
            if delimiter == "\t" and any("\t" in c or "\n" in c for c in row):
                raise ValueError(
                    f"{path} line {reader.line_num}: a field spans several lines or tabs (unbalanced quote?)"
                )
            records.append((reader.line_num, dict(zip(header, row, strict=True))))
    return header, records


def _read_jsonl(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """Column names (keys of the first record) and (line number, record) pairs of a .jsonl file."""
    records = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if line.strip():
                records.append((line_no, json.loads(line)))
    header = list(records[0][1]) if records else []
    for line_no, rec in records:
        missing = [k for k in header if k not in rec]
        if missing:
            raise ValueError(f"{path} line {line_no}: missing column(s) {', '.join(missing)}")
    return header, records


def _build_split(task: Task, rows: list[tuple[str, ...]], labels: list[int], source: str) -> Split:
    if task.literal_newlines:  # as the public example does for Yelp: the escapes are not words
        rows = [tuple(t.replace("\\n", " ") for t in row) for row in rows]
    y = np.asarray(labels, dtype=np.int64)
    keep = y >= 0
    if np.any(y[keep] >= task.num_labels):
        raise ValueError(
            f"{source}: label {int(y[keep].max())} is out of range for task {task.name} "
            f"({task.num_labels} labels: 0..{task.num_labels - 1})"
        )
    return Split(texts=[r for r, k in zip(rows, keep, strict=True) if k], labels=y[keep])


def k_shot_pools(labels: np.ndarray, k_shot: int, num_labels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, dev) pools of ``k_shot`` per class: after a ``seed`` shuffle, each class's first
    ``k_shot`` go to train and the next ``k_shot`` to dev (the BBT/FedBPT recipe)."""
    if k_shot < 1:
        raise ValueError(f"--k_shot must be >= 1, got {k_shot}")
    labels = np.asarray(labels)
    perm = np.random.default_rng(seed).permutation(len(labels))
    in_train = np.zeros(len(labels), dtype=bool)
    in_dev = np.zeros(len(labels), dtype=bool)
    for c in range(num_labels):
        members = perm[labels[perm] == c]
        if len(members) < 2 * k_shot:
            raise ValueError(
                f"--k_shot {k_shot} needs {2 * k_shot} examples of class {c} (train pool + dev pool) "
                f"but the training split has only {len(members)}; lower --k_shot"
            )
        in_train[members[:k_shot]] = True
        in_dev[members[k_shot : 2 * k_shot]] = True
    # Keep the shuffled order so classes are interleaved rather than grouped.
    return perm[in_train[perm]].astype(np.int64), perm[in_dev[perm]].astype(np.int64)


def _check_num_users(num_users: int) -> None:
    if num_users < 1:
        raise ValueError(f"--num_users must be >= 1, got {num_users}")


def split_iid(n: int, num_users: int, seed: int) -> list[np.ndarray]:
    """Partition ``range(n)`` into ``num_users`` near-equal random shards (each sorted ascending)."""
    _check_num_users(num_users)
    if n < num_users:
        raise ValueError(
            f"cannot give each of --num_users {num_users} sites an example: only {n} examples "
            "(lower --num_users or raise --k_shot)"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(s).astype(np.int64) for s in np.array_split(perm, num_users)]


def split_dirichlet(labels: np.ndarray, num_users: int, alpha: float, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Partition indices into ``num_users`` label-skewed shards: per class, site shares ~ Dir(alpha).

    Redraws (same rng stream, bounded tries) until every site has at least ``min_size`` examples.
    """
    _check_num_users(num_users)
    if alpha <= 0:
        raise ValueError(f"--alpha_dir must be > 0, got {alpha}")
    labels = np.asarray(labels)
    hint = "lower --num_users, raise --k_shot or raise --alpha_dir"
    if len(labels) < num_users * min_size:
        raise ValueError(f"{len(labels)} examples cannot give each of --num_users {num_users} sites {min_size}; {hint}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(_DIRICHLET_TRIES):
        shards: list[list[np.ndarray]] = [[] for _ in range(num_users)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(alpha * np.ones(num_users))
            cuts = (np.cumsum(p)[:-1] * len(members)).astype(np.int64)
            for site, part in enumerate(np.split(members, cuts)):
                shards[site].append(part)
        sites = [np.sort(np.concatenate(s)).astype(np.int64) for s in shards]
        if min(len(s) for s in sites) >= min_size:
            return sites
    raise ValueError(
        f"Dirichlet split with --alpha_dir {alpha} left some of the --num_users {num_users} sites with fewer "
        f"than {min_size} of {len(labels)} examples in {_DIRICHLET_TRIES} draws; {hint}"
    )


def site_shards(labels: np.ndarray, num_users: int, iid: bool, alpha: float, seed: int) -> list[np.ndarray]:
    """Shard indices of ``labels`` over sites: IID, or Dirichlet(``alpha``) label skew."""
    if iid:
        return split_iid(len(labels), num_users, seed)
    return split_dirichlet(labels, num_users, alpha, seed)


def site_index(site_name: str, num_users: int) -> int:
    """0-based shard number of an NVFlare client called ``site-N`` (``site-1`` -> 0).

    With ``--num_users 1`` (site-local data: each site reads only its own ``--data_dir`` and uses all of
    it) any site name is accepted: there is only one shard."""
    if num_users == 1:
        return 0
    m = re.fullmatch(r"site-(\d+)", site_name)
    if m is None or int(m.group(1)) < 1:
        raise ValueError(
            f"site name {site_name!r} is not of the form site-N (N >= 1); FedBPT shards the data by site "
            f"number (name clients site-1..site-{num_users}), or, with --num_users 1, each site uses all of its "
            "own --data_dir"
        )
    n = int(m.group(1))
    if n > num_users:
        raise ValueError(
            f"{site_name} is above --num_users {num_users}; start the simulator with -n <= --num_users "
            "or raise --num_users"
        )
    return n - 1
