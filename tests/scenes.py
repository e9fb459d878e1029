"""Random projected-Gaussian scenes for kernel tests (2D: means2d, conics, opacities, depths)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from qrender_ns.render.binning import isect_offset_encode, isect_tiles


@dataclass
class Scene2D:
    means2d: torch.Tensor  # [V,N,2]
    conics: torch.Tensor  # [V,N,3]
    opacities: torch.Tensor  # [V,N]
    depths: torch.Tensor  # [V,N]
    radii: torch.Tensor  # [V,N]
    features: torch.Tensor  # [N,C]
    width: int
    height: int
    tile_size: int
    isect_offsets: torch.Tensor
    flatten_ids: torch.Tensor

    def args(self, features: Optional[torch.Tensor] = None):
        return (self.means2d, self.conics, self.features if features is None else features,
                self.opacities, self.width, self.height, self.tile_size, self.isect_offsets,
                self.flatten_ids)


def make_scene(num_cams=2, num_gs=40, width=37, height=29, channels=3, tile_size=16,
               dtype=torch.float32, seed=0, opacity_range=(0.05, 1.0), scale_range=(1.5, 6.0)):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    margin = 4.0
    means2d = torch.stack([rand(num_cams, num_gs) * (width + 2 * margin) - margin,
                           rand(num_cams, num_gs) * (height + 2 * margin) - margin], dim=-1)
    lo, hi = scale_range
    sx, sy = lo + (hi - lo) * rand(num_cams, num_gs), lo + (hi - lo) * rand(num_cams, num_gs)
    theta = rand(num_cams, num_gs) * math.pi
    c, s = torch.cos(theta), torch.sin(theta)
    # covariance R diag(s^2) R^T, conic = its inverse (a, b, c)
    cxx = c * c * sx**2 + s * s * sy**2
    cyy = s * s * sx**2 + c * c * sy**2
    cxy = c * s * (sx**2 - sy**2)
    det = cxx * cyy - cxy**2
    conics = torch.stack([cyy / det, -cxy / det, cxx / det], dim=-1)
    b = 0.5 * (cxx + cyy)
    radii = torch.ceil(3 * torch.sqrt(b + torch.sqrt((b * b - det).clamp(min=0.01)))).int()
    olo, ohi = opacity_range
    opacities = olo + (ohi - olo) * rand(num_cams, num_gs)
    depths = 1 + 10 * rand(num_cams, num_gs)
    features = torch.randn(num_gs, channels, generator=gen, dtype=torch.float64)
    tiles_w, tiles_h = math.ceil(width / tile_size), math.ceil(height / tile_size)
    keys, flatten_ids = isect_tiles(means2d, radii, depths, tile_size, tiles_w, tiles_h)
    offsets = isect_offset_encode(keys, num_cams, tiles_w, tiles_h)
    return Scene2D(means2d.to(dtype), conics.to(dtype), opacities.to(dtype), depths.to(dtype),
                   radii, features.to(dtype), width, height, tile_size, offsets, flatten_ids)
