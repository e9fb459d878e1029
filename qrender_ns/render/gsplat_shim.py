"""The one place q-splat reaches into gsplat's private modules (gsplat 1.4: `gsplat.cuda._wrapper`,
`gsplat.cuda._torch_impl`): a gsplat upgrade that moves them breaks here and nowhere else.

Imported at call time, on purpose: importing gsplat's CUDA wrappers JIT-compiles all of gsplat when nvcc is
present, which a CPU run must never pay for (and tests/gsplat_standins.py patches them at call time)."""

from __future__ import annotations


def fully_fused_projection(*args, **kwargs):
    """gsplat's fused CUDA projection (CUDA tensors only)."""
    from gsplat.cuda._wrapper import fully_fused_projection as projection

    return projection(*args, **kwargs)


def world_to_cam(means, covars, viewmats):
    """gsplat's pure-torch world -> camera transform of means and covariances."""
    from gsplat.cuda._torch_impl import _world_to_cam

    return _world_to_cam(means, covars, viewmats)


def persp_proj(means_c, covars_c, Ks, width, height):
    """gsplat's pure-torch pinhole projection of camera-space means and covariances."""
    from gsplat.cuda._torch_impl import _persp_proj

    return _persp_proj(means_c, covars_c, Ks, width, height)


def spherical_harmonics(degree, dirs, coeffs):
    """gsplat's pure-torch spherical-harmonics evaluation."""
    from gsplat.cuda._torch_impl import _spherical_harmonics

    return _spherical_harmonics(degree, dirs, coeffs)
