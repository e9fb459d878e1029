"""q-splat: Quantile Rendering of 512-D features on 3D Gaussian Splatting, for nerfstudio.

Importing the package has no side effects; the entry points (`qsplat`, nerfstudio's method and dataparser
entry points) call what they need at start-up (utils/runtime.py, method/__init__.py).
"""

__version__ = "0.1.0"
