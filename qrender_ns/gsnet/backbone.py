"""MinkUNet-style sparse 3D U-Net behind one small sparse-convolution interface, and the backend registry.

The network (`MinkUNet`) owns its weights in one canonical layout and never touches a sparse-conv
library directly; a `SparseConvBackend` executes three operations on a sparse voxel set (`conv3`, `down2`,
`up2`; the interface and its canonical kernel slots are described in `backends/base.py`).

Backends, one file each under `backends/` (optional libraries are imported when the backend is made):
- `torch`: pure PyTorch, always available (the CPU/test path), `backends/torch_backend.py`.
- `spconv`: spconv 2.x (`pip install spconv` for CPU, `spconv-cu12x` for CUDA), `backends/spconv_backend.py`.
- `minkowski`: MinkowskiEngine 0.5.4 (the paper's backbone library); needs a source build
  (scripts/build_minkowski.sh, docs/gsnet.md); parity-tested against `torch` where it is installed;
  `backends/minkowski_backend.py`.

This module keeps the registry (`get_backend`, `available_backends`, `resolve_backend`: tests monkeypatch its
`_BACKENDS`, `_CLASSES`, `_RUNS_ON` here) and re-exports the backend names it always had.
"""

from __future__ import annotations

import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qrender_ns.gsnet.backends.base import (CHILD_OFFSETS, CONV3_OFFSETS, KERNEL_VOLUME,  # noqa: F401
                                            SparseConvBackend, SparseTensor, _native_probe, _single_hit,
                                            calibrate_permutation, child_slot, conv3_slot)
from qrender_ns.gsnet.backends.minkowski_backend import MinkowskiBackend, _MinkowskiLevel  # noqa: F401
from qrender_ns.gsnet.backends.spconv_backend import SpconvBackend, _patch_spconv, _single_threaded_on_cpu  # noqa: F401
from qrender_ns.gsnet.backends.torch_backend import Pairs, TorchBackend, _PairConv, _TorchLevel  # noqa: F401

BACKEND_NAMES = ("torch", "spconv", "minkowski")


# ---------------------------------------------------------------------------------------------------
# Backend registry
# ---------------------------------------------------------------------------------------------------

_BACKENDS: Dict[str, SparseConvBackend] = {}
_IMPORT_ERRORS: Dict[str, str] = {}
_CLASSES = {"torch": TorchBackend, "spconv": SpconvBackend, "minkowski": MinkowskiBackend}
_INSTALL_HINTS = {
    "spconv": "pip install spconv (CPU) or spconv-cu12x matching your CUDA; see docs/gsnet.md",
    "minkowski": "MinkowskiEngine needs a patched source build: run `make minkowski` (scripts/build_minkowski.sh, "
                 "~6 min on 2 cores); docs/gsnet.md",
}


def get_backend(name: str) -> SparseConvBackend:
    """The backend instance called `name` ("torch", "spconv", "minkowski"); ImportError with an
    install hint when its library is missing."""
    if name not in _CLASSES:
        raise ValueError(f"unknown sparse-conv backend {name!r}; choose from {BACKEND_NAMES} or 'auto'")
    if name not in _BACKENDS:
        try:
            _BACKENDS[name] = _CLASSES[name]()
        except ImportError as e:  # noqa: PERF203
            _IMPORT_ERRORS[name] = str(e)
            raise ImportError(f"sparse-conv backend '{name}' is not installed ({e}); "
                              f"{_INSTALL_HINTS.get(name, '')}") from e
    return _BACKENDS[name]


def available_backends() -> List[str]:
    names = []
    for name in BACKEND_NAMES:
        try:
            get_backend(name)
            names.append(name)
        except Exception:  # noqa: BLE001  (a broken install counts as unavailable)
            pass
    return names


def resolve_backend(name: str, device: torch.device) -> str:
    """'auto': on CUDA, MinkowskiEngine when it imports and runs on CUDA (the paper's library), else spconv on
    the same terms, else torch; on the CPU, torch: the fastest full GS-Net step measured here with all three
    installed (benchmarks/results/gsnet_cpu.json). A named backend that cannot run on a CUDA device is an error."""
    device = torch.device(device)
    if name != "auto":
        get_backend(name)
        if device.type == "cuda" and name != "torch":
            reason = _cannot_run_on(name, device)
            if reason is not None:
                raise ValueError(f"sparse-conv backend '{name}' cannot run on {device} ({reason}); its build is "
                                 f"probably CPU-only ({_INSTALL_HINTS.get(name, '')}), or use --backend torch")
        return name
    if device.type == "cuda":
        for candidate in ("minkowski", "spconv"):
            try:
                get_backend(candidate)
            except Exception:  # noqa: BLE001
                continue
            reason = _cannot_run_on(candidate, device)
            if reason is None:
                return candidate
            print(f"[q-splat] GS-Net: {candidate} imports but cannot run on {device} ({reason}); "
                  "a CPU-only build? Using the next sparse-conv backend.", file=sys.stderr)
    return "torch"


_RUNS_ON: Dict[Tuple[str, str], Optional[str]] = {}


