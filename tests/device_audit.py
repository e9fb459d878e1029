"""Tensors q-splat's own code creates without naming a device go to the `meta` device (issue 26).

On a GPU, a tensor our code makes with a factory (torch.zeros, torch.arange, ...) and no `device=` lands on
the CPU while the model is on CUDA: the first op that mixes them raises, or it is stored on the wrong device.
On a CPU-only machine both are the CPU, so nothing shows. Within `our_factories_on_meta()` such a tensor is
made on `meta` instead (no data), and fails at once where it meets a real tensor, or is found stored in the
model afterwards. Calls from other libraries (nerfstudio, gsplat, torch) keep the CPU default: only the
caller's module decides. Host tensors made on purpose say so (`device="cpu"`).
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors


class _OurFactoriesOnMeta(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller == "qrender_ns" or caller.startswith("qrender_ns."):
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


@contextlib.contextmanager
def our_factories_on_meta():
    with _OurFactoriesOnMeta():
        yield


def tensors_on_meta(model) -> list:
    """Names of the model's parameters, buffers and strategy state that ended up on `meta`."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    named += [(f"strategy_state.{k}", v) for k, v in getattr(model, "strategy_state", {}).items()
              if isinstance(v, torch.Tensor)]
    return [name for name, t in named if t.device.type == "meta"]
