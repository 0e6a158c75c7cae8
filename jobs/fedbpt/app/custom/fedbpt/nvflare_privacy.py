"""NVFlare filters for optional privacy of a site's upload: thin glue around ``privacy.privatize``.

They run on the site, in its NVFlare client job, so the noise is added before the result leaves the site.
``RecordBroadcastMean`` (a task data filter) remembers the mean the server broadcast; ``ClipAndNoiseUpdate``
(a task result filter) clips the site's update, local mean minus that mean, to ``clip_norm`` and adds
N(0, (noise_multiplier x clip_norm)^2) to each coordinate. With ``clip_norm = 0`` (the job template's
default) both let every message through unchanged.

Why filters of our own: NVFlare's privacy filters (``nvflare.app_common.filters``: ``PercentilePrivacy``,
``SVTPrivacy``, ``ExcludeVars``) work coordinate by coordinate on a weight difference, and neither clips an
L2 norm nor adds Gaussian noise. Our result is the site's local mean, an absolute point (``params =
{"mean": ...}``, numpy, FULL): applied to it, their thresholds and clipping would cut the prompt itself,
not the site's update.

How the result filter knows the received mean: NVFlare runs a task's data filters, its executor and its
result filters with one FLContext (``ClientRunner._do_task``), so the data filter leaves the broadcast mean
there for the result filter. The alternative, sites sending their update (``params_transfer_type =
"DIFF"``), would change the message, the server's reading of it and the site script's error answers for
every job, private or not; this way a job without privacy is untouched. A result filter that finds no
recorded mean fails the task with a message that says what is missing, and the server names the site.
"""

from __future__ import annotations

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from .privacy import UploadPrivacy, privatize

BROADCAST_MEAN = "fedbpt.broadcast_mean"  # FLContext key: the mean of the task being run


class RecordBroadcastMean(DXOFilter):
    """Task data filter: remembers the broadcast mean in the task's context; changes nothing."""

    def __init__(self):
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS], data_kinds_to_filter=[DataKind.WEIGHTS])

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        mean = (dxo.data or {}).get("mean")
        if mean is not None:
            fl_ctx.set_prop(BROADCAST_MEAN, np.array(mean, dtype=np.float64), private=True, sticky=False)
        return None  # the task data goes on as it came


class ClipAndNoiseUpdate(DXOFilter):
    """Task result filter: the uploaded mean becomes received mean + clipped, noised update.

    ``seed`` is for tests only: by default the noise comes from fresh operating-system entropy."""

    def __init__(self, clip_norm: float = 0.0, noise_multiplier: float = 0.0, seed: int | None = None):
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS], data_kinds_to_filter=[DataKind.WEIGHTS])
        # attributes named as the arguments: NVFlare's Job API exports a component's arguments from them
        self.clip_norm, self.noise_multiplier, self.seed = clip_norm, noise_multiplier, seed
        self.privacy = UploadPrivacy(float(clip_norm), float(noise_multiplier))
        self.rng = np.random.default_rng(seed)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        data = dxo.data or {}
        if not self.privacy.enabled or "mean" not in data:  # off, or an answer without a mean (a site's error)
            return None
        received = fl_ctx.get_prop(BROADCAST_MEAN)
        if received is None:
            raise RuntimeError(
                "ClipAndNoiseUpdate found no broadcast mean: add fedbpt.nvflare_privacy.RecordBroadcastMean to "
                "task_data_filters of config_fed_client.conf for the same tasks"
            )
        mean, done = privatize(np.asarray(data["mean"]), received, self.privacy, self.rng)
        data["mean"] = mean.astype(np.float32)
        dxo.data = data
        self.log_info(
            fl_ctx,
            f"upload privacy: update norm {done['update_norm']:.4g} clipped by {done['clip_factor']:.3g} to at most "
            f"{self.privacy.clip_norm:g}, Gaussian noise of std {done['noise_std']:.4g} per coordinate added",
        )
        return dxo
