"""Which kernels render on a device: the one place where the model's rendering depends on the device.

Everything else (projection inputs, antialiasing, SH degree, depth, densification info, feature blending) is
one code path, so the CPU tests cover the GPU logic; tests swap these choices to run the CUDA kernels' path on
the CPU with stand-ins (tests/gsplat_standins.py, Triton under TRITON_INTERPRET=1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qrender_ns.render import _backend
from qrender_ns.utils.compat import triton_problem


@dataclass(frozen=True)
class RenderKernels:
    rgb: str
    """"gsplat": gsplat.rasterization (its CUDA ops); "cpu": our projection, tile binning and compiled dense kernel."""
    features: str
    """rasterize_to_pixels backend that "auto" means for feature maps: "triton" or "cpu"."""


GPU_KERNELS = RenderKernels(rgb="gsplat", features="triton")
# With a Triton older than compat.MIN_TRITON (torch < 2.8 ships one), which fails inside its own compiler on our
# kernels: the hand CUDA kernel, JIT-built with nvcc.
GPU_KERNELS_OLD_TRITON = RenderKernels(rgb="gsplat", features="cuda")
CPU_KERNELS = RenderKernels(rgb="cpu", features="cpu")


def render_kernels(device) -> RenderKernels:
    if torch.device(device).type != "cuda":
        return CPU_KERNELS
    problem = triton_problem()
    if problem is None:
        return GPU_KERNELS
    if _backend.cuda_home() is None:
        raise RuntimeError(f"q-splat: {problem}, and the hand CUDA kernel it would fall back to needs the CUDA "
                           "toolkit (nvcc; set CUDA_HOME)")
    return GPU_KERNELS_OLD_TRITON
