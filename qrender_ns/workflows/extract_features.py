"""`qsplat extract-features`: run a 2D teacher over a scene's images and fill its cache (resumable).

The same code as the cache filling that `ns-train q-splat` does by itself at start-up (teachers/filling.py),
on the same served images (undistorted, cropped, downscaled by the same dataparser settings), so a cache
made here is what training reads. Options: workflows/options.py (ExtractFeatures).
"""

from __future__ import annotations

from pathlib import Path

from qrender_ns.data.datamanager import ServedImagesConfig
from qrender_ns.data.dataparser import QSplatDataParserConfig, detect_layout
from qrender_ns.teachers.cache import TeacherCacheError
from qrender_ns.teachers.filling import fill_teacher_cache, open_cache_for
from qrender_ns.teachers.settings import TeacherSetupError, resolve_teacher, settings_of
from qrender_ns.teachers.setup import build_teacher
from qrender_ns.workflows.options import ExtractFeatures


def main(cfg: ExtractFeatures) -> None:
    """`qsplat` runs this with the parsed options."""
    if not Path(cfg.data).is_dir():
        raise SystemExit(f"[q-splat] --data {cfg.data} is not a folder: pass a scene folder")
    if cfg.teacher == "none":
        raise SystemExit("[q-splat] --teacher none extracts nothing; choose auto, synthetic, grounded-sam2-clip or sam2-auto-clip")
    bad = [s for s in cfg.splits if s not in ("train", "val", "test")]
    if bad:
        raise SystemExit(f"[q-splat] --splits must be among train, val, test; got {bad}")
    try:
        extract_features(cfg)
    except (TeacherSetupError, TeacherCacheError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"[q-splat] {e}") from None


def extract_features(cfg: ExtractFeatures) -> None:
    """Fill the teacher cache of cfg.data for cfg.splits (as served by the datamanager)."""
    settings = settings_of(cfg)
    scene_root = Path(cfg.data).resolve()
    layout = detect_layout(scene_root)
    name = resolve_teacher(settings, scene_root, layout=layout)
    # The teacher first: missing weights fail before any image is read.
    teacher = build_teacher(settings, name, scene_root, layout)
    config = ServedImagesConfig(dataparser=QSplatDataParserConfig(data=scene_root, downscale_factor=cfg.downscale_factor))
    datamanager = config.setup(device="cpu", test_mode="val")  # the images as training serves them
    items = []
    for split in cfg.splits:
        for key, get_image in datamanager.served_items("train" if split == "train" else "eval"):
            if key not in [k for k, _ in items]:
                items.append((key, get_image))
    with open_cache_for(teacher, [k for k, _ in items], replace_other_teacher=cfg.overwrite) as cache:
        if hasattr(teacher, "write_weights_sidecar"):
            teacher.write_weights_sidecar()
        device = getattr(teacher, "device", "cpu")
        vocabulary = f"{len(teacher.class_names)} classes/prompts" if teacher.class_names else "no prompts"
        print(f"[q-splat] {teacher.name} teacher on {len(items)} images of {cfg.data} ({vocabulary}, device {device})")
        stats = fill_teacher_cache(cache, teacher, items, overwrite=cfg.overwrite, progress=True)
    print(f"[q-splat] teacher cache: {cache.root}")
    rate = f", {stats.written / stats.seconds:.2f} images/s" if stats.written and stats.seconds > 0 else ""
    print(f"  {stats.written} images written ({stats.masks} masks), {stats.skipped} already current, "
          f"{stats.seconds:.1f} s{rate}")
