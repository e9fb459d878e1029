"""Which teacher supervises a scene's features, and with what settings (import-light: the CLI reads it).

One set of options (`TeacherSettings`) is shared by `ns-train q-splat` (`--pipeline.datamanager.<option>`) and
`qsplat extract-features` (`--<option>`), and one code path fills the cache for both (`fill_teacher_cache`):
masks and embeddings are computed on the images exactly as the datamanager serves them (undistorted,
cropped, downscaled) and each cache entry is keyed by the sha256 of those pixels, so a change of distortion,
crop or downscale factor can never leave a mask map of the wrong size: the entry is simply recomputed
(teachers/filling.py). Building a teacher from these settings: teachers/setup.py.

`teacher auto` (the default): the synthetic teacher for scenes made by `qsplat make-scene`; otherwise a real
teacher: Grounded-SAM2 + CLIP (`grounded-sam2-clip`) when text prompts are known (`prompts` / `prompts_file`, a
LeRF-OVS label folder, the ScanNet-19 classes of a ScanNet scene), else the prompt-free SAM2 automatic masks +
CLIP (`sam2-auto-clip`, as LangSplat / LERF: no vocabulary needed before training). The real teachers' weights
must be on this machine (`teacher_weights local`) or are tiny random models built on the spot (`teacher_weights
random-tiny`: a smoke test of a scene, features meaningless); `teacher none` trains RGB only. Options that only
one teacher reads are an error with another.
Kept free of torch at import time (the CLI imports it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import List, Literal, Optional, Sequence, Union

from qrender_ns.data.classes import subset_classes

PathLike = Union[str, Path]

TeacherName = Literal["auto", "synthetic", "grounded-sam2-clip", "sam2-auto-clip", "none"]
REAL = "grounded-sam2-clip"  # the paper's teacher: prompted
AUTOMATIC = "sam2-auto-clip"  # prompt-free: SAM2's automatic masks
REAL_TEACHERS = (REAL, AUTOMATIC)
SYNTHETIC = "synthetic"
MASK_LEVELS = ("small", "medium", "large", "all")
DEFAULT_MASK_LEVEL = "large"

# Options read by some teachers only (None = not given); giving one to another teacher is an error.
CLIP_SAM2_OPTIONS = ("clip_model", "clip_pretrained", "clip_checkpoint", "sam2_config", "sam2_checkpoint")  # both real
GROUNDED_ONLY = ("prompts", "prompts_file", "detector_checkpoint", "box_threshold", "text_threshold", "automatic_masks")
AUTOMATIC_ONLY = ("mask_level",)
REAL_ONLY = CLIP_SAM2_OPTIONS + GROUNDED_ONLY + AUTOMATIC_ONLY  # read by a real teacher (never by the synthetic one)
SYNTHETIC_ONLY = ("synthetic_noise", "synthetic_label_noise", "synthetic_miss_rate")
DEFAULT_SYNTHETIC_NOISE = 0.05


class TeacherSetupError(ValueError):
    """The teacher cannot run as configured (missing weights, options of the other teacher, no prompts...)."""


@dataclass
class TeacherSettings:
    """Teacher options, with the same names in `ns-train q-splat` (`--pipeline.datamanager.NAME`) and in
    `qsplat extract-features` (`--NAME`)."""

    teacher: TeacherName = "auto"
    """Teacher whose masks + 512-D embeddings supervise the features. auto: synthetic for scenes made by
    `qsplat make-scene`; on real scenes grounded-sam2-clip when prompts are known (prompts, a LeRF-OVS label
    folder, ScanNet), else the prompt-free sam2-auto-clip (both need weights, see teacher-weights); none: RGB only."""
    teacher_cache: Optional[Path] = None
    """Teacher cache folder (default: <scene>/qsplat_teacher/<teacher>)."""
    teacher_weights: Literal["local", "random-tiny"] = "local"
    """grounded-sam2-clip / sam2-auto-clip: local = real checkpoints ($QSPLAT_WEIGHTS_DIR, the HF cache or the
    *-checkpoint options; never downloaded); random-tiny = tiny randomly initialised models, to smoke-test a scene end to
    end without weights (its features and queries mean nothing)."""
    prompts: Optional[str] = None
    """grounded-sam2-clip: comma-separated prompts for GroundingDINO, e.g. "chair,table,sofa" (default: the
    categories of a LeRF-OVS label folder, the ScanNet-19 classes for ScanNet scenes)."""
    prompts_file: Optional[Path] = None
    """grounded-sam2-clip: file with prompts, one per line ('#' starts a comment); added to prompts."""
    clip_model: Optional[str] = None
    """grounded-sam2-clip / sam2-auto-clip: open_clip architecture (default ViT-B-16, 512-D)."""
    clip_pretrained: Optional[str] = None
    """grounded-sam2-clip / sam2-auto-clip: open_clip weights tag (default laion2b_s34b_b88k)."""
    clip_checkpoint: Optional[Path] = None
    """grounded-sam2-clip / sam2-auto-clip: open_clip checkpoint file or folder."""
    sam2_config: Optional[str] = None
    """grounded-sam2-clip / sam2-auto-clip: SAM2 config sam2.1_hiera_t|s|b+|l (default sam2.1_hiera_l)."""
    sam2_checkpoint: Optional[Path] = None
    """grounded-sam2-clip / sam2-auto-clip: SAM2 checkpoint (default: under $QSPLAT_WEIGHTS_DIR or the HF cache)."""
    detector_checkpoint: Optional[str] = None
    """grounded-sam2-clip: GroundingDINO folder or HF id (default IDEA-Research/grounding-dino-tiny)."""
    box_threshold: Optional[float] = None
    """grounded-sam2-clip: GroundingDINO box score threshold (default 0.35)."""
    text_threshold: Optional[float] = None
    """grounded-sam2-clip: GroundingDINO text score threshold (default 0.25)."""
    automatic_masks: Optional[bool] = None
    """grounded-sam2-clip: also add SAM2's automatic masks for regions no prompt found (default False)."""
    mask_level: Optional[Literal["small", "medium", "large", "all"]] = None
    """sam2-auto-clip: which of SAM2's granularities supervises the features, one mask id per pixel (default
    large): small / medium / large = per grid point, the smallest / middle / largest of SAM2's three masks
    (LangSplat's s / m / l levels); all = SAM2's default output, every granularity, the finest on top."""
    synthetic_noise: Optional[float] = None
    """synthetic: norm of the random perturbation of each mask's class vector (default 0.05)."""
    synthetic_label_noise: Optional[float] = None
    """synthetic: probability that a furniture instance is named as another furniture class in every view, a
    consistent misdetection of a real teacher (default 0)."""
    synthetic_miss_rate: Optional[float] = None
    """synthetic: probability that an instance's mask is missing from a view, a missed detection (default 0)."""
    teacher_device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device the teacher's models run on."""
    teacher_batch_size: int = 32
    """CLIP crops (and SAM2 boxes) per forward pass."""


