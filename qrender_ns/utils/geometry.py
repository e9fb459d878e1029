"""Rotations: the one quaternion -> rotation matrix of the package (wxyz, as gsplat and the 3DGS PLY)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """[N, 4] wxyz (any norm) -> [N, 3, 3]."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(-1, 3, 3)


def quat_to_rotmat_numpy(quats: np.ndarray) -> np.ndarray:
    """quat_to_rotmat on numpy arrays (same dtype out)."""
    return quat_to_rotmat(torch.from_numpy(np.ascontiguousarray(quats))).numpy()
