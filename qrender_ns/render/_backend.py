"""Loads the compiled rasterizer (JIT with torch.utils.cpp_extension, cached on disk).

Importing q-splat never compiles anything. The first call that needs a kernel builds it once
(CPU: ~1 min on 2 cores; CUDA: several minutes) and says so on stderr; later calls load the
cached build from `$QSPLAT_EXT_DIR` (default `~/.cache/qsplat/ext`). `qsplat build-ext` (and
`make test` / `make demo`) build it ahead of time.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Dict

_LOCK = threading.Lock()
_MODULES: Dict[str, ModuleType] = {}


def _source_dir() -> Path:
    """cuda_ext/csrc: in the repository (editable install) or packaged as qrender_ns.cuda_ext."""
    repo = Path(__file__).resolve().parents[2] / "cuda_ext" / "csrc"
    if repo.is_dir():
        return repo
    from importlib import resources

    return Path(str(resources.files("qrender_ns.cuda_ext"))) / "csrc"


def _sources(with_cuda: bool):
    src = _source_dir()
    files = [src / "bindings.cpp", src / "cpu" / "rasterize_cpu.cpp"]
    if with_cuda:
        files.append(src / "cuda" / "rasterize_cuda.cu")
    return files


def _headers():
    return sorted(_source_dir().rglob("*.h"))


def cuda_home() -> str | None:
    """The CUDA toolkit to build with: $CUDA_HOME / $CUDA_PATH, the toolkit of the nvcc on PATH,
    or /usr/local/cuda*. A toolkit needs bin/nvcc and include/cuda_runtime.h (nvcc on PATH may
    be a wrapper script outside the toolkit, as on our CI machines)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in filter(None, candidates):
        if (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").exists():
            return home
    return None


def ext_dir() -> Path:
    return Path(os.environ.get("QSPLAT_EXT_DIR", Path.home() / ".cache" / "qsplat" / "ext"))


def _build_name(with_cuda: bool) -> str:
    import torch

    digest = hashlib.sha256()
    for path in _sources(with_cuda) + _headers():
        digest.update(path.read_bytes())
    digest.update(torch.__version__.encode())
    kind = "cuda" if with_cuda else "cpu"
    return f"qrender_{kind}_{digest.hexdigest()[:12]}"


def _import_cpp_extension():
    """torch.utils.cpp_extension, without its import-time "No CUDA runtime is found" warning
    (expected on CPU machines that have nvcc)."""
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def load_extension(with_cuda: bool = False, verbose: bool = False) -> ModuleType:
    """Build (first time) and import the kernel module; thread-safe and cached per process."""
    key = "cuda" if with_cuda else "cpu"
    with _LOCK:
        if key in _MODULES:
            return _MODULES[key]
        cpp_extension = _import_cpp_extension()

        name = _build_name(with_cuda)
        build_dir = ext_dir() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        already_built = any(build_dir.glob(f"{name}*.so"))
        if not already_built:
            print(
                f"[q-splat] compiling the {key.upper()} rasterizer kernel into {build_dir} "
                f"(once; ~1 min for CPU, several for CUDA)...",
                file=sys.stderr,
                flush=True,
            )
        cflags = ["-O3", "-fopenmp"]
        ldflags = ["-fopenmp"]
        kwargs = {}
        if with_cuda:
            home = cuda_home()
            if home is None:
                raise RuntimeError(
                    "Building the q-splat CUDA kernel needs the CUDA toolkit (nvcc): set "
                    "CUDA_HOME or put nvcc on PATH, or use backend='cpu'."
                )
            os.environ["CUDA_HOME"] = home
            cpp_extension.CUDA_HOME = home  # torch resolved it at import time, maybe wrongly
            cflags.append("-DWITH_CUDA")
            # CUDA 13 keeps libcudart under lib/, not lib64/.
            ldflags += [f"-L{home}/lib", f"-L{home}/lib64"]
            kwargs["extra_cuda_cflags"] = ["-O3", "-DWITH_CUDA"]
        module = cpp_extension.load(
            name=name,
            sources=[str(p) for p in _sources(with_cuda)],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            build_directory=str(build_dir),
            verbose=verbose,
            with_cuda=with_cuda,
            **kwargs,
        )
        _MODULES[key] = module
        return module
