"""Tests of fedbpt.search: CMA-ES state, messages, local search, the server's global update, projection.

Every expectation is computed here, by hand or with a short independent formula, never by calling the
function under test.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from fedbpt.search import (
    CLIP_LENGTH,
    COVARIANCES,
    MAX_STEP,
    STEP_RULES,
    GlobalPrompt,
    LocalResult,
    ServerState,
    check_result,
    clip_length,
    corrected_sigma,
    decode_down,
    decode_up,
    derive_seed,
    encode_down,
    encode_up,
    init_state,
    load_state,
    local_search,
    no_signal_step_variance,
    projection,
    projection_fingerprint,
    projection_scale,
    rank_weights,
    recombination_weights,
    save_state,
    server_update,
    update_with_clipping,
)


def hand_weights(k: int) -> np.ndarray:
    """CMA's recombination weights, (ln(k + 1/2) - ln i) / sum, i = 1..k, best first."""
    raw = [math.log(k + 0.5) - math.log(i) for i in range(1, k + 1)]
    return np.array(raw) / sum(raw)


def hand_kappa(popsize: int) -> float:
    """1 / mu_eff of a local generation: cma's positive weights ln((popsize + 1) / 2) - ln i, i <= popsize // 2."""
    raw = np.array([math.log((popsize + 1) / 2) - math.log(i) for i in range(1, popsize // 2 + 1)])
    w = raw / raw.sum()
    return float(np.sum(w**2))


def result(mean, fitness: float, sigmas=(1.0, 1.0), popsize: int = 5) -> LocalResult:
    return LocalResult(
        np.asarray(mean, dtype=np.float64), float(fitness), np.asarray(sigmas, dtype=np.float64), popsize
    )


def sphere_to(target: np.ndarray):
    """Batched objective (popsize, d) -> (popsize,): squared distance to ``target``."""
    return lambda z: np.sum((np.asarray(z) - target) ** 2, axis=1)


# ----------------------------------------------------------------------------------------------
# init_state, checkpoint


def test_init_state_starts_at_zero_with_identity_covariance():
    diag, full = init_state(6, 0.7, 11), init_state(6, 0.7, 11, covariance="full")
    assert diag.dim == 6 and diag.sigma == 0.7 and diag.seed == 11 and diag.round == 0
    np.testing.assert_array_equal(diag.mean, np.zeros(6))
    np.testing.assert_array_equal(diag.cov, np.ones(6))
    np.testing.assert_array_equal(full.cov, np.eye(6))
    assert diag.best_round == -1 and diag.best_dev_loss == math.inf


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dim=0, sigma=1.0),
        dict(dim=4, sigma=0.0),
        dict(dim=4, sigma=-1.0),
        dict(dim=4, sigma=1.0, covariance="lowrank"),
    ],
)
def test_init_state_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        init_state(seed=1, **kwargs)


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_save_load_round_trip(tmp_path, covariance):
    state = init_state(5, 0.3, 42, covariance)
    rng = np.random.default_rng(0)
    results = [result(rng.standard_normal(5), f) for f in (0.3, 0.1, 0.2)]
    state = replace(server_update(state, results), best_round=0, best_dev_loss=0.25, best_mean=np.arange(5.0))
    path = str(tmp_path / "fedbpt_state.npz")
    save_state(path, state)
    loaded = load_state(path)
    for name in ("mean", "cov", "p_sigma", "p_c", "best_mean"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(state, name))
    assert loaded.sigma == state.sigma and isinstance(loaded.sigma, float)
    assert loaded.best_dev_loss == 0.25 and isinstance(loaded.best_dev_loss, float)
    assert (loaded.seed, loaded.round, loaded.best_round) == (42, 1, 0)
    assert all(isinstance(v, int) for v in (loaded.seed, loaded.round, loaded.best_round))


def test_load_keeps_infinite_best_dev_loss(tmp_path):
    path = str(tmp_path / "s.npz")
    save_state(path, init_state(3, 1.0, 1))
    loaded = load_state(path)
    assert loaded.best_dev_loss == math.inf and loaded.best_round == -1 and loaded.best_mean.shape == (3,)


# ----------------------------------------------------------------------------------------------
# Messages


def test_down_round_trip_float32():
    rng = np.random.default_rng(1)
    state = replace(init_state(7, 0.37, 9), mean=rng.standard_normal(7), cov=rng.random(7) + 0.5)
    params, meta = encode_down(state)
    assert params["mean"].dtype == np.float32 and params["cov"].dtype == np.float32
    assert meta == {"sigma": 0.37, "seed": 9, "round": 0}
    got = decode_down(params, meta)
    np.testing.assert_allclose(got.mean, state.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.cov, state.cov, rtol=1e-6)
    assert got.sigma == 0.37 and got.mean.dtype == np.float64
    assert got.round == 0 and got.dim == 7
    assert decode_down(*encode_down(replace(state, round=12))).round == 12  # the server's round, for resumed jobs


