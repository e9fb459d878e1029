"""Triton rasterizer: dense and quantile feature blending, forward and backward.

One program per (camera, tile) -- or per chunk of sampled pixels inside one tile -- whose lanes
are that tile's pixels; each program walks the tile's depth-sorted Gaussian list with per-pixel
state (transmittance, quantile level, selected count). Semantics: docs/quantile_rendering.md
(the oracle is `reference.py`). Kernels:

- `_fwd_dense`: walk + blend, grid (programs, channel blocks).
- `_fwd_quantile_select`: the scalar walk only, storing the <= K selected isect indices per pixel.
- `_fwd_quantile_blend`: reads only those K feature rows per pixel, grid (programs, channel blocks).
- `_bwd_dense` / `_bwd_quantile`: back to front with the running scalar `sum_{l>j} w_l (f_l . g)`;
  dense gradients are reduced over the tile's pixels before one atomic per Gaussian.

Compiled (JIT) for CUDA tensors on any NVIDIA GPU; with `TRITON_INTERPRET=1` set before this
module is imported, the same kernels run on CPU tensors in Triton's numpy interpreter (CI).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from ..compat import version_tuple

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# tl.dot on float64 compiles from Triton 3.5 on (3.4 rejects it: "Unsupported lhs dtype fp64"); older
# Tritons take the broadcast-and-sum fallback for float64 queries. MIN_TRITON (compat.py) is 3.4.
FP64_DOT = version_tuple(triton.__version__) >= (3, 5, 0)

# float32-rounded, as reference.py and the C++/CUDA kernels' `constexpr float` constants
ALPHA_MAX = tl.constexpr(float(np.float32(0.999)))
ALPHA_MIN = tl.constexpr(float(np.float32(1.0) / np.float32(255.0)))
T_EPS = tl.constexpr(float(np.float32(1e-4)))
# Stop a walk once every lane is done: a block reduction per step, cheap compiled, but half the
# interpreter's time; it never changes a result (compiled GPU runs of the same tests take it).
EARLY_EXIT = tl.constexpr(not INTERPRET)


# Image/list sizes change per call: no recompile for each value (Triton specialises ints equal to
# 1 or divisible by 16 by default). C stays specialised: 512 % 16 == 0 gives vector loads.
_SIZES = ["num_gs", "K", "W", "H", "TS", "tiles_w", "tiles_h"]


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _lanes(prog, offsets_ptr, chunk_ptr, pix_ptr, W, H, TS, tiles_w, tiles_h,
           PIXEL_LIST: tl.constexpr, BLOCK: tl.constexpr):
    """Lanes of one program: (tile, output row, x, y, valid, camera, list start, list end).

    Full images: program = tile, lane = pixel of the tile, row = flat (cam, y, x).
    Pixel list: program = chunk (tile, first, count) of the tile-sorted list `pix_ptr` of flat
    pixels; row = position in that list."""
    lane = tl.arange(0, BLOCK)
    if PIXEL_LIST:
        tile = tl.load(chunk_ptr + 3 * prog)
        first = tl.load(chunk_ptr + 3 * prog + 1)
        count = tl.load(chunk_ptr + 3 * prog + 2)
        valid = lane < count
        row = (first + lane).to(tl.int64)
        pix = tl.load(pix_ptr + row, mask=valid, other=0).to(tl.int64)
        x = pix % W
        y = (pix // W) % H
    else:
        tile = prog
        tx = tile % tiles_w
        ty = (tile // tiles_w) % tiles_h
        x = tx * TS + lane % TS
        y = ty * TS + lane // TS
        valid = (lane < TS * TS) & (x < W) & (y < H)
        row = ((tile // (tiles_w * tiles_h)).to(tl.int64) * H + y) * W + x
    cam = tile // (tiles_w * tiles_h)
    start = tl.load(offsets_ptr + tile)
    end = tl.load(offsets_ptr + tile + 1)
    return tile, row, x, y, valid, cam, start, end


@triton.jit
def _alpha(means_ptr, conics_ptr, opac_ptr, g, px, py):
    """alpha of Gaussian(s) `g` (flat V*N id, scalar or per lane) at the pixel centres."""
    g2 = g.to(tl.int64)
    mx = tl.load(means_ptr + 2 * g2)
    my = tl.load(means_ptr + 2 * g2 + 1)
    ca = tl.load(conics_ptr + 3 * g2)
    cb = tl.load(conics_ptr + 3 * g2 + 1)
    cc = tl.load(conics_ptr + 3 * g2 + 2)
    op = tl.load(opac_ptr + g2)
    dx = mx - px
    dy = my - py
    sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
    vis = tl.exp(-sigma)
    raw = op * vis
    alpha = tl.minimum(raw, ALPHA_MAX)
    used = (sigma >= 0) & (alpha >= ALPHA_MIN)
    return alpha, used, vis, raw > ALPHA_MAX, dx, dy, ca, cb, cc, op


@triton.jit
def _alpha_grads(v_alpha, vis, clamped, dx, dy, ca, cb, cc, op):
    """dL/dalpha -> dL/d(mean x, mean y, conic a, b, c, opacity); clamped alpha: no gradient."""
    v_alpha = tl.where(clamped, 0.0, v_alpha)
    v_sigma = -op * vis * v_alpha
    v_mx = v_sigma * (ca * dx + cb * dy)
    v_my = v_sigma * (cb * dx + cc * dy)
    return v_mx, v_my, 0.5 * v_sigma * dx * dx, v_sigma * dx * dy, 0.5 * v_sigma * dy * dy, vis * v_alpha


@triton.jit
def _feature_row(g, num_gs, FEAT_PER_CAM: tl.constexpr):
    g2 = g.to(tl.int64)
    if FEAT_PER_CAM:
        return g2
    else:
        return g2 % num_gs


# ----------------------------------------------------------------------------- forward
@triton.jit
def _dense_block(means_ptr, conics_ptr, opac_ptr, feat_ptr, ids_ptr, start, end, px, py, valid, chan, cmask,
                 num_gs, C, FEAT_PER_CAM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """Dense blend of one channel block: (F without background, T_final, last isect used)."""
    dtype = means_ptr.dtype.element_ty
    trans = tl.full([BLOCK], 1.0, dtype)
    done = ~valid
    last = tl.full([BLOCK], -1, tl.int32) + start
    acc = tl.zeros([BLOCK, BLOCK_C], dtype)
    i = start
    while (i < end) & (not EARLY_EXIT or (tl.max(tl.where(done, 0, 1)) > 0)):
        g = tl.load(ids_ptr + i)
        alpha, used, vis, clamped, dx, dy, ca, cb, cc, op = _alpha(means_ptr, conics_ptr, opac_ptr, g, px, py)
        active = (~done) & used
        next_trans = trans * (1 - alpha)
        stop = active & (next_trans <= T_EPS)  # gsplat's early stop, without using Gaussian i
        done = done | stop
        take = active & ~stop
        w = tl.where(take, alpha * trans, 0.0)
        f = tl.load(feat_ptr + _feature_row(g, num_gs, FEAT_PER_CAM) * C + chan, mask=cmask, other=0.0)
        acc += w[:, None] * f[None, :]
        trans = tl.where(take, next_trans, trans)
        last = tl.where(take, i, last)
        i += 1
    return acc, trans, last


@triton.jit(do_not_specialize=_SIZES)
def _fwd_dense(means_ptr, conics_ptr, opac_ptr, feat_ptr, bg_ptr, offsets_ptr, ids_ptr,
               chunk_ptr, pix_ptr, out_feat_ptr, out_alpha_ptr, last_ptr,
               num_gs, C, W, H, TS, tiles_w, tiles_h,
               FEAT_PER_CAM: tl.constexpr, HAS_BG: tl.constexpr, PIXEL_LIST: tl.constexpr,
               BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    prog = tl.program_id(0)
    cblk = tl.program_id(1)
    tile, row, x, y, valid, cam, start, end = _lanes(
        prog, offsets_ptr, chunk_ptr, pix_ptr, W, H, TS, tiles_w, tiles_h, PIXEL_LIST, BLOCK)
    dtype = means_ptr.dtype.element_ty
    px = x.to(dtype) + 0.5
    py = y.to(dtype) + 0.5
    chan = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = chan < C
    acc, trans, last = _dense_block(means_ptr, conics_ptr, opac_ptr, feat_ptr, ids_ptr, start, end, px, py, valid,
                                    chan, cmask, num_gs, C, FEAT_PER_CAM, BLOCK, BLOCK_C)
    if HAS_BG:
        bg = tl.load(bg_ptr + cam.to(tl.int64) * C + chan, mask=cmask, other=0.0)
        acc += trans[:, None] * bg[None, :]
    omask = valid[:, None] & cmask[None, :]
    tl.store(out_feat_ptr + row[:, None] * C + chan[None, :], acc, mask=omask)
    if cblk == 0:  # (a scalar branch: Triton 3.9's interpreter rejects `valid & (cblk == 0)` as a mask)
        tl.store(out_alpha_ptr + row, 1 - trans, mask=valid)
        tl.store(last_ptr + row, last, mask=valid)


@triton.jit(do_not_specialize=_SIZES)
def _fwd_quantile_select(means_ptr, conics_ptr, opac_ptr, bounds_ptr, offsets_ptr, ids_ptr,
                         chunk_ptr, pix_ptr, out_alpha_ptr, sel_ptr, count_ptr,
                         K, W, H, TS, tiles_w, tiles_h,
                         PIXEL_LIST: tl.constexpr, BLOCK: tl.constexpr):
    """Walk the tile's list with the full-ray T; store the quantile Gaussians (isect indices)."""
    prog = tl.program_id(0)
    tile, row, x, y, valid, cam, start, end = _lanes(
        prog, offsets_ptr, chunk_ptr, pix_ptr, W, H, TS, tiles_w, tiles_h, PIXEL_LIST, BLOCK)
    dtype = means_ptr.dtype.element_ty
    px = x.to(dtype) + 0.5
    py = y.to(dtype) + 0.5
    trans = tl.full([BLOCK], 1.0, dtype)
    trans_q = tl.full([BLOCK], 1.0, dtype)
    crossed = tl.zeros([BLOCK], tl.int32)  # boundaries b_1..b_crossed lie above T
    count = tl.zeros([BLOCK], tl.int32)
    done = ~valid
    i = start
    while (i < end) & (not EARLY_EXIT or (tl.max(tl.where(done, 0, 1)) > 0)):
        g = tl.load(ids_ptr + i)
        alpha, used, vis, clamped, dx, dy, ca, cb, cc, op = _alpha(means_ptr, conics_ptr, opac_ptr, g, px, py)
        active = (~done) & used
        next_trans = trans * (1 - alpha)
        # levels = #{k : next_trans < b_k}, b_k = bounds[k-1] (the reference's own values): an
        # estimate from 1 - T, then one exact correction each way.
        est = tl.minimum(tl.maximum(((1 - next_trans) * (K + 1)).to(tl.int32), 0), K)
        b_above = tl.load(bounds_ptr + est, mask=active & (est < K), other=-1.0)
        est = tl.where(b_above > next_trans, est + 1, est)
        b_at = tl.load(bounds_ptr + est - 1, mask=active & (est > 0), other=2.0)
        est = tl.where(b_at <= next_trans, est - 1, est)
        sel = active & (est > crossed)
        tl.store(sel_ptr + row * K + count, i, mask=sel)
        count += sel.to(tl.int32)
        trans_q = tl.where(sel, trans_q * (1 - alpha), trans_q)
        crossed = tl.where(active, tl.maximum(crossed, est), crossed)
        done = done | (active & (crossed >= K))
        trans = tl.where(active, next_trans, trans)
        i += 1
    tl.store(count_ptr + row, count, mask=valid)
    tl.store(out_alpha_ptr + row, tl.where(count > 0, 1 - trans_q, 0.0), mask=valid)


