"""The FedBPT search: CMA-ES state, the sites' local search, the server's global update, the messages.

numpy and ``cma`` only, so every rule here is testable in milliseconds. The server state is a plain
dict of arrays: the whole of it is the checkpoint, a small subset of it is the message to the sites.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace

import cma
import numpy as np

STEP_RULES = ("eq6", "example")
COVARIANCES = ("diag", "full")
# A site's step is refused when it is longer than MAX_STEP times the step its local search makes when the
# fitness carries no signal (about 2 sigma sqrt(d) for 8 generations of popsize 5).
MAX_STEP = 10.0
# A site's local step sizes must lie within this factor of the broadcast sigma. Measured with cma 4.5 over
# 8 generations of popsize 5 and 10 (sphere near and far from its optimum, a linear slope): 0.65x to 1.5x
# at d = 500, and at worst 0.32x to 5.7x at d = 8.
SIGMA_FACTOR = 10.0
# The longest step the server takes from one site, in units of an honest one (see clip_length).
CLIP_LENGTH = 3.0


@dataclass
class ServerState:
    """Everything the server knows; ``round`` counts the global updates done so far."""

    mean: np.ndarray
    sigma: float
    cov: np.ndarray  # (d,) diagonal or (d, d) full
    p_sigma: np.ndarray
    p_c: np.ndarray
    seed: int
    round: int = 0
    best_round: int = -1  # round whose broadcast prompt had the lowest aggregated dev loss
    best_dev_loss: float = math.inf
    best_mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # The best round's other figures (nan: not measured), kept here so that a resumed job can report them,
    # and its sites' own dev figures as JSON {site: [dev_loss, dev_acc, n_dev]}: later rounds are compared
    # with it on the sites that both measured.
    best_dev_acc: float = math.nan
    best_test_acc: float = math.nan
    best_sites: str = ""
    # The best round's per-example dev losses as JSON {site: [loss, ...]}, for the paired test of a later round.
    best_examples: str = ""
    # The guard (``server.Guard``): the lowest pooled dev loss of a broadcast prompt since the best round
    # changed or the search was last restored, that prompt's round and mean (where a restore goes), the
    # rounds since that loss was last lowered, and how many times the search was sent back. ``path_round``:
    # the round since which the evolution paths have grown (a restore empties them).
    lowest_dev_loss: float = math.inf
    lowest_round: int = -1
    lowest_mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    stale: int = 0
    restores: int = 0
    path_round: int = 0
    # Every site's latest description as JSON {site: description}: a site sends it only when the broadcast's
    # digest of it differs from its own (``encode_down``, ``GlobalPrompt.knows``), and the checkpoint keeps
    # it for a resumed job.
    descriptions: str = ""
    # What every site must share beyond the server's own seed and intrinsic_dim ("" and 0: not yet), taken
    # from the majority of the first round's sites that pass their own checks: the projection's fingerprint,
    # one site that has it, the local popsize, the number of local generations and the loss type (sites
    # with another loss report dev losses on another scale); ``reference_from`` says how it was chosen.
    fingerprint: str = ""
    fingerprint_site: str = ""
    local_popsize: int = 0
    local_iter: int = 0
    loss_type: str = ""
    reference_from: str = ""

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def known_descriptions(self) -> dict[str, dict]:
        return json.loads(self.descriptions) if self.descriptions else {}

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ServerState:
        """The inverse of ``to_arrays``; a checkpoint written before a field existed gets its default."""
        kw = {}
        for f in fields(cls):
            if f.name not in arrays and (f.default is not MISSING or f.default_factory is not MISSING):
                continue
            value = np.asarray(arrays[f.name])
            kind = {"float": float, "int": int, "str": str}.get(str(f.type))
            kw[f.name] = kind(value) if kind else value
        return cls(**kw)


def init_state(dim: int, sigma: float, seed: int, covariance: str = "diag") -> ServerState:
    """The search starts at z = 0 (the model without a prompt offset) with step size ``sigma``."""
    if dim < 1:
        raise ValueError(f"intrinsic_dim must be >= 1, got {dim}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    cov = np.ones(dim) if covariance == "diag" else np.eye(dim)
    return ServerState(mean=np.zeros(dim), sigma=float(sigma), cov=cov, p_sigma=np.zeros(dim), p_c=np.zeros(dim),
                       seed=int(seed), best_mean=np.zeros(dim))  # fmt: skip


def save_state(path: str, state: ServerState) -> None:
    with open(path, "wb") as f:  # a file object: numpy would append ".npz" to a bare path
        np.savez(f, **state.to_arrays())


def load_state(path: str) -> ServerState:
    with np.load(path) as f:
        return ServerState.from_arrays(dict(f))


# ----------------------------------------------------------------------------------------------
# Messages: plain float32 arrays, never a pickled optimiser.


def encode_down(state: ServerState) -> tuple[dict[str, np.ndarray], dict]:
    """The broadcast: (params, meta) = ({mean, cov} as float32, {sigma, seed, round}).

    ``round`` is the server's own count of updates: NVFlare's round number restarts at 0 when a job
    resumes from a checkpoint, and the sites derive their random streams from this one."""
    params = {"mean": state.mean.astype(np.float32), "cov": state.cov.astype(np.float32)}
    meta = {"sigma": float(state.sigma), "seed": int(state.seed), "round": int(state.round)}
    if state.descriptions:
        meta["described"] = {site: description_digest(d) for site, d in state.known_descriptions().items()}
    return params, meta


def description_digest(description: dict) -> str:
    """8 hex digits over a site's description: the broadcast names what the server holds for each site, so
    that a site sends its description only when the server lacks it or holds an older one."""
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:8]


@dataclass
class GlobalPrompt:
    """What a site receives: the centre and shape of the global search distribution, and the round."""

    mean: np.ndarray
    sigma: float
    cov: np.ndarray
    round: int = 0
    described: dict[str, str] = field(default_factory=dict)  # site -> digest of the description the server holds

    def knows(self, site: str, description: dict) -> bool:
        """Whether the server already holds this description of ``site`` (the site need not send it)."""
        return self.described.get(site) == description_digest(description)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]


def decode_down(params: dict[str, np.ndarray], meta: dict) -> GlobalPrompt:
    missing = [k for k in ("mean", "cov") if k not in params] + [k for k in ("sigma", "round") if k not in meta]
    if missing:
        raise ValueError(f"server message lacks {missing}; is the server running the FedBPT components?")
    mean = np.asarray(params["mean"], dtype=np.float64)
    described = meta.get("described") if isinstance(meta.get("described"), dict) else {}
    return GlobalPrompt(mean=mean, sigma=float(meta["sigma"]), cov=np.asarray(params["cov"], dtype=np.float64),
                        round=int(meta["round"]), described={str(k): str(v) for k, v in described.items()})  # fmt: skip


@dataclass
class LocalResult:
    """A site's answer: its final local mean, that mean's fitness and the step size of each generation; and
    the per-example dev losses of the prompt it received (empty where not measured), for the server's test
    of whether a round's prompt is better than the best one."""

    mean: np.ndarray
    fitness: float
    sigmas: np.ndarray  # the step size each local generation sampled with
    popsize: int
    evaluations: int = 0
    dev_losses: np.ndarray = field(default_factory=lambda: np.zeros(0))


