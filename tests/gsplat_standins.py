"""CPU stand-ins for the gsplat 1.4 CUDA ops that `gsplat.rasterization` calls, for running the GPU code path
without a GPU (issue 26).

Each has the signature and outputs of the `gsplat.cuda._wrapper` op it replaces, computed with gsplat's
pure-torch math (`gsplat.cuda._torch_impl`) or ours where gsplat has none on the CPU (tile binning, blending).
Where the real op leaves memory unwritten (culled Gaussians' rows of the projection, masked rows of the SH
evaluation: `torch::empty`), the stand-in fills them with NaN: worse than the GPU's leftovers, never better.
`patch_gsplat(monkeypatch)` installs them where gsplat and q-splat look them up.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qrender_ns.render import binning, projection, rasterize

_NAN = float("nan")


def nan_fill_culled(radii: Tensor, *tensors: Optional[Tensor]):
    """Rows of culled Gaussians (radii == 0) set to NaN, as unwritten memory may hold."""
    culled = radii == 0
    filled = []
    for t in tensors:
        if t is None:
            filled.append(None)
            continue
        mask = culled.reshape(*culled.shape, *([1] * (t.dim() - culled.dim())))
        filled.append(torch.where(mask, torch.full_like(t, _NAN), t))
    return filled


def fully_fused_projection(means, covars, quats, scales, viewmats, Ks, width, height, eps2d=0.3, near_plane=0.01,
                           far_plane=1e10, radius_clip=0.0, packed=False, sparse_grad=False,
                           calc_compensations=False, camera_model="pinhole"):
    """(radii, means2d, depths, conics, compensations) [C, N, ...]. Culled rows: NaN where the CUDA op allocates
    with torch::empty (means2d, depths, conics), 0 where it allocates with torch::zeros (compensations)."""
    assert not packed and camera_model == "pinhole" and covars is None and radius_clip == 0.0
    radii, means2d, depths, conics, compensations = projection.project_gaussians_torch(
        means, quats, scales, viewmats, Ks, width, height, near_plane, far_plane, eps2d, calc_compensations)
    means2d, depths, conics = nan_fill_culled(radii, means2d, depths, conics)
    if compensations is not None:
        compensations = torch.where(radii > 0, compensations, torch.zeros_like(compensations))
    return radii, means2d, depths, conics, compensations


def isect_tiles(means2d, radii, depths, tile_size, tile_width, tile_height, sort=True, packed=False,
                n_cameras=None, camera_ids=None, gaussian_ids=None):
    """(tiles_per_gauss [C, N], isect_ids, flatten_ids); isect_ids are our binning's keys, which only the
    stand-in isect_offset_encode reads."""
    assert sort and not packed
    keys, flatten_ids = binning.isect_tiles(means2d, radii, depths, tile_size, tile_width, tile_height)
    tiles_per_gauss = torch.bincount(flatten_ids.long(), minlength=radii.numel()).reshape(radii.shape).int()
    return tiles_per_gauss, keys, flatten_ids


def isect_offset_encode(isect_ids, n_cameras, tile_width, tile_height):
    return binning.isect_offset_encode(isect_ids, n_cameras, tile_width, tile_height)


def rasterize_to_pixels(means2d, conics, colors, opacities, image_width, image_height, tile_size, isect_offsets,
                        flatten_ids, backgrounds=None, masks=None, packed=False, absgrad=False):
    """Dense blending with our compiled CPU kernel (values checked at the listed rows: NaN there is a bug)."""
    assert masks is None and not packed
    return rasterize.rasterize_to_pixels(means2d, conics, colors, opacities, image_width, image_height, tile_size,
                                         isect_offsets, flatten_ids, backgrounds=backgrounds, backend="cpu",
                                         absgrad=absgrad)


def spherical_harmonics(degrees_to_use, dirs, coeffs, masks=None):
    from gsplat.cuda._torch_impl import _spherical_harmonics

    colors = _spherical_harmonics(degrees_to_use, dirs, coeffs)
    if masks is not None:  # the CUDA kernel skips masked rows of an uninitialised output
        colors = torch.where(masks[..., None], colors, torch.full_like(colors, _NAN))
    return colors


STANDINS = ("fully_fused_projection", "isect_tiles", "isect_offset_encode", "rasterize_to_pixels",
            "spherical_harmonics")


def patch_gsplat(monkeypatch) -> None:
    """Replace gsplat's CUDA ops by the stand-ins in gsplat.rendering (which imported them by name) and in
    gsplat.cuda._wrapper (where q-splat's CUDA path imports them at call time)."""
    import gsplat.cuda._wrapper as wrapper
    import gsplat.rendering as rendering

    for name in STANDINS:
        monkeypatch.setattr(rendering, name, globals()[name])
        monkeypatch.setattr(wrapper, name, globals()[name])
