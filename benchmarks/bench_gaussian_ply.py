"""Write/read time and size of a 3DGS PLY with 512-D features: sidecar (float16 .features.npz) vs PLY
properties (f_lang_* float32). `python benchmarks/bench_gaussian_ply.py [N] [C]` (default 1e5 x 512, SH 3)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qrender_ns.data.gaussian_ply import GaussianPly, read_gaussian_ply, sidecar_path, write_gaussian_ply


def main(n: int = 100_000, c: int = 512, repeats: int = 2) -> None:
    rng = np.random.default_rng(0)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    g = GaussianPly(f(n, 3), f(n, 3), f(n, 15, 3), f(n), f(n, 3), f(n, 4), rng.normal(size=(n, c)).astype(np.float16))
    with tempfile.TemporaryDirectory() as d:
        for mode in (None, "sidecar", "properties"):
            path = Path(d) / f"{mode}.ply"
            tw = min(_timed(lambda: write_gaussian_ply(path, g, features=mode)) for _ in range(repeats))
            tr = min(_timed(lambda: read_gaussian_ply(path, features=mode is not None)) for _ in range(repeats))
            size = path.stat().st_size + (sidecar_path(path).stat().st_size if mode == "sidecar" else 0)
            print(f"N={n} C={c} features={mode!s:10}: write {tw:6.2f} s, read {tr:6.2f} s, {size / 1e6:7.1f} MB")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main(*(int(float(a)) for a in sys.argv[1:3]))
