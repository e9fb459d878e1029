"""Full-image datamanager that also serves the teacher's masks and mask embeddings.

Per training image the batch gains `mask_ids` (long [H, W], -1 = no mask) and
`mask_embeddings` (float [M, D]), read lazily from the on-disk teacher cache (never all in
RAM). Eval images of generated scenes gain `gt_classes` (long [H, W], 0 = none), the ground
truth of the 2D mIoU metric.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Type

import numpy as np
import torch
from PIL import Image

from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanager, FullImageDatamanagerConfig

from .dataparser import QSplatDataParserConfig


@dataclass
class QSplatDataManagerConfig(FullImageDatamanagerConfig):
    _target: Type = field(default_factory=lambda: QSplatDataManager)
    dataparser: QSplatDataParserConfig = field(default_factory=QSplatDataParserConfig)
    teacher: str = "synthetic"
    """Teacher whose cache supervises the features (`qsplat extract-features --teacher ...`)."""
    teacher_cache: Optional[Path] = None
    """Teacher cache folder (default: <scene>/qsplat_teacher/<teacher>)."""
    require_teacher: bool = True
    """Fail at start-up when training images are missing from the teacher cache."""


class QSplatDataManager(FullImageDatamanager):
    config: QSplatDataManagerConfig

    def __init__(self, config: QSplatDataManagerConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.scene_root = Path(self.train_dataparser_outputs.metadata["qsplat_scene_root"])
        self.teacher_cache = self._open_teacher_cache()
        # The pipeline hands train_dataset.metadata (a copy of the parser's) to the model.
        self.train_dataset.metadata.update(
            qsplat_teacher_cache=str(self.teacher_cache.root) if self.teacher_cache else None,
            qsplat_class_names=self._class_names(),
        )

    # ------------------------------------------------------------------ teacher cache
    def _open_teacher_cache(self):
        from ..teachers.cache import TeacherCache, default_cache_root, extract_command

        root = self.config.teacher_cache or default_cache_root(self.scene_root, self.config.teacher)
        command = extract_command(self.scene_root, self.config.teacher)
        if not (Path(root) / "manifest.json").is_file():
            if not self.config.require_teacher:
                return None
            raise FileNotFoundError(
                f"No teacher cache at {root}: q-splat trains its features on cached teacher masks "
                f"and embeddings. Run `{command}` first (or pass "
                f"--pipeline.datamanager.teacher-cache PATH)."
            )
        cache = TeacherCache(root)
        if self.config.require_teacher:
            cache.validate([self.image_key(f) for f in self.train_dataset.image_filenames])
        return cache

    def image_key(self, filename: Path) -> str:
        from ..teachers.cache import image_key

        return image_key(filename, self.scene_root)

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
        if mask_ids.shape != (height, width):
            raise ValueError(
                f"teacher cache entry {key}: mask map is {tuple(mask_ids.shape)} but the image is "
                f"{(height, width)}; re-run `qsplat extract-features --data {self.scene_root} --overwrite`."
            )
        data["mask_ids"] = mask_ids.to(self.device)
        data["mask_embeddings"] = embeddings.to(self.device)
        return data

    def _attach_ground_truth(self, data: Dict, dataset) -> Dict:
        stem = Path(dataset.image_filenames[data["image_idx"]]).stem
        path = self.scene_root / "gt" / "classes" / f"{stem}.png"
        if path.is_file():
            data["gt_classes"] = torch.from_numpy(np.asarray(Image.open(path)).astype(np.int64)).to(self.device)
        return data

    # ------------------------------------------------------------------ batches
    def next_train(self, step: int) -> Tuple[Cameras, Dict]:
        camera, data = super().next_train(step)
        return camera, self._attach_teacher(data, self.train_dataset)

    def next_eval_image(self, step: int) -> Tuple[Cameras, Dict]:
        camera, data = super().next_eval_image(step)
        return camera, self._attach_ground_truth(data, self.eval_dataset)

    @property
    def fixed_indices_eval_dataloader(self) -> List[Tuple[Cameras, Dict]]:
        return [(camera, self._attach_ground_truth(data, self.eval_dataset))
                for camera, data in super().fixed_indices_eval_dataloader]
