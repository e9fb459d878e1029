"""Large CPU tensors on transparent huge pages (Linux, best effort).

The table head's [N, 512] feature table and its optimiser state are read and written at a few ten thousand
random rows per step (issue 27). With 4 KiB pages every such row costs a TLB miss whose page walk itself misses
the caches once the table is gigabytes (3 GB of bf16 rows at 3e6 Gaussians); on 2 MiB pages the walks stay
cached. The kernel's default policy here is usually `madvise`: a region gets huge pages only if asked before its
pages are first touched, which is what `huge_page_empty` does (benchmarks/results/profile_scale_cpu.json
measures the step with and without).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Optional, Sequence

import torch

_HUGE_PAGE = 2 << 20
_PAGE = 4096
_MADV_HUGEPAGE = 14
_LIBC: Optional[ctypes.CDLL] = None


def _libc() -> Optional[ctypes.CDLL]:
    global _LIBC
    if _LIBC is None and sys.platform.startswith("linux"):
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError):
            _LIBC = None
    return _LIBC


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask for huge pages on a CPU tensor's memory (whole 4 KiB pages inside it; tensors under 2 MiB are left
    alone). Only pages not touched yet are affected. False where the platform or the kernel says no."""
    nbytes = tensor.untyped_storage().nbytes()
    libc = _libc()
    if libc is None or tensor.device.type != "cpu" or nbytes < _HUGE_PAGE:
        return False
    start = tensor.untyped_storage().data_ptr()
    first = -(-start // _PAGE) * _PAGE
    last = (start + nbytes) // _PAGE * _PAGE
    return last > first and libc.madvise(first, last - first, _MADV_HUGEPAGE) == 0


def huge_page_empty(shape: Sequence[int], dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """torch.empty, on huge pages where the platform allows (CPU); the caller fills it."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if out.device.type == "cpu":
        advise_huge_pages(out)
    return out


def huge_page_zeros(shape: Sequence[int], dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """torch.zeros, on huge pages where the platform allows (CPU)."""
    return huge_page_empty(shape, dtype, device).zero_()