def encode_up(result: LocalResult) -> tuple[dict[str, np.ndarray], dict]:
    """A site's answer: (params, meta) = ({mean} as float32, {fitness, sigmas, local_popsize, dev_losses}).

    Scalars travel as numbers: every numpy array costs about 280 bytes of framing on the wire. The dev
    losses travel as float16 in base64 (2.7 bytes each; a relative error below 5e-4, far finer than the
    differences the server tests)."""
    meta = {"fitness": float(result.fitness), "sigmas": [float(s) for s in result.sigmas],
            "local_popsize": int(result.popsize)}  # fmt: skip
    if result.dev_losses.size:
        meta["dev_losses"] = base64.b64encode(result.dev_losses.astype("<f2").tobytes()).decode("ascii")
    return {"mean": result.mean.astype(np.float32)}, meta


def _dev_losses(meta: dict) -> np.ndarray:
    """The per-example dev losses of a site's answer (empty where it sent none)."""
    if not meta.get("dev_losses"):
        return np.zeros(0)
    try:
        raw = base64.b64decode(str(meta["dev_losses"]), validate=True)
    except ValueError as e:
        raise ValueError(f"dev_losses is not base64: {e}") from None
    if len(raw) % 2:
        raise ValueError("dev_losses is not a whole number of float16 values")
    return np.frombuffer(raw, dtype="<f2").astype(np.float64)


