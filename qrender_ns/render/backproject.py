"""Back-projection: per-pixel targets accumulated onto the Gaussians with their blending weights.

For the pixels p of a view and a target g(p) (a feature, or the embedding of the mask p lies in),
returns per Gaussian i

    sums[i]    = sum_p w_{i,p} g(p)        [N, C]
    weights[i] = sum_p w_{i,p}             [N]

where w_{i,p} = d F(p) / d f_i is the weight Gaussian i's feature has in the pixel's rendered
feature F(p): dense, `T_i alpha_i` over every Gaussian of the ray; quantile (Q-Render, K =
`num_quantiles`), `T_Q,i alpha_i / (1 - T_Q)` over the K selected Gaussians only (their weights in
the normalised blend, so they sum to 1 per pixel), zero elsewhere.

The rendered feature is linear in the per-Gaussian features, so the weighted sum is exactly the
gradient of sum_p <F(p), g(p)> with respect to the features: one forward and one backward of the
rasterizer (any backend) with zero features, no [pixels, N] weight matrix. With mask ids the
rendered channels are the masks (one-hot targets, M channels, only the masked pixels rendered), and
sums = W @ embeddings.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from qrender_ns.render.validate import _check_tensor, check_num_quantiles
from qrender_ns.render.projection import project_and_bin
from qrender_ns.render.rasterize import rasterize_to_pixels


def backproject_to_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    mask_ids: Optional[Tensor] = None,
    embeddings: Optional[Tensor] = None,
    pixel_features: Optional[Tensor] = None,
    num_quantiles: Optional[int] = None,
    backend: str = "auto",
    tile_size: int = 16,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
) -> Tuple[Tensor, Tensor]:
    """Blending-weighted sums of per-pixel targets onto 3D Gaussians (module docstring).

    Gaussians as `rasterize_features` (means [N,3], quats [N,4] wxyz, linear scales [N,3],
    opacities [N] in [0,1]); cameras viewmats [V,4,4] (world-to-camera), Ks [V,3,3]. Targets, one of:
    - `mask_ids` int [V,H,W] (-1 = no mask, else a row of `embeddings` [M,C]; the teacher cache's
      convention) — only masked pixels count, in sums and weights;
    - `pixel_features` [V,H,W,C] — every pixel counts.
    `num_quantiles` None = dense, K = the K quantile Gaussians of Q-Render.
    Returns (sums [N,C], weights [N]); nothing here is differentiable.
    """
    check_num_quantiles(num_quantiles)
    if (mask_ids is None) == (pixel_features is None):
        raise ValueError("give either `mask_ids` (with `embeddings`) or `pixel_features` as the per-pixel target")
    num_gs, num_cams = means.shape[0], viewmats.shape[0]
    device, dtype = means.device, means.dtype
    if mask_ids is not None:
        if embeddings is None:
            raise ValueError("`mask_ids` index the rows of `embeddings` [M, C]: pass `embeddings` too")
        _check_tensor("embeddings", embeddings, (None, None))
        _check_tensor("mask_ids", mask_ids, (num_cams, height, width), floating=False)
        if mask_ids.is_floating_point():
            raise ValueError(f"`mask_ids` must be an integer tensor (-1 = no mask), got {mask_ids.dtype}")
        num_masks = embeddings.shape[0]
        flat = mask_ids.reshape(-1).to(device=device, dtype=torch.int64)
        if flat.numel() and (int(flat.min()) < -1 or int(flat.max()) >= num_masks):
            raise ValueError(f"`mask_ids` must lie in -1..{num_masks - 1} (-1 = no mask; {num_masks} embeddings)")
        pixel_ids = torch.nonzero(flat >= 0).squeeze(-1)
        channels = max(num_masks, 1)
        grad = torch.zeros(pixel_ids.numel(), channels, device=device, dtype=dtype)
        grad[torch.arange(pixel_ids.numel(), device=device), flat[pixel_ids]] = 1.0  # one-hot targets
    else:
        _check_tensor("pixel_features", pixel_features, (num_cams, height, width, None))
        pixel_ids = None
        ones = torch.ones(*pixel_features.shape[:-1], 1, device=device, dtype=dtype)
        grad = torch.cat([pixel_features.to(device=device, dtype=dtype), ones], dim=-1)  # last channel: weights
        channels = grad.shape[-1]
    if num_gs == 0 or (pixel_ids is not None and pixel_ids.numel() == 0):
        out_c = embeddings.shape[1] if mask_ids is not None else pixel_features.shape[-1]
        return torch.zeros(num_gs, out_c, device=device, dtype=dtype), torch.zeros(num_gs, device=device, dtype=dtype)

    with torch.no_grad():
        _, means2d, _, conics, _, isect_offsets, flatten_ids = project_and_bin(
            means.detach(), quats.detach(), scales.detach(), viewmats, Ks, width, height, tile_size, near_plane,
            far_plane)
    with torch.enable_grad():  # callers are often in no_grad (eval, the viewer)
        probe = torch.zeros(num_gs, channels, device=device, dtype=dtype, requires_grad=True)
        out, _ = rasterize_to_pixels(means2d, conics, probe, opacities.detach(), width, height, tile_size,
                                     isect_offsets, flatten_ids, num_quantiles=num_quantiles, backend=backend,
                                     pixel_ids=pixel_ids)
        (acc,) = torch.autograd.grad(out, probe, grad_outputs=grad)
    if mask_ids is not None:
        weights_per_mask = acc[:, :embeddings.shape[0]]  # [N, M]: sum of w over each mask's pixels
        return weights_per_mask @ embeddings.to(device=device, dtype=dtype), weights_per_mask.sum(-1)
    return acc[:, :-1], acc[:, -1]
