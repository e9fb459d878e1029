"""Sensor / generated depth images served with the RGB batches (the depth loss, `--pipeline.model.depth-loss`).

nerfstudio's conventions: the dataparser lists `depth_filenames` (16-bit PNGs or `.npy`) and their
`depth_unit_scale_factor` (file units -> metres) in its metadata; depth is served in scene units, i.e. times
`depth_unit_scale_factor * dataparser_scale` (as nerfstudio's DepthDataset), resized nearest-neighbour to the
served image (never interpolated across an edge), 0 where invalid. A value of 0 in the file means "no
measurement" (ScanNet's holes), so it is masked by the loss, never trained towards.

Depth is read the first time an image is served and cached in its file units (uint16: 2 bytes a pixel, exact)
or as float16 scene units for float files, not as float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

BATCH_KEY = "depth_image"  # nerfstudio's key (DepthDataset, depth-nerfacto)


class DepthImages:
    """The depth images of one split, or why there are none (`missing`)."""

    def __init__(self, dataset, dataparser_outputs):
        metadata = dataparser_outputs.metadata
        self.filenames: Optional[List[Path]] = None
        self.scale = float(metadata.get("depth_unit_scale_factor") or 1.0) * float(dataparser_outputs.dataparser_scale)
        self.units_per_metre = float(dataparser_outputs.dataparser_scale)  # scene units in one metre of depth
        self.missing = _why_missing(dataset, metadata.get("depth_filenames"))
        if self.missing is None:
            self.filenames = [Path(f) for f in metadata["depth_filenames"]]
        self._cache: Dict[int, np.ndarray] = {}

    @property
    def available(self) -> bool:
        return self.filenames is not None

    def get(self, index: int, height: int, width: int) -> torch.Tensor:
        """float32 [height, width, 1] depth of image `index` in scene units (0 = invalid)."""
        cached = self._cache.get(index)
        if cached is None or cached.shape[:2] != (height, width):
            cached = self._cache[index] = self._read(index, height, width)
        if cached.dtype == np.uint16:
            depth = torch.from_numpy(cached.astype(np.float32)) * self.scale
        else:
            depth = torch.from_numpy(cached.astype(np.float32))
        return depth[..., None]

    def _read(self, index: int, height: int, width: int) -> np.ndarray:
        import cv2

        path = self.filenames[index]
        if path.suffix == ".npy":
            raw = np.load(path)
        else:
            raw = cv2.imread(str(path), cv2.IMREAD_ANYDEPTH)
        if raw is None or raw.ndim != 2:
            raise ValueError(f"depth image {path} is not readable as a single-channel 16-bit PNG or .npy array "
                             f"(got {None if raw is None else raw.shape}); fix the file, or train without depth: "
                             f"--pipeline.model.depth-loss off")
        if raw.shape != (height, width):
            raw = cv2.resize(raw, (width, height), interpolation=cv2.INTER_NEAREST)
        if raw.dtype == np.uint16:
            return raw
        depth = raw.astype(np.float32) * self.scale
        depth[~np.isfinite(depth) | (depth < 0)] = 0.0
        return depth.astype(np.float16)


def _why_missing(dataset, filenames) -> Optional[str]:
    """None when every image of the split has a depth file we can serve, else the reason."""
    if not filenames:
        return "the dataparser lists no depth images (ScanNet: depth/; nerfstudio: depth_file_path per frame)"
    if len(filenames) != len(dataset.image_filenames):
        return f"{len(filenames)} depth images for {len(dataset.image_filenames)} images"
    absent = [str(f) for f in filenames if not Path(f).is_file()]
    if absent:
        return f"{len(absent)} of {len(filenames)} depth files do not exist (first: {absent[0]})"
    distortion = dataset.cameras.distortion_params
    if distortion is not None and bool(torch.any(distortion != 0)):
        return "the cameras are distorted and depth images are not undistorted with the RGB"
    return None