def test_up_round_trip_float32():
    rng = np.random.default_rng(2)
    original = LocalResult(rng.standard_normal(9), 0.6931, np.array([0.5, 0.45, 0.4]), 5, 16)
    params, meta = encode_up(original)
    assert set(params) == {"mean"} and params["mean"].dtype == np.float32
    got = decode_up(params, meta)
    np.testing.assert_allclose(got.mean, original.mean, rtol=1e-6, atol=1e-7)
    assert got.fitness == 0.6931 and got.popsize == 5
    np.testing.assert_array_equal(got.sigmas, [0.5, 0.45, 0.4])


@pytest.mark.parametrize("drop", ["mean", "sigma", "cov", "round"])
def test_decode_down_missing_key_raises(drop):
    params = {"mean": np.zeros(3, np.float32), "cov": np.ones(3, np.float32)}
    meta = {"sigma": 1.0, "seed": 1, "round": 0}
    params.pop(drop, None)
    meta.pop(drop, None)
    with pytest.raises(ValueError, match=drop):
        decode_down(params, meta)


@pytest.mark.parametrize("drop", ["mean", "fitness", "sigmas"])
def test_decode_up_missing_key_raises(drop):
    params = {"mean": np.zeros(3, np.float32)}
    meta = {"fitness": 0.5, "sigmas": [1.0, 0.9], "local_popsize": 5}
    params.pop(drop, None)
    meta.pop(drop, None)
    with pytest.raises(ValueError, match=drop):
        decode_up(params, meta)


@pytest.fixture(scope="module")
def nvflare_wire():
    pytest.importorskip("nvflare")
    from nvflare.apis.dxo import DXO, DataKind, from_shareable
    from nvflare.app_common.abstract.fl_model import FLModel
    from nvflare.app_common.decomposers import common_decomposers
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils
    from nvflare.fuel.utils import fobs

    common_decomposers.register()
    return DXO, DataKind, from_shareable, FLModel, FLModelUtils, fobs


def test_up_message_at_d500_fits_4kb_on_the_wire(nvflare_wire):
    _, _, _, FLModel, FLModelUtils, fobs = nvflare_wire
    rng = np.random.default_rng(3)
    local = LocalResult(rng.standard_normal(500), 0.6931471805599453, rng.random(8) + 0.5, 5, 41)
    params, meta = encode_up(local)
    meta["fingerprint"] = "0123456789abcdef"  # every result carries its projection's fingerprint
    metrics = {"n_dev": 20.0, "n_train": 20.0, "dev_loss": 0.6931471805599453, "dev_acc": 0.55,
               "test_loss": 0.7012345678901234, "test_acc": 0.5123456789012345, "local_fitness": 0.6543210987654321,
               "local_sigma": 0.9876543210987654, "seconds": 12.345678901234567}  # fmt: skip
    bare = len(fobs.dump_to_bytes(FLModelUtils.to_shareable(FLModel(params=params, metrics=metrics, meta=meta))))
    # and the site's description, with every result (RoBERTa-large's, as fedbpt.client describes it)
    meta["description"] = {"seed": 1234, "intrinsic_dim": 500, "n_prompt_tokens": 50, "hidden_size": 1024,
                           "projection_scale": 0.0002468, "prompt_at": "embeddings", "cat_or_add": "add",
                           "model_name": "roberta-large", "model_type": "mlm", "task_name": "sst2",
                           "verbalizer_space": 0, "label_scale": 20.0, "gguf_file": None,
                           "fingerprint": "0123456789abcdef", "k_shot": 200, "num_labels": 2, "local_popsize": 5,
                           "local_iter": 8, "sigma": 1.0, "alpha": 1.0, "loss_type": "ce"}  # fmt: skip
    wire = fobs.dump_to_bytes(FLModelUtils.to_shareable(FLModel(params=params, metrics=metrics, meta=meta)))
    print(f"up: {len(wire)} bytes on the wire, of which the description {len(wire) - bare}")
    assert len(wire) <= 4096, f"{len(wire)} bytes up"
    # and what arrives decodes to the same result
    received = FLModelUtils.from_shareable(fobs.load_from_bytes(wire))
    got = decode_up(received.params, received.meta)
    np.testing.assert_allclose(got.mean, local.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got.sigmas, local.sigmas)
    assert got.fitness == local.fitness and got.popsize == 5


