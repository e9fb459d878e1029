"""Training-time augmentation of GS-Net's *inputs* (not of the scene that is rendered).

A Gaussian's semantic feature does not change when the room is turned, mirrored, scaled a little or
lit differently, so GS-Net is shown a transformed copy of the Gaussians while its output is rendered
and supervised with the untouched ones: the rendered views, masks and loss stay exact. With tens of
training rooms (the paper has 1,503 scenes) this is what keeps the U-Net from learning where objects
stood in the training rooms instead of what they look like. The usual 3D semantic-segmentation set
(Pointcept / MinkowskiEngine recipes): rotation about the up axis (z in q-splat's frames: generated
and ScanNet scenes are z-up), mirror in x/y, isotropic scale, brightness/contrast jitter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
from torch import Tensor


@dataclass
class GSNetAugment:
    """Random transforms of GS-Net's inputs per scene and step (training only)."""

    enabled: bool = True
    rotate_z: bool = True
    """Uniform rotation about z (the up axis)."""
    mirror: bool = True
    """Mirror x and/or y, each with probability 1/2."""
    scale: Tuple[float, float] = (0.9, 1.1)
    """Isotropic scale range (positions and sizes; voxel size unchanged)."""
    color_jitter: float = 0.1
    """Brightness and contrast jitter: rgb' = (rgb - 0.5) * (1 + c) + 0.5 + b with b, c ~ U(-j, j), clipped."""

    def __post_init__(self):
        self.scale = tuple(float(s) for s in self.scale)
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"augment scale must be (low, high) with 0 < low <= high, got {self.scale}")
        if not 0 <= self.color_jitter < 1:
            raise ValueError(f"augment color_jitter must be in [0, 1), got {self.color_jitter}")


def _quat_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product of wxyz quaternions (broadcasting)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], dim=-1)


def augment_inputs(inputs: Dict[str, Tensor], aug: GSNetAugment, generator: torch.Generator) -> Dict[str, Tensor]:
    """A transformed copy of `SceneGaussians.gsnet_inputs()` (means, colors, opacities, scales, quats).

    Positions turn about the bounding-box centre. Orientations follow: a rotation R maps q to q_R * q; a mirror
    M maps the covariance R S^2 R^T to (M R M) S^2 (M R M)^T, i.e. negates the quaternion's components along
    the two axes that are not mirrored."""
    if not aug.enabled:
        return inputs
    out = dict(inputs)
    means, device = inputs["means"], inputs["means"].device

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    centre = (means.min(0).values + means.max(0).values) / 2 if means.shape[0] else means.new_zeros(3)
    pos = means - centre
    quats = inputs.get("quats")
    if aug.mirror:
        for axis in (0, 1):
            if float(torch.rand((), generator=generator)) < 0.5:
                pos = pos.clone()
                pos[:, axis] = -pos[:, axis]
                if quats is not None:
                    sign = torch.ones(4, device=device, dtype=quats.dtype)
                    sign[[i + 1 for i in range(3) if i != axis]] = -1
                    quats = quats * sign
    if aug.rotate_z:
        angle = uniform(0.0, 2 * math.pi)
        c, s = math.cos(angle), math.sin(angle)
        rot = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], device=device, dtype=means.dtype)
        pos = pos @ rot.T
        if quats is not None:
            q_rot = torch.tensor([math.cos(angle / 2), 0.0, 0.0, math.sin(angle / 2)], device=device, dtype=quats.dtype)
            quats = _quat_multiply(q_rot, quats)
    factor = uniform(*aug.scale)
    out["means"] = pos * factor + centre
    if inputs.get("scales") is not None:
        out["scales"] = inputs["scales"] * factor
    if quats is not None:
        out["quats"] = quats
    if aug.color_jitter > 0:
        b, c = uniform(-aug.color_jitter, aug.color_jitter), uniform(-aug.color_jitter, aug.color_jitter)
        out["colors"] = ((inputs["colors"] - 0.5) * (1 + c) + 0.5 + b).clamp(0, 1)
    return out