def settings_of(obj) -> TeacherSettings:
    """The TeacherSettings fields of any dataclass that has them (the datamanager config, ExtractFeatures)."""
    return TeacherSettings(**{f.name: getattr(obj, f.name) for f in fields(TeacherSettings)})


def _given(settings: TeacherSettings, names: Sequence[str]) -> List[str]:
    return [n for n in names if getattr(settings, n) is not None]


def _flags(names: Sequence[str], prefix: str) -> str:
    return ", ".join(f"{prefix}{n.replace('_', '-')}" for n in names)


def resolve_teacher(settings: TeacherSettings, scene_root: Path, prefix: str = "--", layout: Optional[str] = None) -> str:
    """The teacher that will run: 'synthetic', 'grounded-sam2-clip', 'sam2-auto-clip' or 'none' (see the module
    docstring). `layout` (the dataparser's: 'scannet' gives the ScanNet-19 prompts) decides between the real teachers
    under auto."""
    real, synthetic = _given(settings, REAL_ONLY), _given(settings, SYNTHETIC_ONLY)
    grounded, automatic = _given(settings, GROUNDED_ONLY), _given(settings, AUTOMATIC_ONLY)
    if settings.teacher_weights != "local":
        real.append("teacher_weights")
    name = settings.teacher
    if name == "auto":
        if real and synthetic:
            raise TeacherSetupError(f"options of two teachers given: {_flags(real, prefix)} (a real teacher) and "
                                    f"{_flags(synthetic, prefix)} (synthetic); pick one with {prefix}teacher")
        if grounded and automatic:
            raise TeacherSetupError(f"options of two teachers given: {_flags(grounded, prefix)} ({REAL}) and "
                                    f"{_flags(automatic, prefix)} ({AUTOMATIC}); pick one with {prefix}teacher")
        generated = (Path(scene_root) / "gt" / "scene.json").is_file()
        if synthetic and not generated:
            raise TeacherSetupError(f"{_flags(synthetic, prefix)} is an option of the synthetic teacher, which needs a "
                                    f"scene made by `qsplat make-scene`; {scene_root} is not one")
        if generated and not real:
            name = SYNTHETIC
        elif automatic:
            name = AUTOMATIC
        elif grounded or default_prompts(settings, scene_root, layout):
            name = REAL
        else:
            name = AUTOMATIC
    wrong = {SYNTHETIC: real, REAL: synthetic + automatic, AUTOMATIC: synthetic + grounded,
             "none": real + synthetic}.get(name, [])
    if wrong:
        raise TeacherSetupError(f"{_flags(wrong, prefix)} {'is' if len(wrong) == 1 else 'are'} not read by the "
                                f"{name} teacher{'' if name != 'none' else ' (none: RGB only)'}; remove "
                                f"{'it' if len(wrong) == 1 else 'them'} or choose another {prefix}teacher")
    if name == SYNTHETIC and not (Path(scene_root) / "gt" / "scene.json").is_file():
        raise TeacherSetupError(
            f"the synthetic teacher needs a scene made by `qsplat make-scene` (its ground-truth masks are the "
            f"teacher); {scene_root} has no gt/scene.json. Real scenes: {prefix}teacher auto (docs/teachers.md), "
            f"or {prefix}teacher none for RGB only.")
    return name


