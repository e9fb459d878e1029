"""Rasterization of high-dimensional Gaussian features: dense and quantile (Q-Render).

In gsplat's roles: rasterize.py is the public API, projection.py the projection and tile binning in front of
it, autograd.py the thin wrappers around the compiled kernels (kernels.py picks them, _backend.py builds them),
triton/ the Triton kernels and their launch code, reference.py the pure-torch oracle every kernel is tested
against (and the owner of the compositing constants), validate.py the input checks.
"""

from qrender_ns.render.projection import Projection, project_and_bin, project_gaussians, viewmat_from_c2w
from qrender_ns.render.rasterize import (rasterize_features, rasterize_pixels_of_rows, rasterize_query_scores,
                                        rasterize_to_pixels, release_cpu_maps)
from qrender_ns.render.reference import rasterize_query_reference, rasterize_to_pixels_reference
from qrender_ns.render.validate import BACKENDS, MAX_QUANTILES

__all__ = [
    "BACKENDS",
    "MAX_QUANTILES",
    "Projection",
    "project_and_bin",
    "project_gaussians",
    "rasterize_features",
    "rasterize_pixels_of_rows",
    "rasterize_query_scores",
    "rasterize_to_pixels",
    "release_cpu_maps",
    "rasterize_query_reference",
    "rasterize_to_pixels_reference",
    "viewmat_from_c2w",
]
