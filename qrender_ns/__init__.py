"""q-splat: Quantile Rendering of 512-D features on 3D Gaussian Splatting, for nerfstudio."""

import os as _os
import sys as _sys

# OpenMP threads that wait for work sleep instead of spinning (libgomp reads this once, when torch
# loads it, so only if we are imported first: `qsplat ...` and the commands it starts, e.g. the
# demo's ns-train). On a shared 2-core machine a training step took 2.2 s with spinning waits and
# 0.58 s with passive ones (benchmarks/results/concurrency_cpu.json). An explicit setting wins.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
