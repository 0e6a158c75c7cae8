"""The server round: result checks, dev-weighted metrics, model selection on dev only, output files."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from fedbpt.search import LocalResult, init_state, load_state, server_update
from fedbpt.server import Guard, RunRecorder, SiteReport, aggregate_round

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


DESCRIBED = {"seed": 1234, "intrinsic_dim": D, "n_prompt_tokens": 10, "hidden_size": 384, "model_name": "/m",
             "loss_type": "ce", "k_shot": 40, "num_labels": 2}  # fmt: skip


def site(name: str, state, dev_loss: float = 0.5, fingerprint: str = "aaaa", popsize: int = 5, **described):
    """A report from a site whose step is a small move from the broadcast mean."""
    r = report(name, 0.0, dev_loss, 10, mean=state.mean + 0.05 * (1 + int(name[-1])))
    r.fingerprint, r.description = fingerprint, {**DESCRIBED, **described}
    r.result.popsize = popsize
    return r


@pytest.mark.parametrize(
    "wrong, why",
    [
        ({"seed": 1235, "fingerprint": "bbbb"},
         "its --seed 1235 differs from the server's seed 1234: give every site's --seed and seed in "
         "config_fed_server.conf the same value"),
        ({"n_prompt_tokens": 20, "fingerprint": "cccc"},
         "its projection (fingerprint cccc) differs from the run's (fingerprint aaaa, that of round 0's majority, "
         "3 of 4 sites: site-2, site-3, site-4): n_prompt_tokens 20 vs 10; every site needs the same --seed"),
        ({"popsize": 10},
         "local popsize 10 differs from --local_popsize 5 (that of round 0's majority, 3 of 4 sites: site-2, "
         "site-3, site-4)"),
        ({"loss_type": "hinge"},
         "--loss_type hinge differs from --loss_type ce (that of round 0's majority, 3 of 4 sites: site-2, site-3, "
         "site-4): its dev losses are on another scale"),
    ],
)  # fmt: skip
def test_a_wrong_site_heard_first_is_refused_in_every_round_and_the_three_right_ones_used(wrong, why):
    """site-1 runs with another --seed, --n_prompt_tokens, --local_popsize or --loss_type and answers first,
    every round."""
    state = init_state(D, 1.0, 1234)
    used, refused = [], []
    for _ in range(5):
        reports = [site("site-1", state, **wrong)] + [site(f"site-{i}", state) for i in (2, 3, 4)]
        state, row = aggregate_round(state, reports)
        used.append(row["sites"])
        refused.append(row["dropped"].get("site-1", ""))
    print(f"{wrong}: the three right sites used in {used.count(['site-2', 'site-3', 'site-4'])} of 5 rounds")
    assert used == [["site-2", "site-3", "site-4"]] * 5
    assert all(reason.startswith(why) for reason in refused), refused
    assert (state.fingerprint, state.local_popsize, state.local_iter, state.loss_type) == ("aaaa", 5, 4, "ce")


def test_the_reference_never_comes_from_a_report_that_fails_its_own_checks():
    """site-1 (first by name and first heard) sends a NaN mean with its own projection; site-2 alone is right.
    One site each: a tie would go to site-1, but site-1's report fails its own checks and is no candidate."""
    state = init_state(D, 1.0, 1234)
    bad = site("site-1", state, fingerprint="bbbb", n_prompt_tokens=20)
    bad.result.mean = np.full(D, np.nan)
    new, row = aggregate_round(state, [bad, site("site-2", state)])
    assert row["sites"] == ["site-2"] and (new.fingerprint, new.fingerprint_site) == ("aaaa", "site-2")
    assert new.reference_from == "round 0's majority, 1 of 2 sites: site-2"


