"""Input checks of the rasterizer's public functions: one sentence naming the bad argument, before any kernel runs;
and the backend choice."""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from qrender_ns.render import kernels
from qrender_ns.utils.compat import triton_problem

MAX_QUANTILES = 128


BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")


FLOAT_DTYPES = (torch.float32, torch.float64)  # what the compiled kernels are built for
HALF_DTYPES = (torch.float16, torch.bfloat16)  # feature tables the row-sparse path reads (rows upcast)


def _check_tensor(name: str, value: Any, shape: Tuple[Optional[int], ...], floating=True,
                  finite=True) -> Tensor:
    """Shape ([None] = any size), dtype and finiteness check with a message naming `name`."""
    if not isinstance(value, Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, value.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"`{name}` must have shape {want}, got {list(value.shape)}")
    if floating:
        if value.dtype not in FLOAT_DTYPES:
            kind = "floating point" if not value.is_floating_point() else "float32 or float64"
            raise ValueError(f"`{name}` must be a {kind} tensor (float32 or float64), got {value.dtype}; "
                             "cast with .float()")
        if finite and value.numel() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"`{name}` contains NaN or Inf values")
    return value


def _check_opacities(opacities: Tensor) -> None:
    if opacities.numel() and (bool((opacities < 0).any()) or bool((opacities > 1).any())):
        raise ValueError("`opacities` must lie in [0, 1] (apply a sigmoid to logits first)")


def check_num_quantiles(num_quantiles: Optional[int]) -> int:
    """None (dense) -> 0; K must be an int in 1..MAX_QUANTILES."""
    if num_quantiles is None:
        return 0
    if isinstance(num_quantiles, bool) or not isinstance(num_quantiles, int):
        raise ValueError(f"`num_quantiles` must be None (dense) or an int, got {num_quantiles!r}")
    if not 1 <= num_quantiles <= MAX_QUANTILES:
        raise ValueError(
            f"`num_quantiles` must be in 1..{MAX_QUANTILES} (or None for dense), got {num_quantiles}"
        )
    return num_quantiles


