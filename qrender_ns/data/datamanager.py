"""The images of a scene exactly as `ns-train q-splat` serves them: nerfstudio's full-image datamanager
(undistorted, cropped, downscaled), each keyed by its path inside the scene (data/keys.py), with depth
(data/depth.py) and, for generated scenes, ground-truth classes on eval images.

The teachers compute their masks on these served images (`served_images`), and the method's datamanager
(method/datamanager.py) adds the teacher's masks and embeddings to the training batches on top of this one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Literal, Sequence, Tuple, Type

import cv2
import numpy as np
import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanager, FullImageDatamanagerConfig
from PIL import Image

from qrender_ns.data.dataparser import QSplatDataParserConfig
from qrender_ns.data.depth import BATCH_KEY as DEPTH_KEY
from qrender_ns.data.depth import DepthImages
from qrender_ns.data.keys import image_key


@dataclass
class ServedImagesConfig(FullImageDatamanagerConfig):
    _target: Type = field(default_factory=lambda: ServedImages)
    dataparser: QSplatDataParserConfig = field(default_factory=QSplatDataParserConfig)
    cache_images_type: Literal["uint8", "float32"] = "uint8"
    """As nerfstudio's; uint8 (4x less RAM). The teacher cache keys images by these served pixels (undistortion
    interpolates differently in float32), so every q-splat path serves the same type."""


class ServedImages(FullImageDatamanager):
    """nerfstudio's FullImageDatamanager, serving images at the dataparser's downscale, with their cache keys,
    depth and (eval images of generated scenes) ground-truth classes."""

    config: ServedImagesConfig

    def __init__(self, config: ServedImagesConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        metadata = self.train_dataparser_outputs.metadata
        self.scene_root = Path(metadata.get("qsplat_scene_root") or self.config.dataparser.data).resolve()
        if self.scene_root.suffix == ".json":
            self.scene_root = self.scene_root.parent
        self.layout = metadata.get("qsplat_layout")
        self.train_depth = DepthImages(self.train_dataset, self.train_dataparser_outputs)
        self.eval_depth = DepthImages(self.eval_dataset, self.eval_dataset._dataparser_outputs)

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

    def _attach_ground_truth(self, data: Dict, dataset) -> Dict:
        stem = Path(dataset.image_filenames[data["image_idx"]]).stem
        path = self.scene_root / "gt" / "classes" / f"{stem}.png"
        if path.is_file():
            classes = np.asarray(Image.open(path))
            height, width = data["image"].shape[:2]
            if classes.shape != (height, width):  # served downscaled: nearest neighbour
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
        return camera, self._attach_depth(data, self.train_depth)

    def next_eval_image(self, step: int) -> Tuple[Cameras, Dict]:
        camera, data = super().next_eval_image(step)
        return camera, self._attach_depth(self._attach_ground_truth(data, self.eval_dataset), self.eval_depth)

    @property
    def fixed_indices_eval_dataloader(self) -> List[Tuple[Cameras, Dict]]:
        return [(camera, self._attach_depth(self._attach_ground_truth(data, self.eval_dataset), self.eval_depth))
                for camera, data in super().fixed_indices_eval_dataloader]


def served_images(scene_root: Path, splits: Sequence[str] = ("train",), **parser_options) -> List[Tuple[str, Callable]]:
    """(image key, get_image) of a scene's images exactly as `ns-train q-splat` serves them (nerfstudio's
    datamanager: undistorted, cropped, downscaled), for the given dataparser splits."""
    config = ServedImagesConfig(dataparser=QSplatDataParserConfig(data=Path(scene_root), **parser_options))
    datamanager = config.setup(device="cpu", test_mode="val")
    items: List[Tuple[str, Callable]] = []
    for split in splits:
        for key, get_image in datamanager.served_items(split):
            if key not in [k for k, _ in items]:
                items.append((key, get_image))
    return items


def _uint8(image: torch.Tensor) -> np.ndarray:
    array = image.detach().cpu().numpy()
    if array.dtype != np.uint8:  # cache_images_type float32: back to the 8-bit pixels
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return array
