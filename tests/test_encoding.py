"""Tokenisation apart from the model: how a generation's rows are ordered and cut into forwards."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from conftest import REPO_SST2, ROBERTA_TOKENIZER, SHARED_DATA, tiny_tokenizer
from fedbpt.encoding import Batch, Encoder, plan_chunks
from fedbpt.tasks import get_task


def cost(plan, overhead: int) -> int:
    return sum(len(e) * length + overhead for _, e, length in plan)


@pytest.mark.parametrize("batch_size, budget, overhead", [(4, 10**6, 0), (128, 100, 0), (128, 10**6, 30), (3, 40, 5)])
def test_every_row_once_within_the_limits(batch_size, budget, overhead):
    lengths = np.random.default_rng(0).integers(3, 30, size=23)
    plan = plan_chunks(lengths, 3, batch_size, budget, overhead)
    pairs = sorted((int(c), int(e)) for cands, ex, _ in plan for c, e in zip(cands, ex))
    assert pairs == sorted(itertools.product(range(3), range(23)))
    for _, ex, length in plan:
        assert len(ex) <= batch_size
        assert len(ex) * length <= budget or len(ex) == 1  # a row longer than the budget goes alone
        assert length == lengths[ex].max()  # the forward is as long as its longest row: no row is cut
    # longest first, an example's candidates side by side
    flat = np.concatenate([lengths[ex] for _, ex, _ in plan])
    assert np.all(np.diff(flat) <= 0)


def brute_force(lengths: np.ndarray, candidates: int, batch_size: int, budget: int, overhead: int) -> int:
    """The cheapest cut of the sorted rows, by trying every set of cut points."""
    rows = np.repeat(np.sort(lengths)[::-1], candidates)
    n, best = len(rows), np.inf
    for cuts in itertools.product([0, 1], repeat=n - 1):
        bounds = [0, *(i + 1 for i, c in enumerate(cuts) if c), n]
        total = 0
        for i, j in itertools.pairwise(bounds):
            if j - i > batch_size or ((j - i) * rows[i] > budget and j - i > 1):
                break
            total += (j - i) * rows[i] + overhead
        else:
            best = min(best, total)
    return int(best)


@pytest.mark.parametrize("seed", range(4))
def test_the_cuts_are_the_cheapest(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 40, size=6)
    for batch_size, budget, overhead in [(100, 10**6, 10), (4, 10**6, 3), (100, 90, 0), (5, 120, 20)]:
        plan = plan_chunks(lengths, 2, batch_size, budget, overhead)
        assert cost(plan, overhead) == brute_force(lengths, 2, batch_size, budget, overhead)


def test_a_row_longer_than_the_budget_goes_alone():
    plan = plan_chunks(np.array([50, 10, 10]), 1, 8, 40, 0)
    assert [(list(e), length) for _, e, length in plan] == [([0], 50), ([1, 2], 10)]


def tiny_batch(lengths: list[int], width: int = 2) -> Batch:
    t = max(lengths)
    attention = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    prompt = torch.zeros_like(attention)
    prompt[:, 1 : 1 + width] = True
    n = len(lengths)
    return Batch(ids=torch.arange(n * t).view(n, t) * attention, attention=attention, prompt=prompt,
                 text=attention & ~prompt, answer=torch.tensor(lengths) - 1, labels=torch.arange(n) % 2)  # fmt: skip


def test_batch_concat_keeps_rows_positions_and_lengths():
    clean, noisy = tiny_batch([9, 7, 4]), tiny_batch([6, 5])
    both = clean.concat(noisy)
    assert both.ids.shape == (5, 9) and both.lengths.tolist() == [9, 7, 4, 6, 5]
    assert both.prompt_positions.tolist() == [[1, 2]] * 5
    assert torch.equal(both.ids[3, :6], noisy.ids[3 - 3, :6]) and not both.attention[3, 6:].any()
    assert both.chunks(5, 128, 10**6, 16) is both.chunks(5, 128, 10**6, 16)  # planned once per shape
    # the old defect: after the concat rows are not sorted, yet no forward exceeds the token budget
    for chunk in both.chunks(3, 128, 20, 0):
        assert len(chunk) * chunk.length <= 20 or len(chunk) == 1
        assert chunk.attended == int(both.lengths[chunk.examples.numpy()].sum())


@pytest.fixture(scope="module")
def readme_site() -> Batch:
    """A site of the README's configuration: 40 SST-2 train examples, 50 prompt tokens. RoBERTa's tokens and
    the full GLUE train file where ../shared has them; else (a fresh clone) all-MiniLM-L6-v2's WordPiece
    tokens and the repository's 2,000-row sample: the padding bound holds for both."""
    from fedbpt.data import load_split

    tokenizer = tiny_tokenizer()
    full = SHARED_DATA / "sst2"
    folder = full if ROBERTA_TOKENIZER.exists() and full.exists() else REPO_SST2
    train = load_split(get_task("sst2"), "train", str(folder))
    pick = np.random.default_rng(1234).permutation(len(train))[:40]
    encoder = Encoder(tokenizer, get_task("sst2"), "mlm", 50, 512, len(tokenizer), "roberta-large")
    return encoder.encode(train.subset(pick))


@pytest.mark.parametrize("limits", [(128, 4096, 16), (4096, 131072, 256)], ids=["cpu", "cuda"])
def test_padding_at_the_readme_configuration_is_at_most_5_percent(readme_site, limits):
    """A generation of 5 candidates on 40 clean and 40 perturbed rows (perturbation keeps lengths)."""
    rows = readme_site.concat(readme_site)
    plan = plan_chunks(rows.lengths, 5, *limits)
    padded = sum(len(e) * length for _, e, length in plan)
    attended = 5 * int(rows.lengths.sum())
    old = old_padding(rows.lengths, 5, *limits[:2]) / attended
    print(f"limits {limits}: padded / attended {padded / attended:.4f} in {len(plan)} forwards (old cutting {old:.4f})")
    assert padded / attended <= 1.05, (padded / attended, len(plan))
    assert old > 1.2


def old_padding(lengths: np.ndarray, candidates: int, batch_size: int, budget: int) -> int:
    """Padded tokens the way this project cut rows before: candidate-major over the clean rows (sorted) then
    the perturbed ones (sorted again), each chunk sized by its first row, which is then not its longest."""
    rows = np.tile(lengths, candidates)
    padded, start = 0, 0
    while start < len(rows):
        size = max(1, min(batch_size, budget // rows[start], len(rows) - start))
        padded += size * int(rows[start : start + size].max())
        start += size
    return padded
