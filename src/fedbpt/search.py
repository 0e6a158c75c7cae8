"""The FedBPT search: CMA-ES state, the sites' local search, the server's global update, the messages.

numpy and ``cma`` only, so every rule here is testable in milliseconds. The server state is a plain
dict of arrays: the whole of it is the checkpoint, a small subset of it is the message to the sites.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import cma
import numpy as np

STEP_RULES = ("eq6", "example")
COVARIANCES = ("diag", "full")


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

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ServerState:
        kw = {f.name: np.asarray(arrays[f.name]) for f in fields(cls)}
        for name in ("sigma", "best_dev_loss"):
            kw[name] = float(kw[name])
        for name in ("seed", "round", "best_round"):
            kw[name] = int(kw[name])
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
    """The broadcast: (params, meta) = ({mean, cov} as float32, {sigma, seed})."""
    params = {"mean": state.mean.astype(np.float32), "cov": state.cov.astype(np.float32)}
    return params, {"sigma": float(state.sigma), "seed": int(state.seed)}


@dataclass
class GlobalPrompt:
    """What a site receives: the centre and shape of the global search distribution."""

    mean: np.ndarray
    sigma: float
    cov: np.ndarray


def decode_down(params: dict[str, np.ndarray], meta: dict) -> GlobalPrompt:
    missing = [k for k in ("mean", "cov") if k not in params] + [k for k in ("sigma",) if k not in meta]
    if missing:
        raise ValueError(f"server message lacks {missing}; is the server running the FedBPT components?")
    mean = np.asarray(params["mean"], dtype=np.float64)
    return GlobalPrompt(mean=mean, sigma=float(meta["sigma"]), cov=np.asarray(params["cov"], dtype=np.float64))


@dataclass
class LocalResult:
    """A site's answer: its final local mean, that mean's fitness and the step sizes it used."""

    mean: np.ndarray
    fitness: float
    sigmas: np.ndarray
    popsize: int
    evaluations: int = 0


def encode_up(result: LocalResult) -> tuple[dict[str, np.ndarray], dict]:
    """A site's answer: (params, meta) = ({mean} as float32, {fitness, sigmas, local_popsize}).

    Scalars travel as numbers: every numpy array costs about 280 bytes of framing on the wire."""
    meta = {"fitness": float(result.fitness), "sigmas": [float(s) for s in result.sigmas],
            "local_popsize": int(result.popsize)}  # fmt: skip
    return {"mean": result.mean.astype(np.float32)}, meta


def decode_up(params: dict[str, np.ndarray], meta: dict) -> LocalResult:
    missing = [k for k in ("mean",) if k not in params] + [k for k in ("fitness", "sigmas") if k not in meta]
    if missing:
        raise ValueError(f"site result lacks {missing}")
    return LocalResult(
        mean=np.asarray(params["mean"], dtype=np.float64),
        fitness=float(meta["fitness"]),
        sigmas=np.asarray(meta["sigmas"], dtype=np.float64).reshape(-1),
        popsize=int(meta.get("local_popsize", 0)),
    )


def check_result(result: LocalResult, state: ServerState, max_step: float = 1e3) -> str | None:
    """Why a site's result cannot be used (wrong shape, not finite, implausibly far), or None."""
    if result.mean.shape != state.mean.shape:
        return (
            f"mean has shape {result.mean.shape}, expected {state.mean.shape}: --intrinsic_dim in app_config "
            "must equal intrinsic_dim in config_fed_server.conf"
        )
    if not (np.all(np.isfinite(result.mean)) and math.isfinite(result.fitness)):
        return "mean or fitness is not finite"
    if result.sigmas.size == 0 or not np.all(np.isfinite(result.sigmas)) or np.any(result.sigmas <= 0):
        return "sigmas must be a non-empty array of positive numbers"
    if result.popsize < 1:
        return f"local popsize {result.popsize} < 1"
    step = np.linalg.norm(result.mean - state.mean)
    if step > max_step * state.sigma * math.sqrt(state.dim):
        return f"step norm {step:.3g} is implausibly large for sigma {state.sigma:.3g}"
    return None


# ----------------------------------------------------------------------------------------------
# Site: a local CMA-ES started from the global distribution.


def derive_seed(seed: int, site: int, round_: int, shared: bool = False) -> int:
    """A positive 31-bit seed per (job seed, site, round); ``shared`` gives every site the same one."""
    entropy = [seed] if shared else [seed, site, round_]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] % (2**31 - 2)) + 1


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
    whitened coordinates u (z = mean + C^1/2 u), so one code path serves diagonal and full C.
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
        candidates = np.asarray(es.ask())
        values = np.asarray(objective(to_z(candidates)), dtype=np.float64)
        es.tell(list(candidates), values.tolist())
        sigmas.append(es.sigma)
        evaluations += len(candidates)
    final = to_z(np.asarray(es.mean)[None, :])
    fitness = float(np.asarray(objective(final))[0])
    return LocalResult(final[0], fitness, np.asarray(sigmas), popsize, evaluations + 1)


