"""Building a scene's teacher from its settings (teachers/settings.py): the synthetic teacher of generated scenes or
Grounded-SAM2 + CLIP with local or tiny random weights, and where its cache lives."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from qrender_ns.teachers.cache import default_cache_root
from qrender_ns.teachers.clip import DEFAULT_MODEL, DEFAULT_PRETRAINED, MissingWeightsError, TeacherDependencyError
from qrender_ns.teachers.masks import (DEFAULT_DETECTOR, DEFAULT_SAM2_CONFIG, GroundedSam2ClipConfig,
                                       GroundedSam2ClipTeacher)
from qrender_ns.teachers.settings import (DEFAULT_SYNTHETIC_NOISE, REAL, SYNTHETIC, TeacherSettings, TeacherSetupError,
                                          resolve_prompts, settings_of)
from qrender_ns.teachers.synthetic import SyntheticTeacher
from qrender_ns.teachers.tiny import tiny_teacher_config


def default_cache_root_for(settings: TeacherSettings, scene_root: Path, name: str) -> Path:
    return Path(settings.teacher_cache) if settings.teacher_cache is not None else default_cache_root(scene_root, name)


def existing_cache_root(settings, scene_root: Path) -> Optional[Path]:
    """The cache a finished run used (its saved config may say teacher auto), without checking any weights."""
    settings = settings_of(settings) if not isinstance(settings, TeacherSettings) else settings
    if settings.teacher == "none":
        return None
    if settings.teacher_cache is not None:
        return Path(settings.teacher_cache)

    names = [settings.teacher] if settings.teacher != "auto" else [SYNTHETIC, REAL]
    if settings.teacher == "auto" and not (Path(scene_root) / "gt" / "scene.json").is_file():
        names = [REAL]
    for name in names:
        root = default_cache_root(scene_root, name)
        if (root / "manifest.json").is_file():
            return root
    return None


# ----------------------------------------------------------------------------------------------------------
# Building a teacher
# ----------------------------------------------------------------------------------------------------------


def _real_config(settings: TeacherSettings, prompts: Sequence[str]):
    s = settings
    if s.teacher_weights == "random-tiny":
        return tiny_teacher_config(prompts, device=s.teacher_device, batch_size=s.teacher_batch_size)
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return GroundedSam2ClipConfig(
        prompts=tuple(prompts), clip_model=pick(s.clip_model, DEFAULT_MODEL),
        clip_pretrained=pick(s.clip_pretrained, DEFAULT_PRETRAINED), clip_checkpoint=s.clip_checkpoint,
        sam2_config=pick(s.sam2_config, DEFAULT_SAM2_CONFIG), sam2_checkpoint=s.sam2_checkpoint,
        detector=pick(s.detector_checkpoint, DEFAULT_DETECTOR), box_threshold=pick(s.box_threshold, 0.35),
        text_threshold=pick(s.text_threshold, 0.25), automatic_masks=pick(s.automatic_masks, False),
        device=s.teacher_device, batch_size=s.teacher_batch_size)


def build_teacher(settings: TeacherSettings, name: str, scene_root: Path, layout: Optional[str] = None,
                  prefix: str = "--"):
    """The teacher object (with teacher_info, dim, class_names, cache_root and compute_served(key, image))."""
    cache_root = default_cache_root_for(settings, scene_root, name)
    if name == SYNTHETIC:
        noise = DEFAULT_SYNTHETIC_NOISE if settings.synthetic_noise is None else settings.synthetic_noise
        try:
            return SyntheticTeacher(scene_root, noise=noise, cache_root=cache_root,
                                    label_noise=settings.synthetic_label_noise or 0.0,
                                    miss_rate=settings.synthetic_miss_rate or 0.0)
        except ValueError as e:
            raise TeacherSetupError(f"{e} ({prefix}synthetic-label-noise / {prefix}synthetic-miss-rate)") from None

    prompts = resolve_prompts(settings, scene_root, layout, prefix)
    try:
        return GroundedSam2ClipTeacher(scene_root, _real_config(settings, prompts), image_keys=[], cache_root=cache_root)
    except TeacherDependencyError as e:
        raise TeacherSetupError(f"{e}\nOr train RGB only: {prefix}teacher none.") from None
    except MissingWeightsError as e:
        raise TeacherSetupError(
            f"The grounded-sam2-clip teacher (auto for a real scene) needs its weights on this machine:\n{e}\n"
            f"Other choices:\n"
            f"  - smoke-test the scene without weights (meaningless features): {prefix}teacher-weights random-tiny\n"
            f"  - train RGB only (no features): {prefix}teacher none\n"
            f"See docs/teachers.md for every checkpoint and where it goes.") from None


# ----------------------------------------------------------------------------------------------------------
# Filling a cache from served images
# ----------------------------------------------------------------------------------------------------------


