"""Text encoders that embed queries into a teacher's feature space, chosen from the cache manifest."""

from __future__ import annotations

from pathlib import Path
from typing import List, Protocol, Union

import torch

from .cache import MANIFEST_NAME, TeacherCache


class TextEncoder(Protocol):
    """What relevancy queries, evaluation and the viewer use: texts -> L2-normalised [T, dim]."""

    name: str  # the teacher whose feature space it embeds into
    dim: int

    def encode(self, texts: List[str]) -> torch.Tensor: ...


def load_text_encoder(cache_root_or_manifest: Union[str, Path, TeacherCache]) -> TextEncoder:
    """The text encoder matching the teacher that filled a cache (its folder, its manifest.json, or an open
    TeacherCache)."""
    cache = cache_root_or_manifest
    if not isinstance(cache, TeacherCache):
        path = Path(cache)
        cache = TeacherCache(path.parent if path.name == MANIFEST_NAME else path)
    if cache.teacher_name == "synthetic":
        from .synthetic import SyntheticTextEncoder

        return SyntheticTextEncoder(dim=cache.feature_dim)
    raise NotImplementedError(
        f"No text encoder for teacher '{cache.teacher_name}' (cache {cache.root}): the CLIP teacher "
        "(Grounded-SAM2 + CLIP) is not installed yet; only 'synthetic' is available.")
