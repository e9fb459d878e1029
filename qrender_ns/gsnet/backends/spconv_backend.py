"""`spconv` sparse-conv backend: spconv 2.x, imported when the backend is first made.

`pip install spconv` for CPU, `spconv-cu12x` for CUDA. Two CPU defects of 2.3.8 are patched at load
(`_patch_spconv`): the CPU backward calls `torch.cuda.current_stream()` (raises without a GPU), and its CPU ops
race when torch uses several threads (they run with one).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor, nn

from qrender_ns.gsnet.backends.base import SparseConvBackend, SparseTensor


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