def test_down_message_at_d500_fits_8kb_on_the_wire(nvflare_wire):
    DXO, DataKind, from_shareable, _, _, fobs = nvflare_wire
    state = replace(init_state(500, 1.0, 1), mean=np.random.default_rng(4).standard_normal(500))
    params, meta = encode_down(state)
    wire = fobs.dump_to_bytes(DXO(DataKind.WEIGHTS, data=params, meta=meta).to_shareable())
    assert len(wire) <= 8192, f"{len(wire)} bytes down"
    dxo = from_shareable(fobs.load_from_bytes(wire))
    got = decode_down(dxo.data, dxo.meta)
    np.testing.assert_allclose(got.mean, state.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got.cov, np.ones(500))
    assert got.sigma == 1.0


# ----------------------------------------------------------------------------------------------
# check_result


@pytest.fixture
def state4():
    return init_state(4, 1.0, 1)


def test_check_result_accepts_a_good_result(state4):
    assert check_result(result([0.1, -0.2, 0.3, 0.0], 0.5, [0.9, 0.8]), state4) is None


def test_check_result_wrong_shape_names_intrinsic_dim(state4):
    reason = check_result(result(np.zeros(5), 0.5), state4)
    assert reason is not None and "intrinsic_dim" in reason


@pytest.mark.parametrize(
    "bad",
    [
        result([0.0, math.nan, 0.0, 0.0], 0.5),
        result([0.0, 0.0, math.inf, 0.0], 0.5),
        result(np.zeros(4), math.nan),
        result(np.zeros(4), math.inf),
    ],
)
def test_check_result_rejects_non_finite(state4, bad):
    assert check_result(bad, state4) is not None


@pytest.mark.parametrize("sigmas", [[1.0, 0.0], [1.0, -0.5], [], [1.0, math.nan]])
def test_check_result_rejects_bad_sigmas(state4, sigmas):
    assert check_result(result(np.zeros(4), 0.5, sigmas), state4) is not None


@pytest.mark.parametrize("sigmas, ok", [([0.11, 9.9], True), ([0.09, 1.0], False), ([1.0, 10.1], False)])
def test_check_result_sigmas_within_a_factor_10_of_the_broadcast(state4, sigmas, ok):
    reason = check_result(result(np.zeros(4), 0.5, sigmas), state4)
    assert (reason is None) == ok
    if not ok:
        assert "factor 10 of the broadcast sigma 1" in reason


def test_check_result_rejects_small_popsize(state4):
    assert check_result(result(np.zeros(4), 0.5, popsize=1), state4) is not None


def test_check_result_holds_sites_to_the_first_sites_popsize_and_generations(state4):
    first = replace(state4, local_popsize=5, local_iter=2)
    assert check_result(result(np.zeros(4), 0.5, [1.0, 1.0]), first) is None
    assert "--local_iter 2" in check_result(result(np.zeros(4), 0.5, [1.0, 1.0, 1.0]), first)
    assert "--local_popsize" in check_result(result(np.zeros(4), 0.5, [1.0, 1.0], popsize=10), first)


def test_check_result_step_threshold(state4):
    # an honest step without signal: sigma * sqrt(kappa * T * d) = 1 * sqrt(0.606 * 2 * 4) = 2.2; bound 10x that
    bound = MAX_STEP * math.sqrt(hand_kappa(5) * 2 * 4)
    assert bound == pytest.approx(22.02, abs=0.01)
    assert check_result(result([bound - 0.01, 0.0, 0.0, 0.0], 0.5), state4) is None
    reason = check_result(result([bound + 0.01, 0.0, 0.0, 0.0], 0.5), state4)
    assert reason is not None and "step norm" in reason
    # measured from the current mean, not from the origin
    moved = replace(state4, mean=np.array([3000.0, 0.0, 0.0, 0.0]))
    assert check_result(result([3001.0, 0.0, 0.0, 0.0], 0.5), moved) is None
    # twice the broadcast sigma allows twice the step; a smaller max_step tightens it
    assert check_result(result([2 * bound - 0.1, 0.0, 0.0, 0.0], 0.5, [2.0, 2.0]), replace(state4, sigma=2.0)) is None
    assert check_result(result([bound / 2 + 0.1, 0.0, 0.0, 0.0], 0.5), state4, max_step=MAX_STEP / 2) is not None


# ----------------------------------------------------------------------------------------------
# derive_seed


