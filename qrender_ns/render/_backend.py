"""Loads the compiled rasterizer (JIT with torch.utils.cpp_extension, cached on disk).

Importing q-splat never compiles anything. The first call that needs a kernel builds it once
(CPU: ~1 min on 2 cores; CUDA: several minutes) and says so on stderr; later calls load the
cached build from `$QSPLAT_EXT_DIR` (default `~/.cache/qsplat/ext`). `qsplat build-ext` (and
`make test` / `make demo`) build it ahead of time.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import io
import logging
import os
import shutil
import sys
import threading
import time
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Dict

import torch

from qrender_ns.utils.compat import check_torch, newer_than_tested

_LOCK = threading.Lock()
_MODULES: Dict[str, ModuleType] = {}


def _source_dir() -> Path:
    """cuda_ext/csrc: in the repository (editable install) or packaged as qrender_ns.cuda_ext."""
    repo = Path(__file__).resolve().parents[2] / "cuda_ext" / "csrc"
    if repo.is_dir():
        return repo

    return Path(str(resources.files("qrender_ns.cuda_ext"))) / "csrc"


def _sources(with_cuda: bool):
    src = _source_dir()
    files = [src / "bindings.cpp", src / "cpu" / "rasterize_cpu.cpp", src / "cpu" / "map_pool.cpp",
             src / "cpu" / "sparse_adam_cpu.cpp", src / "cpu" / "row_blend_cpu.cpp"]
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


_CFLAGS = ["-O3", "-fopenmp"]


def _build_name(with_cuda: bool) -> str:
    """Build key: sources, headers, flags, torch and Python versions. A finished build under this key is
    imported directly (never re-checked by ninja, whose command hash differs between ninja versions and made
    two ninjas sharing a folder silently rebuild everything)."""
    digest = hashlib.sha256()
    for path in _sources(with_cuda) + _headers():
        digest.update(path.read_bytes())
    digest.update(f"{torch.__version__}|{sys.version_info[:2]}|{_CFLAGS}".encode())
    kind = "cuda" if with_cuda else "cpu"
    return f"qrender_{kind}_{digest.hexdigest()[:12]}"


def _import_built(name: str, library: Path) -> ModuleType:
    import importlib.util

    loader = importlib.machinery.ExtensionFileLoader(name, str(library))
    spec = importlib.util.spec_from_file_location(name, str(library), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class _FileLock:
    """An exclusive lock on a file (fcntl): one process builds a given key at a time, the others wait for it."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[q-splat] waiting for another process building the kernel in {self.path.parent} ...",
                  file=sys.stderr, flush=True)
            fcntl.flock(self._file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def _import_cpp_extension():
    """torch.utils.cpp_extension, without its import-time "No CUDA runtime is found" warning
    (expected on CPU machines that have nvcc)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    shim = _pkg_resources_shim()
    printed = io.StringIO()  # torch < 2.2 print()s the same warning to stderr instead of logging it
    try:
        with contextlib.redirect_stderr(printed):
            from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
        sys.stderr.writelines(line for line in printed.getvalue().splitlines(keepends=True)
                              if not line.startswith("No CUDA runtime is found"))
        if shim is not None and sys.modules.get("pkg_resources") is shim:
            del sys.modules["pkg_resources"]
    return cpp_extension


def _pkg_resources_shim() -> ModuleType | None:
    """torch < 2.2's cpp_extension does `from pkg_resources import packaging`, and setuptools >= 81 no longer
    ships pkg_resources (a nerfstudio environment made today by its install guide has torch 2.1.2 and a new
    setuptools). When it is missing, stand in for it during that one import with the `packaging` it wants."""
    import importlib.util

    if "torch.utils.cpp_extension" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        return None
    try:
        import packaging.version  # noqa: F401  (cpp_extension reads packaging.version)
    except ImportError:
        return None  # nothing to stand in with: torch's own ImportError names pkg_resources
    import packaging

    shim = ModuleType("pkg_resources")
    shim.packaging = packaging
    sys.modules["pkg_resources"] = shim
    return shim


def load_extension(with_cuda: bool = False, verbose: bool = False) -> ModuleType:
    """Build (first time, announced on stderr) and import the kernel module; thread- and process-safe, cached."""
    check_torch()  # one sentence for a too old torch, not a C++ compiler error
    key = "cuda" if with_cuda else "cpu"
    with _LOCK:
        if key in _MODULES:
            return _MODULES[key]
        name = _build_name(with_cuda)
        build_dir = ext_dir() / name
        library = build_dir / f"{name}.so"
        module = None
        if not library.is_file():
            build_dir.mkdir(parents=True, exist_ok=True)
            with _FileLock(build_dir / ".build.lock"):
                if not library.is_file():  # nobody built it while we waited
                    module = _build(name, build_dir, with_cuda, verbose)
        _MODULES[key] = module if module is not None else _import_built(name, library)
        return _MODULES[key]


def _build(name: str, build_dir: Path, with_cuda: bool, verbose: bool) -> ModuleType:
    cpp_extension = _import_cpp_extension()
    kind = "CUDA" if with_cuda else "CPU"
    print(f"[q-splat] compiling the {kind} rasterizer kernel into {build_dir} (once per source/torch version; "
          f"~1 min for CPU, several for CUDA)...", file=sys.stderr, flush=True)
    newer = newer_than_tested()
    if newer:
        print(f"[q-splat] {newer}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    cflags, ldflags, kwargs = list(_CFLAGS), ["-fopenmp"], {}
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
    # One ninja for every build: the one beside this Python (the venv's), ahead of the system's.
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])
    try:
        module = cpp_extension.load(name=name, sources=[str(p) for p in _sources(with_cuda)], extra_cflags=cflags,
                           extra_ldflags=ldflags, build_directory=str(build_dir), verbose=verbose,
                           with_cuda=with_cuda, **kwargs)
    finally:
        os.environ["PATH"] = path
    print(f"[q-splat] {kind} kernel built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return module
