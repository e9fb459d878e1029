"""Text as the teachers and queries compare it: one normalisation, the vocabulary check, the encoder protocol."""

from __future__ import annotations

import unicodedata
from typing import List, Optional, Protocol, Sequence

import torch


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
