"""Start-up checks of a scene and its teacher cache: a sentence naming the file, frame or option, not a
traceback (or a silent fallback) minutes later.

Plain functions, no nerfstudio import: the dataparser and datamanager call them once, when a run starts.
Every check raises `SceneCheckError` (a ValueError) with what was expected and how to fix it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

PathLike = Union[str, Path]
_MAX_LISTED = 5


class SceneCheckError(ValueError):
    """A scene or teacher cache that training cannot use as it is."""


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(str(i) for i in items[:_MAX_LISTED])
    return shown + (f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def check_seed_points(points, path: Optional[PathLike]) -> None:
    """Seed point cloud [N, 3]: at least one point, all finite. nerfstudio falls back to random points
    without a word when a PLY has none."""
    pts = _numpy(points) if points is not None else np.zeros((0, 3))
    where = f"seed point cloud {path}" if path is not None else "the seed point cloud"
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise SceneCheckError(f"{where}: expected points [N, 3], got shape {tuple(pts.shape)}")
    if len(pts) == 0:
        raise SceneCheckError(
            f"{where} has no points (0 vertices): training would silently start from random points. Use a PLY "
            "with the scene's points (ScanNet: <scene>_vh_clean_2.ply; nerfstudio layout: the ply_file_path of "
            "transforms.json), or end the ns-train command with `qsplat-data --ply-file-path PATH`")
    bad = ~np.isfinite(pts).all(axis=1)
    if bad.any():
        raise SceneCheckError(f"{where}: {int(bad.sum())} of {len(pts)} points have NaN/Inf coordinates "
                              f"(first at vertex {int(np.argmax(bad))}); fix or remove them")


def check_image_count(image_filenames: Sequence, split: str, data: PathLike) -> None:
    """A split with zero images (an empty images/ folder, a transforms.json with no frames)."""
    if len(image_filenames) == 0:
        raise SceneCheckError(
            f"{data}: the '{split}' split has no images. Expected images with poses (nerfstudio layout: "
            "transforms.json 'frames' with file_path + transform_matrix; ScanNet layout: color/0.jpg ... with "
            "pose/0.txt ...)")


def check_frames_have_poses(frames: Sequence[Mapping], transforms_path: PathLike) -> None:
    """transforms.json frames: each needs a file_path and a 4x4 transform_matrix (nerfstudio raises a bare
    KeyError: 'transform_matrix')."""
    if len(frames) == 0:
        raise SceneCheckError(f"{transforms_path} has no frames: expected a 'frames' list of "
                              "{'file_path': ..., 'transform_matrix': [[4x4]]}")
    missing = [f"frame {i} ({f.get('file_path', '?')})" for i, f in enumerate(frames)
               if "transform_matrix" not in f or "file_path" not in f]
    if missing:
        raise SceneCheckError(
            f"{transforms_path}: {len(missing)} of {len(frames)} frames have no 'transform_matrix' (or no "
            f"'file_path'): {_listing(missing)}. Give every frame its camera-to-world 4x4 pose, or remove frames "
            "without one (e.g. images COLMAP could not register)")
    shapes = [f"frame {i} ({f['file_path']})" for i, f in enumerate(frames)
              if np.asarray(f["transform_matrix"], dtype=object).shape != (4, 4)]
    if shapes:
        raise SceneCheckError(f"{transforms_path}: 'transform_matrix' must be 4x4 for {_listing(shapes)}")


def check_poses(camera_to_worlds, image_filenames: Sequence) -> None:
    """Camera-to-world poses [N, 3, 4] or [N, 4, 4] aligned with image_filenames: finite, with an invertible
    rotation part. Names the frames (a NaN pose otherwise fails much later, naming neither)."""
    poses = _numpy(camera_to_worlds).astype(np.float64)
    if poses.ndim != 3 or poses.shape[1:] not in ((3, 4), (4, 4)):
        raise SceneCheckError(f"camera poses must be [N, 3, 4] or [N, 4, 4], got {tuple(poses.shape)}")
    if len(poses) != len(image_filenames):
        raise SceneCheckError(f"{len(poses)} poses for {len(image_filenames)} images: expected one pose per image")
    names = [str(f) for f in image_filenames]
    not_finite = [f"{names[i]} (frame {i})" for i in np.nonzero(~np.isfinite(poses).all(axis=(1, 2)))[0]]
    if not_finite:
        raise SceneCheckError(f"{len(not_finite)} camera poses contain NaN/Inf: {_listing(not_finite)}. Fix those "
                              "frames' poses (ScanNet: pose/<i>.txt often holds -inf for frames the tracker lost; "
                              "remove those frames)")
    det = np.linalg.det(poses[:, :3, :3])
    degenerate = [f"{names[i]} (frame {i}, det {det[i]:.2g})" for i in np.nonzero(np.abs(det) < 1e-6)[0]]
    if degenerate:
        raise SceneCheckError(f"{len(degenerate)} camera poses have a singular rotation: {_listing(degenerate)}")


def check_images_readable(filenames: Iterable[PathLike]) -> None:
    """Decode every image once (a truncated PNG/JPEG otherwise fails mid-training without its name)."""
    from PIL import Image

    bad: List[str] = []
    for name in filenames:
        try:
            with Image.open(name) as image:
                image.load()
        except FileNotFoundError:
            bad.append(f"{name} (missing)")
        except (OSError, SyntaxError, ValueError) as e:  # PIL: "image file is truncated", "broken data stream"
            bad.append(f"{name} ({e})")
    if bad:
        raise SceneCheckError(f"{len(bad)} images cannot be read: {_listing(bad)}. Replace or re-export them "
                              "(a copy interrupted half-way leaves a truncated file)")


def check_teacher_masks(cache, keys: Sequence[str]) -> None:
    """At least one training image has a teacher mask: otherwise training would be RGB only without a word.
    `cache`: a TeacherCache (only its manifest is read: `entry(key)["num_masks"]`)."""
    if not keys:
        return
    with_masks = sum(1 for k in keys if int(cache.entry(k)["num_masks"]) > 0)
    if with_masks == 0:
        raise SceneCheckError(
            f"Teacher cache {cache.root} (teacher '{cache.teacher_name}') has no mask in any of the {len(keys)} "
            "training images: the feature loss would never run. Check the teacher's prompts and thresholds "
            "(--prompts, --box-threshold) or the images, and re-run: " + cache.command + " --overwrite")


def check_feature_dim(model_dim: int, cache_dim: int, cache_root: Optional[PathLike] = None) -> None:
    """The model's feature-dim equals the teacher's embedding size."""
    if int(model_dim) != int(cache_dim):
        where = f"the teacher cache {cache_root}" if cache_root is not None else "the teacher cache"
        raise SceneCheckError(
            f"--pipeline.model.feature-dim is {model_dim} but {where} holds {cache_dim}-D embeddings: set "
            f"--pipeline.model.feature-dim {cache_dim}, or extract features with a {model_dim}-D teacher")