def decode_up(params: dict[str, np.ndarray], meta: dict) -> LocalResult:
    missing = [k for k in ("mean",) if k not in params] + [k for k in ("fitness", "sigmas") if k not in meta]
    if missing:
        raise ValueError(f"site result lacks {missing}")
    return LocalResult(
        mean=np.asarray(params["mean"], dtype=np.float64).reshape(-1),
        fitness=float(meta["fitness"]),
        sigmas=np.asarray(meta["sigmas"], dtype=np.float64).reshape(-1),
        popsize=int(meta.get("local_popsize", 0)),
        dev_losses=_dev_losses(meta),
    )


def check_result(result: LocalResult, state: ServerState, max_step: float = MAX_STEP) -> str | None:
    """Why a site's result cannot be used, or None.

    It must have the state's dimension; finite values; ``local_iter`` positive step sizes, each within
    ``SIGMA_FACTOR`` of the broadcast sigma; the run's popsize and generations; and a step no longer than
    ``max_step`` times the step its local search makes when the fitness carries no signal."""
    if result.mean.shape != state.mean.shape:
        return (
            f"mean has shape {result.mean.shape}, expected {state.mean.shape}: --intrinsic_dim in app_config "
            "must equal intrinsic_dim in config_fed_server.conf"
        )
    if not (np.all(np.isfinite(result.mean)) and math.isfinite(result.fitness)):
        return "mean or fitness is not finite"
    sigmas = result.sigmas
    if sigmas.size == 0 or not np.all(np.isfinite(sigmas)) or np.any(sigmas <= 0):
        return "sigmas must be a non-empty array of positive numbers"
    if state.local_iter and sigmas.size != state.local_iter:
        return f"{sigmas.size} local step sizes, expected --local_iter {state.local_iter} ({_reference(state)})"
    low, high = float(sigmas.min()), float(sigmas.max())
    if low < state.sigma / SIGMA_FACTOR or high > state.sigma * SIGMA_FACTOR:
        return (
            f"local step sizes {low:.3g}..{high:.3g} are not within a factor {SIGMA_FACTOR:g} of the broadcast "
            f"sigma {state.sigma:.3g}"
        )
    if result.popsize < 2:
        return f"local popsize {result.popsize} < 2"
    if state.local_popsize and result.popsize != state.local_popsize:
        return (
            f"local popsize {result.popsize} differs from --local_popsize {state.local_popsize} ({_reference(state)})"
        )
    step = float(np.linalg.norm(result.mean - state.mean))
    honest = state.sigma * math.sqrt(no_signal_step_variance(result.popsize) * sigmas.size)
    if step > max_step * honest * math.sqrt(state.dim):
        return (
            f"step norm {step:.3g} is more than {max_step:g}x the {honest * math.sqrt(state.dim):.3g} that "
            f"{sigmas.size} local generations move at sigma {state.sigma:.3g} without signal"
        )
    return None


def _reference(state: ServerState) -> str:
    return f"that of {state.reference_from}" if state.reference_from else "the run's"


# ----------------------------------------------------------------------------------------------
# Site: a local CMA-ES started from the global distribution.


def derive_seed(seed: int, site: str, round_: int, shared: bool = False) -> int:
    """A positive 31-bit seed per (job seed, site name, server round); ``shared`` gives every site one seed.

    The site's name, not its shard number, picks its stream: site-local deployments name sites freely."""
    site_key = int.from_bytes(hashlib.sha256(str(site).encode()).digest()[:8], "little")
    entropy = [seed] if shared else [seed, site_key, round_]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] % (2**31 - 2)) + 1


def perturbation_seed(seed: int, site: str, round_: int, shared: bool = False) -> int:
    """The seed of a round's perturbed copy of the site's train shard: the site's search seed, or with
    ``shared`` one seed for every site that changes every round, as the public example draws a new copy each
    round while its search stream stays the same."""
    if not shared:
        return derive_seed(seed, site, round_)
    return int(np.random.SeedSequence([seed, round_, 0x9E27]).generate_state(1)[0] % (2**31 - 2)) + 1


def _sqrt_cov(cov: np.ndarray) -> np.ndarray:
    if cov.ndim == 1:
        return np.sqrt(cov)
    vals, vecs = np.linalg.eigh(cov)
    return (vecs * np.sqrt(np.clip(vals, 1e-20, None))) @ vecs.T


