"""The versions q-splat is tested with, checked at first use (never at import: nerfstudio imports every
plugin's entry point, and an old torch must not break `ns-train splatfacto`).

The range was measured, not guessed (docs/install.md): the oldest end
is nerfstudio's install guide (Python 3.10 here, torch 2.1.2, numpy < 2, `make test-compat` in CI), the
newest torch 2.15.0; the Triton kernels need Triton >= MIN_TRITON (older ones fail inside Triton, so
backend="auto" takes the hand CUDA kernel there).
"""

from __future__ import annotations

import functools
import re
import sys
from typing import Optional, Tuple

MIN_PYTHON = (3, 10)
MIN_TORCH = "2.1.2"
NEWEST_TESTED_TORCH = "2.15.0"
MIN_TRITON = "3.4.0"
TESTED = f"Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}, torch {MIN_TORCH} to {NEWEST_TESTED_TORCH}"


class UnsupportedEnvironment(RuntimeError):
    """An installed version outside the supported range; its message is one sentence naming both."""


def version_tuple(version: str) -> Tuple[int, ...]:
    """'2.1.2+cu121' -> (2, 1, 2); '2.6.0.dev20241112' -> (2, 6, 0); missing parts are 0."""
    parts = [int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def torch_problem(torch_version: Optional[str] = None, python: Tuple[int, int] = tuple(sys.version_info[:2])
                  ) -> Optional[str]:
    """A sentence if this torch/Python is older than supported, else None."""
    if python < MIN_PYTHON:
        return (f"q-splat needs Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]} (tested: {TESTED}); this is Python "
                f"{python[0]}.{python[1]}.")
    if torch_version is None:
        import torch

        torch_version = torch.__version__
    if version_tuple(torch_version) < version_tuple(MIN_TORCH):
        return (f"q-splat needs torch >= {MIN_TORCH} (tested: {TESTED}); this environment has torch "
                f"{torch_version}: install a newer torch as nerfstudio's install guide does.")
    return None


def newer_than_tested(torch_version: Optional[str] = None) -> Optional[str]:
    """A note if this torch is newer than the newest tested one (it may well work), else None."""
    if torch_version is None:
        import torch

        torch_version = torch.__version__
    if version_tuple(torch_version)[:2] > version_tuple(NEWEST_TESTED_TORCH)[:2]:
        return f"torch {torch_version} is newer than the newest tested ({NEWEST_TESTED_TORCH}); report what breaks"
    return None


def check_torch() -> None:
    """Raise UnsupportedEnvironment (one sentence) for a too old torch or Python."""
    problem = torch_problem()
    if problem:
        raise UnsupportedEnvironment(problem)


@functools.lru_cache(maxsize=None)
def triton_problem(triton_version: Optional[str] = None) -> Optional[str]:
    """A sentence if q-splat's Triton kernels cannot run here (Triton missing or older than MIN_TRITON)."""
    if triton_version is None:
        try:
            import triton
        except ImportError:
            return (f"the Triton kernels need the triton package (>= {MIN_TRITON}), which is not installed; use "
                    "backend='cuda' (the hand CUDA kernel) or install triton")
        triton_version = triton.__version__
    if version_tuple(triton_version) < version_tuple(MIN_TRITON):
        return (f"the Triton kernels need triton >= {MIN_TRITON}, this environment has triton {triton_version} "
                f"(older Tritons fail inside their compiler); use backend='cuda' (the hand CUDA kernel) or a torch "
                f"whose triton is >= {MIN_TRITON}")
    return None