# ----------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------


def label_folder_categories(scene_root: Path) -> List[str]:
    """Categories of a LeRF-OVS label folder: <scene>/label/*.json or, as LangSplat ships it,
    <scene>/../label/<scene name>/*.json."""
    scene_root = Path(scene_root)
    for folder in (scene_root / "label", scene_root.parent / "label" / scene_root.name):
        names: List[str] = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                objects = json.loads(path.read_text()).get("objects", [])
            except (OSError, ValueError, AttributeError):
                continue
            for obj in objects:
                category = str(obj.get("category", "")).strip() if isinstance(obj, dict) else ""
                if category and category not in names:
                    names.append(category)
        if names:
            return names
    return []


def default_prompts(settings: TeacherSettings, scene_root: Path, layout: Optional[str]) -> List[str]:
    """The grounded-sam2-clip prompts: --prompts / --prompts-file, else a generated scene's classes, a LeRF-OVS
    label folder's categories or the ScanNet-19 classes of a ScanNet scene; [] when none is known."""
    try:
        prompts = parse_prompts(settings.prompts, settings.prompts_file)
    except OSError as e:
        raise TeacherSetupError(f"cannot read the prompts file {settings.prompts_file} ({e.strerror or e}): pass an "
                                "existing text file, one prompt per line") from None
    if prompts:
        return prompts
    scene_json = Path(scene_root) / "gt" / "scene.json"
    if scene_json.is_file():
        return [c["name"] for c in sorted(json.loads(scene_json.read_text())["classes"], key=lambda c: c["id"])]
    categories = label_folder_categories(scene_root)
    if categories:
        return categories
    if layout == "scannet":
        return list(subset_classes("19")[1])
    return []


def resolve_prompts(settings: TeacherSettings, scene_root: Path, layout: Optional[str], prefix: str = "--") -> List[str]:
    prompts = default_prompts(settings, scene_root, layout)
    if prompts:
        return prompts
    raise TeacherSetupError(
        f"the {REAL} teacher needs text prompts for GroundingDINO on {scene_root}: pass {prefix}prompts "
        f"'chair,table,...' or {prefix}prompts-file FILE (one per line), or use the prompt-free {AUTOMATIC} teacher "
        f"({prefix}teacher auto or {AUTOMATIC}: SAM2's automatic masks, any query after training), or train RGB only "
        f"with {prefix}teacher none.")


# ----------------------------------------------------------------------------------------------------------
# Building a teacher
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# Filling a cache from served images
# ----------------------------------------------------------------------------------------------------------


def parse_prompts(prompts: Optional[str] = None, prompts_file: Optional[PathLike] = None) -> List[str]:
    """Prompts from "chair,table" and/or a file (one per line, '#' comments), in order, without duplicates."""
    items: List[str] = []
    if prompts:
        items += prompts.split(",")
    if prompts_file is not None:
        for line in Path(prompts_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                items += line.split(",") if "," in line else [line]
    out: List[str] = []
    for item in (i.strip() for i in items):
        if item and item not in out:
            out.append(item)
    return out