def test_a_tie_goes_to_the_first_site_by_name_not_the_first_heard(caplog):
    state = init_state(D, 1.0, 1234)
    new, row = aggregate_round(state, [site("site-2", state, fingerprint="bbbb"), site("site-1", state)])
    assert row["sites"] == ["site-1"] and new.fingerprint == "aaaa"
    assert "no majority among the sites' settings" in caplog.text
    # the checkpoint keeps the reference: a later round holds every site to it, whoever answers
    _, later = aggregate_round(new, [site("site-2", new, fingerprint="bbbb"), site("site-3", new)])
    assert later["sites"] == ["site-3"] and "fingerprint bbbb) differs" in later["dropped"]["site-2"]


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
    assert summary["best_test_acc"] == pytest.approx(0.75) and summary["rounds"] == 4
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["best_round"] for x in lines] == [0, 1, 2, 2]
    with np.load(tmp_path / "best_prompt.npz") as best:
        np.testing.assert_allclose(best["z"], broadcast[2], atol=1e-7)  # the prompt that was evaluated
        assert int(best["round"]) == 2 and best["soft_prompt"].shape == (2, 4)
    resumed = load_state(str(tmp_path / "fedbpt_state.npz"))
    assert resumed.round == 4 and resumed.best_round == 2
    np.testing.assert_array_equal(resumed.mean, state.mean)


@pytest.mark.parametrize("restore_after", [4, 0])
def test_the_final_prompt_is_a_measured_one_where_the_guard_would_send_the_search(tmp_path, restore_after):
    """Dev losses 0.7, 0.5, 0.4, 0.6, 0.45: round 2 has the lowest since round 1 became the best, and rounds 3
    and 4 are worse, so the run ends with round 2's prompt, not with the search's unmeasured next mean. With
    the guard off (restore_after = 0) it ends with that next mean, as before the guard."""
    guard = Guard(restore_after=restore_after)
    recorder = RunRecorder(str(tmp_path), guard)
    info = {"model_name": "m", "task_name": "sst2", "seed": 3, "n_prompt_tokens": 2, "hidden_size": 4,
            "projection_scale": 0.5, "cat_or_add": "add"}  # fmt: skip
    state, broadcast = init_state(D, 1.0, 3), []
    for round_, (dev, test) in enumerate(zip([0.7, 0.5, 0.4, 0.6, 0.45], [0.60, 0.90, 0.75, 0.70, 0.72])):
        broadcast.append(state.mean.copy())
        reports = [report("site-1", 0.1 * (round_ + 1), dev, 20, test_acc=test), report("site-2", -0.05, dev, 20)]
        state, row = aggregate_round(state, reports, guard=guard)
        recorder.record(row, state, info)
    summary = json.loads((tmp_path / "summary.json").read_text())
    print(f"restore_after {restore_after}: {summary}")
    assert summary["last_round"] == 4 and summary["best_round"] == 2
    with np.load(tmp_path / "final_prompt.npz") as final:
        z, round_ = final["z"], int(final["round"])
    if restore_after:
        assert summary["final_round"] == round_ == 2 and summary["final_test_acc"] == pytest.approx(0.75)
        assert summary["final_dev_loss"] == pytest.approx(0.4)
        np.testing.assert_allclose(z, broadcast[2], atol=1e-7)
    else:
        assert summary["final_round"] == round_ == 5 and summary["final_test_acc"] is None
        np.testing.assert_allclose(z, state.mean, atol=1e-6)
        assert np.linalg.norm(state.mean - broadcast[2]) > 0.1


def test_after_a_restore_the_run_ends_with_the_prompt_the_search_went_back_to(tmp_path):
    """Round 1 has the lowest dev loss; rounds 2 to 5 are worse, so after round 5 the guard sends the search
    back to round 1's prompt: the final prompt is that one, with round 1's figures."""
    guard = Guard(selection="lowest", restore_after=4)
    recorder = RunRecorder(str(tmp_path), guard)
    state, broadcast = init_state(D, 1.0, 3), []
    for dev in [0.7, 0.3, 0.5, 0.6, 0.55, 0.65]:
        broadcast.append(state.mean.copy())
        reports = [report("site-1", 0.1, dev, 20, test_acc=1.0 - dev / 2), report("site-2", -0.05, dev, 20)]
        state, row = aggregate_round(state, reports, guard=guard)
        recorder.record(row, state)
    assert row["restored"] == {"to_round": 1, "after_rounds": 4, "sigma": pytest.approx(state.sigma)}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_round"] == 1 and summary["final_test_acc"] == pytest.approx(0.85)
    with np.load(tmp_path / "final_prompt.npz") as final:
        np.testing.assert_allclose(final["z"], broadcast[1], atol=1e-7)
        assert int(final["round"]) == 1


