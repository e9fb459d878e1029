"""Triton kernels of the rasterizer (optional dependency: imported only when a Triton backend runs)."""
