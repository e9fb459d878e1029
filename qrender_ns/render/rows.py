"""Row-sparse feature rendering (issue 27): a sampled-pixel render whose feature work and gradient follow the
touched rows of the feature table, not its size; and whole-image renders from a gathered row subset.

Quantile mode blends at most K Gaussians per pixel, and with the geometry fixed the output is linear in their
features: F(p) = sum_j w_pj f_j / A_p (docs/quantile_rendering.md). So a sampled-pixel render is

1. the selection: the compiled kernel's own walk (C++/CUDA/Triton; the torch oracle for backend "torch") picks
   the <= K Gaussians of every sampled pixel, exactly those of the full render;
2. the weights w_pj / A_p of the selected ones, recomputed here in torch from the geometry with the kernels'
   formulas (differentiable in means2d / conics / opacities, so a non-detached geometry gets its gradient by
   autograd, clamped alphas passing none, as in the kernels);
3. the blend of the touched rows R = unique(selected), read from the table (any float dtype, upcast to the
   geometry's dtype: fp32 accumulation of a half-precision table): F = W @ rows. On the CPU with a float32 geometry
   the blend and its backward are one C++ pass each (`_BlendRowsCpu`: the rows are read in the table's dtype, no
   [R, C] float32 copy of them or of their gradient); elsewhere the rows are gathered and upcast (`gather_rows`)
   and blended by an embedding bag.

The gradient of the table is a sparse COO tensor with the R touched rows (coalesced, in the table's dtype):
nothing of size [N, C] is written in a step. Values and gradients equal the dense path's
(tests/test_sparse_features.py).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from qrender_ns.render import _backend
from qrender_ns.render.reference import ALPHA_MAX, _tile_lists, list_alphas, quantile_picks


class _GatherRows(torch.autograd.Function):
    """table[rows] upcast to `dtype`; the table's gradient is row-sparse (COO with the `rows` ids, coalesced)."""

    @staticmethod
    def forward(ctx, table, rows, dtype):
        ctx.shape, ctx.table_dtype = table.shape, table.dtype
        ctx.save_for_backward(rows)
        return table[rows].to(dtype)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        sparse = torch.sparse_coo_tensor(rows[None], grad.to(ctx.table_dtype), ctx.shape, is_coalesced=True,
                                         check_invariants=False)
        return sparse, None, None


class _BlendRowsCpu(torch.autograd.Function):
    """out [P, C] float32 = sum_k weights[p, k] table[touched[slot[p, k]]] (slot -1: no pick), fused in C++
    (cuda_ext/csrc/cpu/row_blend_cpu.cpp): the rows are read in the table's dtype, so neither the touched rows
    nor their gradient exist as [R, C] float32 copies. The table's gradient is row-sparse as gather_rows'."""

    @staticmethod
    def forward(ctx, table, touched, slot, weights):
        ext = _backend.load_extension(with_cuda=False)
        ctx.save_for_backward(table, touched, slot, weights)
        return ext.row_blend_forward_cpu(table.detach(), touched, slot, weights.detach())

    @staticmethod
    def backward(ctx, grad):
        table, touched, slot, weights = ctx.saved_tensors
        ext = _backend.load_extension(with_cuda=False)
        grad_rows, grad_w = ext.row_blend_backward_cpu(table.detach(), touched, slot, weights.detach(),
                                                       grad.contiguous(), ctx.needs_input_grad[3])
        sparse = None
        if ctx.needs_input_grad[0]:
            sparse = torch.sparse_coo_tensor(touched[None], grad_rows, table.shape, is_coalesced=True,
                                             check_invariants=False)
        return sparse, None, None, grad_w if ctx.needs_input_grad[3] else None


def _fused_blend_applies(table, dtype: torch.dtype) -> bool:
    """The C++ blend serves float32 accumulation of a CPU table stored in float32 / bfloat16 / float16."""
    return (isinstance(table, Tensor) and table.device.type == "cpu" and dtype == torch.float32 and table.dim() == 2
            and table.dtype in (torch.float32, torch.bfloat16, torch.float16) and table.is_contiguous())


