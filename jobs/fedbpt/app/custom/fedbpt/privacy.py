"""Optional privacy for a site's upload: clip its update (local mean minus the mean it received) to a norm
and add Gaussian noise to it before it leaves the site.

numpy only. The NVFlare filters (``nvflare_privacy.py``) and the standalone loop both call ``privatize``.
What it protects and what it does not is in the README ("Privacy of the uploads"): the server still sees
each site's noised mean, its unnoised fitness, step sizes and dev metrics, and no formal epsilon is claimed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class UploadPrivacy:
    """Clip the update to ``clip_norm`` (0: off) and add N(0, (noise_multiplier x clip_norm)^2) per coordinate."""

    clip_norm: float = 0.0
    noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        for name in ("clip_norm", "noise_multiplier"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.noise_multiplier > 0 and self.clip_norm == 0:
            raise ValueError("noise_multiplier > 0 needs clip_norm > 0: the noise is noise_multiplier x clip_norm")

    @property
    def enabled(self) -> bool:
        return self.clip_norm > 0

    @property
    def noise_std(self) -> float:
        """The standard deviation of the noise added to each coordinate of the update."""
        return self.noise_multiplier * self.clip_norm


def privatize(
    local_mean: np.ndarray, received_mean: np.ndarray, privacy: UploadPrivacy, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, float]]:
    """The mean to upload instead of ``local_mean``: the received mean plus the clipped, noised update.

    Returns it (float64) and what was done: the update's norm, the clip factor (1.0: not clipped) and the
    noise's standard deviation per coordinate."""
    local = np.asarray(local_mean, dtype=np.float64)
    received = np.asarray(received_mean, dtype=np.float64)
    if local.shape != received.shape:
        raise ValueError(f"the local mean has shape {local.shape}, the received mean {received.shape}")
    if not privacy.enabled:
        return local.copy(), {"update_norm": float(np.linalg.norm(local - received)), "clip_factor": 1.0,
                              "noise_std": 0.0}  # fmt: skip
    update = local - received
    norm = float(np.linalg.norm(update))
    factor = min(1.0, privacy.clip_norm / norm) if norm > 0 else 1.0
    noise = rng.normal(0.0, privacy.noise_std, size=update.shape) if privacy.noise_std > 0 else 0.0
    done = {"update_norm": norm, "clip_factor": factor, "noise_std": privacy.noise_std}
    return received + update * factor + noise, done