def _check_image(image_width: int, image_height: int, tile_size: int) -> None:
    for name, value in (("image_width", image_width), ("image_height", image_height), ("tile_size", tile_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}")


def _check_pixel_ids(pixel_ids: Any, num_pixels: int, device: torch.device) -> Tensor:
    """Sampled pixels: a 1-D integer tensor of flat (camera, y, x) indices in [0, V*H*W)."""
    if not isinstance(pixel_ids, Tensor) or pixel_ids.dim() != 1:
        raise ValueError("`pixel_ids` must be a 1-D integer tensor of flat (camera, y, x) pixel indices, "
                         f"got {type(pixel_ids).__name__}{list(pixel_ids.shape) if isinstance(pixel_ids, Tensor) else ''}")
    if pixel_ids.is_floating_point() or pixel_ids.is_complex() or pixel_ids.dtype == torch.bool:
        raise ValueError(f"`pixel_ids` must be an integer tensor, got {pixel_ids.dtype}")
    if pixel_ids.numel() and (int(pixel_ids.min()) < 0 or int(pixel_ids.max()) >= num_pixels):
        raise ValueError(f"`pixel_ids` must lie in [0, V*H*W) = [0, {num_pixels}) (index = (camera * H + y) * W + x)")
    return pixel_ids.to(device=device, dtype=torch.int64).contiguous()


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":  # on CUDA: Triton, the GPU path CI verifies (docs/api.md, "GPU backends")
        backend = kernels.render_kernels(device).features
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1, Triton's CPU interpreter, "
                             "for tests); use backend='cpu' for CPU tensors")
        problem = triton_problem()
        if problem:
            raise RuntimeError(f"backend='triton': {problem}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError("backend='cuda' needs CUDA tensors; move the inputs with .cuda() or use backend='cpu'")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError("backend='cpu' needs CPU tensors; use backend='cuda' for CUDA tensors")
    return backend


def _check_pixel_inputs(means2d, conics, features, opacities, image_width, image_height, tile_size,
                        isect_offsets, flatten_ids, backgrounds, validate_values,
                        half_features: bool = False) -> Tuple[int, int]:
    """Shapes, dtypes and index ranges of rasterize_to_pixels' inputs -> (V, N).
    `half_features`: shared features [N, C] may also be float16/bfloat16 (paths that upcast gathered rows).

    Values of the per-view tensors (means2d, conics, [V,N] opacities/features) are checked only at the rows
    `flatten_ids` lists: gsplat's CUDA projection leaves culled Gaussians' rows unwritten (torch::empty), and
    no kernel reads them. `validate_values=False` skips every value scan (NaN/Inf and the opacity range: passes
    over N or over the intersections, which a training step's sampled-pixel render must not pay, issue 27); shapes,
    dtypes and index ranges are always checked (flatten_ids' min/max: one vectorised pass, ~ms at 5e6 entries)."""
    _check_image(image_width, image_height, tile_size)
    _check_tensor("means2d", means2d, (None, None, 2), finite=False)
    num_cams, num_gs = means2d.shape[:2]
    _check_tensor("conics", conics, (num_cams, num_gs, 3), finite=False)
    shared_features = isinstance(features, Tensor) and features.dim() == 2
    shared_opacities = isinstance(opacities, Tensor) and opacities.dim() == 1
    half = half_features and shared_features and features.dtype in HALF_DTYPES
    if half:
        _check_tensor("features", features, (num_gs, None), floating=False)
        if validate_values and features.numel() and not bool(torch.isfinite(features).all()):
            raise ValueError("`features` contains NaN or Inf values")
    elif shared_features:
        _check_tensor("features", features, (num_gs, None), finite=validate_values)
    else:
        _check_tensor("features", features, (num_cams, num_gs, None), finite=False)
    if shared_opacities:
        _check_tensor("opacities", opacities, (num_gs,), finite=validate_values)
        if validate_values:
            _check_opacities(opacities)
    else:
        _check_tensor("opacities", opacities, (num_cams, num_gs), finite=False)
    channels = features.shape[-1]
    if channels == 0:
        raise ValueError("`features` must have at least one channel, got C=0")
    tiles_h = math.ceil(image_height / tile_size)
    tiles_w = math.ceil(image_width / tile_size)
    _check_tensor("isect_offsets", isect_offsets, (num_cams, tiles_h, tiles_w), floating=False)
    _check_tensor("flatten_ids", flatten_ids, (None,), floating=False)
    if backgrounds is not None:
        _check_tensor("backgrounds", backgrounds, (num_cams, channels), finite=validate_values)
    for name, t in (("isect_offsets", isect_offsets), ("flatten_ids", flatten_ids)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"`{name}` must be an integer tensor (int32), got {t.dtype}")
    if flatten_ids.numel() and (int(flatten_ids.min()) < 0 or int(flatten_ids.max()) >= num_cams * num_gs):
        raise ValueError(f"`flatten_ids` must index the V*N = {num_cams * num_gs} projected Gaussians")
    offsets = isect_offsets.reshape(-1)
    if offsets.numel() and (int(offsets.min()) < 0 or int(offsets.max()) > flatten_ids.numel()
                            or bool((offsets[1:] < offsets[:-1]).any())):
        raise ValueError("`isect_offsets` must be non-decreasing start offsets into `flatten_ids` "
                         "(as gsplat's isect_offset_encode returns)")
    tensors = [means2d, conics, features, opacities] + ([backgrounds] if backgrounds is not None else [])
    dtype, device = means2d.dtype, means2d.device
    for name, t in zip(("conics", "features", "opacities", "backgrounds"), tensors[1:]):
        if (t.dtype != dtype and not (half and name == "features")) or t.device != device:
            raise ValueError(f"`{name}` must match means2d's dtype/device ({dtype}, {device}), got ({t.dtype}, {t.device})")
    per_view = [("means2d", means2d), ("conics", conics)]
    per_view += [] if shared_features else [("features", features)]
    per_view += [] if shared_opacities else [("opacities", opacities)]
    if not validate_values:  # the value scans below are O(intersections) gathers: skipped with the NaN scan
        return num_cams, num_gs
    listed = flatten_ids.to(device=device, dtype=torch.int64)
    for name, t in per_view:
        rows = t.reshape(num_cams * num_gs, *t.shape[2:])[listed]
        if rows.numel() and not bool(torch.isfinite(rows).all()):
            raise ValueError(f"`{name}` contains NaN or Inf values (at rows that flatten_ids lists)")
        if name == "opacities":
            _check_opacities(rows)
    return num_cams, num_gs
