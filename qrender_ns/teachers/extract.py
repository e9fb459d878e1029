"""`qsplat extract-features`: run a 2D teacher over a scene's images and fill its cache (resumable).

Kept free of torch at import time: the CLI imports this module on every `qsplat` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass
class ExtractFeatures:
    """Cache per-image masks and 512-D embeddings from a 2D teacher (images already cached are skipped)."""

    data: Path
    """Scene root (for the synthetic teacher: a folder made by `qsplat make-scene`)."""
    teacher: Literal["synthetic"] = "synthetic"
    """synthetic: ground-truth masks with fixed class vectors (generated scenes only). The Grounded-SAM2 +
    CLIP teacher for real scenes is a later issue."""
    noise: float = 0.05
    """Synthetic teacher: norm of the random perturbation added to each mask's unit class vector."""
    overwrite: bool = False
    """Recompute every image, not only those without a current cache entry."""

    def main(self) -> None:
        from .synthetic import SyntheticTeacher, require_generated_scene

        try:
            require_generated_scene(self.data)
        except FileNotFoundError as e:
            raise SystemExit(f"[q-splat] {e}") from None
        teacher = SyntheticTeacher(self.data, noise=self.noise)
        print(f"[q-splat] {teacher.name} teacher on {len(teacher.image_keys)} images of {self.data}")
        stats = teacher.run(overwrite=self.overwrite, progress=True)
        print(f"[q-splat] teacher cache: {teacher.cache_root}")
        print(f"  {stats.written} images written ({stats.masks} masks), {stats.skipped} already current, "
              f"{stats.seconds:.1f} s")