def local_search(
    objective: Callable[[np.ndarray], np.ndarray],
    start: GlobalPrompt,
    popsize: int,
    iterations: int,
    seed: int,
) -> LocalResult:
    """Run ``iterations`` generations of CMA-ES from the global distribution; lower fitness is better.

    ``seed`` must be >= 1 (cma reads 0 as "seed from the clock"); ``derive_seed`` gives such seeds.

    ``objective`` scores a whole generation at once: (popsize, d) -> (popsize,). The search runs in
    whitened coordinates u (z = mean + C^1/2 u), so one code path serves diagonal and full C. The
    result's ``sigmas`` are the step sizes the generations sampled with (the paper's sigma_1..sigma_T).
    """
    root = _sqrt_cov(start.cov)

    def to_z(u: np.ndarray) -> np.ndarray:
        return start.mean + (u * root if root.ndim == 1 else u @ root)

    es = cma.CMAEvolutionStrategy(
        np.zeros(start.mean.shape[0]),
        start.sigma,
        {"popsize": popsize, "seed": seed, "maxiter": iterations, "verbose": -9, "verb_log": 0, "tolx": 0,
         "tolfun": 0, "tolflatfitness": iterations + 1, "tolfunhist": 0, "tolstagnation": iterations + 1},
    )  # fmt: skip
    sigmas, evaluations = [], 0
    for _ in range(iterations):
        sigmas.append(es.sigma)
        candidates = np.asarray(es.ask())
        values = np.asarray(objective(to_z(candidates)), dtype=np.float64)
        es.tell(list(candidates), values.tolist())
        evaluations += len(candidates)
    final = to_z(np.asarray(es.mean)[None, :])
    fitness = float(np.asarray(objective(final))[0])
    return LocalResult(final[0], fitness, np.asarray(sigmas), popsize, evaluations + 1)


@functools.lru_cache(maxsize=64)
def no_signal_step_variance(popsize: int) -> float:
    """kappa: the variance, per coordinate and per unit of sigma_t^2, of one local generation's move of
    the mean when the fitness carries no signal.

    A generation moves the mean by sigma_t * sum_i w_i y_i (cma's positive recombination weights w, the
    y_i ~ N(0, C) ranked by the fitness). Ranked at random, that is N(0, sigma_t^2 * sum(w_i^2) * C), and
    sum(w_i^2) = 1 / mu_eff: 0.606 for popsize 5. Without signal the generations' moves are uncorrelated
    (cma's mirrored and two-point samples come in +- pairs), so T generations move the mean by
    N(0, kappa * sum_t sigma_t^2 * C). Measured with this module's local_search over 1,000 runs of 8
    generations on random fitness, for popsize 4 to 20: within 1% of 1 / mu_eff at d = 64 to 500, and 3-6%
    below it at d = 8 to 16, where the step-size adaptation and the steps are correlated."""
    return 1.0 / float(cma.recombination_weights.RecombinationWeights(popsize).mueff)


# ----------------------------------------------------------------------------------------------
# Server: the K local means are one CMA-ES generation.


def rank_weights(k: int) -> np.ndarray:
    """Recombination weights by fitness rank, best first: every site counts, the best most."""
    w = math.log(k + 0.5) - np.log(np.arange(1, k + 1))
    return w / w.sum()


def recombination_weights(fitness: np.ndarray) -> np.ndarray:
    """Each result's weight, in the order given: its rank's weight (lowest fitness first), with tied
    fitnesses sharing the mean of their ranks' weights, so that no arrival or name order decides."""
    fitness = np.asarray(fitness, dtype=np.float64)
    per = np.empty(len(fitness))
    per[np.argsort(fitness, kind="stable")] = rank_weights(len(fitness))
    for value in np.unique(fitness):
        tied = fitness == value
        per[tied] = per[tied].mean()
    return per


