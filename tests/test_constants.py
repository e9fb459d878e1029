"""The compositing constants have one owner, the pure-torch reference (render/reference.py): the C++/CUDA copies
(cuda_ext/csrc/common.h, a C++ `constexpr` cannot read Python) and Triton's (read from the reference) agree with it."""

import re
from pathlib import Path

import numpy as np
import pytest

from qrender_ns.render import reference
from qrender_ns.render.validate import MAX_QUANTILES

COMMON_H = Path(__file__).resolve().parents[1] / "cuda_ext" / "csrc" / "common.h"


def _cpp_constants() -> dict:
    found = dict(re.findall(r"constexpr\s+(?:float|int)\s+(k\w+)\s*=\s*([^;]+);", COMMON_H.read_text()))
    values = {}
    for name, expr in found.items():
        # float literals (0.999f, 1.f, 1e-4f, 255.f) -> np.float32(...): C++ float arithmetic
        expr = re.sub(r"\b(\d+\.?\d*(?:e-?\d+)?)f\b", r"np.float32(\1)", expr)
        values[name] = eval(expr, {"np": np})  # noqa: S307  (our own header's literals)
    return values


def test_cpp_and_cuda_constants_equal_the_reference():
    cpp = _cpp_constants()
    assert float(np.float32(cpp["kAlphaMax"])) == reference.ALPHA_MAX
    assert float(np.float32(cpp["kAlphaMin"])) == reference.ALPHA_MIN
    assert float(np.float32(cpp["kTransEps"])) == reference.T_EPS
    assert int(cpp["kMaxQuantiles"]) == MAX_QUANTILES


def test_the_cpu_kernels_early_reject_uses_the_same_alpha_floor():
    """rasterize_cpu.cpp rejects sigma > ln(255 o) (+ margin): alpha < 1/255 = ALPHA_MIN."""
    source = (COMMON_H.parent / "cpu" / "rasterize_cpu.cpp").read_text()
    assert "std::log(scalar_t(255) * p[5])" in source
    assert reference.ALPHA_MIN == float(np.float32(1.0) / np.float32(255.0))


def test_triton_reads_the_reference_constants():
    kernels = pytest.importorskip("qrender_ns.render.triton.kernels")
    assert (kernels.ALPHA_MAX.value, kernels.ALPHA_MIN.value, kernels.T_EPS.value) == (
        reference.ALPHA_MAX, reference.ALPHA_MIN, reference.T_EPS)
