"""Projection of 3D Gaussians into cameras (EWA, gsplat's math) and tile binning: `project_and_bin` is the one
pipeline in front of blending (rasterize_features, back-projection, the model's CPU RGB render)."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from qrender_ns.render import gsplat_shim
from qrender_ns.render.binning import isect_offset_encode, isect_tiles
from qrender_ns.utils.geometry import quat_to_rotmat


def viewmat_from_c2w(camera_to_worlds: Tensor) -> Tensor:
    """World-to-camera [B, 4, 4] (OpenCV axes) of nerfstudio camera-to-worlds [B, 3, 4] (OpenGL axes): splatfacto's
    `get_viewmat` without its `torch.compile`. The viewer interrupts a render by raising from a trace function on
    every Python line; raised while dynamo compiles, it came out as InternalTorchDynamoError, which the viewer's
    render thread does not catch, so the thread died and the page froze on its last image."""
    R = camera_to_worlds[:, :3, :3] * torch.tensor([1.0, -1.0, -1.0], device=camera_to_worlds.device,
                                                   dtype=camera_to_worlds.dtype)
    T = camera_to_worlds[:, :3, 3:4]
    R_inv = R.transpose(1, 2)
    viewmat = torch.zeros(R.shape[0], 4, 4, device=R.device, dtype=R.dtype)
    viewmat[:, :3, :3] = R_inv
    viewmat[:, :3, 3:4] = -torch.bmm(R_inv, T)
    viewmat[:, 3, 3] = 1.0
    return viewmat


def _quat_scale_to_covar(quats: Tensor, scales: Tensor) -> Tensor:
    """wxyz quaternions (normalised here) and linear scales -> world covariances [N,3,3]."""
    m = quat_to_rotmat(quats) * scales[:, None, :]
    return m @ m.transpose(-1, -2)


def project_gaussians(means, quats, scales, viewmats, Ks, width, height, near_plane=0.01,
                      far_plane=1e10, eps2d=0.3):
    """Perspective EWA projection -> (radii [V,N] int32, means2d [V,N,2], depths, conics [V,N,3]).

    On CUDA: gsplat's fused kernel. Elsewhere: gsplat's pure-torch projection math (`_project_torch`)
    (never gsplat's CUDA wrappers on CPU: they JIT-compile all of gsplat when nvcc is present).
    """
    if means.is_cuda:
        radii, means2d, depths, conics, _ = gsplat_shim.fully_fused_projection(
            means, None, quats, scales, viewmats, Ks, width, height, eps2d=eps2d,
            near_plane=near_plane, far_plane=far_plane)
        return radii, means2d, depths, conics
    return project_gaussians_torch(means, quats, scales, viewmats, Ks, width, height, near_plane, far_plane,
                                   eps2d)[:4]


def project_gaussians_torch(means, quats, scales, viewmats, Ks, width, height, near_plane=0.01, far_plane=1e10,
                            eps2d=0.3, calc_compensations=False):
    """project_gaussians in pure torch on any device, plus gsplat's antialiasing `compensations` [V,N]
    (sqrt(det(cov2d) / det(cov2d + eps2d I)); None unless asked): (radii, means2d, depths, conics, compensations)."""
    return _project_torch(means, _quat_scale_to_covar(quats, scales), viewmats, Ks, width, height, near_plane,
                          far_plane, eps2d, calc_compensations)


def _project_torch(means, covars, viewmats, Ks, width, height, near_plane, far_plane, eps2d,
                   calc_compensations=False):
    """gsplat's `_fully_fused_projection` (pinhole), except that Gaussians outside [near, far] are projected
    with depth 1 before being culled (radius 0). gsplat's version divides by the true depth: a Gaussian
    exactly on a camera's plane (depth 0.0 in float32: it happens, ~1 in 4 CPU demo runs) gave inf means2d
    and NaN conics, and 0/0 gradients that turned its parameters into NaN. gsplat's CUDA kernel culls those
    Gaussians before dividing, as this does."""
    means_c, covars_c = gsplat_shim.world_to_cam(means, covars, viewmats)
    depths = means_c[..., 2]
    in_depth = (depths > near_plane) & (depths < far_plane)
    safe_z = torch.where(in_depth, depths, torch.ones_like(depths))
    means2d, covars2d = gsplat_shim.persp_proj(torch.cat([means_c[..., :2], safe_z[..., None]], dim=-1), covars_c, Ks,
                                    width, height)
    det_orig = covars2d[..., 0, 0] * covars2d[..., 1, 1] - covars2d[..., 0, 1] * covars2d[..., 1, 0]
    covars2d = covars2d + torch.eye(2, device=means.device, dtype=means.dtype) * eps2d
    det = (covars2d[..., 0, 0] * covars2d[..., 1, 1] - covars2d[..., 0, 1] * covars2d[..., 1, 0]).clamp(min=1e-10)
    compensations = torch.sqrt(torch.clamp(det_orig / det, min=0.0)) if calc_compensations else None
    conics = torch.stack([covars2d[..., 1, 1] / det, -(covars2d[..., 0, 1] + covars2d[..., 1, 0]) / 2.0 / det,
                          covars2d[..., 0, 0] / det], dim=-1)
    b = (covars2d[..., 0, 0] + covars2d[..., 1, 1]) / 2
    radius = torch.ceil(3.0 * torch.sqrt(b + torch.sqrt(torch.clamp(b ** 2 - det, min=0.01)))).detach()
    inside = ((means2d[..., 0] + radius > 0) & (means2d[..., 0] - radius < width)
              & (means2d[..., 1] + radius > 0) & (means2d[..., 1] - radius < height))
    radius = torch.where(in_depth & (det > 0) & inside, radius, torch.zeros_like(radius))
    return radius.int(), means2d, depths, conics, compensations


class Projection(NamedTuple):
    """Gaussians projected into V cameras and binned into tiles: what `rasterize_to_pixels` blends."""

    radii: Tensor  # [V, N] int32, 0 = culled
    means2d: Tensor  # [V, N, 2]
    depths: Tensor  # [V, N]
    conics: Tensor  # [V, N, 3]
    compensations: Optional[Tensor]  # [V, N] antialiasing factors (only when asked)
    isect_offsets: Tensor  # [V, tiles_h, tiles_w]
    flatten_ids: Tensor  # [I] Gaussian of each (camera, tile, depth)-sorted intersection


def project_and_bin(means: Tensor, quats: Tensor, scales: Tensor, viewmats: Tensor, Ks: Tensor, width: int,
                    height: int, tile_size: int = 16, near_plane: float = 0.01, far_plane: float = 1e10,
                    calc_compensations: bool = False) -> Projection:
    """Projection (`project_gaussians`; pure torch when antialiasing compensations are asked for) and tile binning:
    the one pipeline in front of blending, shared by `rasterize_features`, back-projection and the model's CPU
    RGB render."""
    if calc_compensations:
        radii, means2d, depths, conics, compensations = project_gaussians_torch(
            means, quats, scales, viewmats, Ks, width, height, near_plane, far_plane, calc_compensations=True)
    else:
        radii, means2d, depths, conics = project_gaussians(means, quats, scales, viewmats, Ks, width, height,
                                                           near_plane, far_plane)
        compensations = None
    tiles_w, tiles_h = math.ceil(width / tile_size), math.ceil(height / tile_size)
    tile_keys, flatten_ids = isect_tiles(means2d, radii, depths, tile_size, tiles_w, tiles_h)
    isect_offsets = isect_offset_encode(tile_keys, viewmats.shape[0], tiles_w, tiles_h)
    return Projection(radii, means2d, depths, conics, compensations, isect_offsets, flatten_ids)