def _cannot_run_on(name: str, device: torch.device) -> Optional[str]:
    """None when backend `name` runs a 3x3x3 sparse convolution on `device` (once per process), else why not:
    `make minkowski` builds MinkowskiEngine --cpu_only and the `spconv` extra is the CPU wheel, and both
    import fine on a GPU machine, then fail at their first CUDA convolution."""
    key = (name, str(device))
    if key not in _RUNS_ON:
        try:
            with torch.no_grad():
                _native_probe(get_backend(name), "conv3", device)
            _RUNS_ON[key] = None
        except Exception as error:  # noqa: BLE001 - any failure means: not usable on this device
            _RUNS_ON[key] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
    return _RUNS_ON[key]


# ---------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(channels)
    if kind == "layer":
        return nn.LayerNorm(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r} (batch, layer, none)")


class SparseConv(nn.Module):
    """A sparse convolution with its canonical weight [K, Cin, Cout] (kaiming-normal init)."""

    def __init__(self, cin: int, cout: int, kind: str):
        super().__init__()
        if kind not in KERNEL_VOLUME:
            raise ValueError(kind)
        self.kind = kind
        k = KERNEL_VOLUME[kind]
        self.weight = nn.Parameter(torch.randn(k, cin, cout) * (2.0 / (k * cin)) ** 0.5)

    def forward(self, x: SparseTensor, fine: Optional[SparseTensor] = None) -> SparseTensor:
        backend = x.backend
        if self.kind == "conv3":
            return backend.conv3(x, self.weight)
        if self.kind == "down2":
            return backend.down2(x, self.weight)
        return backend.up2(x, fine, self.weight)

    def extra_repr(self) -> str:
        k, cin, cout = self.weight.shape
        return f"{self.kind}, {cin} -> {cout}"


class ConvNormAct(nn.Module):
    def __init__(self, cin: int, cout: int, kind: str, norm: str):
        super().__init__()
        self.conv = SparseConv(cin, cout, kind)
        self.norm = _norm(norm, cout)

    def forward(self, x: SparseTensor, fine: Optional[SparseTensor] = None) -> SparseTensor:
        y = self.conv(x, fine)
        return y.replace(F.relu(self.norm(y.features)))


class BasicBlock(nn.Module):
    """MinkUNet's residual block: conv3-norm-relu-conv3-norm + (projected) input, relu."""

    def __init__(self, cin: int, cout: int, norm: str):
        super().__init__()
        self.conv1 = SparseConv(cin, cout, "conv3")
        self.norm1 = _norm(norm, cout)
        self.conv2 = SparseConv(cout, cout, "conv3")
        self.norm2 = _norm(norm, cout)
        self.proj = None if cin == cout else nn.Sequential(nn.Linear(cin, cout, bias=False), _norm(norm, cout))

    def forward(self, x: SparseTensor) -> SparseTensor:
        y = self.conv1(x)
        y = self.conv2(y.replace(F.relu(self.norm1(y.features))))
        skip = x.features if self.proj is None else self.proj(x.features)
        return y.replace(F.relu(self.norm2(y.features) + skip))


class MinkUNet(nn.Module):
    """Sparse U-Net as MinkowskiEngine's MinkUNet: a stem at full resolution, len(enc_channels)
    stride-2 levels of residual blocks, and a decoder of transposed convs with skip concatenation.
    Defaults = MinkUNet14A widths (32 | 32, 64, 128, 256 | 128, 128, 96, 96), one block per level."""

    def __init__(self, in_channels: int, stem_channels: int = 32, enc_channels: Sequence[int] = (32, 64, 128, 256),
                 dec_channels: Sequence[int] = (128, 128, 96, 96), blocks_per_level: int = 1, norm: str = "batch"):
        super().__init__()
        if len(enc_channels) != len(dec_channels) or not enc_channels:
            raise ValueError("enc_channels and dec_channels need the same (non-zero) number of levels")
        self.in_channels, self.out_channels = in_channels, dec_channels[-1]
        self.stem = nn.ModuleList([ConvNormAct(in_channels, stem_channels, "conv3", norm),
                                   ConvNormAct(stem_channels, stem_channels, "conv3", norm)])
        self.downs, self.enc_blocks = nn.ModuleList(), nn.ModuleList()
        skip_channels, ch = [stem_channels], stem_channels
        for width in enc_channels:
            self.downs.append(ConvNormAct(ch, ch, "down2", norm))
            self.enc_blocks.append(nn.Sequential(*[BasicBlock(ch if b == 0 else width, width, norm)
                                                   for b in range(blocks_per_level)]))
            ch = width
            skip_channels.append(width)
        skip_channels.pop()
        self.ups, self.dec_blocks = nn.ModuleList(), nn.ModuleList()
        for width, skip in zip(dec_channels, reversed(skip_channels)):
            self.ups.append(ConvNormAct(ch, width, "up2", norm))
            self.dec_blocks.append(nn.Sequential(*[BasicBlock(width + skip if b == 0 else width, width, norm)
                                                   for b in range(blocks_per_level)]))
            ch = width

    def forward(self, backend: SparseConvBackend, coords: Tensor, features: Tensor) -> Tensor:
        """coords int64 [V, 3] (unique), features [V, in_channels] -> [V, out_channels], same row order."""
        x = backend.init(coords, features)
        for layer in self.stem:
            x = layer(x)
        skips = [x]
        for down, blocks in zip(self.downs, self.enc_blocks):
            x = blocks(down(x))
            skips.append(x)
        skips.pop()
        for up, blocks in zip(self.ups, self.dec_blocks):
            skip = skips.pop()
            x = up(x, skip)
            x = blocks(x.replace(torch.cat([x.features, skip.features], dim=1)))
        return backend.output_features(x)
