"""q-splat: Quantile Rendering of 512-D features on 3D Gaussian Splatting, for nerfstudio."""

__version__ = "0.1.0"
