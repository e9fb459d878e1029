"""Pure-torch reference rasterizer: the oracle for the compiled kernels.

Semantics: docs/quantile_rendering.md. Vectorised over pixels (each pixel gathers the
padded Gaussian list of its tile), differentiable by autograd. It materialises
[pixels, list, C], so it is for tests and small images (or a few sampled pixels) only.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# The compositing constants, owned here: float32-rounded, as the C++/CUDA kernels' `constexpr float` copies in
# cuda_ext/csrc/common.h (tests/test_constants.py keeps them equal); Triton reads these (identical in float64 runs too)
ALPHA_MAX = float(np.float32(0.999))
ALPHA_MIN = float(np.float32(1.0) / np.float32(255.0))
T_EPS = float(np.float32(1e-4))


def quantile_boundaries(num_quantiles: int, dtype: torch.dtype, device=None) -> Tensor:
    """b_k = 1 - k/(K+1), k = 1..K, computed as the kernels do (in the working dtype)."""
    k = torch.arange(1, num_quantiles + 1, dtype=dtype, device=device)
    return 1 - k / (num_quantiles + 1)


def list_alphas(flat_means: Tensor, flat_conics: Tensor, flat_opac: Tensor, ids: Tensor, px: Tensor, py: Tensor):
    """The kernels' alphas of the Gaussians `ids` [P, L] (flat ids, -1: none) at the pixel centres px, py [P, 1],
    front to back: (alpha [P, L] with the skipped ones at 0, keep [P, L] (used: sigma >= 0 and alpha >= 1/255),
    the transmittance after [P, L] and before [P, L] each entry)."""
    valid = ids >= 0
    gid = ids.clamp(min=0)
    dx = flat_means[gid, 0] - px
    dy = flat_means[gid, 1] - py
    conic = flat_conics[gid]
    sigma = 0.5 * (conic[..., 0] * dx * dx + conic[..., 2] * dy * dy) + conic[..., 1] * dx * dy
    alpha = torch.clamp(flat_opac[gid] * torch.exp(-sigma), max=ALPHA_MAX)
    keep = valid & (sigma >= 0) & (alpha >= ALPHA_MIN)
    alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
    trans_incl = torch.cumprod(1 - alpha, dim=-1)
    trans_excl = torch.cat([torch.ones_like(trans_incl[:, :1]), trans_incl[:, :-1]], dim=-1)
    return alpha, keep, trans_incl, trans_excl


def quantile_picks(keep: Tensor, trans_incl: Tensor, trans_excl: Tensor, num_quantiles: int) -> Tensor:
    """The quantile Gaussians [P, L] (bool): the used entries at which the transmittance crosses one of the K
    levels (each crossing picks the entry that crosses it; docs/quantile_rendering.md)."""
    bounds = quantile_boundaries(num_quantiles, trans_incl.dtype, trans_incl.device)
    level_incl = (trans_incl[..., None] < bounds).sum(-1)
    level_excl = (trans_excl[..., None] < bounds).sum(-1)
    return keep & (level_incl > level_excl) & (level_excl < num_quantiles)


def _tile_lists(isect_offsets: Tensor, flatten_ids: Tensor) -> Tensor:
    """[V*th*tw, L] flatten ids of each tile's Gaussians, front to back, -1 padded."""
    starts = isect_offsets.reshape(-1).long()
    total = flatten_ids.numel()
    ends = torch.cat([starts[1:], starts.new_tensor([total])])
    counts = ends - starts
    length = int(counts.max()) if counts.numel() else 0
    steps = torch.arange(length, device=starts.device)
    idx = starts[:, None] + steps[None]
    valid = steps[None] < counts[:, None]
    ids = flatten_ids.long()[idx.clamp(max=max(total - 1, 0))] if total else idx
    return torch.where(valid, ids, torch.full_like(idx, -1))