@triton.jit
def _quantile_block(means_ptr, conics_ptr, opac_ptr, feat_ptr, bg_ptr, ids_ptr, sel_ptr, count_ptr, row, cam,
                    px, py, valid, chan, cmask, num_gs, C, K, FEAT_PER_CAM: tl.constexpr, HAS_BG: tl.constexpr,
                    BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """One channel block of F_Q / (1 - T_Q) from the <= K selected rows (background where none)."""
    dtype = means_ptr.dtype.element_ty
    count = tl.load(count_ptr + row, mask=valid, other=0)
    trans_q = tl.full([BLOCK], 1.0, dtype)
    acc = tl.zeros([BLOCK, BLOCK_C], dtype)
    for j in range(0, tl.max(count)):
        m = j < count
        isect = tl.load(sel_ptr + row * K + j, mask=m, other=0)
        g = tl.load(ids_ptr + isect, mask=m, other=0)
        alpha, used, vis, clamped, dx, dy, ca, cb, cc, op = _alpha(means_ptr, conics_ptr, opac_ptr, g, px, py)
        w = tl.where(m, alpha * trans_q, 0.0)
        trans_q = tl.where(m, trans_q * (1 - alpha), trans_q)
        frow = _feature_row(g, num_gs, FEAT_PER_CAM)
        f = tl.load(feat_ptr + frow[:, None] * C + chan[None, :], mask=m[:, None] & cmask[None, :], other=0.0)
        acc += w[:, None] * f
    norm = tl.where(count > 0, 1 - trans_q, 1.0)
    out = acc / norm[:, None]
    if HAS_BG:
        bg = tl.load(bg_ptr + cam.to(tl.int64) * C + chan, mask=cmask, other=0.0)
        out = tl.where((count > 0)[:, None], out, bg[None, :])
    return out


@triton.jit(do_not_specialize=_SIZES)
def _fwd_quantile_blend(means_ptr, conics_ptr, opac_ptr, feat_ptr, bg_ptr, offsets_ptr, ids_ptr,
                        chunk_ptr, pix_ptr, sel_ptr, count_ptr, out_feat_ptr,
                        num_gs, C, K, W, H, TS, tiles_w, tiles_h,
                        FEAT_PER_CAM: tl.constexpr, HAS_BG: tl.constexpr, PIXEL_LIST: tl.constexpr,
                        BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """F_Q / (1 - T_Q) from the <= K selected rows of each pixel."""
    prog = tl.program_id(0)
    cblk = tl.program_id(1)
    tile, row, x, y, valid, cam, start, end = _lanes(
        prog, offsets_ptr, chunk_ptr, pix_ptr, W, H, TS, tiles_w, tiles_h, PIXEL_LIST, BLOCK)
    dtype = means_ptr.dtype.element_ty
    px = x.to(dtype) + 0.5
    py = y.to(dtype) + 0.5
    chan = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = chan < C
    out = _quantile_block(means_ptr, conics_ptr, opac_ptr, feat_ptr, bg_ptr, ids_ptr, sel_ptr, count_ptr, row, cam,
                          px, py, valid, chan, cmask, num_gs, C, K, FEAT_PER_CAM, HAS_BG, BLOCK, BLOCK_C)
    tl.store(out_feat_ptr + row[:, None] * C + chan[None, :], out, mask=valid[:, None] & cmask[None, :])


@triton.jit(do_not_specialize=_SIZES + ["Q"])
def _fwd_query(means_ptr, conics_ptr, opac_ptr, feat_ptr, bg_ptr, offsets_ptr, ids_ptr, chunk_ptr, pix_ptr,
               sel_ptr, count_ptr, query_ptr, out_ptr, num_gs, C, K, Q, W, H, TS, tiles_w, tiles_h,
               FEAT_PER_CAM: tl.constexpr, HAS_BG: tl.constexpr, PIXEL_LIST: tl.constexpr, QUANTILE: tl.constexpr,
               USE_DOT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Query space: cos(F, e_q) for Q unit queries, channel block by channel block, F never written."""
    prog = tl.program_id(0)
    tile, row, x, y, valid, cam, start, end = _lanes(
        prog, offsets_ptr, chunk_ptr, pix_ptr, W, H, TS, tiles_w, tiles_h, PIXEL_LIST, BLOCK)
    dtype = means_ptr.dtype.element_ty
    px = x.to(dtype) + 0.5
    py = y.to(dtype) + 0.5
    qi = tl.arange(0, BLOCK_Q)
    qmask = qi < Q
    scores = tl.zeros([BLOCK, BLOCK_Q], dtype)
    sq = tl.zeros([BLOCK], dtype)
    for c0 in range(0, C, BLOCK_C):
        chan = c0 + tl.arange(0, BLOCK_C)
        cmask = chan < C
        if QUANTILE:
            f = _quantile_block(means_ptr, conics_ptr, opac_ptr, feat_ptr, bg_ptr, ids_ptr, sel_ptr, count_ptr, row,
                                cam, px, py, valid, chan, cmask, num_gs, C, K, FEAT_PER_CAM, HAS_BG, BLOCK, BLOCK_C)
        else:
            f, trans, last = _dense_block(means_ptr, conics_ptr, opac_ptr, feat_ptr, ids_ptr, start, end, px, py,
                                          valid, chan, cmask, num_gs, C, FEAT_PER_CAM, BLOCK, BLOCK_C)
            if HAS_BG:
                bg = tl.load(bg_ptr + cam.to(tl.int64) * C + chan, mask=cmask, other=0.0)
                f += trans[:, None] * bg[None, :]
        e = tl.load(query_ptr + qi[:, None] * C + chan[None, :], mask=qmask[:, None] & cmask[None, :], other=0.0)
        if USE_DOT:
            scores += tl.dot(f, tl.trans(e), input_precision="ieee")
        else:
            scores += tl.sum(f[:, None, :] * e[None, :, :], axis=2)
        sq += tl.sum(f * f, axis=1)
    out = scores / tl.maximum(tl.sqrt(sq), 1e-12)[:, None]
    tl.store(out_ptr + row[:, None] * Q + qi[None, :], out, mask=valid[:, None] & qmask[None, :])


# ----------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=_SIZES)
def _bwd_dense(means_ptr, conics_ptr, opac_ptr, feat_ptr, bg_ptr, offsets_ptr, ids_ptr,
               chunk_ptr, pix_ptr, out_alpha_ptr, last_ptr, grad_feat_ptr, grad_alpha_ptr,
               g_means_ptr, g_abs_ptr, g_conics_ptr, g_feat_ptr, g_opac_ptr, g_bg_ptr,
               num_gs, C, W, H, TS, tiles_w, tiles_h,
               FEAT_PER_CAM: tl.constexpr, HAS_BG: tl.constexpr, ABSGRAD: tl.constexpr,
               PIXEL_LIST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    prog = tl.program_id(0)
    tile, row, x, y, valid, cam, start, end = _lanes(
        prog, offsets_ptr, chunk_ptr, pix_ptr, W, H, TS, tiles_w, tiles_h, PIXEL_LIST, BLOCK)
    dtype = means_ptr.dtype.element_ty
    px = x.to(dtype) + 0.5
    py = y.to(dtype) + 0.5
    t_final = 1 - tl.load(out_alpha_ptr + row, mask=valid, other=1.0)
    last = tl.load(last_ptr + row, mask=valid, other=-1)
    v_final = tl.load(grad_alpha_ptr + row, mask=valid, other=0.0)  # dL/dalpha_out = -dL/dT_final
    cam64 = cam.to(tl.int64)
    if HAS_BG:
        for c0 in range(0, C, BLOCK_C):
            chan = c0 + tl.arange(0, BLOCK_C)
            cmask = chan < C
            gmask = valid[:, None] & cmask[None, :]
            gout = tl.load(grad_feat_ptr + row[:, None] * C + chan[None, :], mask=gmask, other=0.0)
            bg = tl.load(bg_ptr + cam64 * C + chan, mask=cmask, other=0.0)
            v_final -= tl.sum(gout * bg[None, :], axis=1)
            tl.atomic_add(g_bg_ptr + cam64 * C + chan, tl.sum(t_final[:, None] * gout, axis=0), mask=cmask)
    trans = t_final
    behind = tl.zeros([BLOCK], dtype)  # sum_{l>i} w_l (f_l . g)
    top = tl.max(tl.where(valid, last, start - 1))
    for step in range(0, top - start + 1):
        i = top - step
        g = tl.load(ids_ptr + i)
        alpha, used, vis, clamped, dx, dy, ca, cb, cc, op = _alpha(means_ptr, conics_ptr, opac_ptr, g, px, py)
        m = valid & used & (i <= last)
        if tl.max(m.to(tl.int32)) > 0:
            ra = 1 / (1 - alpha)
            trans = tl.where(m, trans * ra, trans)
            w = tl.where(m, alpha * trans, 0.0)
            frow = _feature_row(g, num_gs, FEAT_PER_CAM)
            fg = tl.zeros([BLOCK], dtype)
            for c0 in range(0, C, BLOCK_C):
                chan = c0 + tl.arange(0, BLOCK_C)
                cmask = chan < C
                gout = tl.load(grad_feat_ptr + row[:, None] * C + chan[None, :],
                               mask=m[:, None] & cmask[None, :], other=0.0)
                f = tl.load(feat_ptr + frow * C + chan, mask=cmask, other=0.0)
                fg += tl.sum(gout * f[None, :], axis=1)
                tl.atomic_add(g_feat_ptr + frow * C + chan, tl.sum(w[:, None] * gout, axis=0), mask=cmask)
            v_alpha = tl.where(m, trans * fg - behind * ra + t_final * ra * v_final, 0.0)
            behind += w * fg
            v_mx, v_my, v_ca, v_cb, v_cc, v_op = _alpha_grads(v_alpha, vis, clamped, dx, dy, ca, cb, cc, op)
            g2 = g.to(tl.int64)
            tl.atomic_add(g_means_ptr + 2 * g2, tl.sum(v_mx, axis=0))
            tl.atomic_add(g_means_ptr + 2 * g2 + 1, tl.sum(v_my, axis=0))
            tl.atomic_add(g_conics_ptr + 3 * g2, tl.sum(v_ca, axis=0))
            tl.atomic_add(g_conics_ptr + 3 * g2 + 1, tl.sum(v_cb, axis=0))
            tl.atomic_add(g_conics_ptr + 3 * g2 + 2, tl.sum(v_cc, axis=0))
            tl.atomic_add(g_opac_ptr + g2, tl.sum(v_op, axis=0))
            if ABSGRAD:
                tl.atomic_add(g_abs_ptr + 2 * g2, tl.sum(tl.abs(v_mx), axis=0))
                tl.atomic_add(g_abs_ptr + 2 * g2 + 1, tl.sum(tl.abs(v_my), axis=0))


@triton.jit(do_not_specialize=_SIZES)
def _bwd_quantile(means_ptr, conics_ptr, opac_ptr, feat_ptr, offsets_ptr, ids_ptr,
                  chunk_ptr, pix_ptr, out_feat_ptr, sel_ptr, count_ptr, grad_feat_ptr, grad_alpha_ptr,
                  g_means_ptr, g_abs_ptr, g_conics_ptr, g_feat_ptr, g_opac_ptr, g_bg_ptr,
                  num_gs, C, K, W, H, TS, tiles_w, tiles_h,
                  FEAT_PER_CAM: tl.constexpr, HAS_BG: tl.constexpr, ABSGRAD: tl.constexpr,
                  PIXEL_LIST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """Back to front over each pixel's selected list (docs/quantile_rendering.md, Backward)."""
    prog = tl.program_id(0)
    tile, row, x, y, valid, cam, start, end = _lanes(
        prog, offsets_ptr, chunk_ptr, pix_ptr, W, H, TS, tiles_w, tiles_h, PIXEL_LIST, BLOCK)
    dtype = means_ptr.dtype.element_ty
    px = x.to(dtype) + 0.5
    py = y.to(dtype) + 0.5
    count = tl.load(count_ptr + row, mask=valid, other=0)
    kmax = tl.max(count)
    # T_Q of the selected subset (forward order), then its normaliser and dL/dA.
    trans_q = tl.full([BLOCK], 1.0, dtype)
    for j in range(0, kmax):
        m = j < count
        isect = tl.load(sel_ptr + row * K + j, mask=m, other=0)
        g = tl.load(ids_ptr + isect, mask=m, other=0)
        alpha, used, vis, clamped, dx, dy, ca, cb, cc, op = _alpha(means_ptr, conics_ptr, opac_ptr, g, px, py)
        trans_q = tl.where(m, trans_q * (1 - alpha), trans_q)
    has = valid & (count > 0)
    norm = tl.where(has, 1 - trans_q, 1.0)
    v_norm = tl.load(grad_alpha_ptr + row, mask=has, other=0.0)
    cam64 = cam.to(tl.int64)
    for c0 in range(0, C, BLOCK_C):
        chan = c0 + tl.arange(0, BLOCK_C)
        cmask = chan < C
        gout = tl.load(grad_feat_ptr + row[:, None] * C + chan[None, :], mask=valid[:, None] & cmask[None, :], other=0.0)
        out = tl.load(out_feat_ptr + row[:, None] * C + chan[None, :], mask=has[:, None] & cmask[None, :], other=0.0)
        v_norm -= tl.sum(gout * out, axis=1) / norm
        if HAS_BG:  # empty pixels show the background
            empty = valid & (count == 0)
            tl.atomic_add(g_bg_ptr + cam64 * C + chan, tl.sum(tl.where(empty[:, None], gout, 0.0), axis=0), mask=cmask)
    trans = trans_q
    behind = tl.zeros([BLOCK], dtype)
    for step in range(0, kmax):
        j = kmax - 1 - step
        m = j < count
        isect = tl.load(sel_ptr + row * K + j, mask=m, other=0)
        g = tl.load(ids_ptr + isect, mask=m, other=0)
        alpha, used, vis, clamped, dx, dy, ca, cb, cc, op = _alpha(means_ptr, conics_ptr, opac_ptr, g, px, py)
        ra = 1 / (1 - alpha)
        trans = tl.where(m, trans * ra, trans)
        w = tl.where(m, alpha * trans, 0.0)
        frow = _feature_row(g, num_gs, FEAT_PER_CAM)
        fg = tl.zeros([BLOCK], dtype)
        for c0 in range(0, C, BLOCK_C):
            chan = c0 + tl.arange(0, BLOCK_C)
            cmask = chan < C
            fm = m[:, None] & cmask[None, :]
            gout = tl.load(grad_feat_ptr + row[:, None] * C + chan[None, :], mask=fm, other=0.0)
            f = tl.load(feat_ptr + frow[:, None] * C + chan[None, :], mask=fm, other=0.0)
            fg += tl.sum(gout * f, axis=1)
            tl.atomic_add(g_feat_ptr + frow[:, None] * C + chan[None, :], (w / norm)[:, None] * gout, mask=fm)
        v_alpha = tl.where(m, (trans * fg - behind * ra) / norm + trans_q * ra * v_norm, 0.0)
        behind += w * fg
        v_mx, v_my, v_ca, v_cb, v_cc, v_op = _alpha_grads(v_alpha, vis, clamped, dx, dy, ca, cb, cc, op)
        g2 = g.to(tl.int64)
        tl.atomic_add(g_means_ptr + 2 * g2, v_mx, mask=m)
        tl.atomic_add(g_means_ptr + 2 * g2 + 1, v_my, mask=m)
        tl.atomic_add(g_conics_ptr + 3 * g2, v_ca, mask=m)
        tl.atomic_add(g_conics_ptr + 3 * g2 + 1, v_cb, mask=m)
        tl.atomic_add(g_conics_ptr + 3 * g2 + 2, v_cc, mask=m)
        tl.atomic_add(g_opac_ptr + g2, v_op, mask=m)
        if ABSGRAD:
            tl.atomic_add(g_abs_ptr + 2 * g2, tl.abs(v_mx), mask=m)
            tl.atomic_add(g_abs_ptr + 2 * g2 + 1, tl.abs(v_my), mask=m)


# ----------------------------------------------------------------------------- launchers
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
