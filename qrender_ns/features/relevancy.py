"""Text queries: relevancy of features (per Gaussian or per pixel) against a text embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def relevancy(features: Tensor, query: Tensor, negatives: Tensor, temperature: float = 10.0) -> Tensor:
    """LERF's relevancy: min over canonical negatives of softmax(t * [cos(f, q), cos(f, n_j)])[0].

    features [..., D], query [D], negatives [J, D] -> [...] in [0, 1]; 0.5 means "no better than
    a generic word". An exactly zero feature (nothing rendered) scores 0.5, as LangSplat's
    get_relevancy gives it (all cosines 0): it enters the IoU's min-max normalisation like theirs.
    """
    f = F.normalize(features, dim=-1)
    pos = f @ F.normalize(query, dim=-1)
    neg = f @ F.normalize(negatives, dim=-1).T  # [..., J]
    return relevancy_from_cosines(pos, neg, temperature)  # a zero feature scores 0.5, as LangSplat's formula


def relevancy_from_cosines(pos: Tensor, neg: Tensor, temperature: float = 10.0) -> Tensor:
    """The same from cosines: pos [...], neg [..., J] (e.g. query-space renders) -> [...]."""
    pair = torch.softmax(temperature * torch.stack([pos[..., None].expand_as(neg), neg], dim=-1), dim=-1)
    return pair[..., 0].min(dim=-1).values
