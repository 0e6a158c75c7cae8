"""A pretend accelerator for the CPU tests: tensors that refuse what CUDA tensors refuse.

``DeviceTensor`` is a ``torch.Tensor`` subclass that lives in host memory but behaves, where it matters
for our code, like a tensor on ``cuda:0``:

- ``.numpy()`` and numpy conversion (``np.asarray``, ``np.bincount`` ...) raise the ``TypeError`` that CUDA
  raises, until ``.cpu()`` brings the data to the host (``.cpu()`` returns a plain tensor);
- a host tensor indexed with a device index raises the ``RuntimeError`` that CUDA raises (in our code: a
  model's own parameters and buffers are plain tensors here, though they live on the device on a GPU);
- everything computed from it is a ``DeviceTensor`` too (``__torch_function__``), so a model's outputs,
  scores and losses stay "on the device" as they would on a GPU.

``pretend_device(monkeypatch)`` makes ``encoding.Batch.to`` (the one way rows reach the model's device)
produce such tensors, and counts the tensors it made, so a test can check that the mode was in effect.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch

NUMPY_REFUSED = (
    "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first."
)
INDEX_REFUSED = "indices should be either on cpu or on the same device as the indexed tensor (cpu)"
# Tensor methods and functions that index their first argument with tensors among the others.
_INDEXING = {
    torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_select, torch.index_select,
    torch.Tensor.index_put_, torch.Tensor.index_put, torch.Tensor.index_add_, torch.Tensor.index_copy_,
    torch.Tensor.index_fill_, torch.Tensor.gather, torch.gather, torch.Tensor.take, torch.take,
}  # fmt: skip


def _holds_device_tensor(value) -> bool:
    if isinstance(value, DeviceTensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_device_tensor(v) for v in value)
    return False


def _ours() -> bool:
    """Whether the caller is our code rather than torch's or a model's: inside a model, its parameters and
    buffers are plain tensors here but live on the device on a GPU, so indexing them there is allowed."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "torch":
        frame = frame.f_back
    return frame is not None and frame.f_globals.get("__name__", "").split(".")[0] != "transformers"


class DeviceTensor(torch.Tensor):
    """A host tensor that plays a CUDA tensor (see the module's docstring)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INDEXING and args and type(args[0]) is torch.Tensor and args[0].dim() > 0 and _ours():
            if _holds_device_tensor(args[1:]) or _holds_device_tensor(list(kwargs.values())):
                raise RuntimeError(INDEX_REFUSED)
        if func is torch.Tensor.cpu:  # the only way to the host, as on CUDA
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs).as_subclass(torch.Tensor)
        return super().__torch_function__(func, types, args, kwargs)

    def numpy(self, *args, **kwargs):
        raise TypeError(NUMPY_REFUSED)

    def __array__(self, *args, **kwargs):
        raise TypeError(NUMPY_REFUSED)


def on_device(t: torch.Tensor) -> torch.Tensor:
    return t if isinstance(t, DeviceTensor) else t.as_subclass(DeviceTensor)


@dataclass
class PretendDevice:
    """What the mode made: how many batches it moved to the pretend device."""

    batches: int = 0


def pretend_device(monkeypatch) -> PretendDevice:
    """From now on (until the test ends), every ``Batch.to`` puts the rows on the pretend device."""
    from fedbpt import encoding

    record = PretendDevice()
    original = encoding.Batch.to

    def to(self, device):
        moved = original(self, device)
        record.batches += 1
        return replace(moved, **{k: on_device(getattr(moved, k)) for k in encoding._TENSORS}, _chunks={})

    monkeypatch.setattr(encoding.Batch, "to", to)
    return record
