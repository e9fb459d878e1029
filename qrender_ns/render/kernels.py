"""Which kernels render on a device: the one place where the model's rendering depends on the device.

Everything else (projection inputs, antialiasing, SH degree, depth, densification info, feature blending) is
one code path, so the CPU tests cover the GPU logic; tests swap these choices to run the CUDA kernels' path on
the CPU with stand-ins (tests/gsplat_standins.py, Triton under TRITON_INTERPRET=1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RenderKernels:
    rgb: str
    """"gsplat": gsplat.rasterization (its CUDA ops); "cpu": our projection, tile binning and compiled dense kernel."""
    features: str
    """rasterize_to_pixels backend that "auto" means for feature maps: "triton" or "cpu"."""


GPU_KERNELS = RenderKernels(rgb="gsplat", features="triton")
CPU_KERNELS = RenderKernels(rgb="cpu", features="cpu")


def render_kernels(device) -> RenderKernels:
    return GPU_KERNELS if torch.device(device).type == "cuda" else CPU_KERNELS
