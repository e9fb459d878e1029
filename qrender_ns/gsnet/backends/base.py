"""The sparse-convolution interface behind GS-Net's MinkUNet: canonical kernel slots, `SparseTensor`,
`SparseConvBackend`, and the calibration of a library's kernel-offset order.

The network (`MinkUNet`, `..backbone`) owns its weights in one canonical layout and never touches a sparse-conv
library directly; a `SparseConvBackend` executes three operations on a sparse voxel set:

- `conv3`: submanifold 3x3x3 convolution (output voxels = input voxels), weight [27, Cin, Cout];
- `down2`: stride-2, kernel-2 convolution onto the coarse voxels `floor(p / 2)`, weight [8, Cin, Cout];
- `up2`: its transpose, back onto the fine voxels of a level seen on the way down, weight [8, Cin, Cout].

Canonical kernel slots: conv3 slot `(dx+1)*9 + (dy+1)*3 + (dz+1)` holds the weight applied to the
neighbour at offset (dx, dy, dz) (`out[p] = sum_d x[p + d] @ W[slot(d)]`, a cross-correlation like
`torch.nn.functional.conv3d`); down2/up2 slot `cx*4 + cy*2 + cz` couples the coarse voxel q with its
child `2q + (cx, cy, cz)`. Backends whose libraries order kernel offsets differently are calibrated
once with one-hot weights (`calibrate_permutation`), so the same weights give the same output on
every backend.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch
from torch import Tensor

KERNEL_VOLUME = {"conv3": 27, "down2": 8, "up2": 8}
CONV3_OFFSETS = torch.tensor(list(itertools.product((-1, 0, 1), repeat=3)), dtype=torch.long)  # [27, 3]
CHILD_OFFSETS = torch.tensor(list(itertools.product((0, 1), repeat=3)), dtype=torch.long)  # [8, 3]


def conv3_slot(offsets: Tensor) -> Tensor:
    return (offsets[..., 0] + 1) * 9 + (offsets[..., 1] + 1) * 3 + (offsets[..., 2] + 1)


def child_slot(offsets: Tensor) -> Tensor:
    return offsets[..., 0] * 4 + offsets[..., 1] * 2 + offsets[..., 2]


@dataclass
class SparseTensor:
    """Features of one resolution level. `features` is authoritative; `native` is the backend's
    structure object for this level (coordinate hash, spconv tensor, MinkowskiEngine tensor)."""

    features: Tensor
    level: int
    native: Any
    backend: "SparseConvBackend"

    def replace(self, features: Tensor) -> "SparseTensor":
        return SparseTensor(features, self.level, self.native, self.backend)


class SparseConvBackend:
    """Executes sparse convolutions with canonical weights (see the module docstring)."""

    name = "base"

    def __init__(self):
        self._perms: Dict[str, Tensor] = {}
        self._lock = threading.Lock()

    # --- to implement -----------------------------------------------------------------------------
    def init(self, coords: Tensor, features: Tensor) -> SparseTensor:
        """Level-0 tensor of unique int64 voxel coords [N, 3] with features [N, C] (rows in that order)."""
        raise NotImplementedError

    def output_features(self, x: SparseTensor) -> Tensor:
        """Features of a level-0 tensor in the row order given to `init`."""
        return x.features

    def _conv3_native(self, x: SparseTensor, weight: Tensor) -> SparseTensor:
        raise NotImplementedError

    def _down2_native(self, x: SparseTensor, weight: Tensor) -> SparseTensor:
        raise NotImplementedError

    def _up2_native(self, x: SparseTensor, fine: SparseTensor, weight: Tensor) -> SparseTensor:
        raise NotImplementedError

    native_order_is_canonical = False

    # --- public ops (canonical weights) -----------------------------------------------------------
    def conv3(self, x: SparseTensor, weight: Tensor) -> SparseTensor:
        return self._conv3_native(x, self._to_native("conv3", weight))

    def down2(self, x: SparseTensor, weight: Tensor) -> SparseTensor:
        return self._down2_native(x, self._to_native("down2", weight))

    def up2(self, x: SparseTensor, fine: SparseTensor, weight: Tensor) -> SparseTensor:
        if fine.level != x.level - 1:
            raise ValueError(f"up2 goes from level {x.level} to level {x.level - 1}, got a level-{fine.level} target")
        return self._up2_native(x, fine, self._to_native("up2", weight))

    def _to_native(self, kind: str, weight: Tensor) -> Tensor:
        if self.native_order_is_canonical:
            return weight
        with self._lock:
            if kind not in self._perms:
                self._perms[kind] = calibrate_permutation(self, kind, weight.device)
        return weight[self._perms[kind].to(weight.device)]

    def describe(self) -> str:
        return self.name


# ---------------------------------------------------------------------------------------------------
# Calibration of a library's kernel-offset order
# ---------------------------------------------------------------------------------------------------


def _native_probe(backend: SparseConvBackend, kind: str, device) -> Tuple[Tensor, Tensor]:
    """Run the backend's native op with one-hot weights; returns (native slot -> offset [K, 3])."""
    f32 = dict(device=device, dtype=torch.float32)
    if kind == "conv3":
        coords = (CONV3_OFFSETS + 1).to(device)  # the 3x3x3 block 0..2; centre (1, 1, 1) is row 13
        n, k = 27, 27
        weight = torch.zeros(k, n, k * n, **f32)
        for s in range(k):
            weight[s, torch.arange(n), s * n + torch.arange(n)] = 1
        out = backend.output_features(backend._conv3_native(backend.init(coords, torch.eye(n, **f32)), weight))
        response = out[13].reshape(k, n)  # [native slot, input row]
        rows = _single_hit(response, kind)
        return coords[rows] - coords[13]
    if kind == "down2":
        coords = CHILD_OFFSETS.to(device)
        weight = torch.zeros(8, 8, 64, **f32)
        for s in range(8):
            weight[s, torch.arange(8), s * 8 + torch.arange(8)] = 1
        coarse = backend._down2_native(backend.init(coords, torch.eye(8, **f32)), weight)
        if coarse.features.shape[0] != 1:
            raise RuntimeError(f"{backend.name}: down2 of a 2x2x2 block gave {coarse.features.shape[0]} voxels, not 1")
        rows = _single_hit(coarse.features[0].reshape(8, 8), kind)
        return coords[rows]
    if kind == "up2":
        coords = CHILD_OFFSETS.to(device)
        fine = backend.init(coords, torch.zeros(8, 1, **f32))
        coarse = backend._down2_native(fine, torch.zeros(8, 1, 1, **f32))
        coarse = coarse.replace(torch.ones(1, 1, **f32))
        weight = torch.zeros(8, 1, 8, **f32)
        weight[torch.arange(8), 0, torch.arange(8)] = 1
        out = backend.output_features(backend._up2_native(coarse, fine, weight))  # [fine row, native slot]
        rows = _single_hit(out.T, kind)
        return coords[rows]
    raise ValueError(kind)


def _single_hit(response: Tensor, kind: str) -> Tensor:
    """Index of the single 1 in each row of a [slots, candidates] one-hot response."""
    if not (torch.allclose(response.sum(1), torch.ones(response.shape[0], device=response.device))
            and bool(((response == 0) | (response == 1)).all())):
        raise RuntimeError(f"kernel calibration of {kind} failed: the library's response is not a permutation "
                           f"({response.sum(1).tolist()})")
    return response.argmax(1)


def calibrate_permutation(backend: SparseConvBackend, kind: str, device=None) -> Tensor:
    """perm [K] with native_weight = canonical_weight[perm] for this backend's op `kind`."""
    device = device or torch.device("cpu")
    with torch.no_grad():
        offsets = _native_probe(backend, kind, device).cpu()
    perm = conv3_slot(offsets) if kind == "conv3" else child_slot(offsets)
    if sorted(perm.tolist()) != list(range(KERNEL_VOLUME[kind])):
        raise RuntimeError(f"{backend.name}: calibrated {kind} offsets are not a permutation: {offsets.tolist()}")
    return perm
