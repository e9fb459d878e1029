"""Text encoders that embed queries into a teacher's feature space, chosen from the cache manifest."""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import List, Optional, Protocol, Sequence, Union

import torch

from .cache import MANIFEST_NAME, TeacherCache


class TextEncoder(Protocol):
    """What relevancy queries, evaluation and the viewer use: texts -> L2-normalised [T, dim]."""

    name: str  # the teacher whose feature space it embeds into
    dim: int

    def encode(self, texts: List[str]) -> torch.Tensor: ...


def normalize_text(text: str) -> str:
    """The one form a query or class name is matched and encoded in: Unicode NFKC, case-folded, runs of
    whitespace collapsed to one space, no leading/trailing space ("  Dining  Chair " -> "dining chair").
    Every text encoder applies it, so the viewer, `qsplat query` and evaluation agree on what a word means."""
    return " ".join(unicodedata.normalize("NFKC", str(text)).casefold().split())


def vocabulary_error(text: str, encoder: TextEncoder, class_names: Sequence[str]) -> Optional[str]:
    """Why `text` cannot be queried, or None. An empty query is refused; so is, with a closed-vocabulary encoder
    (the synthetic teacher knows its scene's class names only), any text that is not one of class_names after
    normalize_text (so "Chair" and " chair " match "chair", while "cha" and "zebra" do not)."""
    query = normalize_text(text)
    if not query:
        return "The query is empty: type a word, e.g. a class name."
    if getattr(encoder, "name", "") == "synthetic":
        known = [normalize_text(c) for c in class_names]
        if query not in known:
            return (f"'{query}' is not a class of this scene, and the synthetic teacher is closed-vocabulary: "
                    f"it only knows {', '.join(known)}. Train with the CLIP teacher for open vocabulary.")
    return None


def load_text_encoder(cache_root_or_manifest: Union[str, Path, TeacherCache], *,
                      clip_checkpoint: Optional[Union[str, Path]] = None, device: str = "cpu",
                      allow_random_init: bool = False) -> TextEncoder:
    """The text encoder matching the teacher that filled a cache (its folder, its manifest.json, or an open
    TeacherCache).

    CLIP teachers (their manifest has a "clip" entry, e.g. grounded-sam2-clip) get their own open_clip model back:
    from clip_checkpoint, else the path the extraction recorded in the cache's weights.json, else
    $QSPLAT_WEIGHTS_DIR / the HF cache; its sha256 must equal the manifest's. A cache made with a randomly
    initialised CLIP (tests) needs allow_random_init=True."""
    cache = cache_root_or_manifest
    if not isinstance(cache, TeacherCache):
        path = Path(cache)
        cache = TeacherCache(path.parent if path.name == MANIFEST_NAME else path)
    if cache.teacher_name == "synthetic":
        from .synthetic import SyntheticTextEncoder

        return SyntheticTextEncoder(dim=cache.feature_dim)
    clip_info = cache.teacher_info.get("clip")
    if isinstance(clip_info, dict):
        from .clip import ClipTextEncoder, load_clip_from_info
        from .masks import read_weights_sidecar

        if clip_checkpoint is None:
            recorded = read_weights_sidecar(cache.root).get("clip_checkpoint")
            clip_checkpoint = recorded if recorded and Path(recorded).is_file() else None
        clip = load_clip_from_info(clip_info, clip_checkpoint, device=device, allow_random_init=allow_random_init)
        if clip.dim != cache.feature_dim:
            raise ValueError(f"CLIP {clip_info.get('model')} embeds into {clip.dim}-D, the cache {cache.root} holds "
                             f"{cache.feature_dim}-D features")
        return ClipTextEncoder(clip, name=cache.teacher_name)
    raise NotImplementedError(
        f"No text encoder for teacher '{cache.teacher_name}' (cache {cache.root}): it is neither 'synthetic' nor a "
        "CLIP teacher (e.g. grounded-sam2-clip, whose manifest names its CLIP model); the text side of any other "
        "teacher is not installed.")