def rasterize_to_pixels_reference(
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
    pixel_ids: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Same signature and result as `qrender_ns.render.rasterize_to_pixels` (validated inputs).

    With `pixel_ids` (int64 [P], flat (camera, y, x) indices into V*H*W) only those pixels are
    blended: returns ([P, C], [P, 1]), equal to the whole image's rows at those pixels.
    """
    pixel_ids_given = pixel_ids is not None
    num_cams, num_gs = means2d.shape[:2]
    channels = features.shape[-1]
    tiles_h, tiles_w = isect_offsets.shape[1:]
    lists = _tile_lists(isect_offsets, flatten_ids)
    device = means2d.device
    if pixel_ids is None:
        pixel_ids = torch.arange(num_cams * image_height * image_width, device=device)
    pixel_ids = pixel_ids.to(device=device, dtype=torch.int64)
    cams = pixel_ids // (image_height * image_width)
    ys = (pixel_ids % (image_height * image_width)) // image_width
    xs = pixel_ids % image_width
    pixel_tile = (cams * tiles_h + ys // tile_size) * tiles_w + xs // tile_size
    px = (xs[:, None] + 0.5).to(means2d.dtype)
    py = (ys[:, None] + 0.5).to(means2d.dtype)

    flat_means = means2d.reshape(-1, 2)
    flat_conics = conics.reshape(-1, 3)
    flat_opac = opacities.reshape(-1) if opacities.dim() == 2 else opacities.repeat(num_cams)
    flat_feat = features.reshape(-1, channels)
    feat_per_cam = features.dim() == 3

    def blend(chunk):
        ids = lists[pixel_tile[chunk]]  # [P, L]
        gid = ids.clamp(min=0)
        fid = gid if feat_per_cam else gid % num_gs
        alpha, keep, trans_incl, trans_excl = list_alphas(flat_means, flat_conics, flat_opac, ids, px[chunk],
                                                          py[chunk])
        bg = backgrounds[cams[chunk]] if backgrounds is not None else None  # [P, C]

        if num_quantiles is None:
            used = trans_incl > T_EPS  # a prefix: T only decreases
            weights = torch.where(used, trans_excl * alpha, torch.zeros_like(alpha))
            t_final = torch.prod(torch.where(used, 1 - alpha, torch.ones_like(alpha)), dim=-1)
            feat = torch.einsum("pl,plc->pc", weights, flat_feat[fid])
            if bg is not None:
                feat = feat + t_final[:, None] * bg
            out_alpha = 1 - t_final
        else:
            selected = quantile_picks(keep, trans_incl, trans_excl, num_quantiles)
            alpha_q = torch.where(selected, alpha, torch.zeros_like(alpha))
            tq_incl = torch.cumprod(1 - alpha_q, dim=-1)
            tq_excl = torch.cat([torch.ones_like(tq_incl[:, :1]), tq_incl[:, :-1]], dim=-1)
            weights = tq_excl * alpha_q
            norm = 1 - torch.prod(1 - alpha_q, dim=-1)
            any_sel = selected.any(dim=-1)
            safe = torch.where(any_sel, norm, torch.ones_like(norm))
            feat = torch.einsum("pl,plc->pc", weights, flat_feat[fid]) / safe[:, None]
            fill = bg if bg is not None else torch.zeros_like(feat)
            feat = torch.where(any_sel[:, None], feat, fill)
            out_alpha = torch.where(any_sel, norm, torch.zeros_like(norm))
        return feat, out_alpha

    # Chunks of one image's size: [chunk, list, C] stays as large as for one camera.
    step = max(image_height * image_width, 1)
    parts = [blend(slice(i, i + step)) for i in range(0, pixel_ids.numel(), step)]
    if parts:
        feat = torch.cat([f for f, _ in parts])
        out_alpha = torch.cat([a for _, a in parts])
    else:
        feat = features.new_zeros(0, channels)
        out_alpha = features.new_zeros(0)
    if pixel_ids_given:
        return feat, out_alpha[:, None]
    return (feat.reshape(num_cams, image_height, image_width, channels),
            out_alpha.reshape(num_cams, image_height, image_width, 1))


def query_scores(features: Tensor, queries: Tensor) -> Tensor:
    """cos(f, t_q) as F.normalize(f) @ F.normalize(T).T: features [..., C], queries [Q, C]."""
    return F.normalize(features, dim=-1) @ F.normalize(queries, dim=-1).T


def rasterize_query_reference(means2d, conics, features, opacities, image_width, image_height, tile_size,
                              isect_offsets, flatten_ids, queries, backgrounds=None, num_quantiles=None
                              ) -> Tuple[Tensor, Tensor]:
    """Query-space oracle: the full feature map, normalised, times the normalised queries.

    Returns (scores [V, H, W, Q], alphas [V, H, W, 1]).
    """
    feat, alpha = rasterize_to_pixels_reference(
        means2d, conics, features, opacities, image_width, image_height, tile_size, isect_offsets,
        flatten_ids, backgrounds, num_quantiles)
    return query_scores(feat, queries), alpha
