"""Which teacher supervises a scene's features, with what settings, and filling its cache from served images.

One set of options (`TeacherSettings`) is shared by `ns-train q-splat` (`--pipeline.datamanager.<option>`) and
`qsplat extract-features` (`--<option>`), and one code path fills the cache for both (`fill_teacher_cache`):
masks and embeddings are computed on the images exactly as the datamanager serves them (undistorted,
cropped, downscaled) and each cache entry is keyed by the sha256 of those pixels, so a change of distortion,
crop or downscale factor can never leave a mask map of the wrong size: the entry is simply recomputed.

`teacher auto` (the default): the synthetic teacher for scenes made by `qsplat make-scene`; otherwise the real
Grounded-SAM2 + CLIP teacher, whose weights must be on this machine (`teacher_weights local`) or are tiny
random models built on the spot (`teacher_weights random-tiny`: a smoke test of a scene, features
meaningless); `teacher none` trains RGB only. Options that only one teacher reads are an error with the other.
Kept free of torch at import time (the CLI imports it).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterable, List, Literal, Optional, Sequence, Tuple

TeacherName = Literal["auto", "synthetic", "grounded-sam2-clip", "none"]
REAL = "grounded-sam2-clip"
SYNTHETIC = "synthetic"

# Options read by one teacher only (None = not given); giving one to the other teacher is an error.
REAL_ONLY = ("prompts", "prompts_file", "clip_model", "clip_pretrained", "clip_checkpoint", "sam2_config",
             "sam2_checkpoint", "detector_checkpoint", "box_threshold", "text_threshold", "automatic_masks")
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
    `qsplat make-scene`, grounded-sam2-clip otherwise (weights needed, see teacher-weights); none: RGB only."""
    teacher_cache: Optional[Path] = None
    """Teacher cache folder (default: <scene>/qsplat_teacher/<teacher>)."""
    teacher_weights: Literal["local", "random-tiny"] = "local"
    """grounded-sam2-clip: local = real checkpoints ($QSPLAT_WEIGHTS_DIR, the HF cache or the *-checkpoint
    options; never downloaded); random-tiny = tiny randomly initialised models, to smoke-test a scene end to
    end without weights (its features and queries mean nothing)."""
    prompts: Optional[str] = None
    """grounded-sam2-clip: comma-separated prompts for GroundingDINO, e.g. "chair,table,sofa" (default: the
    categories of a LeRF-OVS label folder, the ScanNet-19 classes for ScanNet scenes)."""
    prompts_file: Optional[Path] = None
    """grounded-sam2-clip: file with prompts, one per line ('#' starts a comment); added to prompts."""
    clip_model: Optional[str] = None
    """grounded-sam2-clip: open_clip architecture (default ViT-B-16, 512-D)."""
    clip_pretrained: Optional[str] = None
    """grounded-sam2-clip: open_clip weights tag (default laion2b_s34b_b88k)."""
    clip_checkpoint: Optional[Path] = None
    """grounded-sam2-clip: open_clip checkpoint file or folder."""
    sam2_config: Optional[str] = None
    """grounded-sam2-clip: SAM2 config sam2.1_hiera_t|s|b+|l (default sam2.1_hiera_l)."""
    sam2_checkpoint: Optional[Path] = None
    """grounded-sam2-clip: SAM2 checkpoint (default: under $QSPLAT_WEIGHTS_DIR or the HF cache)."""
    detector_checkpoint: Optional[str] = None
    """grounded-sam2-clip: GroundingDINO folder or HF id (default IDEA-Research/grounding-dino-tiny)."""
    box_threshold: Optional[float] = None
    """grounded-sam2-clip: GroundingDINO box score threshold (default 0.35)."""
    text_threshold: Optional[float] = None
    """grounded-sam2-clip: GroundingDINO text score threshold (default 0.25)."""
    automatic_masks: Optional[bool] = None
    """grounded-sam2-clip: also add SAM2's automatic masks for regions no prompt found (default False)."""
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


