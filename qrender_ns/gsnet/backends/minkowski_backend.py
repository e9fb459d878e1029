"""`minkowski` sparse-conv backend: MinkowskiEngine, imported when the backend is first made.

MinkowskiEngine 0.5.4 (the paper's backbone library); needs a source build (scripts/build_minkowski.sh,
docs/gsnet.md); parity-tested against `torch` where it is installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from qrender_ns.gsnet.backends.base import SparseConvBackend, SparseTensor
from qrender_ns.gsnet.backends.torch_backend import _TorchLevel


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
