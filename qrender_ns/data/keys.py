"""How the teacher cache and the datamanager name an image: its path inside the scene folder."""

from __future__ import annotations

from pathlib import Path
from typing import Union

PathLike = Union[str, Path]


def image_key(image_path: PathLike, scene_root: PathLike) -> str:
    """Cache key of an image (e.g. a dataparser's `image_filenames[i]`): its path relative to the scene root."""
    return Path(image_path).resolve().relative_to(Path(scene_root).resolve()).as_posix()
