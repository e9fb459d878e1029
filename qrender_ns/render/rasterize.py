"""Public rasterization API: gsplat-1.4-shaped, dense or quantile blending, CPU/CUDA/torch.

`rasterize_to_pixels` mirrors `gsplat.rasterize_to_pixels` (+ `num_quantiles`);
`rasterize_features` mirrors `gsplat.rasterization` for arbitrary C-channel features.
Semantics of both modes: docs/quantile_rendering.md.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..compat import triton_problem
from . import _backend, kernels
from .binning import isect_offset_encode, isect_tiles
from .reference import rasterize_to_pixels_reference

MAX_QUANTILES = 128
BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float64)  # what the compiled kernels are built for


# ----------------------------------------------------------------------------- validation
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
    if backend == "auto":  # on CUDA: Triton, the GPU path CI verifies (README, "GPU backends")
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
                        isect_offsets, flatten_ids, backgrounds, validate_values) -> Tuple[int, int]:
    """Shapes, dtypes and index ranges of rasterize_to_pixels' inputs -> (V, N).

    Values of the per-view tensors (means2d, conics, [V,N] opacities/features) are checked only at the rows
    `flatten_ids` lists: gsplat's CUDA projection leaves culled Gaussians' rows unwritten (torch::empty), and
    no kernel reads them."""
    _check_image(image_width, image_height, tile_size)
    _check_tensor("means2d", means2d, (None, None, 2), finite=False)
    num_cams, num_gs = means2d.shape[:2]
    _check_tensor("conics", conics, (num_cams, num_gs, 3), finite=False)
    shared_features = isinstance(features, Tensor) and features.dim() == 2
    shared_opacities = isinstance(opacities, Tensor) and opacities.dim() == 1
    if shared_features:
        _check_tensor("features", features, (num_gs, None), finite=validate_values)
    else:
        _check_tensor("features", features, (num_cams, num_gs, None), finite=False)
    if shared_opacities:
        _check_tensor("opacities", opacities, (num_gs,), finite=validate_values)
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
        if t.dtype != dtype or t.device != device:
            raise ValueError(f"`{name}` must match means2d's dtype/device ({dtype}, {device}), got ({t.dtype}, {t.device})")
    per_view = [("means2d", means2d), ("conics", conics)]
    per_view += [] if shared_features else [("features", features)]
    per_view += [] if shared_opacities else [("opacities", opacities)]
    listed = flatten_ids.to(device=device, dtype=torch.int64)
    for name, t in per_view:
        rows = t.reshape(num_cams * num_gs, *t.shape[2:])[listed]
        if validate_values and rows.numel() and not bool(torch.isfinite(rows).all()):
            raise ValueError(f"`{name}` contains NaN or Inf values (at rows that flatten_ids lists)")
        if name == "opacities":
            _check_opacities(rows)
    return num_cams, num_gs


# ------------------------------------------------------------------------------- autograd
class _RasterizeToPixels(torch.autograd.Function):
    """Thin wrapper around the compiled forward/backward (CPU or CUDA), whole images or the
    sampled pixels `pixel_ids` (int64 [P], or None)."""

    @staticmethod
    def forward(ctx, means2d, conics, features, opacities, backgrounds, width, height, tile_size,
                isect_offsets, flatten_ids, num_quantiles, absgrad, kind, pixel_ids=None):
        ext = _backend.load_extension(with_cuda=kind == "cuda")
        sampled = pixel_ids is not None
        fwd = getattr(ext, f"rasterize_pixels_forward_{kind}" if sampled else f"rasterize_forward_{kind}")
        extra = (pixel_ids,) if sampled else ()
        out_feat, out_alpha, last_ids, sel_ids, sel_count = fwd(
            means2d, conics, features, opacities, backgrounds, width, height, tile_size,
            isect_offsets, flatten_ids, num_quantiles, *extra)
        ctx.config = (width, height, tile_size, num_quantiles, absgrad, kind, backgrounds is not None, sampled)
        ctx.save_for_backward(means2d, conics, features, opacities, backgrounds, isect_offsets,
                              flatten_ids, out_feat, out_alpha, last_ids, sel_ids, sel_count,
                              pixel_ids)
        return out_feat, out_alpha

    @staticmethod
    def backward(ctx, grad_feat, grad_alpha):
        width, height, tile_size, num_quantiles, absgrad, kind, has_bg, sampled = ctx.config
        (means2d, conics, features, opacities, backgrounds, isect_offsets, flatten_ids,
         out_feat, out_alpha, last_ids, sel_ids, sel_count, pixel_ids) = ctx.saved_tensors
        ext = _backend.load_extension(with_cuda=kind == "cuda")
        bwd = getattr(ext, f"rasterize_pixels_backward_{kind}" if sampled else f"rasterize_backward_{kind}")
        extra = (pixel_ids,) if sampled else ()
        g_means, g_conics, g_feat, g_opac, g_bg, g_abs = bwd(
            means2d, conics, features, opacities, backgrounds if has_bg else None, width, height,
            tile_size, isect_offsets, flatten_ids, num_quantiles, out_feat, out_alpha, last_ids,
            sel_ids, sel_count, grad_feat.contiguous(), grad_alpha.contiguous(), absgrad, *extra)
        if absgrad:
            ctx.saved_means2d_absgrad = g_abs  # read by the caller through the hook below
        return (g_means, g_conics, g_feat, g_opac, g_bg if has_bg else None,
                None, None, None, None, None, None, None, None, None)


def rasterize_to_pixels(
    means2d: Tensor,
    conics: Tensor,
    features: Tensor,
    opacities: Tensor,
    image_width: int,
    image_height: int,
    tile_size: int,
    isect_offsets: Tensor,
    flatten_ids: Tensor,
    backgrounds: Optional[Tensor] = None,
    num_quantiles: Optional[int] = None,
    backend: str = "auto",
    absgrad: bool = False,
    validate_values: bool = True,
    pixel_ids: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Blend C-channel features of tile-binned projected Gaussians into images.

    Args (gsplat 1.4 shapes): means2d [V,N,2], conics [V,N,3], features [N,C] (shared by the
    cameras) or [V,N,C], opacities [V,N] or [N], isect_offsets int32 [V,th,tw], flatten_ids
    int32 [M] into the flattened V*N Gaussians, backgrounds [V,C]. `num_quantiles=None` is
    dense alpha blending; K selects the K quantile Gaussians per pixel (Q-Render).
    `backend`: "auto" (CPU tensors: "cpu"; CUDA tensors: "triton"), "cpu" (C++/OpenMP),
    "triton" (Triton, CUDA tensors), "cuda" (the hand CUDA kernel), "torch" (the pure-torch
    reference). With `absgrad=True` the backward also stores |dL/dmeans2d| summed
    over pixels in `means2d.absgrad` (compiled backends), as gsplat's densification expects.
    `validate_values=False` skips the NaN/Inf scan of the float inputs (shapes and index
    ranges are always checked): a full pass over `features`, ~0.3 s for 1e6 x 512 on 2 CPU
    cores, which hot loops that guard their losses can skip.
    `pixel_ids` (int [P], flat (camera, y, x) indices into V*H*W, repeats allowed) blends only
    those pixels, forward and backward: the same tiles, pixel centres and quantile selection as
    the whole image, without its [V,H,W,C] map (training losses that read a few pixels).

    Returns (features [V,H,W,C], alphas [V,H,W,1]), or ([P,C], [P,1]) with `pixel_ids`.
    """
    k = check_num_quantiles(num_quantiles)
    num_cams, num_gs = _check_pixel_inputs(means2d, conics, features, opacities, image_width, image_height,
                                           tile_size, isect_offsets, flatten_ids, backgrounds, validate_values)
    device = means2d.device
    if pixel_ids is not None:
        pixel_ids = _check_pixel_ids(pixel_ids, num_cams * image_height * image_width, device)
    kind = _resolve_backend(backend, device)
    if kind == "torch":
        return rasterize_to_pixels_reference(
            means2d, conics, features, opacities, image_width, image_height, tile_size,
            isect_offsets, flatten_ids, backgrounds, num_quantiles, pixel_ids=pixel_ids)

    if opacities.dim() == 1:
        opacities = opacities.expand(num_cams, num_gs)  # cheap: features stay un-expanded
    if kind == "triton":
        from .triton_kernels import rasterize_pixels_triton, rasterize_to_pixels_triton

        if pixel_ids is not None:
            out = rasterize_pixels_triton(means2d, conics, features, opacities, image_width, image_height, tile_size,
                                          isect_offsets, flatten_ids, pixel_ids, backgrounds, k, absgrad)
        else:
            out = rasterize_to_pixels_triton(means2d, conics, features, opacities, image_width, image_height,
                                             tile_size, isect_offsets, flatten_ids, backgrounds, k, absgrad)
        if absgrad and means2d.requires_grad:
            _attach_absgrad(means2d, out[0])
        return out
    args = [t.contiguous() for t in (means2d, conics, features, opacities)]
    bg = backgrounds.contiguous() if backgrounds is not None else None
    out = _RasterizeToPixels.apply(
        *args, bg, image_width, image_height, tile_size, isect_offsets.int().contiguous(),
        flatten_ids.int().contiguous(), k, absgrad, kind, pixel_ids)
    if absgrad and means2d.requires_grad:
        _attach_absgrad(means2d, out[0])
    return out


