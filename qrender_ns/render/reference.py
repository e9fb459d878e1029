"""Pure-torch reference rasterizer: the oracle for the compiled kernels.

Semantics: docs/quantile_rendering.md. Vectorised over pixels (each pixel gathers the
padded Gaussian list of its tile), differentiable by autograd. It materialises
[pixels, list, C], so it is for tests and small images only.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

# float32-rounded, as the kernels' `constexpr float` constants (identical in float64 runs too)
ALPHA_MAX = float(np.float32(0.999))
ALPHA_MIN = float(np.float32(1.0) / np.float32(255.0))
T_EPS = float(np.float32(1e-4))


def quantile_boundaries(num_quantiles: int, dtype: torch.dtype, device=None) -> Tensor:
    """b_k = 1 - k/(K+1), k = 1..K, computed as the kernels do (in the working dtype)."""
    k = torch.arange(1, num_quantiles + 1, dtype=dtype, device=device)
    return 1 - k / (num_quantiles + 1)


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
) -> Tuple[Tensor, Tensor]:
    """Same signature and result as `qrender_ns.render.rasterize_to_pixels` (validated inputs)."""
    num_cams, num_gs = means2d.shape[:2]
    channels = features.shape[-1]
    tiles_h, tiles_w = isect_offsets.shape[1:]
    lists = _tile_lists(isect_offsets, flatten_ids)

    ys, xs = torch.meshgrid(
        torch.arange(image_height, device=means2d.device),
        torch.arange(image_width, device=means2d.device),
        indexing="ij",
    )
    pixel_tile = ((ys // tile_size) * tiles_w + xs // tile_size).reshape(-1)
    px = (xs.reshape(-1, 1) + 0.5).to(means2d.dtype)
    py = (ys.reshape(-1, 1) + 0.5).to(means2d.dtype)

    flat_means = means2d.reshape(-1, 2)
    flat_conics = conics.reshape(-1, 3)
    flat_opac = opacities.reshape(-1) if opacities.dim() == 2 else opacities.repeat(num_cams)
    flat_feat = features.reshape(-1, channels)
    feat_per_cam = features.dim() == 3

    out_feats, out_alphas = [], []
    for cam in range(num_cams):
        ids = lists[cam * tiles_h * tiles_w + pixel_tile]  # [P, L]
        valid = ids >= 0
        gid = ids.clamp(min=0)
        fid = gid if feat_per_cam else gid % num_gs
        dx = flat_means[gid, 0] - px
        dy = flat_means[gid, 1] - py
        conic = flat_conics[gid]
        sigma = 0.5 * (conic[..., 0] * dx * dx + conic[..., 2] * dy * dy) + conic[..., 1] * dx * dy
        alpha = torch.clamp(flat_opac[gid] * torch.exp(-sigma), max=ALPHA_MAX)
        keep = valid & (sigma >= 0) & (alpha >= ALPHA_MIN)
        alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
        trans_incl = torch.cumprod(1 - alpha, dim=-1)
        trans_excl = torch.cat([torch.ones_like(trans_incl[:, :1]), trans_incl[:, :-1]], dim=-1)
        bg = backgrounds[cam] if backgrounds is not None else None

        if num_quantiles is None:
            used = trans_incl > T_EPS  # a prefix: T only decreases
            weights = torch.where(used, trans_excl * alpha, torch.zeros_like(alpha))
            t_final = torch.prod(torch.where(used, 1 - alpha, torch.ones_like(alpha)), dim=-1)
            feat = torch.einsum("pl,plc->pc", weights, flat_feat[fid])
            if bg is not None:
                feat = feat + t_final[:, None] * bg
            out_alpha = 1 - t_final
        else:
            bounds = quantile_boundaries(num_quantiles, alpha.dtype, alpha.device)
            level_incl = (trans_incl[..., None] < bounds).sum(-1)
            level_excl = (trans_excl[..., None] < bounds).sum(-1)
            selected = keep & (level_incl > level_excl) & (level_excl < num_quantiles)
            alpha_q = torch.where(selected, alpha, torch.zeros_like(alpha))
            tq_incl = torch.cumprod(1 - alpha_q, dim=-1)
            tq_excl = torch.cat([torch.ones_like(tq_incl[:, :1]), tq_incl[:, :-1]], dim=-1)
            weights = tq_excl * alpha_q
            norm = 1 - torch.prod(1 - alpha_q, dim=-1)
            any_sel = selected.any(dim=-1)
            safe = torch.where(any_sel, norm, torch.ones_like(norm))
            feat = torch.einsum("pl,plc->pc", weights, flat_feat[fid]) / safe[:, None]
            fill = bg if bg is not None else torch.zeros_like(feat[0])
            feat = torch.where(any_sel[:, None], feat, fill.expand_as(feat))
            out_alpha = torch.where(any_sel, norm, torch.zeros_like(norm))
        out_feats.append(feat.reshape(image_height, image_width, channels))
        out_alphas.append(out_alpha.reshape(image_height, image_width, 1))
    return torch.stack(out_feats), torch.stack(out_alphas)

