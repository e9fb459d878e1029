"""Triton rasterizer kernels (`@triton.jit`): dense and quantile feature blending, forward and backward.
Their launch code and autograd wrapper: launch.py.

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

import os

import triton
import triton.language as tl

from qrender_ns.render import reference
from qrender_ns.utils.compat import version_tuple

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# tl.dot on float64 compiles from Triton 3.5 on (3.4 rejects it: "Unsupported lhs dtype fp64"); older
# Tritons take the broadcast-and-sum fallback for float64 queries. MIN_TRITON (compat.py) is 3.4.
FP64_DOT = version_tuple(triton.__version__) >= (3, 5, 0)

# The compositing constants: reference.py owns them (tests/test_constants.py checks the C++/CUDA copies)
ALPHA_MAX = tl.constexpr(reference.ALPHA_MAX)
ALPHA_MIN = tl.constexpr(reference.ALPHA_MIN)
T_EPS = tl.constexpr(reference.T_EPS)
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
