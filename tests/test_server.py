"""The server round: result checks, dev-weighted metrics, model selection on dev only, output files."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from fedbpt.search import LocalResult, init_state, load_state
from fedbpt.server import RunRecorder, SiteReport, aggregate_round

D = 8


def report(site: str, step: float, dev_loss: float, n_dev: int, test_acc: float | None = None, **kw) -> SiteReport:
    metrics = {"dev_loss": dev_loss, "dev_acc": 1.0 - dev_loss, "n_dev": float(n_dev)}
    if test_acc is not None:
        metrics.update(test_acc=test_acc, test_loss=1.0 - test_acc, n_test=100.0)
    mean = kw.get("mean", np.full(D, step))
    return SiteReport(site, LocalResult(mean, kw.get("fitness", step), np.full(4, 0.9), popsize=5), metrics)


def test_dev_metrics_are_weighted_by_dev_examples_and_test_comes_from_evaluators():
    state = init_state(D, 1.0, 7)
    _, row = aggregate_round(state, [report("site-1", 0.1, 0.2, 30, test_acc=0.8), report("site-2", 0.2, 0.6, 10)])
    assert row["dev_loss"] == pytest.approx((0.2 * 30 + 0.6 * 10) / 40)
    assert row["test_acc"] == pytest.approx(0.8)
    assert row["sites"] == ["site-1", "site-2"] and row["round"] == 0 and row["sigma"] == 1.0
    assert "padded_tokens" not in row  # only when the sites report what their forwards cost


def test_row_sums_the_sites_padded_and_attended_tokens():
    a, b = report("site-1", 0.1, 0.2, 30), report("site-2", 0.2, 0.6, 10)
    a.metrics.update(padded_tokens=1040.0, attended_tokens=1000.0)
    b.metrics.update(padded_tokens=520.0, attended_tokens=500.0)
    _, row = aggregate_round(init_state(D, 1.0, 7), [a, b])
    assert (row["padded_tokens"], row["attended_tokens"]) == (1560, 1500)


def test_bad_results_are_dropped_and_named():
    state = init_state(D, 1.0, 7)
    bad_shape = report("site-2", 0.1, 0.5, 10, mean=np.zeros(D + 1))
    not_finite = report("site-3", 0.1, 0.5, 10, mean=np.full(D, np.nan))
    new, row = aggregate_round(state, [report("site-1", 0.1, 0.5, 10), bad_shape, not_finite],
                               refused={"site-4": "its task ended with EXECUTION_EXCEPTION"},
                               expected=["site-1", "site-2", "site-3", "site-4", "site-5"])  # fmt: skip
    assert row["sites"] == ["site-1"]
    assert list(row["dropped"]) == ["site-2", "site-3", "site-4"]
    assert "intrinsic_dim" in row["dropped"]["site-2"] and "not finite" in row["dropped"]["site-3"]
    assert row["dropped"]["site-4"] == "its task ended with EXECUTION_EXCEPTION"
    assert row["missing"] == ["site-5"]  # sent the task, never answered
    np.testing.assert_allclose(new.mean, np.full(D, 0.1))  # one site: the recombination is its mean
    with pytest.raises(RuntimeError, match=r"no usable site result \(site-2: mean has shape"):
        aggregate_round(state, [bad_shape])


def test_when_every_site_fails_the_error_gives_their_reasons():
    why = "site-1 cannot take part: --intrinsic_dim 50 in this site's app_config differs from intrinsic_dim 500"
    with pytest.raises(RuntimeError, match="round 0: no usable site result .site-1: the site stopped: site-1 cannot"):
        aggregate_round(init_state(D, 1.0, 7), [], refused={"site-1": f"the site stopped: {why}"})


@pytest.mark.parametrize(
    "metrics, reason",
    [
        ({"dev_loss": float("nan")}, "dev_loss nan is not a finite, non-negative number"),
        ({"dev_acc": -0.1}, "dev_acc -0.1 is not"),
        ({"test_acc": float("inf")}, "test_acc inf is not"),
        ({"n_dev": 0.0}, "n_dev 0.0 is not a positive number of examples"),
        ({"n_dev": 2.5}, "n_dev 2.5 is not"),
        ({"n_dev": 81.0}, "n_dev 81 is more than the 80 examples of the k-shot pool"),
        ({"n_train": 1e9}, "n_train 1000000000 is more than the 80"),
    ],
)
def test_implausible_metrics_are_refused_and_named(metrics, reason):
    state = init_state(D, 1.0, 7)
    good = report("site-1", 0.1, 0.5, 10)
    liar = report("site-2", 0.1, 0.5, 10)
    liar.metrics.update(metrics)
    for r in (good, liar):
        r.description = {"k_shot": 40, "num_labels": 2}
    _, row = aggregate_round(state, [good, liar])
    assert row["sites"] == ["site-1"] and row["dropped"]["site-2"].startswith(reason)


def test_sites_must_share_the_first_sites_projection_popsize_and_generations():
    state = init_state(D, 1.0, 7)
    a, b, c, e = (report(f"site-{i}", 0.1, 0.5, 10) for i in (1, 2, 3, 4))
    described = {"seed": 7, "n_prompt_tokens": 10, "hidden_size": 384, "model_name": "/models/minilm"}
    a.fingerprint, a.description = "aaaa", dict(described)
    b.fingerprint, b.description = "bbbb", {**described, "seed": 8}
    c.fingerprint, c.description = "aaaa", dict(described)
    c.result.popsize = 10
    e.fingerprint, e.description = "aaaa", dict(described)
    new, row = aggregate_round(state, [a, b, c, e])  # heard in this order: site-1 sets the reference
    assert row["sites"] == ["site-1", "site-4"]
    assert row["dropped"]["site-2"].startswith(
        "its projection (fingerprint bbbb) differs from the one of site-1 (fingerprint aaaa), the first site heard: "
        "seed 8 vs 7"
    )
    assert "local popsize 10 differs from 5" in row["dropped"]["site-3"]
    assert (new.fingerprint, new.fingerprint_site, new.local_popsize, new.local_iter) == ("aaaa", "site-1", 5, 4)
    # the reference is kept in the state (and its checkpoint): later rounds hold every site to it
    b.result.mean = b.result.mean + 0.0
    _, later = aggregate_round(new, [b, e])
    assert later["sites"] == ["site-4"] and "site-1" in later["dropped"]["site-2"]


def test_row_records_the_mean_norm_and_clipping():
    state = init_state(D, 1.0, 7)
    _, row = aggregate_round(state, [report("site-1", 0.1, 0.5, 10), report("site-2", 0.2, 0.5, 10)])
    assert row["mean_norm"] == 0.0 and row["clipped"] == {}
    far = report("site-2", 0.0, 0.5, 10, mean=np.full(D, 9.0), fitness=0.0)  # 3.4 honest steps: clipped, not refused
    _, row = aggregate_round(replace(state, mean=np.full(D, 0.5)), [report("site-1", 0.1, 0.5, 10), far])
    assert row["mean_norm"] == pytest.approx(0.5 * np.sqrt(D))
    assert list(row["clipped"]) == ["site-2"] and 0.0 < row["clipped"]["site-2"] < 1.0


def test_best_round_is_chosen_on_dev_never_on_test(tmp_path):
    """Round 1 has the best test accuracy but a worse dev loss than round 2: round 2 is the best."""
    recorder = RunRecorder(str(tmp_path))
    info = {"model_name": "m", "task_name": "sst2", "seed": 3, "n_prompt_tokens": 2, "hidden_size": 4,
            "projection_scale": 0.5, "cat_or_add": "add"}  # fmt: skip
    state = init_state(D, 1.0, 3)
    dev = [0.7, 0.5, 0.4, 0.6]
    test = [0.60, 0.90, 0.75, 0.70]
    broadcast = []
    for round_ in range(4):
        broadcast.append(state.mean.copy())
        reports = [report("site-1", 0.1 * (round_ + 1), dev[round_], 20, test_acc=test[round_]),
                   report("site-2", -0.05, dev[round_], 20)]  # fmt: skip
        state, row = aggregate_round(state, reports)
        recorder.record(row, state, info)
        recorder.save_state(state)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_round"] == 2 and summary["best_dev_loss"] == pytest.approx(0.4)
    assert summary["best_test_acc"] == pytest.approx(0.75) and summary["final_test_acc"] == pytest.approx(0.70)
    assert summary["rounds"] == 4
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["best_round"] for x in lines] == [0, 1, 2, 2]
    with np.load(tmp_path / "best_prompt.npz") as best:
        np.testing.assert_allclose(best["z"], broadcast[2], atol=1e-7)  # the prompt that was evaluated
        assert int(best["round"]) == 2 and best["soft_prompt"].shape == (2, 4)
    with np.load(tmp_path / "final_prompt.npz") as final:
        np.testing.assert_allclose(final["z"], state.mean, atol=1e-6)
    resumed = load_state(str(tmp_path / "fedbpt_state.npz"))
    assert resumed.round == 4 and resumed.best_round == 2
    np.testing.assert_array_equal(resumed.mean, state.mean)
