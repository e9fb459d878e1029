"""Rasterization of high-dimensional Gaussian features: dense and quantile (Q-Render)."""

from .rasterize import (
    BACKENDS,
    MAX_QUANTILES,
    project_gaussians,
    rasterize_features,
    rasterize_query_scores,
    rasterize_to_pixels,
    release_cpu_maps,
)
from .reference import rasterize_query_reference, rasterize_to_pixels_reference

__all__ = [
    "BACKENDS",
    "MAX_QUANTILES",
    "project_gaussians",
    "rasterize_features",
    "rasterize_query_scores",
    "rasterize_to_pixels",
    "release_cpu_maps",
    "rasterize_query_reference",
    "rasterize_to_pixels_reference",
]