def test_derive_seed_differs_per_site_and_round_and_is_in_range():
    seeds = [derive_seed(42, f"site-{site}", rnd) for site in range(10) for rnd in range(10)]
    assert len(set(seeds)) == 100
    assert all(isinstance(s, int) and 1 <= s <= 2**31 - 1 for s in seeds)
    assert derive_seed(42, "site-3", 4) == derive_seed(42, "site-3", 4)
    assert derive_seed(42, "site-3", 4) != derive_seed(43, "site-3", 4)
    # any site name works (site-local deployments), and names that look alike get different streams
    assert derive_seed(42, "hospital-a", 0) != derive_seed(42, "hospital-b", 0)


def test_derive_seed_shared_is_one_seed_per_job():
    shared = {derive_seed(42, f"site-{site}", rnd, shared=True) for site in range(5) for rnd in range(5)}
    assert len(shared) == 1
    (seed,) = shared
    assert 1 <= seed <= 2**31 - 1
    assert derive_seed(7, "site-1", 0, shared=True) != seed


# ----------------------------------------------------------------------------------------------
# local_search


def test_local_search_improves_a_quadratic_and_counts():
    d, popsize, iterations = 20, 6, 30
    target = np.linspace(-1.0, 1.0, d)
    objective = sphere_to(target)
    rows = []

    def counting(z):
        rows.append(np.asarray(z).shape[0])
        return objective(z)

    start = GlobalPrompt(mean=np.zeros(d), sigma=0.5, cov=np.ones(d))
    start_fitness = float(np.sum(target**2))  # sum of squares of 0 - target
    res = local_search(counting, start, popsize, iterations, seed=123)
    assert res.fitness < 0.25 * start_fitness
    assert res.fitness == pytest.approx(float(np.sum((res.mean - target) ** 2)))  # the fitness of the returned mean
    assert res.evaluations == popsize * iterations + 1 == sum(rows)
    assert rows == [popsize] * iterations + [1]
    assert len(res.sigmas) == iterations and np.all(res.sigmas > 0)
    assert res.popsize == popsize and res.mean.shape == (d,)


def test_local_search_is_deterministic_for_a_seed():
    d = 20
    objective = sphere_to(np.ones(d))
    start = GlobalPrompt(mean=np.zeros(d), sigma=0.5, cov=np.ones(d))
    a = local_search(objective, start, 6, 10, seed=5)
    b = local_search(objective, start, 6, 10, seed=5)
    c = local_search(objective, start, 6, 10, seed=6)
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.sigmas, b.sigmas)
    assert a.fitness == b.fitness
    assert not np.array_equal(a.mean, c.mean)


def test_local_search_with_full_covariance_start():
    d = 20
    target = np.full(d, 1.0)
    rng = np.random.default_rng(8)
    a = rng.standard_normal((d, d))
    cov = a @ a.T / d + 0.5 * np.eye(d)  # symmetric positive definite
    start = GlobalPrompt(mean=np.zeros(d), sigma=0.5, cov=cov)
    res = local_search(sphere_to(target), start, 6, 30, seed=9)
    assert res.fitness < 0.25 * d  # start: sum of squares of 0 - 1 = d
    assert res.evaluations == 6 * 30 + 1 and len(res.sigmas) == 30


def test_local_search_samples_from_the_start_distribution_diag():
    """First generation: z = mean + sigma * sqrt(cov) * u. A coordinate with variance 1e-8 barely moves."""
    mean = np.array([10.0, -5.0, 3.0, 0.0, 1.0, 2.0])
    cov = np.array([1e-8, 1.0, 1.0, 1.0, 1.0, 1.0])
    seen = []

    def record(z):
        seen.append(np.array(z))
        return np.sum(np.asarray(z) ** 2, axis=1)

    local_search(record, GlobalPrompt(mean=mean, sigma=0.3, cov=cov), 8, 1, seed=3)
    first = seen[0] - mean
    assert np.all(np.abs(first[:, 0]) < 0.3 * 1e-4 * 6)  # sigma * sqrt(1e-8) * 6 standard deviations
    assert np.std(first[:, 1:]) > 0.1  # about sigma = 0.3
    assert np.all(np.abs(first[:, 1:]) < 0.3 * 6)


def test_local_search_samples_from_the_start_distribution_full():
    """With cov = 1e-6 I + v v^T the first generation lies (almost) on the line mean + t v."""
    d = 10
    v = np.ones(d) / math.sqrt(d)
    cov = 1e-6 * np.eye(d) + np.outer(v, v)
    mean = np.arange(d, dtype=float)
    seen = []

    def record(z):
        seen.append(np.array(z))
        return np.sum(np.asarray(z) ** 2, axis=1)

    local_search(record, GlobalPrompt(mean=mean, sigma=0.5, cov=cov), 8, 1, seed=4)
    steps = seen[0] - mean
    along = steps @ v
    across = steps - np.outer(along, v)
    assert np.sum(across**2) < 1e-3 * np.sum(along**2)


