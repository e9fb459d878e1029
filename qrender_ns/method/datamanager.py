"""Full-image datamanager that also serves the teacher's masks and mask embeddings.

Per training image the batch gains `mask_ids` (long [H, W], -1 = no mask) and `mask_embeddings`
(float [M, D]), read lazily from the on-disk teacher cache (never all in RAM). Eval images of generated
scenes gain `gt_classes` (long [H, W], 0 = none), the ground truth of the 2D mIoU metric. Where the data has depth
(ScanNet `depth/`, generated scenes, transforms.json `depth_file_path`), train and eval images gain `depth_image`
(float [H, W, 1], scene units, 0 = invalid; data/depth.py) for the depth loss and the depth-error metric.

When training starts, a missing or partial teacher cache is filled first, from the images exactly as this
datamanager serves them (undistorted, cropped, downscaled; data/datamanager.py, teachers/filling.py): `ns-train q-splat --data
<scene>` is one command. The dataparser is any of nerfstudio's (`ns-train q-splat ... colmap --downscale-factor
4` works); the default `qsplat-data` detects the layout (data/dataparser.py). A teacher that cannot start (no
prompts where needed, missing weights or packages, options of another teacher) ends ns-train with its one-line
`[q-splat] ...` sentence (SystemExit), as `qsplat extract-features` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Tuple, Type

from nerfstudio.cameras.cameras import Cameras
from nerfstudio.configs.dataparser_configs import AnnotatedDataParserUnion
from nerfstudio.utils.rich_utils import CONSOLE

from qrender_ns.data.checks import check_teacher_masks
from qrender_ns.data.datamanager import ServedImages, ServedImagesConfig
from qrender_ns.data.dataparser import QSplatDataParserConfig
from qrender_ns.teachers.cache import TeacherCache, TeacherCacheError, extract_command
from qrender_ns.teachers.filling import fill_teacher_cache, open_cache_for, served_image_sha256
from qrender_ns.teachers.settings import TeacherSettings, TeacherSetupError, resolve_teacher, settings_of
from qrender_ns.teachers.setup import build_teacher, default_cache_root_for, existing_cache_root

PREFIX = "--pipeline.datamanager."


@dataclass
class QSplatDataManagerConfig(ServedImagesConfig, TeacherSettings):
    _target: Type = field(default_factory=lambda: QSplatDataManager)
    dataparser: AnnotatedDataParserUnion = field(default_factory=QSplatDataParserConfig)  # type: ignore[valid-type]
    """Any of nerfstudio's dataparsers (`ns-train q-splat --data X colmap --downscale-factor 4` works as with
    splatfacto); the default, qsplat-data, is registered through nerfstudio.dataparser_configs."""
    fill_teacher_cache: bool = True
    """Before training, compute the teacher's masks and embeddings of training images that are not cached yet
    (progress bar; resumable). Off: a missing entry is an error."""


class QSplatDataManager(ServedImages):
    config: QSplatDataManagerConfig

    def __init__(self, config: QSplatDataManagerConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        try:
            self.teacher_cache = self._setup_teacher(training=self.test_mode == "val")
        except TeacherSetupError as e:  # no prompts, missing weights or packages: one line, not a traceback
            raise SystemExit(f"[q-splat] {e}") from None
        random_teacher = bool(self.teacher_cache and (self.teacher_cache.teacher_info.get("clip") or {}).get("random_init"))
        # The pipeline hands train_dataset.metadata (a copy of the parser's) to the model.
        self.train_dataset.metadata.update(
            qsplat_teacher_cache=str(self.teacher_cache.root) if self.teacher_cache else None,
            qsplat_class_names=self._class_names(),
            qsplat_teacher_random=random_teacher and self.config.teacher_weights == "random-tiny",
            qsplat_train_views=self.train_views,  # feature_head=backproject reads the training views through it
            # read by the model's depth_loss "auto" / "on" (None: depth is served; else why not)
            qsplat_depth_missing=self.train_depth.missing,
            qsplat_depth_units_per_metre=self.train_depth.units_per_metre,
            # --pipeline.model.gaussians-ply: the PLY's frame is checked against these, and brought into this one
            qsplat_dataparser_transform=self.train_dataparser_outputs.dataparser_transform,
            qsplat_dataparser_scale=float(self.train_dataparser_outputs.dataparser_scale),
            qsplat_train_camera_centers=self.train_dataset.cameras.camera_to_worlds[:, :3, 3].clone(),
            qsplat_test_mode=self.test_mode,  # "val" while training; ns-eval / ns-viewer: the checkpoint's Gaussians
        )

    # ------------------------------------------------------------------ teacher cache
    def _setup_teacher(self, training: bool):
        settings = settings_of(self.config)
        if not training:  # ns-eval / ns-viewer: read the cache the run used (if any); never compute
            root = existing_cache_root(settings, self.scene_root)
            return TeacherCache(root) if root is not None and (root / "manifest.json").is_file() else None
        name = resolve_teacher(settings, self.scene_root, PREFIX, layout=self.layout)
        if name == "none":
            CONSOLE.print("[yellow]\\[q-splat] --pipeline.datamanager.teacher none: training RGB only, no features.[/yellow]")
            return None
        items = self.served_items("train")
        keys = [key for key, _ in items]
        if self.config.fill_teacher_cache:
            try:
                teacher = build_teacher(settings, name, self.scene_root, self.layout, PREFIX)
            except TeacherSetupError:
                cache = self._complete_cache_without_models(settings, name, items)
                if cache is None:
                    raise
                return cache
            with self._open_cache_when_free(teacher, keys) as writer:  # one writer at a time (a lock)
                if hasattr(teacher, "write_weights_sidecar"):
                    teacher.write_weights_sidecar()
                stats = fill_teacher_cache(writer, teacher, items, progress=True)
            if stats.written:
                CONSOLE.print(f"\\[q-splat] {name} teacher: {stats.written} images computed ({stats.masks} masks), "
                              f"{stats.skipped} already cached, {stats.seconds:.1f} s -> {writer.root}")
            cache = TeacherCache(writer.root)  # training only reads: no lock held
        else:
            root = default_cache_root_for(settings, self.scene_root, name)
            try:
                cache = TeacherCache(root)
            except TeacherCacheError:
                raise TeacherCacheError(
                    f"No teacher cache at {root} and --pipeline.datamanager.fill-teacher-cache False. Run "
                    f"`{extract_command(self.scene_root, name)}` first, or drop that option.") from None
            stale = [key for key, get_image in items if not cache.is_current(key, served_image_sha256(get_image()))]
            if stale:
                raise TeacherCacheError(
                    f"Teacher cache {root}: {len(stale)} of {len(keys)} training images are missing or were cached "
                    f"from other pixels (another downscale / undistortion / an edited image), e.g. {stale[:3]}. "
                    f"Run `{extract_command(self.scene_root, name)}`, or drop --pipeline.datamanager.fill-teacher-cache.")
        sizes = [tuple(get_image().shape[:2]) for _, get_image in items]
        cache.validate(keys, sizes=sizes)
        check_teacher_masks(cache, keys)  # no mask anywhere would train RGB only without a word
        return cache

    @staticmethod
    def _open_cache_when_free(teacher, keys):
        """The cache's writer; while another process writes it (e.g. a second training of the same scene started
        at once), wait for it (blocking on its lock): what it finishes is then already cached here."""
        def say_waiting(holder: str) -> None:
            CONSOLE.print(f"\\[q-splat] the teacher cache is being written by {holder} (another training or "
                          "extract-features): waiting for it to finish (Ctrl+C stops)")

        return open_cache_for(teacher, keys, PREFIX, on_busy=say_waiting)

    def _complete_cache_without_models(self, settings, name: str, items):
        """A cache that already holds every training image as served (e.g. extracted on another machine) trains
        without the teacher's weights; None when anything would have to be computed."""
        root = default_cache_root_for(settings, self.scene_root, name)
        try:
            cache = TeacherCache(root)
        except TeacherCacheError:
            return None
        if not all(cache.is_current(key, served_image_sha256(get_image())) for key, get_image in items):
            return None
        CONSOLE.print(f"\\[q-splat] teacher weights not found, but {root} already holds every training image: using it")
        return cache

    def _class_names(self) -> List[str]:
        scene_json = self.scene_root / "gt" / "scene.json"
        if scene_json.is_file():
            classes = json.loads(scene_json.read_text())["classes"]
            return [c["name"] for c in sorted(classes, key=lambda c: c["id"])]
        return list(self.teacher_cache.class_names) if self.teacher_cache else []

    def _attach_teacher(self, data: Dict, dataset) -> Dict:
        if self.teacher_cache is None:
            return data
        key = self.image_key(dataset.image_filenames[data["image_idx"]])
        mask_ids, embeddings = self.teacher_cache.read(key)
        height, width = data["image"].shape[:2]
        if mask_ids.shape != (height, width):  # cannot happen with a validated cache; guard against edits
            raise ValueError(
                f"teacher cache entry {key}: mask map is {tuple(mask_ids.shape)} but the served image is "
                f"{(height, width)}; re-run `qsplat extract-features --data {self.scene_root} --overwrite`.")
        data["mask_ids"] = mask_ids.to(self.device)
        data["mask_embeddings"] = embeddings.to(self.device)
        return data

    # ------------------------------------------------------------------ batches
    def next_train(self, step: int) -> Tuple[Cameras, Dict]:
        camera, data = super().next_train(step)
        return camera, self._attach_teacher(data, self.train_dataset)
