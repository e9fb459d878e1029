"""GS-Net: sparse 3D U-Net predicting a 512-D feature per Gaussian (docs/gsnet.md).

`voxelize` (Gaussians <-> sparse voxels), `backbone` (MinkUNet behind the `SparseConvBackend`
interface: torch / spconv / minkowski), `gsnet` (the network, its config and checkpoints),
`scenes` (Gaussians + cameras + teacher of a scene), `train` (`qsplat train-gsnet`, DDP via
torchrun), `predict` (`qsplat predict-features`), `backproject` (the training-free baseline,
`qsplat backproject`).
"""

from qrender_ns.gsnet.backbone import BACKEND_NAMES, MinkUNet, SparseConvBackend, available_backends, get_backend
from qrender_ns.gsnet.gsnet import GSNet, GSNetConfig, read_checkpoint
from qrender_ns.gsnet.voxelize import Voxelization, devoxelize, devoxelize_trilinear, pool_to_voxels, voxelize

__all__ = [
    "BACKEND_NAMES",
    "GSNet",
    "GSNetConfig",
    "MinkUNet",
    "SparseConvBackend",
    "Voxelization",
    "available_backends",
    "devoxelize",
    "devoxelize_trilinear",
    "get_backend",
    "pool_to_voxels",
    "read_checkpoint",
    "voxelize",
]
