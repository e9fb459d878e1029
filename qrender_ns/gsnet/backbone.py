"""MinkUNet-style sparse 3D U-Net behind one small sparse-convolution interface.

The network (`MinkUNet`) owns its weights in one canonical layout and never touches a sparse-conv
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

Backends:
- `torch`: pure PyTorch, always available (the CPU/test path). Voxel coordinates are hashed to int64
  keys and looked up with `searchsorted`; a convolution is a gather-matmul-scatter (`index_select`,
  `mm`, `index_add_`) per kernel slot over the occupied neighbour pairs only, in a custom autograd
  function that keeps no per-slot intermediates for backward.
- `spconv`: spconv 2.x (`pip install spconv` for CPU, `spconv-cu12x` for CUDA). Two CPU defects of
  2.3.8 are patched at load (`_patch_spconv`): the CPU backward calls `torch.cuda.current_stream()`
  (raises without a GPU), and its CPU ops race when torch uses several threads (they run with one).
- `minkowski`: MinkowskiEngine 0.5.4 (the paper's backbone library); needs a source build
  (scripts/build_minkowski.sh, docs/gsnet.md); parity-tested against `torch` where it is installed.
"""

from __future__ import annotations

import itertools
import sys
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .voxelize import linear_keys, lookup_keys

BACKEND_NAMES = ("torch", "spconv", "minkowski")
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


# ---------------------------------------------------------------------------------------------------
# torch backend
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# spconv backend
# ---------------------------------------------------------------------------------------------------