# ----------------------------------------------------------------------------------------------
# rank_weights, corrected_sigma


def test_rank_weights_ten_sites():
    w = rank_weights(10)
    assert w.shape == (10,)
    assert w.sum() == pytest.approx(1.0)
    assert np.all(np.diff(w) < 0)
    assert w[0] == pytest.approx(0.28, abs=0.005)  # the public example's numbers
    assert w[-1] == pytest.approx(0.006, abs=0.0005)
    np.testing.assert_allclose(w, hand_weights(10), rtol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_rank_weights_other_sizes(k):
    np.testing.assert_allclose(rank_weights(k), hand_weights(k), rtol=1e-12)
    assert np.all(rank_weights(k) > 0)


# K = 4 sites, popsize 5, two local generations each: sum of sigma^2 per site in the comments.
SITES4 = [
    result(np.zeros(3), 0.3, [1.0, 1.0]),  # 2
    result(np.zeros(3), 0.1, [2.0, 1.0]),  # 5, best
    result(np.zeros(3), 0.4, [3.0, 3.0]),  # 18, worst
    result(np.zeros(3), 0.2, [1.0, 2.0]),  # 5, second
]


@pytest.mark.parametrize("popsize", [4, 5, 6, 10, 20])
def test_no_signal_step_variance_is_one_over_mu_eff(popsize):
    assert no_signal_step_variance(popsize) == pytest.approx(hand_kappa(popsize), rel=1e-12)
    assert no_signal_step_variance(5) == pytest.approx(0.606, abs=1e-3)


def test_local_search_without_signal_moves_the_mean_by_kappa_times_its_sigmas():
    """The calibration's premise, measured: on random fitness, E|m_T - m_0|^2 / d = kappa * sum(sigma_t^2)."""
    d, runs = 64, 150
    rng = np.random.default_rng(0)
    start = GlobalPrompt(np.zeros(d), 0.7, np.ones(d))
    moved = total = 0.0
    for run in range(runs):
        res = local_search(lambda z: rng.random(len(z)), start, 5, 8, seed=run + 1)
        moved += float(np.mean(res.mean**2))
        total += float(np.sum(res.sigmas**2))
        assert res.sigmas[0] == 0.7  # the first generation samples with the broadcast sigma
    assert moved / total == pytest.approx(hand_kappa(5), rel=0.05)


def test_corrected_sigma_eq6_by_hand():
    # better half = sites with fitness 0.1 and 0.2: mean sum of sigma^2 = 5; sqrt(kappa * 5)
    assert corrected_sigma(SITES4, "eq6") == pytest.approx(math.sqrt(hand_kappa(5) * 5), rel=1e-12)
    # the order in which the results arrive does not matter
    assert corrected_sigma(SITES4[::-1], "eq6") == pytest.approx(math.sqrt(hand_kappa(5) * 5), rel=1e-12)


def test_corrected_sigma_eq6_averages_the_better_half_for_odd_k():
    # K = 3: the better half is the best site alone (2); Eq. 6 as printed would divide its sum by 3 sites
    three = SITES4[:3]
    assert corrected_sigma(three, "eq6") == pytest.approx(math.sqrt(hand_kappa(5) * 5), rel=1e-12)
    one = [result(np.zeros(2), 0.5, [0.5, 0.4], popsize=4)]
    assert corrected_sigma(one, "eq6") == pytest.approx(math.sqrt(hand_kappa(4) * 0.41), rel=1e-12)


def test_corrected_sigma_example_by_hand():
    # all sites: 2 + 5 + 18 + 5 = 30; mu_local = 5 // 2 = 2; sqrt(30 / (4 * 2)) = sqrt(3.75)
    assert corrected_sigma(SITES4, "example") == pytest.approx(math.sqrt(3.75), rel=1e-12)


def test_corrected_sigma_unknown_rule():
    with pytest.raises(ValueError, match="rule"):
        corrected_sigma(SITES4, "paper")
    assert set(STEP_RULES) == {"eq6", "example"}


# ----------------------------------------------------------------------------------------------
# server_update


OLD_MEAN = np.array([0.5, -0.5, 1.0, 0.0])
MEANS = [
    np.array([1.0, 0.0, 0.0, 2.0]),
    np.array([0.0, 1.0, 2.0, -1.0]),
    np.array([3.0, -2.0, 1.0, 0.5]),
]


def known_state(covariance: str = "diag") -> ServerState:
    return replace(init_state(4, 0.5, 3, covariance), mean=OLD_MEAN.copy(), round=5, best_round=2, best_dev_loss=0.42,
                   best_mean=np.array([9.0, 8.0, 7.0, 6.0]))  # fmt: skip


def known_results(fitnesses) -> list[LocalResult]:
    """Steps of honest length for their local sigmas, so that no clipping interferes."""
    sigmas = ([2.5, 2.0], [3.0, 1.5], [1.0, 1.0])
    return [result(m, f, s) for m, f, s in zip(MEANS, fitnesses, sigmas)]


@pytest.mark.parametrize("rule", STEP_RULES)
@pytest.mark.parametrize("covariance", COVARIANCES)
def test_server_update_mean_is_rank_weighted_recombination(rule, covariance):
    w = hand_weights(3)  # about 0.637, 0.285, 0.078
    assert w == pytest.approx([0.637, 0.2846, 0.0784], abs=1e-3)
    state = known_state(covariance)
    new = server_update(state, known_results([0.2, 0.7, 0.1]), rule)
    # ranks: site 2 (0.1) first, site 0 (0.2) second, site 1 (0.7) last
    expected = w[0] * MEANS[2] + w[1] * MEANS[0] + w[2] * MEANS[1]
    np.testing.assert_allclose(new.mean, expected, rtol=1e-12, atol=1e-12)
    assert new.round == 6 and new.seed == 3
    assert (new.best_round, new.best_dev_loss) == (2, 0.42)
    np.testing.assert_array_equal(new.best_mean, [9.0, 8.0, 7.0, 6.0])
    np.testing.assert_array_equal(state.mean, OLD_MEAN)  # the old state is untouched


def test_server_update_ignores_arrival_order():
    results = known_results([0.2, 0.7, 0.1])
    a = server_update(known_state(), results)
    b = server_update(known_state(), [results[1], results[2], results[0]])
    np.testing.assert_allclose(b.mean, a.mean, rtol=1e-12)
    np.testing.assert_allclose(b.cov, a.cov, rtol=1e-12)
    np.testing.assert_allclose(b.p_sigma, a.p_sigma, rtol=1e-12)
    assert b.sigma == pytest.approx(a.sigma, rel=1e-12)


def test_server_update_follows_the_fitnesses():
    w = hand_weights(3)
    before = server_update(known_state(), known_results([0.2, 0.7, 0.1]))
    swapped = server_update(known_state(), known_results([0.7, 0.2, 0.1]))  # sites 0 and 1 swap fitness
    expected = w[0] * MEANS[2] + w[1] * MEANS[1] + w[2] * MEANS[0]
    np.testing.assert_allclose(swapped.mean, expected, rtol=1e-12, atol=1e-12)
    assert not np.allclose(swapped.mean, before.mean)


def test_server_update_needs_results():
    with pytest.raises(ValueError):
        server_update(known_state(), [])


def test_tied_fitnesses_share_their_weights_whatever_the_order():
    w = hand_weights(4)
    got = recombination_weights([0.3, 0.1, 0.3, 0.2])
    np.testing.assert_allclose(got, [(w[2] + w[3]) / 2, w[0], (w[2] + w[3]) / 2, w[1]], rtol=1e-12)
    np.testing.assert_allclose(recombination_weights([0.5, 0.5, 0.5]), [1 / 3] * 3, rtol=1e-12)
    # sites named site-1, site-10, site-2 with one fitness: the update does not depend on their order
    results = known_results([0.2, 0.2, 0.2])
    a = server_update(known_state(), results)
    b = server_update(known_state(), results[::-1])
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12)
    np.testing.assert_allclose(a.mean, OLD_MEAN + np.mean([m - OLD_MEAN for m in MEANS], axis=0), rtol=1e-12)