def resolve_teacher(settings: TeacherSettings, scene_root: Path, prefix: str = "--") -> str:
    """The teacher that will run: 'synthetic', 'grounded-sam2-clip' or 'none' (see the module docstring)."""
    real, synthetic = _given(settings, REAL_ONLY), _given(settings, SYNTHETIC_ONLY)
    if settings.teacher_weights != "local":
        real.append("teacher_weights")
    name = settings.teacher
    if name == "auto":
        if real and synthetic:
            raise TeacherSetupError(f"options of both teachers given: {_flags(real, prefix)} (grounded-sam2-clip) and "
                                    f"{_flags(synthetic, prefix)} (synthetic); pick one with {prefix}teacher")
        generated = (Path(scene_root) / "gt" / "scene.json").is_file()
        name = REAL if real or not generated else SYNTHETIC
        if synthetic and not generated:
            raise TeacherSetupError(f"{_flags(synthetic, prefix)} is an option of the synthetic teacher, which needs a "
                                    f"scene made by `qsplat make-scene`; {scene_root} is not one")
    wrong = {SYNTHETIC: real, REAL: synthetic, "none": real + synthetic}.get(name, [])
    if wrong:
        raise TeacherSetupError(f"{_flags(wrong, prefix)} {'is' if len(wrong) == 1 else 'are'} not read by the "
                                f"{name} teacher{'' if name != 'none' else ' (none: RGB only)'}; remove "
                                f"{'it' if len(wrong) == 1 else 'them'} or choose another {prefix}teacher")
    if name == SYNTHETIC and not (Path(scene_root) / "gt" / "scene.json").is_file():
        raise TeacherSetupError(
            f"the synthetic teacher needs a scene made by `qsplat make-scene` (its ground-truth masks are the "
            f"teacher); {scene_root} has no gt/scene.json. Real scenes: {prefix}teacher grounded-sam2-clip "
            f"(docs/teachers.md), or {prefix}teacher none for RGB only.")
    return name


def default_cache_root_for(settings: TeacherSettings, scene_root: Path, name: str) -> Path:
    from .cache import default_cache_root

    return Path(settings.teacher_cache) if settings.teacher_cache is not None else default_cache_root(scene_root, name)


def existing_cache_root(settings, scene_root: Path) -> Optional[Path]:
    """The cache a finished run used (its saved config may say teacher auto), without checking any weights."""
    settings = settings_of(settings) if not isinstance(settings, TeacherSettings) else settings
    if settings.teacher == "none":
        return None
    if settings.teacher_cache is not None:
        return Path(settings.teacher_cache)
    from .cache import default_cache_root

    names = [settings.teacher] if settings.teacher != "auto" else [SYNTHETIC, REAL]
    if settings.teacher == "auto" and not (Path(scene_root) / "gt" / "scene.json").is_file():
        names = [REAL]
    for name in names:
        root = default_cache_root(scene_root, name)
        if (root / "manifest.json").is_file():
            return root
    return None


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


def resolve_prompts(settings: TeacherSettings, scene_root: Path, layout: Optional[str], prefix: str = "--") -> List[str]:
    from .masks import parse_prompts

    prompts = parse_prompts(settings.prompts, settings.prompts_file)
    if prompts:
        return prompts
    scene_json = Path(scene_root) / "gt" / "scene.json"
    if scene_json.is_file():
        return [c["name"] for c in sorted(json.loads(scene_json.read_text())["classes"], key=lambda c: c["id"])]
    categories = label_folder_categories(scene_root)
    if categories:
        return categories
    if layout == "scannet":
        from ..eval.scannet3d import subset_classes

        return list(subset_classes("19")[1])
    raise TeacherSetupError(
        f"the grounded-sam2-clip teacher needs text prompts for GroundingDINO on {scene_root}: pass "
        f"{prefix}prompts 'chair,table,...' or {prefix}prompts-file FILE (one per line); or train RGB only with "
        f"{prefix}teacher none.")


# ----------------------------------------------------------------------------------------------------------
# Building a teacher
# ----------------------------------------------------------------------------------------------------------


def _real_config(settings: TeacherSettings, prompts: Sequence[str]):
    from .masks import DEFAULT_DETECTOR, DEFAULT_SAM2_CONFIG, GroundedSam2ClipConfig
    from .clip import DEFAULT_MODEL, DEFAULT_PRETRAINED

    s = settings
    if s.teacher_weights == "random-tiny":
        from .tiny import tiny_teacher_config

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
        from .synthetic import SyntheticTeacher

        noise = DEFAULT_SYNTHETIC_NOISE if settings.synthetic_noise is None else settings.synthetic_noise
        try:
            return SyntheticTeacher(scene_root, noise=noise, cache_root=cache_root,
                                    label_noise=settings.synthetic_label_noise or 0.0,
                                    miss_rate=settings.synthetic_miss_rate or 0.0)
        except ValueError as e:
            raise TeacherSetupError(f"{e} ({prefix}synthetic-label-noise / {prefix}synthetic-miss-rate)") from None
    from .clip import MissingWeightsError, TeacherDependencyError
    from .masks import GroundedSam2ClipTeacher

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


