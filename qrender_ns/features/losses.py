"""Contrastive feature losses between rendered pixel features and teacher mask embeddings."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_mask_pixels(mask_ids: Tensor, pixels_per_mask: int, generator: Optional[torch.Generator] = None
                       ) -> Tuple[Tensor, Tensor]:
    """Up to `pixels_per_mask` random pixels of every mask: (flat pixel indices [P], mask ids [P]).

    The loss then needs rendered features only at these pixels, not a dense [H, W, D] map.
    """
    flat = mask_ids.reshape(-1)
    valid = torch.nonzero(flat >= 0).squeeze(-1)
    if valid.numel() == 0:
        return valid, valid
    order = torch.randperm(valid.numel(), generator=generator, device="cpu").to(valid.device)
    shuffled = valid[order]
    ids = flat[shuffled]
    ids_sorted, by_mask = torch.sort(ids, stable=True)  # random order within each mask
    counts = torch.bincount(ids_sorted)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(ids_sorted.numel(), device=ids.device) - starts[ids_sorted]
    keep = rank < pixels_per_mask
    return shuffled[by_mask[keep]], ids_sorted[keep]


def cosine_matrix(features: Tensor, embeddings: Tensor) -> Tensor:
    """cos(f_p, e_m) [P, M] = F.normalize(f) @ F.normalize(e).T, computed as (f @ e_hat.T) / |f|:
    the [P, D] features are never normalised elementwise, so the backward is one matmul and a
    row scaling instead of several [P, D] passes (the loss reads ~10k x 512 pixel features)."""
    norms = features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (features @ F.normalize(embeddings, dim=-1).T) / norms


def paper_contrastive_loss(features: Tensor, targets: Tensor, embeddings: Tensor) -> Tensor:
    """Q-Render Eq. 2: -log( exp(cos(f, e_m)) / sum_{j != m} exp(cos(f, e_j)) ).

    Cosine similarity, no temperature, and the denominator excludes the positive as printed
    in the paper. features [P, D], targets [P] in 0..M-1, embeddings [M, D]; needs M >= 2.
    """
    cos = cosine_matrix(features, embeddings)  # [P, M]
    positive = cos.gather(1, targets[:, None]).squeeze(1)
    negatives = cos.masked_fill(F.one_hot(targets, cos.shape[1]).bool(), float("-inf"))
    return (torch.logsumexp(negatives, dim=1) - positive).mean()


def infonce_loss(features: Tensor, targets: Tensor, embeddings: Tensor, log_temperature: Tensor) -> Tensor:
    """Standard InfoNCE: cross-entropy over cos / tau, positive included, tau learnable."""
    cos = cosine_matrix(features, embeddings)
    return F.cross_entropy(cos / log_temperature.exp(), targets)
