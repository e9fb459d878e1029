"""Process start-up settings the entry points apply explicitly (never at package import).

OpenMP threads that wait for work should sleep instead of spinning: libgomp reads OMP_WAIT_POLICY once, when
torch loads it, and spinning waits slow down every process sharing the cores (benchmarks/results/
concurrency_cpu.json). An explicit setting always wins.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

RESTART_NOTE = ("[q-splat] restarting ns-train with OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep instead of "
                "spinning: trainings sharing cores stay fast); set OMP_WAIT_POLICY yourself to skip this")


def prefer_passive_omp() -> None:
    """`qsplat`: before torch loads, default OMP_WAIT_POLICY to PASSIVE (inherited by the commands it starts,
    e.g. the demo's ns-train). Too late once torch is imported: then nothing is changed."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def ns_train_needs_restart(argv: List[str], environ=os.environ, torch_loaded: Optional[bool] = None) -> bool:
    """A bare `ns-train q-splat ...` whose torch (and libgomp) nerfstudio loaded before it discovered this plugin."""
    torch_loaded = "torch" in sys.modules if torch_loaded is None else torch_loaded
    return (torch_loaded and "OMP_WAIT_POLICY" not in environ and len(argv) > 1 and argv[1] == "q-splat"
            and os.path.basename(argv[0]) == "ns-train")


def restart_ns_train_with_passive_omp() -> None:
    """nerfstudio's method entry point: too late to set the policy in-process, so a bare `ns-train q-splat`
    starts over once with it set (the imports run again): trainings sharing cores slow each other down far less
    (benchmarks/results/concurrency_cpu.json). OMP_WAIT_POLICY=ACTIVE keeps spinning and skips this."""
    orig_argv = getattr(sys, "orig_argv", None)
    if orig_argv and ns_train_needs_restart(sys.argv):
        print(RESTART_NOTE, file=sys.stderr, flush=True)
        os.execve(sys.executable, list(orig_argv), {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