def corrected_sigma(results: list[LocalResult], rule: str) -> float:
    """The step size with which the server reads the sites' steps.

    ``eq6``: the paper's Eq. 6, calibrated. Eq. 6 is 2 * sqrt(sum over the better half of sites of their
    local sum(sigma_t^2), divided by K * popsize); for even K that is sqrt(kappa * mean over the better
    half of sum(sigma_t^2)) with kappa = 2 / popsize (0.4 for popsize 5). Each site's step is, without
    signal, N(0, kappa_true * sum(sigma_t^2) * C) with kappa_true = ``no_signal_step_variance`` (0.57
    for 8 generations of popsize 5 at d = 500), so Eq. 6 reads honest steps as 1.2 standard deviations
    long, and the CSA makes sigma creep up round after round. We use kappa_true, the mean over the
    better half (for odd K, Eq. 6 sums floor(K/2) sites but divides by K), and the sigma_t each local
    generation sampled with. Then a step without signal reads as a sample of N(0, C): CSA's neutral
    point, and sigma neither grows nor shrinks when nothing is learnt.

    ``example``: the public example's rule, sqrt(sum over all sites of their local sigma^2, divided by
    K * mu_local) with mu_local = popsize // 2.
    """
    k = len(results)
    if rule == "eq6":
        better = sorted(results, key=lambda r: r.fitness)[: max(1, k // 2)]
        kappa = no_signal_step_variance(results[0].popsize)
        return math.sqrt(kappa * float(np.mean([np.sum(r.sigmas**2) for r in better])))
    if rule == "example":
        total = sum(float(np.sum(r.sigmas**2)) for r in results)
        return math.sqrt(total / (k * max(1, results[0].popsize // 2)))
    raise ValueError(f"unknown step-size rule {rule!r}; choose one of {STEP_RULES}")


def clip_length(dim: int) -> float:
    """The longest step, in Mahalanobis units of the corrected sigma, that the server takes from one site.

    An honest step, T generations without signal, is about sqrt(d) long. pycma bounds injected solutions
    at sqrt(d) + 2d / (d + 2), which suits one Gaussian sample; but with cma's two-point step-size
    adaptation (its default from d = 300) successive local generations line up, and honest steps at d = 500
    reach 2.4 sqrt(d) (largest of 300 runs of 8 generations without signal), 26% of them beyond pycma's
    bound. Clipped there, the steps lose 14% of their squared length on average and sigma shrinks when
    nothing is learnt (to 0.61 in 200 rounds). 3 sqrt(d) clips none of those honest steps and still caps
    what one absurd but finite result can do at three honest steps.
    """
    return CLIP_LENGTH * math.sqrt(dim)


def _whiten(cov: np.ndarray, y: np.ndarray) -> np.ndarray:
    """C^-1/2 y for the rows of y."""
    if cov.ndim == 1:
        return y / np.sqrt(cov)
    vals, vecs = np.linalg.eigh(cov)
    return ((y @ vecs) / np.sqrt(np.clip(vals, 1e-20, None))) @ vecs.T


@dataclass
class Update:
    """A server update: the next state, and by how much each site's step was shortened (1.0: not at all)."""

    state: ServerState
    clipped: np.ndarray  # per result, in the order given


def server_update(state: ServerState, results: list[LocalResult], rule: str = "eq6") -> ServerState:
    """One global CMA-ES update from the sites' local means and fitnesses (lower is better)."""
    return update_with_clipping(state, results, rule).state


def update_with_clipping(state: ServerState, results: list[LocalResult], rule: str = "eq6") -> Update:
    """One global CMA-ES update, and how much each site's step was shortened.

    The new mean is the fitness-rank-weighted recombination of the local means, each step first clipped
    to ``clip_length`` (so that one absurd but finite result moves the search no further than an honest
    one). Covariance and paths follow CMA-ES (sep-CMA-ES learning rates for a diagonal C). The broadcast
    step size is the previous one times the CSA ratio that the update applied to the corrected sigma:
    broadcasting the corrected sigma itself grows it round after round.
    """
    if not results:
        raise ValueError("server_update needs at least one site result")
    n = state.dim
    w = recombination_weights([r.fitness for r in results])
    mu_eff = 1.0 / float(np.sum(w**2))
    sigma_c = corrected_sigma(results, rule)
    y = np.stack([(r.mean - state.mean) / sigma_c for r in results])  # (k, n)
    lengths = np.linalg.norm(_whiten(state.cov, y), axis=1)
    shrink = np.minimum(1.0, clip_length(n) / np.maximum(lengths, 1e-300))
    y = y * shrink[:, None]
    y_w = w @ y

    c_s = (mu_eff + 2) / (n + mu_eff + 5)
    d_s = 1 + 2 * max(0.0, math.sqrt((mu_eff - 1) / (n + 1)) - 1) + c_s
    c_c = (4 + mu_eff / n) / (n + 4 + 2 * mu_eff / n)
    c_1 = 2 / ((n + 1.3) ** 2 + mu_eff)
    c_mu = min(1 - c_1, 2 * (mu_eff - 2 + 1 / mu_eff) / ((n + 2) ** 2 + mu_eff))
    diag = state.cov.ndim == 1
    if diag:  # sep-CMA-ES: a diagonal C can learn (n + 2) / 3 times faster
        c_1, c_mu = c_1 * (n + 2) / 3, c_mu * (n + 2) / 3
        if c_1 + c_mu > 1:
            c_1, c_mu = c_1 / (c_1 + c_mu), c_mu / (c_1 + c_mu)
    chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))

    p_sigma = (1 - c_s) * state.p_sigma + math.sqrt(c_s * (2 - c_s) * mu_eff) * _whiten(state.cov, y_w[None])[0]
    norm_ps = float(np.linalg.norm(p_sigma))
    generation = state.round + 1
    # p_sigma starts at 0, so after g updates its expected length is chi_n * sqrt(1 - (1 - c_s)^2g), not
    # chi_n. Read against chi_n alone, the first ~1 / c_s rounds look like short steps and shrink sigma by
    # exp(-(1 - ln 2) / d_s), about 0.74, even when nothing is learnt; read against its own expectation,
    # the path is neutral from the first round (the same correction h_sigma uses below).
    startup = math.sqrt(1 - (1 - c_s) ** (2 * (generation - state.path_round)))
    sigma_after = sigma_c * math.exp((c_s / d_s) * (norm_ps / (chi_n * startup) - 1))
    h_sigma = norm_ps / startup < (1.4 + 2 / (n + 1)) * chi_n
    p_c = (1 - c_c) * state.p_c + h_sigma * math.sqrt(c_c * (2 - c_c) * mu_eff) * y_w
    decay = 1 - c_1 - c_mu + (1 - h_sigma) * c_1 * c_c * (2 - c_c)
    if diag:
        cov = decay * state.cov + c_1 * p_c**2 + c_mu * (w @ y**2)
    else:
        cov = decay * state.cov + c_1 * np.outer(p_c, p_c) + c_mu * (y.T * w) @ y
        cov = (cov + cov.T) / 2

    new = replace(state, mean=state.mean + sigma_c * y_w, sigma=state.sigma * sigma_after / sigma_c, cov=cov,
                  p_sigma=p_sigma, p_c=p_c, round=generation)  # fmt: skip
    return Update(new, shrink)


# ----------------------------------------------------------------------------------------------
# The fixed random projection z -> soft prompt (identical on every site, never sent).


def projection(seed: int, dim: int, out_features: int, scale: float) -> np.ndarray:
    """A (dim, out_features) float32 matrix with N(0, scale^2) entries, from the job seed alone."""
    rng = np.random.default_rng([seed, 0x5EED])
    return rng.standard_normal((dim, out_features), dtype=np.float32) * np.float32(scale)


def projection_scale(embedding_std: float, dim: int, sigma: float, alpha: float = 1.0) -> float:
    """BBT's scale: alpha * std(word embeddings) / (sqrt(d) * sigma0)."""
    return alpha * embedding_std / (math.sqrt(dim) * sigma)


def relative_scale(row_norm: float, dim: int, width: int, sigma: float, rho: float) -> float:
    """The scale at which a first-round prompt moves each placeholder row by ``rho`` of its norm: a row of A z
    with z ~ N(0, sigma^2 I_d) has expected squared norm width * d * (scale * sigma)^2, so the scale is
    rho * row_norm / (sigma * sqrt(d * width)), whatever the model and the place (``--prompt_scale relative``)."""
    return rho * row_norm / (sigma * math.sqrt(dim * width))


def projection_fingerprint(description: dict, matrix: np.ndarray, rows: int = 4) -> str:
    """16 hex digits over what makes the projection A (``description``: seed, model, L, H, scale, ...)
    and A's first ``rows`` rows as float32: sites that would build different matrices disagree on it."""
    digest = hashlib.sha256(repr(sorted((k, str(v)) for k, v in description.items())).encode())
    digest.update(np.ascontiguousarray(matrix[:rows], dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]
