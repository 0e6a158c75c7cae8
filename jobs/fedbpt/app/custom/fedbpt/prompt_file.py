"""A run's prompt file (``best_prompt.npz`` or ``final_prompt.npz``) and the frozen model it was made for.

The file describes where and how the search put its prompt into the model (projection seed and scale,
``prompt_at``, ``cat_or_add``, ``n_prompt_tokens``, ...). ``open_blackbox`` builds the BlackBox from that
description, so that ``fedbpt.predict`` and ``fedbpt.export`` score exactly what the sites scored, and
refuses a model or a file that does not fit, with a one-line message that names the mismatch.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .blackbox import BlackBox, BlackBoxConfig, resolve_model_path
from .config import AUTO
from .tasks import get_task

# What a prompt file must hold to be used; RunRecorder writes these from a reference site's description.
REQUIRED = ("z", "soft_prompt", "seed", "model_name", "model_type", "task_name", "n_prompt_tokens", "hidden_size",
            "projection_scale", "prompt_at", "cat_or_add", "fingerprint")  # fmt: skip
# The description keys that make the projection A and say where A z enters (BlackBox's fingerprint covers them).
PROJECTION_KEYS = ("seed", "intrinsic_dim", "n_prompt_tokens", "hidden_size", "projection_scale", "prompt_at",
                   "cat_or_add")  # fmt: skip


class PromptFileError(ValueError):
    """The prompt file, or the model given for it, cannot be used; the message says what to fix."""


@dataclass
class PromptFile:
    """z, the soft prompt A z (L x H) and the description of a run's prompt file."""

    path: Path
    z: np.ndarray  # (d,) float32, as the sites received it
    soft_prompt: np.ndarray  # (L, H) float32
    description: dict  # every other entry of the file, as Python scalars

    @property
    def round(self) -> int:
        return int(self.description.get("round", -1))


def read_prompt(path: str | Path) -> PromptFile:
    """Read a prompt file; a missing, damaged or foreign file is a ``PromptFileError`` naming ``--prompt``."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(
            f"--prompt {path}: no such file (a run writes best_prompt.npz and final_prompt.npz into its run directory)"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise PromptFileError(f"--prompt {path}: not a .npz file ({e})") from None
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise PromptFileError(
            f"--prompt {path} is not a FedBPT prompt file: it lacks {', '.join(missing)} (give the "
            "best_prompt.npz or final_prompt.npz of a run)"
        )
    description = {k: v.item() for k, v in arrays.items() if k not in ("z", "soft_prompt")}
    z = arrays["z"].astype(np.float32).reshape(-1)
    soft = arrays["soft_prompt"].astype(np.float32)
    length, hidden = int(description["n_prompt_tokens"]), int(description["hidden_size"])
    if soft.shape != (length, hidden):
        raise PromptFileError(
            f"--prompt {path}: its soft prompt is {' x '.join(map(str, soft.shape))} but it says n_prompt_tokens "
            f"{length} and hidden_size {hidden}: the file is damaged"
        )
    dim = int(description.get("intrinsic_dim", z.size))
    if z.size != dim:
        raise PromptFileError(f"--prompt {path}: z has {z.size} values but intrinsic_dim is {dim}: the file is damaged")
    return PromptFile(path, z, soft, description)


def open_blackbox(
    prompt: PromptFile,
    model_name: str | None = None,
    task_name: str | None = None,
    device: str = "auto",
    dtype: str = AUTO,
    batch_size: int | str = AUTO,
    token_budget: int | str = AUTO,
) -> BlackBox:
    """The BlackBox that the prompt was searched in: the file's model (or ``model_name``), projection and
    place, checked against the file: hidden size, projection fingerprint and the soft prompt itself."""
    d = prompt.description
    name = model_name or str(d["model_name"])
    try:
        resolve_model_path(name)
    except FileNotFoundError as e:
        if model_name:
            raise PromptFileError(str(e)) from None
        raise PromptFileError(
            f"the prompt file's model_name {name!r} is not on this machine: give the model's folder with --model_name"
        ) from None
    cfg = BlackBoxConfig(
        model_name=name,
        task=get_task(task_name or str(d["task_name"])),
        n_prompt_tokens=int(d["n_prompt_tokens"]),
        intrinsic_dim=None,  # built below, once the hidden size is known to fit
        seed=int(d["seed"]),
        cat_or_add=str(d["cat_or_add"]),
        model_type=str(d["model_type"]),
        device=device,
        dtype=dtype,
        # files written before sigma and alpha were recorded: the defaults (the projection check below says so)
        sigma=float(d.get("sigma", 1.0)),
        alpha=float(d.get("alpha", 1.0)),
        verbalizer_space=bool(d.get("verbalizer_space", 0)),
        batch_size=batch_size,
        token_budget=token_budget,
        label_scale=float(d.get("label_scale", 20.0)),
        gguf_file=d.get("gguf_file") or None,
        prompt_at=str(d["prompt_at"]),
        prompt_scale=str(d.get("prompt_scale", "bbt")),  # files written before --prompt_scale: BBT's
        rho=float(d.get("rho", 0.1)),
    )
    try:
        bb = BlackBox(cfg)
    except OSError as e:
        raise PromptFileError(f"--model_name {name}: could not load it ({_first_line(e)})") from None
    check_fit(prompt, bb)
    return bb


def check_fit(prompt: PromptFile, bb: BlackBox) -> None:
    """Refuse a model whose hidden size or projection differs from the file's; build the projection."""
    d, where = prompt.description, f"--prompt {prompt.path}"
    made_for = f"{d['model_name']} ({d['model_type']})"
    if bb.hidden != int(d["hidden_size"]):
        raise PromptFileError(
            f"{where} was made for {made_for} with hidden size {d['hidden_size']}; --model_name {bb.cfg.model_name} "
            f"has hidden size {bb.hidden}: give the model the prompt was trained with"
        )
    bb.use_dim(prompt.z.size)
    if bb.fingerprint != d["fingerprint"]:
        mine = bb.description()
        differs = [k for k in PROJECTION_KEYS if k in d and str(mine[k]) != str(d[k])]
        if "projection_scale" in differs:
            hint = "" if "sigma" in d else " (or the run used --sigma or --alpha other than 1: the file predates them)"
            raise PromptFileError(
                f"{where} was made for {made_for}, whose word embeddings give projection scale "
                f"{d['projection_scale']}; --model_name {bb.cfg.model_name} gives {mine['projection_scale']}: it is "
                f"another model{hint}; give the model the prompt was trained with"
            )
        detail = "; ".join(f"{k} {mine[k]!r} here, {d[k]!r} in the file" for k in differs)
        raise PromptFileError(
            f"{where}: the projection rebuilt from its description has fingerprint {bb.fingerprint}, the file says "
            f"{d['fingerprint']}" + (f" ({detail})" if detail else " (this fedbpt builds another projection)")
        )
    rebuilt = bb.prompts(prompt.z)[0].float().cpu().numpy()
    if np.abs(rebuilt - prompt.soft_prompt).max() > 1e-4 * np.abs(prompt.soft_prompt).max() + 1e-7:
        raise PromptFileError(f"{where}: its soft_prompt is not A z for its own z and projection: the file is damaged")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def one_line(e: BaseException) -> str:
    """An exception as a one-line message (transformers' errors span several lines)."""
    return " ".join(str(e).split()) or type(e).__name__
