"""Public rasterization API: gsplat-1.4-shaped, dense or quantile blending, CPU/CUDA/torch.

`rasterize_to_pixels` mirrors `gsplat.rasterize_to_pixels` (+ `num_quantiles`);
`rasterize_features` mirrors `gsplat.rasterization` for arbitrary C-channel features.
Semantics of both modes: docs/quantile_rendering.md.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from qrender_ns.render import _backend
from qrender_ns.render.autograd import _attach_absgrad, _RasterizeToPixels
from qrender_ns.render.projection import project_and_bin
from qrender_ns.render.reference import rasterize_query_reference, rasterize_to_pixels_reference
from qrender_ns.render.rows import rasterize_pixels_sparse
from qrender_ns.render.validate import (_check_image, _check_opacities, _check_pixel_ids, _check_pixel_inputs,
                                        _check_tensor, _resolve_backend, check_num_quantiles)


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
    sparse_grad: bool = False,
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
    `validate_values=False` skips the value scans (NaN/Inf of the float inputs, opacities in
    [0, 1]; shapes and index ranges are always checked): a full pass over `features`, ~0.3 s
    for 1e6 x 512 on 2 CPU cores, and gathers over the intersections, which hot loops that
    guard their losses can skip.
    `pixel_ids` (int [P], flat (camera, y, x) indices into V*H*W, repeats allowed) blends only
    those pixels, forward and backward: the same tiles, pixel centres and quantile selection as
    the whole image, without its [V,H,W,C] map (training losses that read a few pixels).
    `sparse_grad=True` (with `pixel_ids`, quantile mode, features [N,C]; as gsplat's `sparse_grad`): the gradient
    of `features` is a sparse COO tensor holding only the rows the pixels selected (at most P*K), and `features`
    may be stored in any float dtype (bfloat16/float16 rows are upcast as they are gathered, so the blend
    accumulates in the geometry's dtype); the kernel does the selection, the blend of the <= K rows per pixel
    is an embedding bag (qrender_ns/render/rows.py). Same values and gradients as the dense path.

    Returns (features [V,H,W,C], alphas [V,H,W,1]), or ([P,C], [P,1]) with `pixel_ids`.
    """
    k = check_num_quantiles(num_quantiles)
    num_cams, num_gs = _check_pixel_inputs(means2d, conics, features, opacities, image_width, image_height,
                                           tile_size, isect_offsets, flatten_ids, backgrounds, validate_values,
                                           half_features=sparse_grad)
    device = means2d.device
    if pixel_ids is not None:
        pixel_ids = _check_pixel_ids(pixel_ids, num_cams * image_height * image_width, device)
    kind = _resolve_backend(backend, device)
    if sparse_grad:
        if pixel_ids is None or k == 0 or features.dim() != 2:
            raise ValueError("sparse_grad=True needs pixel_ids, num_quantiles (quantile mode) and features [N, C] "
                             "shared by the cameras")
        if absgrad:
            raise ValueError("sparse_grad=True does not compute absgrad (the model's feature loss never asks it)")
        return rasterize_pixels_sparse(means2d, conics, features, opacities, image_width, image_height, tile_size,
                                       isect_offsets, flatten_ids, pixel_ids, backgrounds, k, kind)
    if kind == "torch":
        return rasterize_to_pixels_reference(
            means2d, conics, features, opacities, image_width, image_height, tile_size,
            isect_offsets, flatten_ids, backgrounds, num_quantiles, pixel_ids=pixel_ids)

    if opacities.dim() == 1:
        opacities = opacities.expand(num_cams, num_gs)  # cheap: features stay un-expanded
    if kind == "triton":
        from qrender_ns.render.triton.launch import rasterize_pixels_triton, rasterize_to_pixels_triton

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


def rasterize_pixels_of_rows(
    means2d: Tensor,
    conics: Tensor,
    features_of: Callable[[Tensor], Tensor],
    opacities: Tensor,
    image_width: int,
    image_height: int,
    tile_size: int,
    isect_offsets: Tensor,
    flatten_ids: Tensor,
    pixel_ids: Tensor,
    num_quantiles: int,
    backgrounds: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """rasterize_to_pixels(..., pixel_ids, sparse_grad=True) for features that are computed, not stored: the
    kernel selects the <= K Gaussians of every sampled pixel, `features_of(rows)` (rows: sorted unique int64 [R]
    into the N Gaussians) returns their [R, C] features, and the pixels blend them. A feature head that predicts
    (GS-Net) then runs its per-Gaussian part for the R rows the step reads, not for all N (issue 27). Gradients
    flow through `features_of`'s output. Returns ([P, C], [P, 1]). Values/index checks as validate_values=False."""
    k = check_num_quantiles(num_quantiles)
    if k == 0:
        raise ValueError("rasterize_pixels_of_rows needs num_quantiles (quantile mode)")
    num_gs = means2d.shape[1] if isinstance(means2d, Tensor) and means2d.dim() == 3 else 0
    stand_in = means2d.new_zeros(1, 1).expand(num_gs, 1) if num_gs else means2d
    num_cams, _ = _check_pixel_inputs(means2d, conics, stand_in, opacities, image_width, image_height, tile_size,
                                      isect_offsets, flatten_ids, None, False)
    pixel_ids = _check_pixel_ids(pixel_ids, num_cams * image_height * image_width, means2d.device)
    kind = _resolve_backend(backend, means2d.device)
    return rasterize_pixels_sparse(means2d, conics, features_of, opacities, image_width, image_height, tile_size,
                                   isect_offsets, flatten_ids, pixel_ids, backgrounds, k, kind)


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
        return rasterize_query_reference(means2d, conics, features, opacities, image_width, image_height,
                                         tile_size, isect_offsets, flatten_ids, queries, backgrounds,
                                         num_quantiles)
    if opacities.dim() == 1:
        opacities = opacities.expand(num_cams, num_gs)
    if kind == "triton":
        from qrender_ns.render.triton.launch import query_scores_triton, rasterize_to_pixels_triton

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
    radii, means2d, depths, conics, _, isect_offsets, flatten_ids = project_and_bin(
        means, quats, scales, viewmats, Ks, width, height, tile_size, near_plane, far_plane)
    if means2d.requires_grad:
        means2d.retain_grad()
    out_feat, out_alpha = rasterize_to_pixels(
        means2d, conics, features, opacities, width, height, tile_size, isect_offsets,
        flatten_ids, backgrounds=backgrounds, num_quantiles=num_quantiles, backend=kind,
        absgrad=absgrad)
    meta = dict(backend=kind, means2d=means2d, radii=radii, depths=depths, conics=conics,
                isect_offsets=isect_offsets, flatten_ids=flatten_ids, tile_size=tile_size,
                num_quantiles=num_quantiles, width=width, height=height, n_cameras=num_cams)
    return out_feat, out_alpha, meta