def test_a_resumed_job_that_never_beats_the_checkpoint_still_has_its_best_prompt_and_figures(tmp_path):
    """The first job's round 1 is the best (dev loss 0.3); the job resumed from its checkpoint runs rounds 3
    and 4, both worse: its own download has best_prompt.npz and the best figures all the same."""
    info = {"model_name": "m", "task_name": "sst2", "seed": 3, "n_prompt_tokens": 2, "hidden_size": 4,
            "projection_scale": 0.5, "cat_or_add": "add"}  # fmt: skip
    state, broadcast = init_state(D, 1.0, 3), {}

    def rounds(recorder: RunRecorder, dev: list[float]) -> None:
        nonlocal state
        for loss in dev:
            broadcast[state.round] = state.mean.copy()
            reports = [report("site-1", 0.1, loss, 20, test_acc=0.5 + loss), report("site-2", -0.05, loss, 20)]
            state, row = aggregate_round(state, reports)
            recorder.record(row, state, info)
            recorder.save_state(state)

    rounds(RunRecorder(str(tmp_path / "first")), [0.5, 0.3, 0.4])
    state = load_state(str(tmp_path / "first" / "fedbpt_state.npz"))  # what resume_from loads
    rounds(RunRecorder(str(tmp_path / "second")), [0.6, 0.7])
    summary = json.loads((tmp_path / "second" / "summary.json").read_text())
    print(f"resumed job's summary: {summary}")
    assert summary["best_round"] == 1 and summary["rounds"] == 2 and summary["last_round"] == 4
    # the final prompt is the first job's round 1 too (no lower dev loss since): its figures come from the state
    assert summary["final_round"] == 1 and summary["final_test_acc"] == pytest.approx(0.8)
    assert summary["best_dev_loss"] == pytest.approx(0.3) and summary["best_dev_acc"] == pytest.approx(0.7)
    assert summary["best_test_acc"] == pytest.approx(0.8) and summary["best_dev_sites"] == ["site-1", "site-2"]
    with np.load(tmp_path / "second" / "best_prompt.npz") as best:
        assert int(best["round"]) == 1 and best["soft_prompt"].shape == (2, 4)
        np.testing.assert_allclose(best["z"], broadcast[1], atol=1e-7)


def test_a_site_whose_search_result_is_refused_still_counts_its_dev_and_test_figures():
    """site-1 (the evaluator) sends a NaN mean: its search result is left out, its measurement of the
    broadcast prompt is not."""
    state = init_state(D, 1.0, 7)
    refused = report("site-1", 0.1, 0.2, 30, test_acc=0.8, mean=np.full(D, np.nan))
    _, row = aggregate_round(state, [refused, report("site-2", 0.2, 0.6, 10)])
    assert row["sites"] == ["site-2"] and row["dropped"]["site-1"] == "mean or fitness is not finite"
    assert row["dev_sites"] == ["site-1", "site-2"]
    assert row["dev_loss"] == pytest.approx((0.2 * 30 + 0.6 * 10) / 40) and row["test_acc"] == pytest.approx(0.8)