def test_an_absurd_step_is_clipped_to_three_honest_ones():
    """A site 1,000 honest steps away, with the best fitness, moves the mean no further than clip_length."""
    d = 50
    state = init_state(d, 1.0, 0)
    rng = np.random.default_rng(3)
    sigmas = np.ones(8)
    sigma_c = math.sqrt(hand_kappa(5) * 8)  # the corrected sigma of sites that all report these sigmas
    honest = [result(sigma_c * rng.standard_normal(d), 0.5 + i, sigmas) for i in range(3)]
    absurd = result(1000 * sigma_c * np.ones(d), 0.0, sigmas)
    update = update_with_clipping(state, [absurd, *honest])
    assert clip_length(d) == CLIP_LENGTH * math.sqrt(d)
    np.testing.assert_allclose(update.clipped[0], clip_length(d) / (1000 * math.sqrt(d)), rtol=1e-9)
    assert list(update.clipped[1:]) == [1.0, 1.0, 1.0]  # honest steps (length about sqrt(d)) pass untouched
    w = hand_weights(4)
    step = update.state.mean - state.mean
    own = w[1:] @ np.stack([h.mean for h in honest])
    np.testing.assert_allclose(np.linalg.norm(step - own), w[0] * sigma_c * clip_length(d), rtol=1e-9)


