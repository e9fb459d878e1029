"""Launch code of the Triton rasterizer (kernels.py holds the `@triton.jit` kernels): launch geometry, the
autograd function, input checks, and the three entry points `rasterize.py` calls for `backend="triton"` --
full images, sampled pixels (`pixel_ids`) and query space (`rasterize_query_scores`)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
from torch import Tensor

from qrender_ns.render.triton.kernels import (FP64_DOT, INTERPRET, _bwd_dense, _bwd_quantile, _fwd_dense,
                                              _fwd_quantile_blend, _fwd_quantile_select, _fwd_query)


def _block_c(channels: int, dtype: torch.dtype, narrow: bool = False) -> int:
    """Channels per program: registers on the GPU (32 floats / 16 doubles, as the CUDA kernel; half
    in the backward and dense query kernels, which spill at 32 per the sm_90 resource usage);
    all of them in the interpreter, where each op costs Python overhead, not registers."""
    full = triton.next_power_of_2(channels)
    if INTERPRET:
        return min(full, 1024)
    return min(full, (16 if dtype == torch.float64 else 32) // (2 if narrow else 1))


def _warps(block: int) -> int:
    """One warp per 32 lanes (a 16x16 tile: 8 warps, as gsplat's 256 threads): 4 warps spilled."""
    return max(1, min(8, block // 32))


class _Layout:
    """Launch geometry shared by forward and backward: programs = tiles, or chunks of a
    tile-sorted pixel list (at most BLOCK pixels of one tile each)."""

    def __init__(self, num_cams, width, height, tile_size, isect_offsets, flatten_ids, pixel_ids):
        self.width, self.height, self.tile_size = width, height, tile_size
        self.tiles_h, self.tiles_w = isect_offsets.shape[1:]
        self.block = triton.next_power_of_2(tile_size * tile_size)
        device = isect_offsets.device
        self.offsets = torch.cat([isect_offsets.reshape(-1).int(),
                                  torch.tensor([flatten_ids.numel()], dtype=torch.int32, device=device)])
        self.ids = flatten_ids.int().contiguous()
        self.pixel_list = pixel_ids is not None
        if not self.pixel_list:
            self.rows = num_cams * height * width
            self.programs = num_cams * self.tiles_h * self.tiles_w
            self.out_shape = (num_cams, height, width)
            self.chunks = self.pixels = self.offsets  # unused placeholders
            return
        pix = pixel_ids.reshape(-1).long()
        x, y = pix % width, (pix // width) % height
        tile = (pix // (width * height)) * (self.tiles_h * self.tiles_w) + (y // tile_size) * self.tiles_w + x // tile_size
        self.order = torch.argsort(tile, stable=True)
        self.inverse = torch.argsort(self.order)
        self.out_shape = (pix.numel(),)
        self.pixels = pix[self.order].contiguous()
        sorted_tile = tile[self.order]
        tiles, counts = torch.unique_consecutive(sorted_tile, return_counts=True)
        firsts = torch.cumsum(counts, 0) - counts
        per = (counts + self.block - 1) // self.block  # chunks per tile
        chunk_tile = torch.repeat_interleave(tiles, per)
        chunk_local = torch.arange(int(per.sum()), device=device) - torch.repeat_interleave(torch.cumsum(per, 0) - per, per)
        chunk_first = torch.repeat_interleave(firsts, per) + chunk_local * self.block
        chunk_count = torch.minimum(torch.repeat_interleave(firsts + counts, per) - chunk_first,
                                    torch.full_like(chunk_first, self.block))
        self.chunks = torch.stack([chunk_tile, chunk_first, chunk_count], dim=1).int().contiguous()
        self.rows = pix.numel()
        self.programs = self.chunks.shape[0]

    def geometry(self):
        return (self.width, self.height, self.tile_size, self.tiles_w, self.tiles_h)


def _forward(lay: _Layout, means2d, conics, features, opacities, backgrounds, num_quantiles):
    num_gs, channels = means2d.shape[1], features.shape[-1]
    opts = dict(dtype=means2d.dtype, device=means2d.device)
    out_feat = torch.empty(lay.rows, channels, **opts)
    out_alpha = torch.empty(lay.rows, **opts)
    block_c = _block_c(channels, means2d.dtype)
    grid2 = (lay.programs, triton.cdiv(channels, block_c))
    bg = backgrounds if backgrounds is not None else means2d
    flags = dict(FEAT_PER_CAM=features.dim() == 3, HAS_BG=backgrounds is not None, PIXEL_LIST=lay.pixel_list,
                 BLOCK=lay.block)
    if lay.programs == 0:
        return out_feat, out_alpha, None, None
    if num_quantiles == 0:
        last = torch.empty(lay.rows, dtype=torch.int32, device=means2d.device)
        _fwd_dense[grid2](means2d, conics, opacities, features, bg, lay.offsets, lay.ids, lay.chunks, lay.pixels,
                          out_feat, out_alpha, last, num_gs, channels, *lay.geometry(), BLOCK_C=block_c,
                          num_warps=_warps(lay.block), **flags)
        return out_feat, out_alpha, last, None
    sel = torch.full((lay.rows, num_quantiles), -1, dtype=torch.int32, device=means2d.device)
    count = torch.empty(lay.rows, dtype=torch.int32, device=means2d.device)
    bounds = 1 - torch.arange(1, num_quantiles + 1, **opts) / (num_quantiles + 1)  # as reference.py
    _fwd_quantile_select[(lay.programs,)](
        means2d, conics, opacities, bounds, lay.offsets, lay.ids, lay.chunks, lay.pixels, out_alpha, sel, count,
        num_quantiles, *lay.geometry(), PIXEL_LIST=lay.pixel_list, BLOCK=lay.block, num_warps=_warps(lay.block))
    _fwd_quantile_blend[grid2](means2d, conics, opacities, features, bg, lay.offsets, lay.ids, lay.chunks,
                               lay.pixels, sel, count, out_feat, num_gs, channels, num_quantiles, *lay.geometry(),
                               BLOCK_C=block_c, num_warps=_warps(lay.block), **flags)
    return out_feat, out_alpha, sel, count


class _TritonRasterize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, features, opacities, backgrounds, lay, num_quantiles, absgrad):
        out_feat, out_alpha, sel_or_last, count = _forward(lay, means2d, conics, features, opacities,
                                                           backgrounds, num_quantiles)
        ctx.lay, ctx.num_quantiles, ctx.absgrad = lay, num_quantiles, absgrad
        ctx.has_bg = backgrounds is not None
        ctx.save_for_backward(means2d, conics, features, opacities, backgrounds, out_feat, out_alpha,
                              sel_or_last, count)
        if lay.pixel_list:  # kernel rows are in tile order: back to the caller's order
            out_feat, out_alpha = out_feat[lay.inverse], out_alpha[lay.inverse]
        channels = features.shape[-1]
        return out_feat.reshape(*lay.out_shape, channels), out_alpha.reshape(*lay.out_shape, 1)

    @staticmethod
    def backward(ctx, grad_feat, grad_alpha):
        lay, num_quantiles = ctx.lay, ctx.num_quantiles
        means2d, conics, features, opacities, backgrounds, out_feat, out_alpha, sel_or_last, count = ctx.saved_tensors
        num_gs, channels = means2d.shape[1], features.shape[-1]
        g_means = torch.zeros_like(means2d)
        g_abs = torch.zeros_like(means2d) if ctx.absgrad else g_means
        g_conics = torch.zeros_like(conics)
        g_feat = torch.zeros_like(features)
        g_opac = torch.zeros_like(opacities)
        g_bg = torch.zeros_like(backgrounds) if ctx.has_bg else g_means
        bg = backgrounds if ctx.has_bg else means2d
        grad_feat, grad_alpha = grad_feat.reshape(lay.rows, channels), grad_alpha.reshape(lay.rows)
        if lay.pixel_list:
            grad_feat, grad_alpha = grad_feat[lay.order], grad_alpha[lay.order]
        grad_feat, grad_alpha = grad_feat.contiguous(), grad_alpha.contiguous()
        flags = dict(FEAT_PER_CAM=features.dim() == 3, HAS_BG=ctx.has_bg, ABSGRAD=ctx.absgrad,
                     PIXEL_LIST=lay.pixel_list, BLOCK=lay.block, BLOCK_C=_block_c(channels, means2d.dtype, narrow=True),
                     num_warps=_warps(lay.block))
        grads = (g_means, g_abs, g_conics, g_feat, g_opac, g_bg)
        if lay.programs == 0:
            pass
        elif num_quantiles == 0:
            _bwd_dense[(lay.programs,)](means2d, conics, opacities, features, bg, lay.offsets, lay.ids, lay.chunks,
                                        lay.pixels, out_alpha, sel_or_last, grad_feat, grad_alpha, *grads,
                                        num_gs, channels, *lay.geometry(), **flags)
        else:
            _bwd_quantile[(lay.programs,)](means2d, conics, opacities, features, lay.offsets, lay.ids, lay.chunks,
                                           lay.pixels, out_feat, sel_or_last, count, grad_feat, grad_alpha, *grads,
                                           num_gs, channels, num_quantiles, *lay.geometry(), **flags)
        if ctx.absgrad:
            ctx.saved_means2d_absgrad = g_abs  # read by rasterize._attach_absgrad
        return g_means, g_conics, g_feat, g_opac, g_bg if ctx.has_bg else None, None, None, None


def _check_device(t: Tensor) -> None:
    if t.is_cuda:
        return
    if not INTERPRET:
        raise ValueError(
            "backend='triton' needs CUDA tensors; on the CPU use backend='cpu' (or set TRITON_INTERPRET=1 "
            "before importing q-splat to run the Triton kernels in Triton's interpreter, for testing)")


def rasterize_to_pixels_triton(means2d: Tensor, conics: Tensor, features: Tensor, opacities: Tensor,
                               image_width: int, image_height: int, tile_size: int, isect_offsets: Tensor,
                               flatten_ids: Tensor, backgrounds: Optional[Tensor] = None,
                               num_quantiles: int = 0, absgrad: bool = False) -> Tuple[Tensor, Tensor]:
    """Full images (validated inputs, opacities [V,N]; `num_quantiles` 0 = dense):
    (features [V,H,W,C], alphas [V,H,W,1]). `means2d`'s gradient hook for `absgrad` is the caller's."""
    _check_device(means2d)
    num_cams = means2d.shape[0]
    lay = _Layout(num_cams, image_width, image_height, tile_size, isect_offsets, flatten_ids, None)
    return _TritonRasterize.apply(*_contig(means2d, conics, features, opacities, backgrounds), lay,
                                  num_quantiles, absgrad)


def rasterize_pixels_triton(means2d: Tensor, conics: Tensor, features: Tensor, opacities: Tensor,
                            image_width: int, image_height: int, tile_size: int, isect_offsets: Tensor,
                            flatten_ids: Tensor, pixel_ids: Tensor, backgrounds: Optional[Tensor] = None,
                            num_quantiles: int = 0, absgrad: bool = False) -> Tuple[Tensor, Tensor]:
    """Sampled pixels: `pixel_ids` [P] flat indices into the V*H*W pixels (cam*H*W + y*W + x), in any
    order, repeats allowed. Returns (features [P,C], alphas [P,1]), the rows of the full render.
    Same inputs otherwise as `rasterize_to_pixels_triton`."""
    _check_device(means2d)
    num_cams = means2d.shape[0]
    if pixel_ids.dim() != 1 or pixel_ids.is_floating_point():
        raise ValueError(f"`pixel_ids` must be a 1-D integer tensor, got {pixel_ids.dtype} {list(pixel_ids.shape)}")
    total = num_cams * image_height * image_width
    if pixel_ids.numel() and (int(pixel_ids.min()) < 0 or int(pixel_ids.max()) >= total):
        raise ValueError(f"`pixel_ids` must index the V*H*W = {total} pixels (cam*H*W + y*W + x)")
    lay = _Layout(num_cams, image_width, image_height, tile_size, isect_offsets, flatten_ids,
                  pixel_ids.to(means2d.device))
    return _TritonRasterize.apply(*_contig(means2d, conics, features, opacities, backgrounds), lay,
                                  num_quantiles, absgrad)


def select_pixels_triton(means2d: Tensor, conics: Tensor, ones: Tensor, opacities: Tensor, image_width: int,
                         image_height: int, tile_size: int, isect_offsets: Tensor, flatten_ids: Tensor,
                         pixel_ids: Tensor, num_quantiles: int) -> Tuple[Tensor, Tensor]:
    """The quantile walk only, at sampled pixels (render/rows.py): (isect indices [P, K], -1 padded; counts [P]),
    in the order of `pixel_ids`. `ones`: a [N, 1] feature column (the blend pass it feeds is one channel)."""
    _check_device(means2d)
    lay = _Layout(means2d.shape[0], image_width, image_height, tile_size, isect_offsets, flatten_ids,
                  pixel_ids.to(means2d.device))
    _, _, sel, count = _forward(lay, *_contig(means2d, conics, ones, opacities, None), num_quantiles)
    if sel is None:  # no programs: no pixels
        return (torch.full((pixel_ids.numel(), num_quantiles), -1, dtype=torch.int32, device=means2d.device),
                torch.zeros(pixel_ids.numel(), dtype=torch.int32, device=means2d.device))
    return sel[lay.inverse], count[lay.inverse]


def _contig(means2d, conics, features, opacities, backgrounds):
    return (means2d.contiguous(), conics.contiguous(), features.contiguous(), opacities.contiguous(),
            backgrounds.contiguous() if backgrounds is not None else None)


@torch.no_grad()
def query_scores_triton(means2d: Tensor, conics: Tensor, features: Tensor, opacities: Tensor,
                        image_width: int, image_height: int, tile_size: int, isect_offsets: Tensor,
                        flatten_ids: Tensor, queries: Tensor, backgrounds: Optional[Tensor] = None,
                        num_quantiles: int = 0, pixel_ids: Optional[Tensor] = None) -> Tensor:
    """Query space (forward only): cosine of each pixel's rendered feature F with Q queries [Q, C],
    `F . e_q / (|F| |e_q|)` (0 where F = 0), without writing F. Returns [V, H, W, Q], or [P, Q]
    for `pixel_ids` (as `rasterize_pixels_triton`). Same inputs otherwise as the full render."""
    _check_device(means2d)
    num_cams, channels = means2d.shape[0], features.shape[-1]
    if queries.dim() != 2 or queries.shape[1] != channels:
        raise ValueError(f"`queries` must have shape [Q, {channels}] (C of `features`), got {list(queries.shape)}")
    lay = _Layout(num_cams, image_width, image_height, tile_size, isect_offsets, flatten_ids,
                  None if pixel_ids is None else pixel_ids.to(means2d.device))
    means2d, conics, features, opacities, backgrounds = _contig(means2d, conics, features, opacities, backgrounds)
    unit = torch.nn.functional.normalize(queries.to(means2d.dtype), dim=-1).contiguous()
    num_q = unit.shape[0]
    out = torch.zeros(lay.rows, num_q, dtype=means2d.dtype, device=means2d.device)
    if lay.programs and num_q:
        sel = count = lay.offsets
        if num_quantiles:
            sel = torch.full((lay.rows, num_quantiles), -1, dtype=torch.int32, device=means2d.device)
            count = torch.empty(lay.rows, dtype=torch.int32, device=means2d.device)
            alpha = torch.empty(lay.rows, dtype=means2d.dtype, device=means2d.device)
            bounds = 1 - torch.arange(1, num_quantiles + 1, dtype=means2d.dtype, device=means2d.device) / (
                num_quantiles + 1)
            _fwd_quantile_select[(lay.programs,)](
                means2d, conics, opacities, bounds, lay.offsets, lay.ids, lay.chunks, lay.pixels, alpha, sel, count,
                num_quantiles, *lay.geometry(), PIXEL_LIST=lay.pixel_list, BLOCK=lay.block,
                num_warps=_warps(lay.block))
        block_c = max(16, _block_c(channels, means2d.dtype, narrow=not num_quantiles))
        # tl.dot needs all dims >= 16; the broadcast fallback is for tiny tiles (and float64 before Triton 3.5)
        use_dot = lay.block >= 16 and (FP64_DOT or means2d.dtype != torch.float64)
        _fwd_query[(lay.programs,)](
            means2d, conics, opacities, features, backgrounds if backgrounds is not None else means2d, lay.offsets,
            lay.ids, lay.chunks, lay.pixels, sel, count, unit, out, means2d.shape[1], channels, num_quantiles, num_q,
            *lay.geometry(), FEAT_PER_CAM=features.dim() == 3, HAS_BG=backgrounds is not None,
            PIXEL_LIST=lay.pixel_list, QUANTILE=num_quantiles > 0, USE_DOT=use_dot, BLOCK=lay.block,
            BLOCK_C=block_c, BLOCK_Q=max(16, triton.next_power_of_2(num_q)), num_warps=_warps(lay.block))
    if lay.pixel_list:
        out = out[lay.inverse]
    return out.reshape(*lay.out_shape, num_q)
