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
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
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


def transform_inputs(inputs: Dict[str, Tensor], mirror: Tuple[bool, bool] = (False, False), angle: float = 0.0,
                     scale: float = 1.0, brightness: float = 0.0, contrast: float = 0.0) -> Dict[str, Tensor]:
    """A copy of `SceneGaussians.gsnet_inputs()` (means, colors, opacities, scales, quats) mirrored in x / y, turned
    by `angle` about z and scaled, all about the bounding-box centre; colours (rgb - 0.5) (1 + contrast) + 0.5 +
    brightness, clipped.

    Orientations follow: a rotation R maps q to q_R * q; a mirror M maps the covariance R S^2 R^T to
    (M R M) S^2 (M R M)^T, i.e. negates the quaternion's components along the two axes that are not mirrored."""
    out = dict(inputs)
    means, device = inputs["means"], inputs["means"].device
    centre = (means.min(0).values + means.max(0).values) / 2 if means.shape[0] else means.new_zeros(3)
    pos = means - centre
    quats = inputs.get("quats")
    for axis in (0, 1):
        if mirror[axis]:
            pos = pos.clone()
            pos[:, axis] = -pos[:, axis]
            if quats is not None:
                sign = torch.ones(4, device=device, dtype=quats.dtype)
                sign[[i + 1 for i in range(3) if i != axis]] = -1
                quats = quats * sign
    if angle != 0.0:
        c, s = math.cos(angle), math.sin(angle)
        rot = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], device=device, dtype=means.dtype)
        pos = pos @ rot.T
        if quats is not None:
            q_rot = torch.tensor([math.cos(angle / 2), 0.0, 0.0, math.sin(angle / 2)], device=device, dtype=quats.dtype)
            quats = _quat_multiply(q_rot, quats)
    out["means"] = pos * scale + centre
    if inputs.get("scales") is not None:
        out["scales"] = inputs["scales"] * scale
    if quats is not None:
        out["quats"] = quats
    if brightness != 0.0 or contrast != 0.0:
        out["colors"] = ((inputs["colors"] - 0.5) * (1 + contrast) + 0.5 + brightness).clamp(0, 1)
    return out


def augment_inputs(inputs: Dict[str, Tensor], aug: GSNetAugment, generator: torch.Generator) -> Dict[str, Tensor]:
    """`transform_inputs` with random parameters drawn from `aug` (training)."""
    if not aug.enabled:
        return inputs

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    mirror = [False, False]
    if aug.mirror:
        for axis in (0, 1):
            mirror[axis] = float(torch.rand((), generator=generator)) < 0.5
    angle = uniform(0.0, 2 * math.pi) if aug.rotate_z else 0.0
    factor = uniform(*aug.scale)
    brightness = contrast = 0.0
    if aug.color_jitter > 0:
        brightness, contrast = uniform(-aug.color_jitter, aug.color_jitter), uniform(-aug.color_jitter, aug.color_jitter)
    return transform_inputs(inputs, (mirror[0], mirror[1]), angle, factor, brightness, contrast)


def tta_transforms(views: int) -> List[Tuple[Tuple[bool, bool], float]]:
    """(mirror, angle) of each test-time view: 1 = the inputs as they are; an even V = V / 2 turns about z by
    2 pi k / (V / 2), each as is and mirrored in x (the symmetries GS-Net is trained under, see GSNetAugment)."""
    if views == 1:
        return [((False, False), 0.0)]
    if views < 1 or views % 2:
        raise ValueError(f"test-time views must be 1 or an even number (turns x mirror), got {views}")
    turns = views // 2
    return [((mirrored, False), 2 * math.pi * k / turns) for k in range(turns) for mirrored in (False, True)]


@torch.no_grad()
def predict_with_tta(net, inputs: Dict[str, Tensor], units_per_metre: float = 1.0, views: int = 1) -> Tensor:
    """GS-Net's features averaged over `tta_transforms(views)` of its inputs, L2-normalised: every view voxelizes
    the room on another grid, and a Gaussian's feature should not depend on how the room is turned."""
    total = None
    for mirror, angle in tta_transforms(views):
        features = net(**transform_inputs(inputs, mirror, angle), units_per_metre=units_per_metre)
        total = features if total is None else total + features
    return F.normalize(total, dim=-1) if views > 1 else total