def csa_first_round_ratio(n: int, k: int) -> float:
    """exp(-c_s / d_s) from Hansen's tutorial: the CSA factor when the evolution path stays zero."""
    w = hand_weights(k)
    mu_eff = 1 / float(np.sum(w**2))
    c_s = (mu_eff + 2) / (n + mu_eff + 5)
    d_s = 1 + 2 * max(0.0, math.sqrt((mu_eff - 1) / (n + 1)) - 1) + c_s
    return math.exp(-c_s / d_s)


@pytest.mark.parametrize("rule", STEP_RULES)
@pytest.mark.parametrize("covariance", COVARIANCES)
def test_zero_steps_shrink_sigma_whatever_the_local_sigmas(rule, covariance):
    """All sites return the old mean: p_sigma stays 0, so the broadcast sigma is multiplied by exp(-c_s/d_s) < 1.

    The corrected sigma only sets the unit in which the server reads the steps: the broadcast sigma is
    old sigma * (sigma after CSA / corrected sigma), so it does not depend on the local sigmas' scale."""
    state = replace(known_state(covariance), round=0)
    ratio = csa_first_round_ratio(4, 3)
    assert ratio < 1
    for scale in (1e-3, 1.0, 50.0):
        results = [result(OLD_MEAN, f, scale * np.array(s)) for f, s in zip((0.3, 0.1, 0.2), ([1, 2], [3, 1], [2, 2]))]
        new = server_update(state, results, rule)
        assert new.sigma == pytest.approx(0.5 * ratio, rel=1e-12)
        np.testing.assert_allclose(new.mean, OLD_MEAN, rtol=0, atol=1e-15)
        np.testing.assert_array_equal(new.p_sigma, np.zeros(4))


@pytest.mark.parametrize("rule", STEP_RULES)
@pytest.mark.parametrize("covariance", COVARIANCES)
def test_server_update_is_invariant_to_a_common_scale_of_steps_and_sigmas(rule, covariance):
    """Scaling every site's step and local sigmas by a leaves y = step / corrected sigma unchanged: the
    broadcast sigma, covariance and paths are the same; the mean moves a times as far."""
    state = known_state(covariance)
    rng = np.random.default_rng(5)
    steps = rng.standard_normal((4, 4))
    sigmas = rng.random((4, 3)) + 0.2
    fits = [0.4, 0.1, 0.3, 0.2]

    def update(a):
        return server_update(
            state, [result(OLD_MEAN + a * s, f, a * sg) for s, f, sg in zip(steps, fits, sigmas)], rule
        )

    one, many = update(1.0), update(37.0)
    assert many.sigma == pytest.approx(one.sigma, rel=1e-9)
    np.testing.assert_allclose(many.cov, one.cov, rtol=1e-9)
    np.testing.assert_allclose(many.p_sigma, one.p_sigma, rtol=1e-9)
    np.testing.assert_allclose(many.mean - OLD_MEAN, 37.0 * (one.mean - OLD_MEAN), rtol=1e-9)


@pytest.mark.parametrize("rule", STEP_RULES)
@pytest.mark.parametrize("covariance", COVARIANCES)
def test_sigma_stays_bounded_over_rounds_of_random_steps(rule, covariance):
    """20 rounds, 10 sites in d = 50, fitness unrelated to the step (pure noise, no signal to follow).

    Each site's local sigmas equal the broadcast sigma and its step is broadcast sigma * N(0, I). Both
    rules give a corrected sigma of about 1.8-2x the broadcast one (8 local generations, popsize 5), so
    the steps look short to CSA and sigma drifts down slowly (about exp(-0.05) a round here). Broadcasting
    the corrected sigma itself would multiply it by about 1.7 a round: 1.7**20 is about 4e4. The window
    [0.1, 10] x the start separates the two with a wide margin and does not depend on the random draw."""
    d, k, sigma0 = 50, 10, 1.0
    state = init_state(d, sigma0, 0, covariance)
    rng = np.random.default_rng(1)
    for _ in range(20):
        results = [
            result(state.mean + state.sigma * rng.standard_normal(d), rng.random(), np.full(8, state.sigma), 5)
            for _ in range(k)
        ]
        state = server_update(state, results, rule)
        assert 0.1 * sigma0 <= state.sigma <= 10 * sigma0
    assert state.round == 20


