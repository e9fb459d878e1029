"""The prompt-free real teacher, "sam2-auto-clip": SAM2's automatic masks with one open_clip embedding per mask.

As LangSplat and LERF, it needs no vocabulary before training: SAM2's automatic mask generator segments
everything on a grid of points, and CLIP embeds each mask, so any text can be queried after training. It is
what `--teacher auto` runs on a real scene for which no prompts are known (grounded-sam2-clip, the paper's
teacher, stays the choice when there are prompts: --prompts, a LeRF-OVS label folder, ScanNet's classes).

Per image (RGB, as the datamanager serves it):

1. `SAM2AutomaticMaskGenerator` on a `points_per_side`² grid; SAM2 predicts three masks per point (subpart,
   part, whole). `mask_level` picks what supervises the features, since the cache holds one mask id per
   pixel: small / medium / large = per point the smallest / middle / largest of the three by area
   (LangSplat's s / m / l levels, each generated and de-duplicated on its own: `masks.keep_one_granularity`),
   or all = SAM2's default output, the three levels together. Default large (docs/teachers.md says why).
2. The masks become one id map, largest first so smaller masks stay visible on top; masks left with fewer
   than `min_mask_pixels` visible pixels are dropped and the rest renumbered 0..M-1 (-1 = no mask).
3. CLIP embeds each kept mask exactly as grounded-sam2-clip does (the whole mask's box + padding,
   background black, square, batched) with the model text queries use.

The cache (`qsplat_teacher/sam2-auto-clip/`, the same format) records the models, checkpoint hashes and
every setting in its manifest; its class_names are empty (no vocabulary): queries are any text, and the
'wins' selection competes a query against the canonical negatives only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from qrender_ns.teachers.masks import (GRANULARITY_RANK, ClipMaskTeacher, PathLike, Sam2ClipModels, Sam2Segmenter,
                                       largest_first)
from qrender_ns.teachers.settings import AUTOMATIC, DEFAULT_MASK_LEVEL, MASK_LEVELS

NAME = AUTOMATIC
VERSION = 1  # bump when what compute() produces changes: caches made by an older version are then redone


@dataclass
class Sam2AutoClipConfig(Sam2ClipModels):
    """Models and settings of the sam2-auto-clip teacher. The generator's defaults are LangSplat's
    (preprocess.py: 32 points per side, predicted IoU > 0.7, stability >= 0.85, box NMS 0.7, regions and holes
    under 100 px removed) except crop_n_layers (LangSplat 1: five SAM passes per image; here 0, one pass)."""

    mask_level: str = DEFAULT_MASK_LEVEL
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.7
    stability_score_thresh: float = 0.85
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    min_mask_region_area: int = 100
    """SAM2's post-processing: holes and islands smaller than this are removed (0: off; needs cv2)."""

    def __post_init__(self):
        if self.mask_level not in MASK_LEVELS:
            raise ValueError(f"mask level must be one of {', '.join(MASK_LEVELS)}, got {self.mask_level!r}")
        if self.points_per_side < 1:
            raise ValueError(f"points_per_side must be >= 1, got {self.points_per_side}")

    def generator_settings(self) -> dict:
        """SAM2AutomaticMaskGenerator's keyword arguments."""
        return {"points_per_side": self.points_per_side, "points_per_batch": self.points_per_batch,
                "pred_iou_thresh": self.pred_iou_thresh, "stability_score_thresh": self.stability_score_thresh,
                "box_nms_thresh": self.box_nms_thresh, "crop_n_layers": self.crop_n_layers,
                "min_mask_region_area": self.min_mask_region_area}


class Sam2AutoClipTeacher(ClipMaskTeacher):
    """SAM2 automatic masks + CLIP embeddings for a scene's images, written to its teacher cache."""

    name = NAME
    packages = ("sam2",)

    def __init__(self, scene_dir: PathLike, config: Sam2AutoClipConfig, image_keys: Optional[Sequence[str]] = None,
                 splits: Sequence[str] = ("train",), cache_root: Optional[PathLike] = None):
        sam2_info = self._setup_models(scene_dir, config, cache_root)
        c = config
        self._info = {
            "name": NAME, "version": VERSION, "clip": self.clip_info, "sam2": sam2_info,
            "automatic_masks": {**c.generator_settings(), "mask_level": c.mask_level,
                                "granularity": "per point, the masks of this area rank among SAM2's three"
                                if c.mask_level in GRANULARITY_RANK else "SAM2's default output (all three)"},
            "masks": {"min_mask_pixels": c.min_mask_pixels, "crop_padding": c.crop_padding,
                      "paint": "largest first, smaller on top",
                      "crop": "mask box + padding, background black, zero-padded square, bicubic resize"},
        }
        self._setup_images(image_keys, splits)

    @property
    def class_names(self) -> List[str]:
        return []  # open vocabulary: nothing is named before training

    @property
    def segmenter(self) -> Sam2Segmenter:
        if self._segmenter is None:
            c = self.config
            self._segmenter = Sam2Segmenter(c.sam2_config, self.sam2_path, self.device, c.sam2_overrides, c.seed,
                                            automatic=c.generator_settings(), level=c.mask_level)
        return self._segmenter

    def masks(self, image: np.ndarray) -> List[np.ndarray]:
        """The candidate masks in paint order (largest first)."""
        return largest_first([m for m in self.segmenter.automatic_masks(image) if m.any()])