def gather_rows(table: Tensor, rows: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """table[rows] as `dtype` (default the table's); differentiable, with a row-sparse table gradient.
    `rows` must be unique and sorted (the gradient is marked coalesced)."""
    return _GatherRows.apply(table, rows, dtype or table.dtype)


def _selection_reference(means2d, conics, opacities, width, height, tile_size, isect_offsets, flatten_ids,
                         pixel_ids, num_quantiles) -> Tensor:
    """The oracle's quantile walk at the sampled pixels: flat Gaussian ids [P, K] (V*N space), -1 padded."""
    num_cams, num_gs = means2d.shape[:2]
    tiles_h, tiles_w = isect_offsets.shape[1:]
    lists = _tile_lists(isect_offsets, flatten_ids)
    cams = pixel_ids // (height * width)
    ys = (pixel_ids % (height * width)) // width
    xs = pixel_ids % width
    ids = lists[(cams * tiles_h + ys // tile_size) * tiles_w + xs // tile_size]
    flat_means, flat_conics = means2d.reshape(-1, 2), conics.reshape(-1, 3)
    flat_opac = opacities.reshape(-1) if opacities.dim() == 2 else opacities.repeat(num_cams)
    _, keep, trans_incl, trans_excl = list_alphas(flat_means, flat_conics, flat_opac, ids,
                                                  (xs[:, None] + 0.5).to(means2d.dtype),
                                                  (ys[:, None] + 0.5).to(means2d.dtype))
    selected = quantile_picks(keep, trans_incl, trans_excl, num_quantiles)
    order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True)[:, :num_quantiles]  # selected first
    picked = torch.gather(ids, 1, order)
    chosen = torch.gather(selected, 1, order)
    out = torch.where(chosen, picked, torch.full_like(picked, -1))
    if out.shape[1] < num_quantiles:
        out = torch.cat([out, out.new_full((out.shape[0], num_quantiles - out.shape[1]), -1)], dim=1)
    return out


@torch.no_grad()
def select_pixels(means2d: Tensor, conics: Tensor, opacities: Tensor, width: int, height: int, tile_size: int,
                  isect_offsets: Tensor, flatten_ids: Tensor, pixel_ids: Tensor, num_quantiles: int,
                  kind: str) -> Tensor:
    """The quantile Gaussians of every sampled pixel, front to back: flat ids [P, K] into the V*N Gaussians,
    -1 where a pixel selected fewer than K. `kind`: the resolved backend ("cpu", "cuda", "triton", "torch");
    the compiled kernels run their own walk (a 1-channel forward), so the pick is theirs exactly."""
    num_cams, num_gs = means2d.shape[:2]
    if opacities.dim() == 1:
        opacities = opacities.expand(num_cams, num_gs)
    means2d, conics, opacities = (t.detach().contiguous() for t in (means2d, conics, opacities))
    if kind == "torch":
        return _selection_reference(means2d, conics, opacities, width, height, tile_size, isect_offsets,
                                    flatten_ids, pixel_ids, num_quantiles)
    ones = _ones(num_gs, means2d.dtype, means2d.device)
    ids = flatten_ids.int().contiguous()
    # tile-major order: the samples of one tile walk the same list one after the other, so its entries are read
    # from the [N] geometry once and then from the cache; without it every sample pays the random reads of its own
    # walk, whose length grows with the tile lists (with N). The CPU kernel groups the samples of a tile itself
    # (they walk together as SIMD lanes).
    order = None if kind == "cpu" else tile_major_order(pixel_ids, width, height, tile_size)
    walked = pixel_ids if order is None else pixel_ids[order]
    if kind == "triton":
        from qrender_ns.render.triton.launch import select_pixels_triton

        sel, count = select_pixels_triton(means2d, conics, ones, opacities, width, height, tile_size,
                                          isect_offsets, ids, walked, num_quantiles)
    else:
        ext = _backend.load_extension(with_cuda=kind == "cuda")
        _, _, _, sel, count = getattr(ext, f"rasterize_pixels_forward_{kind}")(
            means2d, conics, ones, opacities, None, width, height, tile_size, isect_offsets.int().contiguous(), ids,
            num_quantiles, walked)
    slots = torch.arange(num_quantiles, device=sel.device)
    valid = slots[None] < count.long()[:, None]
    gid = ids[torch.where(valid, sel.long(), torch.zeros_like(sel, dtype=torch.long))].long()  # [P, K] reads only
    gid = torch.where(valid, gid, torch.full_like(gid, -1))
    if order is None:
        return gid
    out = torch.empty_like(gid)
    out[order] = gid
    return out


_ONES: dict = {}


def _ones(num_gs: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A [N, 1] column of ones (the selection walk's 1-channel features), kept between steps of the same N."""
    key = (num_gs, dtype, str(device))
    if key not in _ONES:
        _ONES.clear()
        _ONES[key] = torch.ones(num_gs, 1, dtype=dtype, device=device)
    return _ONES[key]


def tile_major_order(pixel_ids: Tensor, width: int, height: int, tile_size: int) -> Tensor:
    """A permutation of the samples that groups them by (camera, tile), row-major inside a tile: [P] int64."""
    hw = height * width
    cams, ys, xs = pixel_ids // hw, (pixel_ids % hw) // width, pixel_ids % width
    tiles_w = -(-width // tile_size)
    tiles_h = -(-height // tile_size)
    tile = (cams * tiles_h + ys // tile_size) * tiles_w + xs // tile_size
    key = (tile * tile_size + ys % tile_size) * tile_size + xs % tile_size
    return torch.argsort(key, stable=True)


def pixel_weights(means2d: Tensor, conics: Tensor, opacities: Tensor, width: int, height: int, pixel_ids: Tensor,
                  gid: Tensor) -> Tuple[Tensor, Tensor]:
    """Blending weights of the selected Gaussians `gid` [P, K] (-1 padded) at the sampled pixels, normalised by
    their accumulated opacity: (w / A [P, K], A [P], 0 where nothing was selected). Differentiable in the
    geometry, with the kernels' formulas (docs/quantile_rendering.md, "Quantile mode")."""
    num_cams, num_gs = means2d.shape[:2]
    valid = gid >= 0
    safe = gid.clamp(min=0)
    ys = (pixel_ids % (height * width)) // width
    xs = pixel_ids % width
    flat_means, flat_conics = means2d.reshape(-1, 2), conics.reshape(-1, 3)
    flat_opac = opacities.reshape(-1) if opacities.dim() == 2 else opacities.repeat(num_cams)
    mean, conic = flat_means[safe], flat_conics[safe]
    dx = mean[..., 0] - (xs[:, None] + 0.5).to(means2d.dtype)
    dy = mean[..., 1] - (ys[:, None] + 0.5).to(means2d.dtype)
    sigma = 0.5 * (conic[..., 0] * dx * dx + conic[..., 2] * dy * dy) + conic[..., 1] * dx * dy
    alpha = torch.clamp(flat_opac[safe] * torch.exp(-sigma), max=ALPHA_MAX)
    alpha = torch.where(valid, alpha, torch.zeros_like(alpha))
    trans = torch.cumprod(1 - alpha, dim=-1)
    trans_excl = torch.cat([torch.ones_like(trans[:, :1]), trans[:, :-1]], dim=-1)
    norm = 1 - trans[:, -1]
    any_sel = valid[:, 0]
    safe_norm = torch.where(any_sel, norm, torch.ones_like(norm))
    weights = trans_excl * alpha / safe_norm[:, None]
    return weights, torch.where(any_sel, norm, torch.zeros_like(norm))


def blend_selected(features: Union[Tensor, Callable[[Tensor], Tensor]], gid: Tensor, weights: Tensor, num_gs: int,
                   dtype: torch.dtype, kind: str) -> Tensor:
    """F [P, C] (in `dtype`) = sum_k weights[p, k] features[gid[p, k] % num_gs] over the selected Gaussians `gid`
    [P, K] (-1 padded): the touched rows R = unique(selected) are read once (the fused C++ blend on the CPU, else
    gathered, upcast and blended by an embedding bag); the table's gradient is row-sparse over R."""
    valid = gid >= 0
    rows = torch.where(valid, gid % num_gs, torch.zeros_like(gid))
    touched, inverse = torch.unique(rows[valid], sorted=True, return_inverse=True)
    if touched.numel() == 0:
        channels = features(touched).shape[-1] if callable(features) else features.shape[-1]
        return weights.new_zeros(gid.shape[0], channels, dtype=dtype)
    if kind == "cpu" and not callable(features) and _fused_blend_applies(features, dtype):
        slot = torch.full_like(rows, -1)
        slot[valid] = inverse
        return _BlendRowsCpu.apply(features, touched, slot, weights.to(dtype).contiguous())
    slot = torch.zeros_like(rows)
    slot[valid] = inverse
    if callable(features):  # features computed for the touched rows only (GS-Net's head)
        table = features(touched).to(dtype)
    else:
        table = gather_rows(features, touched, dtype)  # [R, C]: fp32 accumulation of any table
    return F.embedding_bag(slot, table, per_sample_weights=weights.to(table.dtype), mode="sum")


def rasterize_pixels_sparse(means2d: Tensor, conics: Tensor, features: Union[Tensor, Callable[[Tensor], Tensor]], opacities: Tensor, width: int,
                            height: int, tile_size: int, isect_offsets: Tensor, flatten_ids: Tensor,
                            pixel_ids: Tensor, backgrounds: Optional[Tensor], num_quantiles: int,
                            kind: str) -> Tuple[Tensor, Tensor]:
    """rasterize_to_pixels(..., pixel_ids, sparse_grad=True) after validation: ([P, C], [P, 1]) in the geometry's
    dtype; the gradient of `features` [N, C] (shared by the cameras) is row-sparse. `features` may also be a
    callable rows [R] -> [R, C] (rasterize_pixels_of_rows: the features of the selected rows only, computed on
    demand, e.g. by GS-Net's head; gradients flow through it)."""
    num_gs = means2d.shape[1]
    gid = select_pixels(means2d, conics, opacities, width, height, tile_size, isect_offsets, flatten_ids,
                        pixel_ids, num_quantiles, kind)
    weights, norm = pixel_weights(means2d, conics, opacities, width, height, pixel_ids, gid)
    out = blend_selected(features, gid, weights, num_gs, means2d.dtype, kind)
    valid = gid >= 0
    empty = ~valid[:, 0]
    if backgrounds is not None:
        cams = pixel_ids // (height * width)
        out = torch.where(empty[:, None], backgrounds[cams].to(out.dtype), out)
    return out, norm[:, None]


def compact_view(means2d: Tensor, conics: Tensor, opacities: Tensor, flatten_ids: Tensor
                 ) -> Tuple[Tensor, Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The Gaussians a view's tile lists reference, renamed 0..R-1: (rows [R] into the N Gaussians, (means2d,
    conics, opacities, flatten_ids) of the compact view). Rendering the compact view with `table[rows]` equals
    rendering the whole view with the whole table (same lists, same order): a row gather instead of [N, C]
    copies (a masked or upcast table) for eval and viewer renders. One camera (flatten_ids < N)."""
    if means2d.shape[0] != 1:
        raise ValueError("compact_view renders one camera at a time")
    rows, renamed = torch.unique(flatten_ids.long(), sorted=True, return_inverse=True)
    opac = opacities if opacities.dim() == 2 else opacities[None]
    return rows, (means2d[:, rows], conics[:, rows], opac[:, rows], renamed.int())