def test_a_round_without_the_site_of_a_hard_shard_is_compared_on_the_sites_it_has(tmp_path):
    """Label-skewed shards: site-3's dev loss is high. Round 1 lacks site-3 and is worse on site-1 and site-2,
    although its dev loss over the sites it has is lower than round 0's over all three: round 0 stays best.
    Round 2 has all three again and is better on each: it becomes the best."""
    recorder = RunRecorder(str(tmp_path))
    state = init_state(D, 1.0, 7)
    rounds = [{"site-1": 0.5, "site-2": 0.5, "site-3": 0.9}, {"site-1": 0.55, "site-2": 0.55},
              {"site-1": 0.45, "site-2": 0.45, "site-3": 0.85}]  # fmt: skip
    rows = []
    for dev in rounds:
        state, row = aggregate_round(state, [report(s, 0.1, loss, 10) for s, loss in dev.items()],
                                     expected=["site-1", "site-2", "site-3"])  # fmt: skip
        recorder.record(row, state)
        rows.append(row)
    assert rows[1]["dev_loss"] < rows[0]["dev_loss"]  # what a selection on the rows alone would have picked
    assert [r["best_round"] for r in rows] == [0, 0, 2]
    assert rows[1]["dev_sites"] == ["site-1", "site-2"] and rows[1]["missing"] == ["site-3"]
    assert rows[1]["compared_on"] == ["site-1", "site-2"] and rows[2]["compared_on"] == ["site-1", "site-2", "site-3"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds_with_fewer_dev_sites"] == {"1": ["site-3"]}
    assert "dev_sites and compared_on" in summary["selection"]


def test_loss_type_perf_dev_losses_are_minus_accuracy_and_accepted_in_their_range():
    state = init_state(D, 1.0, 1234)
    good = [site(f"site-{i}", state, loss_type="perf") for i in (1, 2)]
    for r, acc in zip(good, (0.75, 0.625)):
        r.metrics.update(dev_loss=-acc, dev_acc=acc)
    liar = site("site-3", state, loss_type="perf")
    liar.metrics.update(dev_loss=0.3, dev_acc=0.7)
    new, row = aggregate_round(state, [*good, liar])
    assert row["sites"] == ["site-1", "site-2"] and new.loss_type == "perf"
    assert row["dropped"]["site-3"] == "dev_loss 0.3 is not a number in [-1, 0] (--loss_type perf reports -accuracy)"
    assert row["dev_loss"] == pytest.approx(-(0.75 + 0.625) / 2) and new.best_round == 0


def with_examples(r: SiteReport, losses) -> SiteReport:
    """The report with its per-example dev losses (their mean is its dev loss, as a site sends them)."""
    losses = np.asarray(losses, dtype=np.float64)
    r.metrics.update(dev_loss=float(losses.mean()), n_dev=float(losses.size))
    r.result = replace(r.result, dev_losses=losses)
    return r


def test_a_round_replaces_the_best_only_when_the_paired_bootstrap_says_its_dev_loss_is_lower():
    """Round 0 (z = 0) is the first best round. Round 1 is lower on average by noise: 0.02 lower over 40
    examples whose differences spread by 0.3; round 2 is lower by 0.05 on every example. ``bootstrap`` keeps
    round 0 against round 1 and takes round 2; ``lowest`` takes both."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.9, size=(2, 20))
    noise = rng.normal(0.0, 0.3, size=(2, 20))
    noise -= noise.mean() + 0.02  # the mean difference is exactly -0.02
    rounds = [base, base + noise, base - 0.05]
    for selection, expected in (("bootstrap", [0, 0, 2]), ("lowest", [0, 1, 2])):
        state, rows = init_state(D, 1.0, 7), []
        for losses in rounds:
            reports = [with_examples(report(f"site-{i + 1}", 0.1, 0.0, 20), losses[i]) for i in range(2)]
            state, row = aggregate_round(state, reports, guard=Guard(selection=selection))
            rows.append(row)
        assert [r["best_round"] for r in rows] == expected, selection
        assert rows[1]["dev_loss"] < rows[0]["dev_loss"]
    state, rows = init_state(D, 1.0, 7), []
    for losses in rounds:
        reports = [with_examples(report(f"site-{i + 1}", 0.1, 0.0, 20), losses[i]) for i in range(2)]
        state, row = aggregate_round(state, reports)
        rows.append(row)
    p_noise, p_real = rows[1]["p_better"], rows[2]["p_better"]
    print(f"P(lower): noise {p_noise:.3f}, real {p_real:.3f}")
    assert 0.5 < p_noise < 0.9 and p_real == 1.0 and rows[0]["p_better"] is None
    assert json.loads(state.best_examples)["site-1"] == pytest.approx(list(rounds[2][0]))


def test_per_example_losses_that_disagree_with_the_dev_loss_are_not_used():
    state = init_state(D, 1.0, 7)
    state, _ = aggregate_round(state, [with_examples(report("site-1", 0.1, 0.0, 4), [0.5, 0.5, 0.5, 0.5])])
    liar = with_examples(report("site-1", 0.1, 0.0, 4), [0.1, 0.1, 0.1, 0.1])
    liar.metrics["dev_loss"] = 0.45  # lower than round 0, but not what its examples say
    _, row = aggregate_round(state, [liar])
    assert row["p_better"] is None and row["best_round"] == 1  # compared on the dev losses, as before


def test_the_guard_returns_the_search_to_the_lowest_dev_loss_after_restore_after_rounds_without_a_lower_one(tmp_path):
    """Dev losses 0.5, 0.4 (the lowest), then four rounds of 0.45 or worse: after the fourth, the next state's
    mean is round 1's broadcast mean, its sigma half the broadcast one, its paths empty. The count restarts
    from the restored prompt's own measurement (round 6, 0.6 here): four more rounds without a lower one send
    the search back to round 6's prompt. With restore_after = 0 the search walks on."""
    losses = [0.5, 0.4, 0.45, 0.47, 0.46, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6]
    for restore_after, restored in ((4, {5: 1, 10: 6}), (0, {})):
        guard = Guard(selection="lowest", restore_after=restore_after)
        recorder = RunRecorder(str(tmp_path / str(restore_after)), guard)
        state, means, rows = init_state(D, 1.0, 7), [], []
        for round_, dev in enumerate(losses):
            means.append(state.mean.copy())
            before = state
            state, row = aggregate_round(state, [report(s, 0.1 * (round_ + 1), dev, 10) for s in ("site-1", "site-2")],
                                         guard=guard)  # fmt: skip
            recorder.record(row, state)
            rows.append(row)
            if row["restored"]:
                np.testing.assert_array_equal(state.mean, means[row["restored"]["to_round"]])
                assert state.sigma == before.sigma * 0.5 and row["next_sigma"] == state.sigma
                assert not state.p_sigma.any() and not state.p_c.any() and state.path_round == state.round
                assert row["restored"]["after_rounds"] == 4
        assert {r["round"]: r["restored"]["to_round"] for r in rows if r["restored"]} == restored
        assert state.restores == len(restored) and all(r["best_round"] == 1 for r in rows[1:])
        summary = json.loads((tmp_path / str(restore_after) / "summary.json").read_text())
        assert summary["restores"] == len(restored)
        assert ("returns to the prompt with the lowest one" in summary["selection"]) == bool(restore_after)


def test_the_guard_goes_back_to_the_lowest_dev_loss_also_before_selection_takes_it_as_the_best():
    """On 4 dev examples a prompt 0.1 lower is not better with confidence 0.9 (the best round stays round 0),
    but it is where the search was best: the restore goes there, not to z = 0."""
    state = init_state(D, 1.0, 7)
    noisy = [[0.9, 0.1, 0.9, 0.1], [0.3, 0.7, 0.3, 0.3], [0.9, 0.3, 0.9, 0.1], [0.9, 0.3, 0.9, 0.1],
             [0.9, 0.3, 0.9, 0.1], [0.9, 0.3, 0.9, 0.1]]  # fmt: skip
    means = []
    for round_, losses in enumerate(noisy):
        means.append(state.mean.copy())
        state, row = aggregate_round(state, [with_examples(report("site-1", 0.1 * (round_ + 1), 0.0, 4), losses)])
    assert row["best_round"] == 0 and row["restored"]["to_round"] == 1
    np.testing.assert_array_equal(state.mean, means[1])


def test_after_a_restore_the_step_size_path_starts_afresh():
    """The first update after a restore (empty paths, ``path_round`` = its round) reads its path as a fresh
    search's first round does: the same sites' steps give the same sigma as from init_state. Read against
    the path's expectation at round 10 instead (no ``path_round``), the same steps shrink sigma."""
    rng = np.random.default_rng(3)
    fresh = init_state(64, 1.0, 7)
    results = [LocalResult(0.5 * rng.standard_normal(64), float(rng.random()), np.full(4, 1.0), popsize=5)
               for _ in range(6)]  # fmt: skip
    restored = replace(fresh, round=10, path_round=10)
    unmarked = replace(fresh, round=10)
    first = server_update(fresh, results).sigma
    assert server_update(restored, results).sigma == pytest.approx(first, rel=1e-12)
    assert server_update(unmarked, results).sigma < 0.99 * first
    stale = replace(fresh, round=4, best_round=0, best_dev_loss=0.4, lowest_dev_loss=0.4, lowest_round=0,
                    lowest_mean=np.zeros(64), stale=3)  # fmt: skip
    reports = [SiteReport(f"site-{i}", r, {"dev_loss": 0.5, "n_dev": 4.0}) for i, r in enumerate(results)]
    new, row = aggregate_round(stale, reports, guard=Guard(selection="lowest"))
    assert row["restored"]["to_round"] == 0 and row["next_sigma"] == 0.5  # the fourth round without a lower one
    assert (new.path_round, new.round) == (5, 5) and not new.p_sigma.any()


@pytest.mark.parametrize(("key", "value"), [("selection", "best"), ("confidence", 1.0), ("restore_after", -1),
                                            ("restore_shrink", 0.0)])  # fmt: skip
def test_guard_settings_that_cannot_work_are_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"aggregator {key} must"):
        Guard(**{key: value})
