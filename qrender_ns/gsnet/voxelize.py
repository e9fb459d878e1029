"""Gaussians -> sparse voxels -> Gaussians, in pure torch (`unique`, `index_add_`, `scatter_reduce`).

GS-Net (the Q-Render paper's generalizable feature network) samples every Gaussian at its centre
into a voxel grid (default 5 cm, the paper's best), merges the Gaussians that fall into one voxel
(duplicates) by averaging their input attributes, runs the sparse U-Net on the occupied voxels, and
scatters the voxel predictions back to the Gaussians with a max-reduce. With centre sampling each
Gaussian lies in exactly one voxel, so the max-reduce is a gather of that voxel's feature.

`devoxelize_trilinear` is the smooth alternative to the gather: a Gaussian blends the features of
the (up to) 8 occupied voxels whose centres surround its centre, with trilinear weights renormalised
over the occupied ones (its own voxel is always among them, with weight >= 1/8).

`sampling="extent"` also samples each Gaussian at its centre +- one standard deviation along its
three principal axes (7 points): a large Gaussian then touches several voxels, contributes to each
voxel's pooled input, and gets the element-wise max of those voxels' features back.

Coordinates are int64 voxel indices `floor((x - origin) / voxel_size)`; the occupied voxels come out
in lexicographic (x, y, z) order, and no voxel is empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

from qrender_ns.utils.geometry import quat_to_rotmat  # noqa: F401  (also imported from here)

_KEY_BITS = 21  # per axis: voxel indices in [0, 2^21) after shifting, i.e. 2M voxels = 100 km at 5 cm
_KEY_RANGE = 1 << _KEY_BITS


@dataclass
class Voxelization:
    """The sparse voxel grid of a set of Gaussians and the Gaussian <-> voxel incidence."""

    coords: Tensor  # int64 [V, 3] occupied voxel indices, lexicographic order
    origin: Tensor  # [3] world position of voxel (0, 0, 0)'s corner
    voxel_size: float
    pair_gaussian: Tensor  # int64 [P] Gaussian of each (Gaussian, voxel) incidence
    pair_voxel: Tensor  # int64 [P] voxel of each incidence
    num_gaussians: int
    center_voxel: Tensor  # int64 [N] the voxel holding each Gaussian's centre

    @property
    def num_voxels(self) -> int:
        return int(self.coords.shape[0])

    @property
    def is_center_sampled(self) -> bool:
        """True when every Gaussian touches exactly one voxel (its centre's)."""
        return self.pair_gaussian.shape[0] == self.num_gaussians

    def voxel_centers(self) -> Tensor:
        """World positions [V, 3] of the voxel centres."""
        return self.origin + (self.coords.to(self.origin.dtype) + 0.5) * self.voxel_size


def linear_keys(coords: Tensor) -> Tensor:
    """int64 key of integer coords [M, 3] (each axis shifted by 2^20; |coord| < 2^20 required)."""
    shifted = coords + (_KEY_RANGE // 2)
    return (shifted[:, 0] * _KEY_RANGE + shifted[:, 1]) * _KEY_RANGE + shifted[:, 2]


def lookup_keys(sorted_keys: Tensor, queries: Tensor) -> Tensor:
    """Position of each query key in the ascending `sorted_keys`, -1 where absent."""
    if sorted_keys.numel() == 0:
        return torch.full_like(queries, -1)
    pos = torch.searchsorted(sorted_keys, queries).clamp_max(sorted_keys.numel() - 1)
    return torch.where(sorted_keys[pos] == queries, pos, torch.full_like(pos, -1))


def decode_keys(keys: Tensor) -> Tensor:
    z = keys % _KEY_RANGE
    y = (keys // _KEY_RANGE) % _KEY_RANGE
    x = keys // (_KEY_RANGE * _KEY_RANGE)
    return torch.stack([x, y, z], dim=1) - (_KEY_RANGE // 2)


def _check_range(coords: Tensor) -> None:
    if coords.numel() and int(coords.abs().max()) >= _KEY_RANGE // 2 - 2:
        raise ValueError(f"the scene spans more than 2^20 voxels along an axis (max |index| "
                         f"{int(coords.abs().max())}); "
                         "increase voxel_size or check the Gaussians' units (metres expected)")


def extent_samples(means: Tensor, scales: Tensor, quats: Tensor) -> Tensor:
    """[N, 7, 3]: the centre and centre +- scale_k * axis_k for the three principal axes."""
    axes = quat_to_rotmat(quats) * scales[:, None, :]  # columns = scaled principal axes
    offsets = axes.transpose(1, 2)  # [N, 3 axes, 3 xyz]
    return torch.cat([means[:, None], means[:, None] + offsets, means[:, None] - offsets], dim=1)


def voxelize(means: Tensor, voxel_size: float, origin: Optional[Tensor] = None,
             sampling: Literal["center", "extent"] = "center", scales: Optional[Tensor] = None,
             quats: Optional[Tensor] = None) -> Voxelization:
    """Sparse voxel grid of Gaussians with centres `means` [N, 3] (same units as `voxel_size`).

    origin: corner of voxel (0, 0, 0) (default: the componentwise minimum of the means, so indices
    start at 0). `sampling="extent"` needs linear `scales` [N, 3] and `quats` [N, 4] (wxyz).
    """
    if means.dim() != 2 or means.shape[1] != 3:
        raise ValueError(f"`means` must have shape [N, 3], got {list(means.shape)}")
    if not voxel_size > 0:
        raise ValueError(f"`voxel_size` must be > 0, got {voxel_size}")
    means = means.detach()
    if means.numel() and not bool(torch.isfinite(means).all()):
        raise ValueError("`means` contains NaN or Inf")
    num = means.shape[0]
    device = means.device
    if origin is None:
        origin = means.min(dim=0).values if num else torch.zeros(3, device=device, dtype=means.dtype)
    origin = origin.to(means)
    if sampling == "center":
        points = means
    elif sampling == "extent":
        if scales is None or quats is None:
            raise ValueError("sampling='extent' needs `scales` and `quats`")
        points = extent_samples(means, scales.detach().to(means), quats.detach().to(means)).reshape(-1, 3)
    else:
        raise ValueError(f"`sampling` must be 'center' or 'extent', got {sampling!r}")
    point_coords = torch.floor((points - origin) / voxel_size).long()
    _check_range(point_coords)
    keys, inverse = torch.unique(linear_keys(point_coords), sorted=True, return_inverse=True)
    coords = decode_keys(keys)
    if sampling == "center":
        pair_gaussian = torch.arange(num, device=device)
        pair_voxel = inverse
        center_voxel = inverse
    else:
        samples = points.shape[0] // max(num, 1)
        gaussian_of_point = torch.arange(num, device=device).repeat_interleave(samples)
        pair_keys = torch.unique(gaussian_of_point * keys.shape[0] + inverse)  # duplicates merged
        pair_gaussian, pair_voxel = pair_keys // keys.shape[0], pair_keys % keys.shape[0]
        center_voxel = inverse.reshape(num, samples)[:, 0]
    return Voxelization(coords=coords, origin=origin, voxel_size=float(voxel_size), pair_gaussian=pair_gaussian,
                        pair_voxel=pair_voxel, num_gaussians=num, center_voxel=center_voxel)


def pool_to_voxels(vox: Voxelization, values: Tensor, reduce: Literal["mean", "max", "sum"] = "mean") -> Tensor:
    """Per-voxel reduction [V, D] of per-Gaussian values [N, D] over the Gaussians touching each voxel."""
    if values.shape[0] != vox.num_gaussians:
        raise ValueError(f"values has {values.shape[0]} rows, the voxelization {vox.num_gaussians} Gaussians")
    src = values if vox.is_center_sampled else values[vox.pair_gaussian]
    index = vox.pair_voxel
    out = values.new_zeros(vox.num_voxels, values.shape[1])
    if reduce == "max":
        return out.scatter_reduce(0, index[:, None].expand_as(src), src, "amax", include_self=False)
    out = out.index_add(0, index, src)
    if reduce == "sum":
        return out
    if reduce != "mean":
        raise ValueError(f"`reduce` must be 'mean', 'max' or 'sum', got {reduce!r}")
    counts = torch.bincount(index, minlength=vox.num_voxels).clamp_min(1).to(values.dtype)
    return out / counts[:, None]


def devoxelize(vox: Voxelization, voxel_features: Tensor) -> Tensor:
    """Per-Gaussian features [N, C]: the max over the voxels each Gaussian touches (its own voxel's
    feature under centre sampling). Differentiable w.r.t. voxel_features."""
    if voxel_features.shape[0] != vox.num_voxels:
        raise ValueError(f"voxel_features has {voxel_features.shape[0]} rows, the voxelization {vox.num_voxels} voxels")
    if vox.is_center_sampled:
        return voxel_features[vox.pair_voxel]
    src = voxel_features[vox.pair_voxel]
    out = voxel_features.new_zeros(vox.num_gaussians, voxel_features.shape[1])
    return out.scatter_reduce(0, vox.pair_gaussian[:, None].expand_as(src), src, "amax", include_self=False)


def devoxelize_trilinear(vox: Voxelization, voxel_features: Tensor, points: Tensor) -> Tensor:
    """Per-Gaussian features [N, C] trilinearly interpolated between the centres of the occupied voxels
    around each Gaussian centre `points` [N, 3] (the units given to `voxelize`). Missing (empty) corners
    drop out and the remaining weights are renormalised, so a feature field that is linear over 8 occupied
    corners is reproduced exactly. Differentiable w.r.t. voxel_features (not w.r.t. the points)."""
    if voxel_features.shape[0] != vox.num_voxels:
        raise ValueError(f"voxel_features has {voxel_features.shape[0]} rows, the voxelization {vox.num_voxels} voxels")
    if points.shape != (vox.num_gaussians, 3):
        raise ValueError(f"points must have shape [{vox.num_gaussians}, 3], got {list(points.shape)}")
    grid = (points.detach().to(vox.origin) - vox.origin) / vox.voxel_size - 0.5  # voxel-centre coordinates
    base = torch.floor(grid)
    frac = (grid - base).to(voxel_features.dtype)
    base = base.long()
    keys = linear_keys(vox.coords)  # sorted: coords are in lexicographic order
    corners, weights = [], []
    for corner in range(8):
        bits = torch.tensor([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1], device=base.device)
        pos = lookup_keys(keys, linear_keys(base + bits))
        w = torch.where(bits.bool(), frac, 1 - frac).prod(dim=1)
        corners.append(pos.clamp_min(0))
        weights.append(torch.where(pos >= 0, w, torch.zeros_like(w)))
    total = torch.stack(weights, dim=1).sum(dim=1, keepdim=True).clamp_min(1e-12)
    out = voxel_features.new_zeros(vox.num_gaussians, voxel_features.shape[1])
    for pos, w in zip(corners, weights):
        out = out + (w[:, None] / total) * voxel_features[pos]
    return out