@pytest.mark.parametrize("rule", STEP_RULES)
def test_federated_rounds_on_a_quadratic(rule):
    """The whole loop in miniature: 4 sites run local CMA-ES from the broadcast, the server updates.

    Over 20 rounds the global mean approaches the optimum and sigma neither collapses nor explodes."""
    d = 20
    target = np.full(d, 3.0)
    objective = sphere_to(target)
    state = init_state(d, 1.0, 7)
    start_fitness = float(np.sum(target**2))  # 180
    for _ in range(20):
        prompt = decode_down(*encode_down(state))
        results = [
            local_search(objective, prompt, 5, 8, derive_seed(state.seed, site, state.round)) for site in range(4)
        ]
        assert all(check_result(r, state) is None for r in results)
        state = server_update(state, [decode_up(*encode_up(r)) for r in results], rule)
        assert 0.1 <= state.sigma <= 10
    assert float(objective(state.mean[None, :])[0]) < 0.05 * start_fitness


def test_covariance_stays_symmetric_positive():
    d = 6
    rng = np.random.default_rng(11)
    diag, full = init_state(d, 1.0, 0, "diag"), init_state(d, 1.0, 0, "full")
    for _ in range(15):
        # a shared set of site results, with large steps so that the covariance actually moves
        raw = [(rng.standard_normal(d) * 3, rng.random(), rng.random(4) + 0.1) for _ in range(5)]
        diag = server_update(diag, [result(diag.mean + s, f, sg) for s, f, sg in raw])
        full = server_update(full, [result(full.mean + s, f, sg) for s, f, sg in raw])
        assert diag.cov.shape == (d,) and np.all(diag.cov > 0) and np.all(np.isfinite(diag.cov))
        assert full.cov.shape == (d, d)
        np.testing.assert_array_equal(full.cov, full.cov.T)
        assert np.all(np.linalg.eigvalsh(full.cov) > 0)
    assert not np.allclose(diag.cov, 1.0)  # it did learn something
    assert not np.allclose(full.cov, np.eye(d))


def test_diag_and_full_agree_on_the_first_round():
    """From C = I, C^-1/2 is the identity for both: same mean, same path, same sigma after one round."""
    rng = np.random.default_rng(12)
    raw = [(rng.standard_normal(5), f, rng.random(3) + 0.1) for f in (0.5, 0.2, 0.9, 0.1)]
    diag = server_update(init_state(5, 0.8, 0, "diag"), [result(m, f, s) for m, f, s in raw])
    full = server_update(init_state(5, 0.8, 0, "full"), [result(m, f, s) for m, f, s in raw])
    np.testing.assert_allclose(full.mean, diag.mean, rtol=1e-12)
    np.testing.assert_allclose(full.p_sigma, diag.p_sigma, rtol=1e-12)
    np.testing.assert_allclose(full.p_c, diag.p_c, rtol=1e-12)
    assert full.sigma == pytest.approx(diag.sigma, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# projection


def test_projection_depends_on_the_seed_only():
    a, b, c = projection(42, 50, 2000, 0.02), projection(42, 50, 2000, 0.02), projection(43, 50, 2000, 0.02)
    assert a.shape == (50, 2000) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert abs(float(a.std()) - 0.02) < 0.05 * 0.02
    assert abs(float(a.mean())) < 0.02 * 5 / math.sqrt(a.size)  # five standard errors


def test_projection_scale_formula():
    # alpha * std / (sqrt(d) * sigma0) = 2 * 0.5 / (10 * 0.5) = 0.2
    assert projection_scale(0.5, 100, 0.5, alpha=2.0) == pytest.approx(0.2)
    assert projection_scale(0.3, 4, 1.5) == pytest.approx(0.1)


def test_projection_fingerprint_tells_projections_apart():
    description = {"seed": 3, "intrinsic_dim": 8, "n_prompt_tokens": 2, "hidden_size": 4, "projection_scale": 0.5}
    a = projection(3, 8, 8, 0.5)
    same = projection_fingerprint(dict(reversed(description.items())), a.copy())  # key order does not matter
    assert projection_fingerprint(description, a) == same and len(same) == 16
    assert projection_fingerprint({**description, "seed": 4}, a) != same
    assert projection_fingerprint({**description, "projection_scale": 0.51}, a) != same
    b = a.copy()
    b[0, 0] += 1e-3
    assert projection_fingerprint(description, b) != same  # the matrix itself is part of it
    b = a.copy()
    b[5] += 1.0
    assert projection_fingerprint(description, b) == same  # only its first rows are