def _attach_absgrad(means2d: Tensor, output: Tensor) -> None:
    """After backward, copy the kernel's |dL/dmeans2d| onto `means2d.absgrad` (gsplat's field)."""
    node = output.grad_fn

    def hook(*_):
        absgrad = getattr(node, "saved_means2d_absgrad", None)
        if absgrad is not None:
            prev = getattr(means2d, "absgrad", None)
            means2d.absgrad = absgrad if prev is None else prev + absgrad

    node.register_hook(hook)


# ----------------------------------------------------------------------------- query space
@torch.no_grad()
def rasterize_query_scores(
    means2d: Tensor,
    conics: Tensor,
    features: Tensor,
    opacities: Tensor,
    image_width: int,
    image_height: int,
    tile_size: int,
    isect_offsets: Tensor,
    flatten_ids: Tensor,
    queries: Tensor,
    backgrounds: Optional[Tensor] = None,
    num_quantiles: Optional[int] = None,
    backend: str = "auto",
    validate_values: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Cosine scores cos(F(p), t_q) of every pixel's blended feature against queries [Q, C].

    Same inputs and blending as `rasterize_to_pixels` (dense or quantile), but no [V,H,W,C] map
    is made: each pixel blends its rows in a small buffer for |F(p)|, and its scores come from
    the per-Gaussian projections features @ T^T (one [N, Q] matmul; where the blended rows
    cancel, from the buffer instead, so float32 rounding stays that of the full map). Equal to
    `F.normalize(features_map) @ F.normalize(queries).T` (zero features score 0).
    Inference only (no gradients). Returns (scores [V,H,W,Q], alphas [V,H,W,1]).
    """
    k = check_num_quantiles(num_quantiles)
    num_cams, num_gs = _check_pixel_inputs(means2d, conics, features, opacities, image_width, image_height,
                                           tile_size, isect_offsets, flatten_ids, backgrounds, validate_values)
    channels = features.shape[-1]
    _check_tensor("queries", queries, (None, channels), finite=validate_values)
    if queries.shape[0] == 0:
        raise ValueError("`queries` must hold at least one embedding, got Q=0")
    device = means2d.device
    queries = queries.to(device=device, dtype=means2d.dtype)
    kind = _resolve_backend(backend, device)
    if kind == "torch":
        from .reference import rasterize_query_reference

        return rasterize_query_reference(means2d, conics, features, opacities, image_width, image_height,
                                         tile_size, isect_offsets, flatten_ids, queries, backgrounds,
                                         num_quantiles)
    if opacities.dim() == 1:
        opacities = opacities.expand(num_cams, num_gs)
    if kind == "triton":
        from .triton_kernels import query_scores_triton, rasterize_to_pixels_triton

        geometry = [t.detach() for t in (means2d, conics)]
        bg = backgrounds.detach() if backgrounds is not None else None
        scores = query_scores_triton(*geometry, features.detach(), opacities.detach(), image_width, image_height,
                                     tile_size, isect_offsets, flatten_ids, queries, bg, k)
        ones = torch.ones(num_gs, 1, device=device, dtype=means2d.dtype)  # alphas: a 1-channel pass
        _, alphas = rasterize_to_pixels_triton(*geometry, ones, opacities.detach(), image_width, image_height,
                                               tile_size, isect_offsets, flatten_ids, None, k)
        return scores, alphas
    unit = torch.nn.functional.normalize(queries, dim=-1).contiguous()
    ext = _backend.load_extension(with_cuda=kind == "cuda")

    def project(rows):  # [..., C] -> [..., Q + 1]: projections, then the row norm
        if kind == "cpu":  # one pass over the rows (a matmul and a norm read them twice)
            return ext.project_rows_cpu(rows, unit)
        return torch.cat([rows @ unit.T, rows.norm(dim=-1, keepdim=True)], dim=-1).contiguous()

    proj = project(features.detach())
    bg_proj = project(backgrounds.detach()) if backgrounds is not None else None
    args = [t.detach().contiguous() for t in (means2d, conics, features, opacities)]
    bg = backgrounds.detach().contiguous() if backgrounds is not None else None
    scores, alphas = getattr(ext, f"rasterize_query_{kind}")(
        *args, bg, image_width, image_height, tile_size, isect_offsets.int().contiguous(),
        flatten_ids.int().contiguous(), k, unit, proj, bg_proj)
    return scores, alphas


# ------------------------------------------------------------------------------ high level
def release_cpu_maps() -> int:
    """Return the CPU kernel's idle output maps to the OS; returns the bytes released.

    The CPU kernel keeps the pages of freed maps of 32 MiB or more (up to QSPLAT_MAP_CACHE_MB, default
    1024; 0 turns it off) and reuses them for the next map of the same size: first-touch page faults
    cost a 640x480x512 render more than its blend (docs/quantile_rendering.md, "Output pages").
    """
    # the CUDA build carries its own copy of the CPU kernel (and of its pool)
    return sum(int(m.release_recycled_maps()) for m in _backend._MODULES.values() if hasattr(m, "release_recycled_maps"))


def viewmat_from_c2w(camera_to_worlds: Tensor) -> Tensor:
    """World-to-camera [B, 4, 4] (OpenCV axes) of nerfstudio camera-to-worlds [B, 3, 4] (OpenGL axes): splatfacto's
    `get_viewmat` without its `torch.compile`. The viewer interrupts a render by raising from a trace function on
    every Python line; raised while dynamo compiles, it came out as InternalTorchDynamoError, which the viewer's
    render thread does not catch, so the thread died and the page froze on its last image."""
    R = camera_to_worlds[:, :3, :3] * torch.tensor([1.0, -1.0, -1.0], device=camera_to_worlds.device,
                                                   dtype=camera_to_worlds.dtype)
    T = camera_to_worlds[:, :3, 3:4]
    R_inv = R.transpose(1, 2)
    viewmat = torch.zeros(R.shape[0], 4, 4, device=R.device, dtype=R.dtype)
    viewmat[:, :3, :3] = R_inv
    viewmat[:, :3, 3:4] = -torch.bmm(R_inv, T)
    viewmat[:, 3, 3] = 1.0
    return viewmat


def _quat_scale_to_covar(quats: Tensor, scales: Tensor) -> Tensor:
    """wxyz quaternions (normalised here) and linear scales -> world covariances [N,3,3]."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    rot = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(-1, 3, 3)
    m = rot * scales[:, None, :]
    return m @ m.transpose(-1, -2)


def project_gaussians(means, quats, scales, viewmats, Ks, width, height, near_plane=0.01,
                      far_plane=1e10, eps2d=0.3):
    """Perspective EWA projection -> (radii [V,N] int32, means2d [V,N,2], depths, conics [V,N,3]).

    On CUDA: gsplat's fused kernel. Elsewhere: gsplat's pure-torch projection math (`_project_torch`)
    (never gsplat's CUDA wrappers on CPU: they JIT-compile all of gsplat when nvcc is present).
    """
    if means.is_cuda:
        from gsplat.cuda._wrapper import fully_fused_projection

        radii, means2d, depths, conics, _ = fully_fused_projection(
            means, None, quats, scales, viewmats, Ks, width, height, eps2d=eps2d,
            near_plane=near_plane, far_plane=far_plane)
        return radii, means2d, depths, conics
    return project_gaussians_torch(means, quats, scales, viewmats, Ks, width, height, near_plane, far_plane,
                                   eps2d)[:4]


def project_gaussians_torch(means, quats, scales, viewmats, Ks, width, height, near_plane=0.01, far_plane=1e10,
                            eps2d=0.3, calc_compensations=False):
    """project_gaussians in pure torch on any device, plus gsplat's antialiasing `compensations` [V,N]
    (sqrt(det(cov2d) / det(cov2d + eps2d I)); None unless asked): (radii, means2d, depths, conics, compensations)."""
    return _project_torch(means, _quat_scale_to_covar(quats, scales), viewmats, Ks, width, height, near_plane,
                          far_plane, eps2d, calc_compensations)


def _project_torch(means, covars, viewmats, Ks, width, height, near_plane, far_plane, eps2d,
                   calc_compensations=False):
    """gsplat's `_fully_fused_projection` (pinhole), except that Gaussians outside [near, far] are projected
    with depth 1 before being culled (radius 0). gsplat's version divides by the true depth: a Gaussian
    exactly on a camera's plane (depth 0.0 in float32: it happens, ~1 in 4 CPU demo runs) gave inf means2d
    and NaN conics, and 0/0 gradients that turned its parameters into NaN. gsplat's CUDA kernel culls those
    Gaussians before dividing, as this does."""
    from gsplat.cuda._torch_impl import _persp_proj, _world_to_cam

    means_c, covars_c = _world_to_cam(means, covars, viewmats)
    depths = means_c[..., 2]
    in_depth = (depths > near_plane) & (depths < far_plane)
    safe_z = torch.where(in_depth, depths, torch.ones_like(depths))
    means2d, covars2d = _persp_proj(torch.cat([means_c[..., :2], safe_z[..., None]], dim=-1), covars_c, Ks,
                                    width, height)
    det_orig = covars2d[..., 0, 0] * covars2d[..., 1, 1] - covars2d[..., 0, 1] * covars2d[..., 1, 0]
    covars2d = covars2d + torch.eye(2, device=means.device, dtype=means.dtype) * eps2d
    det = (covars2d[..., 0, 0] * covars2d[..., 1, 1] - covars2d[..., 0, 1] * covars2d[..., 1, 0]).clamp(min=1e-10)
    compensations = torch.sqrt(torch.clamp(det_orig / det, min=0.0)) if calc_compensations else None
    conics = torch.stack([covars2d[..., 1, 1] / det, -(covars2d[..., 0, 1] + covars2d[..., 1, 0]) / 2.0 / det,
                          covars2d[..., 0, 0] / det], dim=-1)
    b = (covars2d[..., 0, 0] + covars2d[..., 1, 1]) / 2
    radius = torch.ceil(3.0 * torch.sqrt(b + torch.sqrt(torch.clamp(b ** 2 - det, min=0.01)))).detach()
    inside = ((means2d[..., 0] + radius > 0) & (means2d[..., 0] - radius < width)
              & (means2d[..., 1] + radius > 0) & (means2d[..., 1] - radius < height))
    radius = torch.where(in_depth & (det > 0) & inside, radius, torch.zeros_like(radius))
    return radius.int(), means2d, depths, conics, compensations


def rasterize_features(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    features: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    num_quantiles: Optional[int] = None,
    backend: str = "auto",
    tile_size: int = 16,
    backgrounds: Optional[Tensor] = None,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    absgrad: bool = False,
) -> Tuple[Tensor, Tensor, Dict[str, Any]]:
    """Render C-channel features of 3D Gaussians: projection + tile binning + blending.

    means [N,3], quats [N,4] (wxyz, normalised here), scales [N,3] (linear), opacities [N] in
    [0,1], features [N,C], viewmats [V,4,4] world-to-camera, Ks [V,3,3].
    Returns (features [V,H,W,C], alphas [V,H,W,1], meta); meta holds "backend" (what ran),
    "means2d" (retains grad, for densification), "radii", "depths", "conics",
    "isect_offsets", "flatten_ids", "tile_size", "num_quantiles".
    """
    _check_image(width, height, tile_size)
    check_num_quantiles(num_quantiles)
    _check_tensor("means", means, (None, 3))
    num_gs = means.shape[0]
    _check_tensor("quats", quats, (num_gs, 4))
    _check_tensor("scales", scales, (num_gs, 3))
    _check_tensor("opacities", opacities, (num_gs,))
    _check_tensor("features", features, (num_gs, None))
    _check_tensor("viewmats", viewmats, (None, 4, 4))
    _check_tensor("Ks", Ks, (viewmats.shape[0], 3, 3))
    _check_opacities(opacities)
    if num_gs and bool((scales < 0).any()):
        raise ValueError("`scales` must be non-negative linear scales (apply exp to log-scales first)")
    kind = _resolve_backend(backend, means.device)
    num_cams = viewmats.shape[0]
    radii, means2d, depths, conics = project_gaussians(
        means, quats, scales, viewmats, Ks, width, height, near_plane, far_plane)
    if means2d.requires_grad:
        means2d.retain_grad()
    tiles_w, tiles_h = math.ceil(width / tile_size), math.ceil(height / tile_size)
    tile_keys, flatten_ids = isect_tiles(means2d, radii, depths, tile_size, tiles_w, tiles_h)
    isect_offsets = isect_offset_encode(tile_keys, num_cams, tiles_w, tiles_h)
    out_feat, out_alpha = rasterize_to_pixels(
        means2d, conics, features, opacities, width, height, tile_size, isect_offsets,
        flatten_ids, backgrounds=backgrounds, num_quantiles=num_quantiles, backend=kind,
        absgrad=absgrad)
    meta = dict(backend=kind, means2d=means2d, radii=radii, depths=depths, conics=conics,
                isect_offsets=isect_offsets, flatten_ids=flatten_ids, tile_size=tile_size,
                num_quantiles=num_quantiles, width=width, height=height, n_cameras=num_cams)
    return out_feat, out_alpha, meta