# ----------------------------------------------------------------------------------------------
# Server: the K local means are one CMA-ES generation.


def rank_weights(k: int) -> np.ndarray:
    """Recombination weights by fitness rank, best first: every site counts, the best most."""
    w = math.log(k + 0.5) - np.log(np.arange(1, k + 1))
    return w / w.sum()


def corrected_sigma(results: list[LocalResult], rule: str) -> float:
    """The step size with which the server reads the sites' steps.

    ``eq6``: the paper's Eq. 6, 2 * sqrt(sum over the better half of sites of their local sigma^2,
    divided by K * local popsize). ``example``: the public example's rule, sqrt(sum over all sites of
    their local sigma^2, divided by K * mu_local) with mu_local = popsize // 2.
    """
    k = len(results)
    if rule == "eq6":
        better = sorted(results, key=lambda r: r.fitness)[: max(1, k // 2)]
        total = sum(float(np.sum(r.sigmas**2)) for r in better)
        return 2.0 * math.sqrt(total / (k * results[0].popsize))
    if rule == "example":
        total = sum(float(np.sum(r.sigmas**2)) for r in results)
        return math.sqrt(total / (k * max(1, results[0].popsize // 2)))
    raise ValueError(f"unknown step-size rule {rule!r}; choose one of {STEP_RULES}")


def server_update(state: ServerState, results: list[LocalResult], rule: str = "eq6") -> ServerState:
    """One global CMA-ES update from the sites' local means and fitnesses (lower is better).

    The new mean is the fitness-rank-weighted recombination of the local means. Covariance and
    paths follow CMA-ES (sep-CMA-ES learning rates for a diagonal C). The broadcast step size is the
    previous one times the CSA ratio that the update applied to the corrected sigma: broadcasting the
    corrected sigma itself grows it round after round.
    """
    if not results:
        raise ValueError("server_update needs at least one site result")
    n, k = state.dim, len(results)
    order = np.argsort([r.fitness for r in results], kind="stable")
    w = rank_weights(k)
    mu_eff = 1.0 / float(np.sum(w**2))
    sigma_c = corrected_sigma(results, rule)
    y = np.stack([(results[i].mean - state.mean) / sigma_c for i in order])  # (k, n), best first
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

    if diag:
        inv_sqrt_y = y_w / np.sqrt(state.cov)
    else:
        vals, vecs = np.linalg.eigh(state.cov)
        inv_sqrt_y = vecs @ ((vecs.T @ y_w) / np.sqrt(np.clip(vals, 1e-20, None)))
    p_sigma = (1 - c_s) * state.p_sigma + math.sqrt(c_s * (2 - c_s) * mu_eff) * inv_sqrt_y
    norm_ps = float(np.linalg.norm(p_sigma))
    sigma_after = sigma_c * math.exp((c_s / d_s) * (norm_ps / chi_n - 1))
    generation = state.round + 1
    h_sigma = norm_ps / math.sqrt(1 - (1 - c_s) ** (2 * generation)) < (1.4 + 2 / (n + 1)) * chi_n
    p_c = (1 - c_c) * state.p_c + h_sigma * math.sqrt(c_c * (2 - c_c) * mu_eff) * y_w
    decay = 1 - c_1 - c_mu + (1 - h_sigma) * c_1 * c_c * (2 - c_c)
    if diag:
        cov = decay * state.cov + c_1 * p_c**2 + c_mu * (w @ y**2)
    else:
        cov = decay * state.cov + c_1 * np.outer(p_c, p_c) + c_mu * (y.T * w) @ y
        cov = (cov + cov.T) / 2

    return ServerState(
        mean=state.mean + sigma_c * y_w,
        sigma=state.sigma * sigma_after / sigma_c,
        cov=cov,
        p_sigma=p_sigma,
        p_c=p_c,
        seed=state.seed,
        round=generation,
        best_round=state.best_round,
        best_dev_loss=state.best_dev_loss,
        best_mean=state.best_mean,
    )


# ----------------------------------------------------------------------------------------------
# The fixed random projection z -> soft prompt (identical on every site, never sent).


def projection(seed: int, dim: int, out_features: int, scale: float) -> np.ndarray:
    """A (dim, out_features) float32 matrix with N(0, scale^2) entries, from the job seed alone."""
    rng = np.random.default_rng([seed, 0x5EED])
    return rng.standard_normal((dim, out_features), dtype=np.float32) * np.float32(scale)


def projection_scale(embedding_std: float, dim: int, sigma: float, alpha: float = 1.0) -> float:
    """BBT's scale: alpha * std(word embeddings) / (sqrt(d) * sigma0)."""
    return alpha * embedding_std / (math.sqrt(dim) * sigma)
