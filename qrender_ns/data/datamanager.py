"""Full-image datamanager that also serves the teacher's masks and mask embeddings.

Per training image the batch gains `mask_ids` (long [H, W], -1 = no mask) and `mask_embeddings`
(float [M, D]), read lazily from the on-disk teacher cache (never all in RAM). Eval images of generated
scenes gain `gt_classes` (long [H, W], 0 = none), the ground truth of the 2D mIoU metric. Where the data has depth
(ScanNet `depth/`, generated scenes, transforms.json `depth_file_path`), train and eval images gain `depth_image`
(float [H, W, 1], scene units, 0 = invalid; data/depth.py) for the depth loss and the depth-error metric.

When training starts, a missing or partial teacher cache is filled first, from the images exactly as this
datamanager serves them (undistorted, cropped, downscaled; `teachers/setup.py`): `ns-train q-splat --data
<scene>` is one command. The dataparser is any of nerfstudio's (`ns-train q-splat ... colmap --downscale-factor
4` works); the default `qsplat-data` detects the layout (data/dataparser.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Literal, Optional, Tuple, Type

import numpy as np
import torch
import tyro
from PIL import Image

from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanager, FullImageDatamanagerConfig
from nerfstudio.utils.rich_utils import CONSOLE

from ..teachers.setup import TeacherSettings
from .dataparser import QSplatDataParserConfig
from .depth import BATCH_KEY as DEPTH_KEY
from .depth import DepthImages


def _dataparser_union():
    """nerfstudio's dataparser subcommands with ours first (the default), so `ns-train q-splat --data X colmap
    --downscale-factor 4` works as with splatfacto."""
    from nerfstudio.configs.dataparser_configs import all_dataparsers

    parsers = {"qsplat-data": QSplatDataParserConfig(), **{k: v for k, v in all_dataparsers.items() if k != "qsplat-data"}}
    return tyro.conf.OmitSubcommandPrefixes[tyro.extras.subcommand_type_from_defaults(parsers, prefix_names=False)]


DataParserUnion = _dataparser_union()
PREFIX = "--pipeline.datamanager."


@dataclass
class QSplatDataManagerConfig(FullImageDatamanagerConfig, TeacherSettings):
    _target: Type = field(default_factory=lambda: QSplatDataManager)
    dataparser: DataParserUnion = field(default_factory=QSplatDataParserConfig)  # type: ignore[valid-type]
    cache_images_type: Literal["uint8", "float32"] = "uint8"
    """As nerfstudio's; uint8 (4x less RAM). The teacher cache keys images by these served pixels (undistortion
    interpolates differently in float32), so every q-splat path serves the same type."""
    fill_teacher_cache: bool = True
    """Before training, compute the teacher's masks and embeddings of training images that are not cached yet
    (progress bar; resumable). Off: a missing entry is an error."""


class QSplatDataManager(FullImageDatamanager):
    config: QSplatDataManagerConfig

    def __init__(self, config: QSplatDataManagerConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        metadata = self.train_dataparser_outputs.metadata
        self.scene_root = Path(metadata.get("qsplat_scene_root") or self.config.dataparser.data).resolve()
        if self.scene_root.suffix == ".json":
            self.scene_root = self.scene_root.parent
        self.layout = metadata.get("qsplat_layout")
        self.teacher_cache = self._setup_teacher(training=self.test_mode == "val")
        self.train_depth = DepthImages(self.train_dataset, self.train_dataparser_outputs)
        self.eval_depth = DepthImages(self.eval_dataset, self.eval_dataset._dataparser_outputs)
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
        )

    # ------------------------------------------------------------------ served images
    def _image_scale(self, outputs) -> float:
        return self.config.camera_res_scale_factor / float(outputs.metadata.get("qsplat_downscale") or 1.0)

    def create_train_dataset(self):
        outputs = self.train_dataparser_outputs
        return self.dataset_type(dataparser_outputs=outputs, scale_factor=self._image_scale(outputs))

    def create_eval_dataset(self):
        outputs = self.dataparser.get_dataparser_outputs(split=self.test_split)
        return self.dataset_type(dataparser_outputs=outputs, scale_factor=self._image_scale(outputs))

    def image_key(self, filename: Path) -> str:
        from ..teachers.cache import image_key

        try:
            return image_key(filename, self.scene_root)
        except ValueError:
            raise ValueError(f"image {filename} lies outside the scene folder {self.scene_root}; the teacher cache "
                             f"keys images by their path inside the scene. Move or link the images into it.") from None

    def served_items(self, split: str) -> List[Tuple[str, Callable[[], np.ndarray]]]:
        """(cache key, get_image) of every image of a split, as served (uint8 [H, W, C] after undistortion)."""
        train = split == "train"
        dataset = self.train_dataset if train else self.eval_dataset
        images = (lambda: self.cached_train) if train else (lambda: self.cached_eval)  # noqa: E731
        return [(self.image_key(f), lambda i=i: _uint8(images()[i]["image"])) for i, f in enumerate(dataset.image_filenames)]

    def train_views(self) -> Tuple[Cameras, List[str]]:
        """The training cameras as served (intrinsics after undistortion: the images are loaded first) and
        their teacher-cache keys, index for index."""
        _ = self.cached_train  # undistortion updates the intrinsics in place
        return self.train_dataset.cameras, [self.image_key(f) for f in self.train_dataset.image_filenames]

    # ------------------------------------------------------------------ teacher cache
    def _setup_teacher(self, training: bool):
        from ..teachers import setup as ts
        from ..teachers.cache import TeacherCache, TeacherCacheError, extract_command

        settings = ts.settings_of(self.config)
        if not training:  # ns-eval / ns-viewer: read the cache the run used (if any); never compute
            root = ts.existing_cache_root(settings, self.scene_root)
            return TeacherCache(root) if root is not None and (root / "manifest.json").is_file() else None
        name = ts.resolve_teacher(settings, self.scene_root, PREFIX)
        if name == "none":
            CONSOLE.print("[yellow]\\[q-splat] --pipeline.datamanager.teacher none: training RGB only, no features.[/yellow]")
            return None
        items = self.served_items("train")
        keys = [key for key, _ in items]
        if self.config.fill_teacher_cache:
            try:
                teacher = ts.build_teacher(settings, name, self.scene_root, self.layout, PREFIX)
            except ts.TeacherSetupError:
                cache = self._complete_cache_without_models(settings, name, items)
                if cache is None:
                    raise
                return cache
            with self._open_cache_when_free(teacher, keys) as writer:  # one writer at a time (a lock)
                if hasattr(teacher, "write_weights_sidecar"):
                    teacher.write_weights_sidecar()
                stats = ts.fill_teacher_cache(writer, teacher, items, progress=True)
            if stats.written:
                CONSOLE.print(f"\\[q-splat] {name} teacher: {stats.written} images computed ({stats.masks} masks), "
                              f"{stats.skipped} already cached, {stats.seconds:.1f} s -> {writer.root}")
            cache = TeacherCache(writer.root)  # training only reads: no lock held
        else:
            root = ts.default_cache_root_for(settings, self.scene_root, name)
            try:
                cache = TeacherCache(root)
            except TeacherCacheError:
                raise TeacherCacheError(
                    f"No teacher cache at {root} and --pipeline.datamanager.fill-teacher-cache False. Run "
                    f"`{extract_command(self.scene_root, name)}` first, or drop that option.") from None
            stale = [key for key, get_image in items if not cache.is_current(key, ts.served_image_sha256(get_image()))]
            if stale:
                raise TeacherCacheError(
                    f"Teacher cache {root}: {len(stale)} of {len(keys)} training images are missing or were cached "
                    f"from other pixels (another downscale / undistortion / an edited image), e.g. {stale[:3]}. "
                    f"Run `{extract_command(self.scene_root, name)}`, or drop --pipeline.datamanager.fill-teacher-cache.")
        sizes = [tuple(get_image().shape[:2]) for _, get_image in items]
        cache.validate(keys, sizes=sizes)
        from .checks import check_teacher_masks

        check_teacher_masks(cache, keys)  # no mask anywhere would train RGB only without a word
        return cache

    @staticmethod
    def _open_cache_when_free(teacher, keys):
        """The cache's writer; while another process writes it (e.g. a second training of the same scene started
        at once), wait for it (blocking on its lock): what it finishes is then already cached here."""
        from ..teachers import setup as ts

        def say_waiting(holder: str) -> None:
            CONSOLE.print(f"\\[q-splat] the teacher cache is being written by {holder} (another training or "
                          "extract-features): waiting for it to finish (Ctrl+C stops)")

        return ts.open_cache_for(teacher, keys, PREFIX, on_busy=say_waiting)

    def _complete_cache_without_models(self, settings, name: str, items):
        """A cache that already holds every training image as served (e.g. extracted on another machine) trains
        without the teacher's weights; None when anything would have to be computed."""
        from ..teachers import setup as ts
        from ..teachers.cache import TeacherCache, TeacherCacheError

        root = ts.default_cache_root_for(settings, self.scene_root, name)
        try:
            cache = TeacherCache(root)
        except TeacherCacheError:
            return None
        if not all(cache.is_current(key, ts.served_image_sha256(get_image())) for key, get_image in items):
            return None
        CONSOLE.print(f"\\[q-splat] teacher weights not found, but {root} already holds every training image: using it")
        return cache

    def _class_names(self) -> List[str]:
        scene_json = self.scene_root / "gt" / "scene.json"
        if scene_json.is_file():
            import json

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

    def _attach_ground_truth(self, data: Dict, dataset) -> Dict:
        stem = Path(dataset.image_filenames[data["image_idx"]]).stem
        path = self.scene_root / "gt" / "classes" / f"{stem}.png"
        if path.is_file():
            classes = np.asarray(Image.open(path))
            height, width = data["image"].shape[:2]
            if classes.shape != (height, width):  # served downscaled: nearest neighbour
                import cv2

                classes = cv2.resize(classes, (width, height), interpolation=cv2.INTER_NEAREST)
            data["gt_classes"] = torch.from_numpy(classes.astype(np.int64)).to(self.device)
        return data

    def _attach_depth(self, data: Dict, depth: DepthImages) -> Dict:
        if depth.available:
            height, width = data["image"].shape[:2]
            data[DEPTH_KEY] = depth.get(int(data["image_idx"]), height, width).to(self.device)
        return data

    # ------------------------------------------------------------------ batches
    def next_train(self, step: int) -> Tuple[Cameras, Dict]:
        camera, data = super().next_train(step)
        return camera, self._attach_depth(self._attach_teacher(data, self.train_dataset), self.train_depth)

    def next_eval_image(self, step: int) -> Tuple[Cameras, Dict]:
        camera, data = super().next_eval_image(step)
        return camera, self._attach_depth(self._attach_ground_truth(data, self.eval_dataset), self.eval_depth)

    @property
    def fixed_indices_eval_dataloader(self) -> List[Tuple[Cameras, Dict]]:
        return [(camera, self._attach_depth(self._attach_ground_truth(data, self.eval_dataset), self.eval_depth))
                for camera, data in super().fixed_indices_eval_dataloader]


def _uint8(image: torch.Tensor) -> np.ndarray:
    array = image.detach().cpu().numpy()
    if array.dtype != np.uint8:  # cache_images_type float32: back to the 8-bit pixels
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return array
