"""Building a scene's teacher from its settings (teachers/settings.py): the synthetic teacher of generated scenes,
Grounded-SAM2 + CLIP or SAM2 automatic masks + CLIP with local or tiny random weights, and where its cache lives.
Every set-up failure (no prompts, missing weights or packages, options of another teacher) is a one-line
TeacherSetupError: `qsplat extract-features` and `ns-train q-splat` print it without a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from qrender_ns.data.dataparser import detect_layout
from qrender_ns.teachers.automatic import Sam2AutoClipConfig, Sam2AutoClipTeacher
from qrender_ns.teachers.cache import default_cache_root
from qrender_ns.teachers.clip import DEFAULT_MODEL, DEFAULT_PRETRAINED, MissingWeightsError, TeacherDependencyError
from qrender_ns.teachers.masks import (DEFAULT_DETECTOR, DEFAULT_SAM2_CONFIG, GroundedSam2ClipConfig,
                                       GroundedSam2ClipTeacher)
from qrender_ns.teachers.settings import (AUTOMATIC, DEFAULT_MASK_LEVEL, DEFAULT_SYNTHETIC_NOISE, REAL_TEACHERS,
                                          SYNTHETIC, TeacherSettings, TeacherSetupError, resolve_prompts,
                                          resolve_teacher, settings_of)
from qrender_ns.teachers.synthetic import SyntheticTeacher
from qrender_ns.teachers.tiny import tiny_auto_config, tiny_teacher_config


def default_cache_root_for(settings: TeacherSettings, scene_root: Path, name: str) -> Path:
    return Path(settings.teacher_cache) if settings.teacher_cache is not None else default_cache_root(scene_root, name)


def existing_cache_root(settings, scene_root: Path) -> Optional[Path]:
    """The cache a finished run used (its saved config may say teacher auto), without checking any weights."""
    settings = settings_of(settings) if not isinstance(settings, TeacherSettings) else settings
    if settings.teacher == "none":
        return None
    if settings.teacher_cache is not None:
        return Path(settings.teacher_cache)

    names = [settings.teacher] if settings.teacher != "auto" else [SYNTHETIC, *REAL_TEACHERS]
    if settings.teacher == "auto":
        try:  # the teacher auto picks now first (a scene may hold the caches of both real teachers)
            layout = detect_layout(scene_root)
            names = [resolve_teacher(settings, scene_root, layout=layout)] + names
        except ValueError:  # TeacherSetupError, SceneLayoutError: no preference
            pass
        if not (Path(scene_root) / "gt" / "scene.json").is_file():
            names = [n for n in names if n != SYNTHETIC]
    for name in names:
        root = default_cache_root(scene_root, name)
        if (root / "manifest.json").is_file():
            return root
    return None


# ----------------------------------------------------------------------------------------------------------
# Building a teacher
# ----------------------------------------------------------------------------------------------------------


def _pick(value, default):
    return default if value is None else value


def _real_config(settings: TeacherSettings, prompts: Sequence[str]):
    s = settings
    if s.teacher_weights == "random-tiny":
        return tiny_teacher_config(prompts, device=s.teacher_device, batch_size=s.teacher_batch_size)
    return GroundedSam2ClipConfig(
        prompts=tuple(prompts), clip_model=_pick(s.clip_model, DEFAULT_MODEL),
        clip_pretrained=_pick(s.clip_pretrained, DEFAULT_PRETRAINED), clip_checkpoint=s.clip_checkpoint,
        sam2_config=_pick(s.sam2_config, DEFAULT_SAM2_CONFIG), sam2_checkpoint=s.sam2_checkpoint,
        detector=_pick(s.detector_checkpoint, DEFAULT_DETECTOR), box_threshold=_pick(s.box_threshold, 0.35),
        text_threshold=_pick(s.text_threshold, 0.25), automatic_masks=_pick(s.automatic_masks, False),
        device=s.teacher_device, batch_size=s.teacher_batch_size)


def _automatic_config(settings: TeacherSettings):
    s = settings
    level = _pick(s.mask_level, DEFAULT_MASK_LEVEL)
    if s.teacher_weights == "random-tiny":
        return tiny_auto_config(device=s.teacher_device, batch_size=s.teacher_batch_size, mask_level=level)
    return Sam2AutoClipConfig(
        clip_model=_pick(s.clip_model, DEFAULT_MODEL), clip_pretrained=_pick(s.clip_pretrained, DEFAULT_PRETRAINED),
        clip_checkpoint=s.clip_checkpoint, sam2_config=_pick(s.sam2_config, DEFAULT_SAM2_CONFIG),
        sam2_checkpoint=s.sam2_checkpoint, mask_level=level, device=s.teacher_device, batch_size=s.teacher_batch_size)


def _flag_names(message: str, prefix: str) -> str:
    """The teachers' messages name their options as `qsplat extract-features` spells them; ns-train's differ."""
    if prefix == "--":
        return message
    for option in ("clip-checkpoint", "sam2-checkpoint", "detector-checkpoint", "prompts"):
        message = message.replace(f"--{option} ", f"{prefix}{option} ")
    return message


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

    why = ""
    if settings.teacher == "auto":
        why = " (auto's choice for a real scene " + ("without prompts)" if name == AUTOMATIC else "with prompts)")
    try:
        if name == AUTOMATIC:
            return Sam2AutoClipTeacher(scene_root, _automatic_config(settings), image_keys=[], cache_root=cache_root)
        prompts = resolve_prompts(settings, scene_root, layout, prefix)
        return GroundedSam2ClipTeacher(scene_root, _real_config(settings, prompts), image_keys=[], cache_root=cache_root)
    except TeacherDependencyError as e:
        raise TeacherSetupError(f"The {name} teacher cannot start: {e} Or train RGB only: {prefix}teacher none.") from None
    except MissingWeightsError as e:
        raise TeacherSetupError(
            f"The {name} teacher{why} needs its weights on this machine: {_flag_names(str(e), prefix)} Other "
            f"choices: {prefix}teacher-weights random-tiny smoke-tests the scene without weights (meaningless "
            f"features), {prefix}teacher none trains RGB only; docs/teachers.md lists every checkpoint.") from None
