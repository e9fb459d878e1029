"""Make q-splat checkpoints loadable with torch >= 2.6 (`torch.load` defaults to weights_only).

nerfstudio's ns-eval / ns-viewer call `torch.load(path)` without `weights_only=False`, and a
nerfstudio checkpoint holds numpy float64 learning rates (ExponentialDecayScheduler's
`_last_lr`, optimizer param groups): loading fails with "Unsupported global:
numpy.core.multiarray.scalar". Importing our method config (nerfstudio does, before it loads a
checkpoint) allow-lists exactly these plain-data numpy types; no code-executing global is added.
"""

from __future__ import annotations

import numpy as np
import torch


def numpy_scalar_globals() -> list:
    try:
        from numpy.core.multiarray import scalar
    except ImportError:  # numpy >= 2 moved it
        from numpy._core.multiarray import scalar
    dtypes = [np.dtype]
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
        if hasattr(np, "dtypes") and hasattr(np.dtypes, name):
            dtypes.append(getattr(np.dtypes, name))
    return [scalar, *dtypes]


def register_safe_globals() -> None:
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals(numpy_scalar_globals())


register_safe_globals()
