"""`torch` sparse-conv backend: pure PyTorch, always available (the CPU/test path).

Voxel coordinates are hashed to int64 keys and looked up with `searchsorted`; a convolution is a
gather-matmul-scatter (`index_select`, `mm`, `index_add_`) per kernel slot over the occupied neighbour pairs
only, in a custom autograd function that keeps no per-slot intermediates for backward.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from qrender_ns.gsnet.backends.base import CONV3_OFFSETS, SparseConvBackend, SparseTensor, child_slot
from qrender_ns.gsnet.voxelize import linear_keys, lookup_keys

Pairs = List[Optional[Tuple[Tensor, Tensor]]]  # per kernel slot: (output rows, input rows); None = identity


class _TorchLevel:
    """One level's voxel coordinates, their hash, and the kernel maps computed from them (cached)."""

    def __init__(self, coords: Tensor):
        self.coords = coords
        self.sorted_keys, self.order = torch.sort(linear_keys(coords))
        self._conv3_pairs: Optional[Pairs] = None
        self._down: Optional[Tuple["_TorchLevel", Pairs, Pairs]] = None

    @property
    def num(self) -> int:
        return int(self.coords.shape[0])

    def lookup(self, queries: Tensor) -> Tensor:
        """Row of each query coordinate [M, 3] in this level, -1 where absent."""
        pos = lookup_keys(self.sorted_keys, linear_keys(queries))
        return torch.where(pos >= 0, self.order[pos.clamp_min(0)], pos)

    def conv3_pairs(self) -> Pairs:
        """Submanifold 3x3x3 pairs: slot k holds (rows m, rows n) with coords[n] = coords[m] + offset_k;
        the centre slot (13) is the identity."""
        if self._conv3_pairs is None:
            offsets = CONV3_OFFSETS.to(self.coords.device)
            nbr = self.lookup((self.coords[:, None, :] + offsets[None]).reshape(-1, 3)).reshape(-1, 27)
            pairs: Pairs = []
            for k in range(27):
                if k == 13:
                    pairs.append(None)
                    continue
                rows = torch.nonzero(nbr[:, k] >= 0).squeeze(1)
                pairs.append((rows, nbr[rows, k]))
            self._conv3_pairs = pairs
        return self._conv3_pairs

    def down(self) -> Tuple["_TorchLevel", Pairs, Pairs]:
        """(coarse level, down pairs (coarse parent, fine child) per child slot, up pairs (the reverse))."""
        if self._down is None:
            parent_coords = torch.div(self.coords, 2, rounding_mode="floor")
            keys, parent = torch.unique(linear_keys(parent_coords), sorted=True, return_inverse=True)
            slot = child_slot(self.coords - 2 * parent_coords)
            coarse_coords = parent_coords.new_empty(keys.shape[0], 3)
            coarse_coords[parent] = parent_coords
            down: Pairs = []
            for k in range(8):
                children = torch.nonzero(slot == k).squeeze(1)
                down.append((parent[children], children))
            up: Pairs = [(child, par) for par, child in down]
            self._down = (_TorchLevel(coarse_coords), down, up)
        return self._down


class _PairConv(torch.autograd.Function):
    """Sparse convolution as gather-matmul-scatter per kernel slot:
    out[o] += x[i] @ W[k] for every pair (o, i) of slot k (None = identity pairs, a plain matmul).
    Only occupied neighbours are multiplied (on surfaces ~1/3 of the 27 slots); backward is the same
    with the pairs reversed and the kernel transposed."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, pairs: Pairs, num_out: int) -> Tensor:
        out = x.new_zeros(num_out, weight.shape[2])
        for k, pair in enumerate(pairs):
            if pair is None:
                out += x @ weight[k]
            elif pair[0].numel():
                out.index_add_(0, pair[0], torch.index_select(x, 0, pair[1]) @ weight[k])
        ctx.save_for_backward(x, weight)
        ctx.pairs = pairs
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = torch.zeros_like(weight) if need_w else None
        for k, pair in enumerate(ctx.pairs):
            if pair is None:
                if need_x:
                    grad_x += grad_out @ weight[k].T
                if need_w:
                    grad_w[k] = x.T @ grad_out
            elif pair[0].numel():
                g = torch.index_select(grad_out, 0, pair[0])
                if need_x:
                    grad_x.index_add_(0, pair[1], g @ weight[k].T)
                if need_w:
                    grad_w[k] = torch.index_select(x, 0, pair[1]).T @ g
        return grad_x, grad_w, None, None


class TorchBackend(SparseConvBackend):
    """Pure PyTorch sparse convolution: int64 coordinate hash + searchsorted neighbour lookup, then
    gather-matmul-scatter per kernel slot (`_PairConv`)."""

    name = "torch"
    native_order_is_canonical = True

    def init(self, coords: Tensor, features: Tensor) -> SparseTensor:
        return SparseTensor(features, 0, _TorchLevel(coords.long()), self)

    def _conv3_native(self, x: SparseTensor, weight: Tensor) -> SparseTensor:
        level = x.native
        return x.replace(_PairConv.apply(x.features, weight, level.conv3_pairs(), level.num))

    def _down2_native(self, x: SparseTensor, weight: Tensor) -> SparseTensor:
        coarse, down, _ = x.native.down()
        return SparseTensor(_PairConv.apply(x.features, weight, down, coarse.num), x.level + 1, coarse, self)

    def _up2_native(self, x: SparseTensor, fine: SparseTensor, weight: Tensor) -> SparseTensor:
        coarse, _, up = fine.native.down()
        if coarse is not x.native:
            raise ValueError("up2: the coarse tensor was not made by down2 of the given fine level")
        return SparseTensor(_PairConv.apply(x.features, weight, up, fine.native.num), fine.level, fine.native, self)
