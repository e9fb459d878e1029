"""The training-free baseline head: back-projection of the teacher's mask embeddings (docs/gsnet.md).

Every Gaussian's feature is the blending-weighted average of the mask embeddings of the pixels it
contributes to, over all training views, with the weights of the same rasterizer pass as training
(Q-Render with K = `num_quantiles`, or dense):

    f_i = normalize( sum_v sum_p w_{i,p} e_{m_v(p)} / sum_v sum_p w_{i,p} )

(pixels in no mask are skipped). One pass over the views, no optimisation. A Gaussian no masked
pixel reaches (total weight 0) gets the zero feature, the project's "never supervised" state.

    qsplat backproject --scenes data/room2 outputs/room/q-splat/<time>/config.yml [--num-quantiles 10]

Inside `ns-train q-splat`: `--pipeline.model.feature-head backproject` (method/model.py). Over whole scenes,
`qsplat backproject`: workflows/backproject.py.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from qrender_ns.render.backproject import backproject_to_gaussians
from qrender_ns.utils.progress import track

# One view of the back-projection: (viewmat [4, 4] world-to-camera, K [3, 3], width, height, teacher-cache key)
View = Tuple[Tensor, Tensor, int, int, str]


def normalize_backprojection(sums: Tensor, weights: Tensor) -> Tensor:
    """Unit features sums / weights, zero where the total weight is 0 (never reached by a masked pixel)."""
    features = F.normalize(sums, dim=-1)
    return torch.where((weights > 0)[:, None], features, torch.zeros_like(features))


def backproject_views(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, views: Sequence[View],
                      teacher, num_quantiles: Optional[int] = 10, render_scale: float = 1.0, backend: str = "auto",
                      progress: bool = False, description: str = "back-projection") -> Tuple[Tensor, Tensor]:
    """Back-project `teacher`'s masks of every view onto the Gaussians (linear scales, opacities in [0, 1]):
    (features [N, D] unit or zero, total weights [N])."""
    if not render_scale > 0:
        raise ValueError(f"render_scale must be > 0, got {render_scale}")
    device, dtype = means.device, means.dtype
    sums = torch.zeros(means.shape[0], int(teacher.feature_dim), device=device, dtype=dtype)
    weights = torch.zeros(means.shape[0], device=device, dtype=dtype)
    for viewmat, K, width, height, key in track(list(views), description, progress):
        w, h = max(1, round(width * render_scale)), max(1, round(height * render_scale))
        K = K.clone().to(device=device, dtype=dtype)
        K[:2] *= torch.tensor([w / width, h / height], device=device, dtype=dtype)[:, None]
        mask_ids, embeddings = teacher.read(key)
        mask_ids = _resize_nearest(mask_ids.to(device), h, w)
        s, wt = backproject_to_gaussians(means, quats, scales, opacities, viewmat.to(device=device, dtype=dtype)[None],
                                         K[None], w, h, mask_ids=mask_ids[None], embeddings=embeddings.to(device),
                                         num_quantiles=num_quantiles, backend=backend)
        sums += s
        weights += wt
    return normalize_backprojection(sums, weights), weights


def _resize_nearest(mask_ids: Tensor, height: int, width: int) -> Tensor:
    """Teacher mask ids [H, W] resampled nearest to the render size."""
    if tuple(mask_ids.shape) == (height, width):
        return mask_ids
    rows = (torch.arange(height, device=mask_ids.device) * mask_ids.shape[0]) // height
    cols = (torch.arange(width, device=mask_ids.device) * mask_ids.shape[1]) // width
    return mask_ids[rows][:, cols]
