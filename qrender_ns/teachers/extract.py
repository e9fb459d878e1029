"""`qsplat extract-features`: run a 2D teacher over a scene's images and fill its cache (resumable).

The same code as the cache filling that `ns-train q-splat` does by itself at start-up (teachers/setup.py),
on the same served images (undistorted, cropped, downscaled by the same dataparser settings), so a cache
made here is what training reads. Kept free of torch at import time: the CLI imports this module on every
`qsplat` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from .setup import TeacherSettings


@dataclass
class ExtractFeatures(TeacherSettings):
    """Cache per-image masks and 512-D embeddings from a 2D teacher (images already cached are skipped).
    `ns-train q-splat` does this by itself when the cache is missing; the options have the same names there
    (--pipeline.datamanager.NAME)."""

    data: Path = Path(".")
    """Scene folder in any layout `ns-train q-splat` reads (COLMAP, nerfstudio, instant-ngp, ScanNet, generated)."""
    overwrite: bool = False
    """Recompute every image, not only those without a current cache entry (and replace a cache made with other
    settings)."""
    splits: Tuple[str, ...] = ("train",)
    """Dataparser splits whose images get features (training reads the train split)."""
    downscale_factor: Optional[float] = None
    """As `qsplat-data --downscale-factor` of the training run (None: automatic, the same
    rule): the teacher sees the images at the resolution training serves them."""

    def main(self) -> None:
        from . import setup as ts
        from .cache import TeacherCacheError

        if not Path(self.data).is_dir():
            raise SystemExit(f"[q-splat] --data {self.data} is not a folder: pass a scene folder")
        if self.teacher == "none":
            raise SystemExit("[q-splat] --teacher none extracts nothing; choose auto, synthetic or grounded-sam2-clip")
        bad = [s for s in self.splits if s not in ("train", "val", "test")]
        if bad:
            raise SystemExit(f"[q-splat] --splits must be among train, val, test; got {bad}")
        try:
            self._run(ts)
        except (ts.TeacherSetupError, TeacherCacheError, ValueError, FileNotFoundError) as e:
            raise SystemExit(f"[q-splat] {e}") from None

    def _run(self, ts) -> None:
        from ..data.datamanager import QSplatDataManagerConfig
        from ..data.dataparser import QSplatDataParserConfig

        from ..data.dataparser import detect_layout

        settings = ts.settings_of(self)
        scene_root = Path(self.data).resolve()
        name = ts.resolve_teacher(settings, scene_root)
        # The teacher first: missing weights fail before any image is read.
        teacher = ts.build_teacher(settings, name, scene_root, detect_layout(scene_root))
        config = QSplatDataManagerConfig(
            dataparser=QSplatDataParserConfig(data=scene_root, downscale_factor=self.downscale_factor),
            fill_teacher_cache=False, **{**vars(settings), "teacher": "none", "teacher_weights": "local",
                                         # a teacher's own options would be refused by the "none" teacher
                                         **{k: None for k in ts.REAL_ONLY + ts.SYNTHETIC_ONLY}})
        datamanager = config.setup(device="cpu", test_mode="val")  # the served images
        items = []
        for split in self.splits:
            for key, get_image in datamanager.served_items("train" if split == "train" else "eval"):
                if key not in [k for k, _ in items]:
                    items.append((key, get_image))
        with ts.open_cache_for(teacher, [k for k, _ in items], replace_other_teacher=self.overwrite) as cache:
            if hasattr(teacher, "write_weights_sidecar"):
                teacher.write_weights_sidecar()
            device = getattr(teacher, "device", "cpu")
            print(f"[q-splat] {teacher.name} teacher on {len(items)} images of {self.data} "
                  f"({len(teacher.class_names)} classes/prompts, device {device})")
            stats = ts.fill_teacher_cache(cache, teacher, items, overwrite=self.overwrite, progress=True)
        print(f"[q-splat] teacher cache: {cache.root}")
        rate = f", {stats.written / stats.seconds:.2f} images/s" if stats.written and stats.seconds > 0 else ""
        print(f"  {stats.written} images written ({stats.masks} masks), {stats.skipped} already current, "
              f"{stats.seconds:.1f} s{rate}")
