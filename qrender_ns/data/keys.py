"""Naming conventions shared by the readers and writers of scenes: an image's key (its path inside the scene
folder, used by the teacher cache and the datamanager) and ScanNet's exported folders."""

from __future__ import annotations

from pathlib import Path
from typing import Union

PathLike = Union[str, Path]
SCANNET_DIRS = ("color", "depth", "pose", "intrinsic")  # ScanNet's SensReader export, read by data/dataparser.py


def image_key(image_path: PathLike, scene_root: PathLike) -> str:
    """Cache key of an image (e.g. a dataparser's `image_filenames[i]`): its path relative to the scene root."""
    return Path(image_path).resolve().relative_to(Path(scene_root).resolve()).as_posix()