def served_image_sha256(image) -> str:
    """sha256 of an image as served (uint8 [H, W, C] pixels, shape included): the cache entry's key."""
    import numpy as np

    array = np.ascontiguousarray(np.asarray(image))
    digest = hashlib.sha256(f"{array.shape}|{array.dtype}|".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def open_cache_for(teacher, image_keys: Sequence[str], prefix: str = "--", replace_other_teacher: bool = False,
                   on_busy=None):
    """The teacher's cache, opened for writing. A cache at that folder made by another teacher or with other
    settings, or one made for other images, is never silently replaced: a clear error says what to do
    (synthetic caches, cheap to redo from ground truth, and replace_other_teacher=True are the exceptions).
    While another process writes it: CacheBusyError, or with `on_busy`, on_busy(holder) and a wait until it is
    done (a blocking wait on its lock); the checks are then made on what it wrote."""
    from .cache import CacheBusyError, TeacherCache, wait_for_writer

    root = Path(teacher.cache_root)
    while True:
        if on_busy is not None:
            wait_for_writer(root, on_busy)
        _refuse_foreign_cache(teacher, root, image_keys, prefix, replace_other_teacher)
        try:
            return TeacherCache.create(root, teacher.teacher_info, teacher.dim, teacher.class_names)
        except CacheBusyError:
            if on_busy is None:
                raise  # else another writer took the lock since the wait: wait for that one too


def _refuse_foreign_cache(teacher, root: Path, image_keys: Sequence[str], prefix: str, replace_other_teacher: bool):
    from .cache import MANIFEST_NAME, TeacherCache, TeacherCacheError, _make_header

    if (root / MANIFEST_NAME).is_file() and not replace_other_teacher:
        try:
            old = TeacherCache.open(root)
        except TeacherCacheError:
            old = None  # unreadable: create() starts it over (nothing usable is lost)
        if old is not None and len(old):
            header = _make_header(teacher.teacher_info, teacher.dim, teacher.class_names)
            same = (old.teacher_info == header["teacher"] and old.feature_dim == header["feature_dim"]
                    and old.class_names == header["class_names"])
            if not same and old.teacher_name != SYNTHETIC:
                changed = sorted(k for k in set(old.teacher_info) | set(header["teacher"])
                                 if old.teacher_info.get(k) != header["teacher"].get(k))
                raise TeacherSetupError(
                    f"Teacher cache {root} ({len(old)} images) was made by teacher '{old.teacher_name}' with other "
                    f"settings (differ: {', '.join(changed) or 'feature_dim/class_names'}); it is kept as it is. "
                    f"To recompute it with these settings: qsplat extract-features --data {_scene_of(root)} "
                    f"--teacher {teacher.name} ... --overwrite; or keep both with {prefix}teacher-cache NEW_FOLDER.")
            if image_keys and not set(old.keys()) & set(image_keys):
                raise TeacherSetupError(
                    f"Teacher cache {root} holds {len(old)} images, none of which is an image of this scene "
                    f"(cache: {old.keys()[:3]}, scene: {list(image_keys)[:3]}): it was made for other images and is "
                    f"kept as it is. Use another {prefix}teacher-cache folder (or the default one).")


def _scene_of(cache_root: Path):
    from .cache import CACHE_DIRNAME

    return cache_root.parent.parent if cache_root.parent.name == CACHE_DIRNAME else "SCENE"


def fill_teacher_cache(cache, teacher, items: Sequence[Tuple[str, Callable]], overwrite: bool = False,
                       progress: bool = True):
    """Compute and write every (image key, served image) whose entry is not current (all with overwrite);
    current entries are skipped (resume). `items` yields (key, get_image) with get_image() -> uint8 [H, W, 3+]."""
    from .cache import FillStats

    start, stats = time.perf_counter(), FillStats()
    todo = []
    for key, get_image in items:
        image = get_image()
        sha = served_image_sha256(image)
        if not overwrite and cache.is_current(key, sha):
            stats.skipped += 1
        else:
            todo.append((key, image, sha))
    for key, image, sha in _progress(todo, f"{teacher.name} teacher", progress and bool(todo)):
        mask_ids, embeddings = teacher.compute_served(key, image)
        cache.write(key, mask_ids, embeddings, sha)
        stats.written += 1
        stats.masks += int(embeddings.shape[0])
    stats.seconds = time.perf_counter() - start
    return stats


def _progress(items: Sequence, description: str, enabled: bool) -> Iterable:
    if not enabled:
        yield from items
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = (TextColumn("[q-splat] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns) as bar:
        task = bar.add_task(description, total=len(items))
        for item in items:
            yield item
            bar.advance(task)


def served_images(scene_root: Path, splits: Sequence[str] = ("train",), **parser_options) -> List[Tuple[str, Callable]]:
    """(image key, get_image) of a scene's images exactly as `ns-train q-splat` serves them (nerfstudio's
    datamanager: undistorted, cropped, downscaled), for the given dataparser splits."""
    from ..data.datamanager import QSplatDataManagerConfig
    from ..data.dataparser import QSplatDataParserConfig

    config = QSplatDataManagerConfig(dataparser=QSplatDataParserConfig(data=Path(scene_root), **parser_options),
                                     teacher="none")
    datamanager = config.setup(device="cpu", test_mode="val")
    items: List[Tuple[str, Callable]] = []
    for split in splits:
        for key, get_image in datamanager.served_items(split):
            if key not in [k for k, _ in items]:
                items.append((key, get_image))
    return items