def _single_threaded_on_cpu(fn):
    """Run a spconv op with one torch thread when its first tensor is on the CPU (see _patch_spconv)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = args[0] if args else None
        if not (isinstance(first, Tensor) and first.device.type == "cpu"):
            return fn(*args, **kwargs)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def _patch_spconv(ops_module) -> None:
    """Two CPU defects of spconv 2.3.8 (measured here, 2 cores):
    - its CPU backward calls torch.cuda.current_stream(), which raises without a GPU: the stream
      getter returns 0 when CUDA is unavailable (CPU kernels ignore the stream);
    - its CPU index-pair generation and gather-matmul-scatter race when torch runs several threads
      (the same call gives different results from run to run): these ops run with one thread."""
    if getattr(ops_module, "_qsplat_patched", False):
        return

    def get_current_stream():
        return torch.cuda.current_stream().cuda_stream if torch.cuda.is_available() else 0

    ops_module.get_current_stream = get_current_stream
    for name in ("get_indice_pairs", "get_indice_pairs_implicit_gemm", "indice_conv", "indice_conv_backward",
                 "implicit_gemm", "implicit_gemm_backward"):
        if hasattr(ops_module, name):
            setattr(ops_module, name, _single_threaded_on_cpu(getattr(ops_module, name)))
    ops_module._qsplat_patched = True


class SpconvBackend(SparseConvBackend):
    """spconv 2.x. Levels share one indice_dict: submanifold maps are keyed per level, and up2 reuses
    the index pairs of the matching down2 (SparseInverseConv3d)."""

    name = "spconv"
    _PAD = 64  # coords shifted and spatial shape padded by multiples of 2^6 (exact for <= 6 levels)

    def __init__(self):
        super().__init__()
        import spconv
        import spconv.pytorch as spconv_torch
        import spconv.pytorch.ops as spconv_ops

        _patch_spconv(spconv_ops)
        self.sp = spconv_torch
        self.version = getattr(spconv, "__version__", "?")
        self._modules: Dict[Tuple, nn.Module] = {}

    def describe(self) -> str:
        return f"spconv {self.version}"

    def _module(self, kind: str, cin: int, cout: int, key: str, device) -> nn.Module:
        ident = (kind, cin, cout, key, str(device))
        if ident not in self._modules:
            sp = self.sp
            if kind == "conv3":
                m = sp.SubMConv3d(cin, cout, 3, bias=False, indice_key=key)
            elif kind == "down2":
                m = sp.SparseConv3d(cin, cout, 2, stride=2, bias=False, indice_key=key)
            else:
                m = sp.SparseInverseConv3d(cin, cout, 2, bias=False, indice_key=key)
            self._modules[ident] = m.to(device)
        return self._modules[ident]

    def _call(self, kind: str, x: SparseTensor, weight: Tensor, key: str, level: int):
        k, cin, cout = weight.shape
        size = 3 if kind == "conv3" else 2
        native_weight = weight.permute(2, 0, 1).reshape(cout, size, size, size, cin).contiguous()
        module = self._module(kind, cin, cout, key, weight.device)
        inp = x.native.replace_feature(x.features)
        out = torch.func.functional_call(module, {"weight": native_weight}, (inp,))
        return SparseTensor(out.features, level, out, self)

    def init(self, coords: Tensor, features: Tensor) -> SparseTensor:
        coords = coords.long()
        # Shift by a multiple of _PAD so that floor(p / 2^l) groups voxels exactly as the other backends.
        shift = 0
        if coords.numel():
            shift = torch.div(coords.min(dim=0).values, self._PAD, rounding_mode="floor") * self._PAD
        shifted = coords - shift
        extent = (shifted.max(dim=0).values + 1) if coords.numel() else torch.ones(3, dtype=torch.long)
        shape = ((extent + self._PAD - 1) // self._PAD * self._PAD).tolist()
        indices = torch.cat([shifted.new_zeros(shifted.shape[0], 1), shifted], dim=1).int().contiguous()
        native = self.sp.SparseConvTensor(features, indices, shape, 1)
        return SparseTensor(features, 0, native, self)

    def _conv3_native(self, x, weight):
        return self._call("conv3", x, weight, f"subm{x.level}", x.level)

    def _down2_native(self, x, weight):
        return self._call("down2", x, weight, f"down{x.level}", x.level + 1)

    def _up2_native(self, x, fine, weight):
        return self._call("up2", x, weight, f"down{fine.level}", fine.level)


# ---------------------------------------------------------------------------------------------------
# MinkowskiEngine backend
# ---------------------------------------------------------------------------------------------------


@dataclass
class _MinkowskiLevel:
    """A MinkowskiEngine tensor plus, at level 0, the row of each ME row in the caller's order (ME's
    coordinate manager stores coordinates in its own order; its SparseTensor takes no extra attributes)."""

    tensor: Any
    rows: Optional[Tensor] = None


class MinkowskiBackend(SparseConvBackend):
    """MinkowskiEngine 0.5.x. Tensor strides play the role of levels (a level-l coordinate is stored
    multiplied by 2^l); the level-0 row order is mapped back in `output_features`; kernel order is
    calibrated at first use. Build: scripts/build_minkowski.sh (docs/gsnet.md)."""

    name = "minkowski"

    def __init__(self):
        super().__init__()
        import MinkowskiEngine as ME

        self.ME = ME
        self._modules: Dict[Tuple, nn.Module] = {}

    def describe(self) -> str:
        return f"MinkowskiEngine {getattr(self.ME, '__version__', '?')}"

    def _module(self, kind, cin, cout, device):
        ident = (kind, cin, cout, str(device))
        if ident not in self._modules:
            ME = self.ME
            if kind == "conv3":
                m = ME.MinkowskiConvolution(cin, cout, kernel_size=3, stride=1, bias=False, dimension=3)
            elif kind == "down2":
                m = ME.MinkowskiConvolution(cin, cout, kernel_size=2, stride=2, bias=False, dimension=3)
            else:
                m = ME.MinkowskiConvolutionTranspose(cin, cout, kernel_size=2, stride=2, bias=False, dimension=3)
            self._modules[ident] = m.to(device)
        return self._modules[ident]

    def _with_features(self, x: SparseTensor):
        native = x.native.tensor
        return self.ME.SparseTensor(features=x.features, coordinate_map_key=native.coordinate_map_key,
                                    coordinate_manager=native.coordinate_manager)

    def init(self, coords: Tensor, features: Tensor) -> SparseTensor:
        ME = self.ME
        coords = coords.long()
        # (ME's stride-2 coordinates are floor(p / 2) * 2, negative ones included: checked, no shift needed)
        batched = torch.cat([coords.new_zeros(coords.shape[0], 1), coords], dim=1).int().cpu()
        probe = ME.SparseTensor(features=features.detach(), coordinates=batched, device=str(features.device))
        rows = _TorchLevel(coords).lookup(probe.C[:, 1:].long().to(coords.device))
        if bool((rows < 0).any()) or rows.numel() != coords.shape[0]:
            raise RuntimeError("MinkowskiEngine changed the voxel set (coordinates must be unique)")
        native = ME.SparseTensor(features=features[rows], coordinate_map_key=probe.coordinate_map_key,
                                 coordinate_manager=probe.coordinate_manager)
        return SparseTensor(features[rows], 0, _MinkowskiLevel(native, rows), self)

    def output_features(self, x: SparseTensor) -> Tensor:
        rows = x.native.rows
        if rows is None:
            raise ValueError("output_features needs a level-0 tensor")
        inverse = torch.empty_like(rows)
        inverse[rows] = torch.arange(rows.numel(), device=rows.device)
        return x.features[inverse]

    def _run(self, kind, x, weight, coordinates=None):
        k, cin, cout = weight.shape
        module = self._module(kind, cin, cout, weight.device)
        kwargs = {} if coordinates is None else {"coordinates": coordinates}
        return torch.func.functional_call(module, {"kernel": weight}, (self._with_features(x),), kwargs)

    def _conv3_native(self, x, weight):
        out = self._run("conv3", x, weight)
        return SparseTensor(out.F, x.level, _MinkowskiLevel(out, x.native.rows), self)

    def _down2_native(self, x, weight):
        out = self._run("down2", x, weight)
        return SparseTensor(out.F, x.level + 1, _MinkowskiLevel(out), self)

    def _up2_native(self, x, fine, weight):
        out = self._run("up2", x, weight, coordinates=fine.native.tensor.coordinate_map_key)
        return SparseTensor(out.F, fine.level, _MinkowskiLevel(out, fine.native.rows), self)


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
