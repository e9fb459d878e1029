"""q-splat: Quantile Rendering of 512-D features on 3D Gaussian Splatting, for nerfstudio."""

import os as _os
import sys as _sys

# OpenMP threads that wait for work sleep instead of spinning (libgomp reads this once, when torch
# loads it, so only if we are imported first: `qsplat ...` and the commands it starts, e.g. the
# demo's ns-train). On a shared 2-core machine a training step took 2.2 s with spinning waits and
# 0.58 s with passive ones (benchmarks/results/concurrency_cpu.json). An explicit setting wins.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
elif "OMP_WAIT_POLICY" not in _os.environ and len(_sys.argv) > 1 and _sys.argv[1] == "q-splat" \
        and _os.path.basename(_sys.argv[0]) == "ns-train" and getattr(_sys, "orig_argv", None):
    # A bare `ns-train q-splat`: nerfstudio loaded torch (and libgomp) before it discovered this plugin, too late
    # to set the policy in-process. Two such trainings at once on 2 cores ran 9.9x slower than one alone with
    # spinning waits and 1.2x with passive ones (benchmarks/results/concurrency_cpu.json), so the command starts
    # over once with the policy set (~5 s of imports again here). OMP_WAIT_POLICY=ACTIVE keeps spinning and skips this.
    print("[q-splat] restarting ns-train with OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep instead of "
          "spinning: trainings sharing cores stay fast); set OMP_WAIT_POLICY yourself to skip this", file=_sys.stderr,
          flush=True)
    _os.execve(_sys.executable, list(_sys.orig_argv), {**_os.environ, "OMP_WAIT_POLICY": "PASSIVE"})

__version__ = "0.1.0"
