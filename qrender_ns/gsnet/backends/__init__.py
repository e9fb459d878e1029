"""GS-Net's sparse-convolution backends, one file each; optional libraries are imported only when a backend is made.

- `base`: the interface (`SparseConvBackend`, `SparseTensor`, canonical kernel slots, `calibrate_permutation`);
- `torch_backend`: `TorchBackend`, pure PyTorch, always available;
- `spconv_backend`: `SpconvBackend`, spconv 2.x;
- `minkowski_backend`: `MinkowskiBackend`, MinkowskiEngine 0.5.x.

The registry (`get_backend`, `available_backends`, `resolve_backend`) and the network (`MinkUNet`) are in
`qrender_ns.gsnet.backbone`.
"""

from qrender_ns.gsnet.backends.base import SparseConvBackend, SparseTensor, calibrate_permutation
from qrender_ns.gsnet.backends.minkowski_backend import MinkowskiBackend
from qrender_ns.gsnet.backends.spconv_backend import SpconvBackend
from qrender_ns.gsnet.backends.torch_backend import TorchBackend

__all__ = ["SparseConvBackend", "SparseTensor", "calibrate_permutation", "TorchBackend", "SpconvBackend",
           "MinkowskiBackend"]
