"""One site's side of a round, with no federation framework in it: the NVFlare client script and the
standalone loop both drive this class with the server's message and send back what it returns."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from .blackbox import BlackBox, BlackBoxConfig
from .config import ClientConfig, site_data_dir
from .data import Split, k_shot_pools, load_split, site_index, site_shards
from .search import GlobalPrompt, LocalResult, derive_seed, local_search, perturbation_seed
from .tasks import get_task

log = logging.getLogger(__name__)


@dataclass
class TaskData:
    """The k-shot train and dev pools of all sites together, and the test split (if loaded)."""

    train: Split
    dev: Split
    test: Split | None


def load_task_data(cfg: ClientConfig, with_test: bool = True) -> TaskData:
    """The public recipe: shuffle the training split, k examples per class for train and k for dev."""
    task = get_task(cfg.task_name)
    full = load_split(task, "train", cfg.data_dir)
    train_idx, dev_idx = k_shot_pools(full.labels, cfg.k_shot, task.num_labels, cfg.seed)
    test = None
    if with_test:
        test = load_split(task, "dev" if task.test_split == "validation" else "test", cfg.data_dir)
    return TaskData(full.subset(train_idx), full.subset(dev_idx), test)


def blackbox_config(cfg: ClientConfig) -> BlackBoxConfig:
    return BlackBoxConfig(
        model_name=cfg.model_name,
        task=get_task(cfg.task_name),
        n_prompt_tokens=cfg.n_prompt_tokens,
        intrinsic_dim=cfg.intrinsic_dim,
        seed=cfg.seed,
        cat_or_add=cfg.cat_or_add,
        model_type=cfg.model_type,
        device=cfg.device,
        dtype=cfg.dtype,
        sigma=cfg.sigma,
        alpha=cfg.alpha,
        loss_type=cfg.loss_type,
        verbalizer_space=bool(cfg.verbalizer_space),
        batch_size=cfg.batch_size,
        token_budget=cfg.token_budget,
        label_scale=cfg.label_scale,
        gguf_file=cfg.gguf_file,
        prompt_at=cfg.prompt_at,
        prompt_scale=cfg.prompt_scale,
        rho=cfg.rho,
    )


class ServerMismatch(ValueError):
    """The site's settings cannot work with the server's search state; the site must stop."""


def check_server_state(cfg: ClientConfig, start: GlobalPrompt) -> None:
    """Refuse a server state that this site's flags cannot work with: the server's message carries the
    search dimension, and a site that asked for another one names both settings."""
    if cfg.intrinsic_dim is not None and cfg.intrinsic_dim != start.dim:
        raise ServerMismatch(
            f"--intrinsic_dim {cfg.intrinsic_dim} in this site's app_config differs from intrinsic_dim {start.dim} "
            "of the server's search state (config_fed_server.conf, or the checkpoint it resumed from); give "
            "both the same value, or leave --intrinsic_dim out of app_config to take the server's"
        )


class FedBPTClient:
    """A site: its shards of the train and dev pools, the shared black box, its local search."""

    def __init__(self, cfg: ClientConfig, site: str, blackbox: BlackBox | None = None, data: TaskData | None = None):
        self.cfg = cfg
        self.site = site
        self.index = site_index(site, cfg.num_users)
        self.evaluator = site in cfg.evaluators
        self.blackbox = blackbox or BlackBox(blackbox_config(cfg))
        if data is None:
            data = load_task_data(replace(cfg, data_dir=site_data_dir(cfg.data_dir, site)), with_test=self.evaluator)
        num_labels = get_task(cfg.task_name).num_labels
        # Train and dev pools are split the same way, with independent draws.
        train_shard = site_shards(data.train.labels, cfg.num_users, bool(cfg.iid), cfg.alpha_dir, cfg.seed)
        dev_shard = site_shards(data.dev.labels, cfg.num_users, bool(cfg.iid), cfg.alpha_dir, cfg.seed + 1)
        train = data.train.subset(train_shard[self.index])
        counts = np.bincount(train.labels, minlength=num_labels)  # on the host, before the rows go to the device
        self.train = self.blackbox.encode(train)
        self.dev = self.blackbox.encode(data.dev.subset(dev_shard[self.index]))
        self.test = self.blackbox.encode(data.test) if self.evaluator and data.test is not None else None
        self.dev_losses = np.zeros(0)  # the last evaluated prompt's loss on each dev example
        log.info("%s: %d train examples (per class %s), %d dev, %s test", site, len(self.train),
                 counts.tolist(), len(self.dev), len(self.test) if self.test is not None else "no")  # fmt: skip

    def description(self) -> dict:
        """What the server needs (sent with every result): how to turn z into the soft prompt (L x H) and use it
        without the federation (sigma and alpha let fedbpt.predict rebuild the projection scale from the
        model), the projection's fingerprint, the sizes it checks the site's reports against, and the loss
        type (the scale of the site's dev losses)."""
        task = get_task(self.cfg.task_name)
        return {**self.blackbox.description(), "k_shot": self.cfg.k_shot, "num_labels": task.num_labels,
                "local_popsize": self.cfg.local_popsize, "local_iter": self.cfg.local_iter,
                "sigma": self.cfg.sigma, "alpha": self.cfg.alpha, "prompt_scale": self.cfg.prompt_scale,
                "rho": self.cfg.rho, "loss_type": self.cfg.loss_type}  # fmt: skip

    def accept(self, start: GlobalPrompt) -> None:
        """Take the search dimension from the server's message; a site that asked for another one stops."""
        check_server_state(self.cfg, start)
        self.blackbox.use_dim(start.dim)

    def evaluate(self, z: np.ndarray) -> dict[str, float]:
        """The received prompt's dev loss and metric on this site's dev shard (and test, if an evaluator).
        Each dev example's loss is kept in ``dev_losses`` for the result (the server's paired test)."""
        metrics: dict[str, float] = {"n_dev": float(len(self.dev)), "n_train": float(len(self.train))}
        metrics["dev_loss"], metrics["dev_acc"], self.dev_losses = self.blackbox.evaluate_examples(z, self.dev)
        if self.test is not None:
            metrics["test_loss"], metrics["test_acc"] = self.blackbox.evaluate(z, self.test)
            metrics["n_test"] = float(len(self.test))
        return metrics

    def run_round(self, start: GlobalPrompt) -> tuple[LocalResult, dict[str, float]]:
        """Evaluate the global prompt, then search locally from it; returns the result and metrics.

        The random stream comes from (job seed, site name, the server's round), so a job resumed from a
        checkpoint continues the streams instead of replaying round 0's."""
        t0 = time.perf_counter()
        bb = self.blackbox
        self.accept(start)
        round_ = start.round
        tokens = bb.padded_tokens, bb.attended_tokens, bb.nonfinite_candidates
        metrics = self.evaluate(start.mean)
        shared = self.cfg.random_stream == "shared"
        seed = derive_seed(self.cfg.seed, self.site, round_, shared=shared)
        rows = self.train
        if self.cfg.perturb:  # one perturbed copy per round, scored beside the clean rows
            rng = np.random.default_rng(perturbation_seed(self.cfg.seed, self.site, round_, shared=shared))
            rows = self.train.concat(bb.perturb(self.train, self.cfg.perturb_rate, rng, self.cfg.perturb_scope))

        def objective(z: np.ndarray) -> np.ndarray:
            return bb.fitness(z, rows, n_clean=len(self.train))

        result = replace(local_search(objective, start, self.cfg.local_popsize, self.cfg.local_iter, seed),
                         dev_losses=self.dev_losses)  # fmt: skip
        metrics.update(local_fitness=result.fitness, local_sigma=float(result.sigmas[-1]),
                       padded_tokens=float(bb.padded_tokens - tokens[0]),
                       attended_tokens=float(bb.attended_tokens - tokens[1]),
                       nonfinite_candidates=float(bb.nonfinite_candidates - tokens[2]),
                       seconds=time.perf_counter() - t0)  # fmt: skip
        if metrics["nonfinite_candidates"]:
            log.warning("%s round %d: %d candidate(s) gave non-finite class scores (--dtype %s) and got their "
                        "generation's worst fitness", self.site, round_, metrics["nonfinite_candidates"],
                        str(bb.dtype).removeprefix("torch."))  # fmt: skip
        log.info("%s round %d: dev loss %.4f acc %.4f%s | local fitness %.4f sigma %.3g | %.1f s", self.site,
                 round_, metrics["dev_loss"], metrics["dev_acc"],
                 f" test acc {metrics['test_acc']:.4f}" if "test_acc" in metrics else "",
                 result.fitness, result.sigmas[-1], metrics["seconds"])  # fmt: skip
        return result, metrics
