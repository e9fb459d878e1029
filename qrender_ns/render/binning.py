"""Tile binning on any device in vectorised torch (gsplat's `_isect_tiles` is a Python loop).

Same output as gsplat's `isect_tiles` + `isect_offset_encode`: each (camera, Gaussian) is
listed in every tile its 3-sigma square touches, sorted by (camera, tile, depth).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


@torch.no_grad()
def isect_tiles(
    means2d: Tensor, radii: Tensor, depths: Tensor, tile_size: int, tiles_w: int, tiles_h: int
) -> Tuple[Tensor, Tensor]:
    """means2d [V,N,2], radii [V,N] (int, 0 = culled), depths [V,N].

    Returns (tile_keys [M] int64 = camera * tiles_h * tiles_w + tile, flatten_ids [M] int32
    indexing the flattened [V*N] Gaussians), sorted by (key, depth).
    """
    num_cams, num_gs = means2d.shape[:2]
    device = means2d.device
    tile_means = means2d.detach() / tile_size
    tile_radii = (radii.to(means2d.dtype) / tile_size)[..., None]
    lo = torch.floor(tile_means - tile_radii).long()
    hi = torch.ceil(tile_means + tile_radii).long()
    lo[..., 0].clamp_(0, tiles_w)
    hi[..., 0].clamp_(0, tiles_w)
    lo[..., 1].clamp_(0, tiles_h)
    hi[..., 1].clamp_(0, tiles_h)
    extent = hi - lo
    counts = (extent[..., 0] * extent[..., 1] * (radii > 0)).reshape(-1)
    total = int(counts.sum())
    if total == 0:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return empty, empty.int()
    flat = torch.repeat_interleave(torch.arange(num_cams * num_gs, device=device), counts)
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(total, device=device) - first[flat]
    width = extent[..., 0].reshape(-1)[flat]
    tx = lo[..., 0].reshape(-1)[flat] + local % width
    ty = lo[..., 1].reshape(-1)[flat] + local // width
    keys = (flat // num_gs) * (tiles_h * tiles_w) + ty * tiles_w + tx
    # Two stable sorts = lexicographic (key, depth, index): deterministic on ties.
    order = torch.argsort(depths.detach().reshape(-1)[flat], stable=True)
    order = order[torch.argsort(keys[order], stable=True)]
    return keys[order], flat[order].int()


@torch.no_grad()
def isect_offset_encode(tile_keys: Tensor, num_cams: int, tiles_w: int, tiles_h: int) -> Tensor:
    """Start offset of every (camera, tile) list in the sorted isects: int32 [V, th, tw]."""
    num_tiles = num_cams * tiles_h * tiles_w
    counts = torch.bincount(tile_keys, minlength=num_tiles)
    offsets = torch.cumsum(counts, 0) - counts
    return offsets.int().reshape(num_cams, tiles_h, tiles_w)
