"""Writers of a generated scene: frames, the scannet and nerfstudio layouts, LeRF labels, scene.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from qrender_ns.data.scene_generator.cameras import (_make_cameras, _make_varied_cameras, eval_split, intrinsics_matrix,
                                                     opencv_to_opengl)
from qrender_ns.data.scene_generator.point_cloud import (keep_points, observed_points, sample_point_cloud,
                                                         write_point_cloud_ply)
from qrender_ns.data.scene_generator.render import render_view
from qrender_ns.data.scene_generator.rooms import build_scene
from qrender_ns.data.scene_generator.scene import (BACKGROUND_ID, CLASS_NAMES, DEPTH_UNIT_SCALE_FACTOR, JPEG_QUALITY,
                                                   MIN_LABEL_PIXELS, STRUCTURE_CLASSES, Scene, class_id)
from qrender_ns.data.scene_generator.variation import SceneVariation


@dataclass
class _Frame:
    index: int
    name: str  # image file stem, also the gt file stem
    image: str  # paths relative to the scene root
    depth: str
    is_eval: bool
    c2w_opencv: np.ndarray
    render: dict


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), array):
        raise OSError(f"could not write {path}")


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if path.suffix == ".jpg" else []
    if not cv2.imwrite(str(path), rgb[..., ::-1], params):
        raise OSError(f"could not write {path}")


def _depth_mm(depth_m: np.ndarray) -> np.ndarray:
    return np.clip(np.round(depth_m / DEPTH_UNIT_SCALE_FACTOR), 0, 65535).astype(np.uint16)


def _write_frames(root: Path, frames: List[_Frame]) -> None:
    for f in frames:
        _write_rgb(root / f.image, f.render["rgb"])
        _write_png(root / f.depth, _depth_mm(f.render["depth"]))
        _write_png(root / "gt" / "instances" / f"{f.name}.png", f.render["instance"])
        _write_png(root / "gt" / "classes" / f"{f.name}.png", f.render["cls"])


def _write_scannet(root: Path, scene_name: str, frames: List[_Frame], K: np.ndarray, cloud: dict) -> str:
    _write_frames(root, frames)
    (root / "pose").mkdir()
    for f in frames:
        np.savetxt(root / "pose" / f"{f.name}.txt", f.c2w_opencv, fmt="%.9f")
    (root / "intrinsic").mkdir()
    K4 = np.eye(4)
    K4[:3, :3] = K
    for name, matrix in (("intrinsic_color", K4), ("intrinsic_depth", K4), ("extrinsic_color", np.eye(4)),
                         ("extrinsic_depth", np.eye(4))):
        np.savetxt(root / "intrinsic" / f"{name}.txt", matrix, fmt="%.6f")
    ply_name = f"{scene_name}_vh_clean_2.ply"
    write_point_cloud_ply(root / ply_name, cloud)
    return ply_name


def _write_nerfstudio(root: Path, frames: List[_Frame], K: np.ndarray, width: int, height: int, cloud: dict,
                      instance_classes: Dict[int, str]) -> str:
    _write_frames(root, frames)
    write_point_cloud_ply(root / "sparse_pc.ply", cloud)
    eval_images = [f.image for f in frames if f.is_eval]
    transforms = {
        "camera_model": "OPENCV",
        "fl_x": float(K[0, 0]), "fl_y": float(K[1, 1]), "cx": float(K[0, 2]), "cy": float(K[1, 2]),
        "w": width, "h": height, "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0,
        # Poses are already z-up; this stops the parser's default "up" re-orientation.
        "orientation_override": "none",
        "ply_file_path": "sparse_pc.ply",
        # Informational only: nerfstudio reads depth_unit_scale_factor from its parser config.
        "depth_unit_scale_factor": DEPTH_UNIT_SCALE_FACTOR,
        "train_filenames": [f.image for f in frames if not f.is_eval],
        "val_filenames": eval_images,
        "test_filenames": eval_images,
        "frames": [{"file_path": f.image, "depth_file_path": f.depth,
                    "transform_matrix": opencv_to_opengl(f.c2w_opencv).tolist()} for f in frames],
    }
    (root / "transforms.json").write_text(json.dumps(transforms, indent=2))
    for f in frames:
        if f.is_eval:
            label = lerf_label(f.render["instance"], instance_classes, Path(f.image).name)
            (root / "label").mkdir(exist_ok=True)
            (root / "label" / f"{f.name}.json").write_text(json.dumps(label, indent=2))
    return "sparse_pc.ply"


def lerf_label(instance_map: np.ndarray, instance_classes: Dict[int, str], image_name: str,
               skip_classes: Sequence[str] = STRUCTURE_CLASSES, min_pixels: int = MIN_LABEL_PIXELS) -> dict:
    """LeRF-OVS / LangSplat-style label for one view: one object per visible instance (>= min_pixels),
    its largest outer contour as "segmentation" [[x, y], ...] and "bbox" [x1, y1, x2, y2] of the whole mask."""
    h, w = instance_map.shape
    objects = []
    for inst_id in np.unique(instance_map):
        name = instance_classes.get(int(inst_id))
        if name is None or name in skip_classes:
            continue
        mask = (instance_map == inst_id).astype(np.uint8)
        if mask.sum() < min_pixels:
            continue
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        contour = max(contours, key=cv2.contourArea).reshape(-1, 2)
        if len(contour) < 3:
            continue
        ys, xs = np.nonzero(mask)
        objects.append({
            "category": name,
            "instance_id": int(inst_id),
            "segmentation": contour.astype(int).tolist(),
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())],
        })
    return {"info": {"width": w, "height": h, "name": image_name}, "objects": objects}


def _scene_json(scene: Scene, layout: str, scene_name: str, seed: int, width: int, height: int, K: np.ndarray,
                frames: List[_Frame], fraction: float, seed_ply: str) -> dict:
    room = scene.room
    return {
        "format": "qsplat-procedural-scene/1",
        "layout": layout,
        "scene_name": scene_name,
        "seed": seed,
        "world": "metres, +z up, floor at z=0, room centred on the xy origin",
        "scene_extent": round(math.ceil(10 * max(room.half_x, room.half_y, room.height)) / 10 + 0.1, 2),
        "width": width,
        "height": height,
        "K": K.tolist(),
        "depth_unit_scale_factor": DEPTH_UNIT_SCALE_FACTOR,
        "depth_kind": "z-depth (along the optical axis), uint16 PNG",
        "background_id": BACKGROUND_ID,
        "classes": [{"id": class_id(n), "name": n} for n in CLASS_NAMES],
        **scene.to_json(),
        "cameras": [{
            "index": f.index, "frame": f.name, "image": f.image, "depth": f.depth,
            "instance_map": f"gt/instances/{f.name}.png", "class_map": f"gt/classes/{f.name}.png",
            "is_eval": f.is_eval, "c2w_opencv": f.c2w_opencv.tolist(),
        } for f in frames],
        "eval_frames": [f.name for f in frames if f.is_eval],
        "scannet_train_split_fraction": fraction,
        "point_cloud": "gt/points.ply",
        "seed_point_cloud": seed_ply,
        "label_dir": "label" if layout == "nerfstudio" else None,
    }


def _frame_paths(layout: str, index: int, ns_image_ext: str) -> Tuple[str, str, str]:
    if layout == "scannet":
        return str(index), f"color/{index}.jpg", f"depth/{index}.png"
    name = f"frame_{index + 1:05d}"
    return name, f"images/{name}.{ns_image_ext}", f"depths/{name}.png"


def _write_scene(root: Path, scene_name: str, layout: str, seed: int, num_images: int, width: int, height: int,
                 num_eval: int, num_points: int, ns_image_ext: str, observed_only: bool,
                 variation: Optional[SceneVariation] = None) -> dict:
    scene = build_scene(seed, variation)
    K = intrinsics_matrix(width, height)
    fraction, eval_indices = eval_split(num_images, num_eval)
    if variation is None:
        cameras, camera_path = _make_cameras(scene, seed, num_images), None
    else:
        cameras, camera_path = _make_varied_cameras(scene, seed, num_images, variation)
    frames = []
    for i, c2w in enumerate(cameras):
        name, image, depth = _frame_paths(layout, i, ns_image_ext)
        render = render_view(scene, c2w, K, width, height)
        frames.append(_Frame(i, name, image, depth, i in eval_indices, c2w, render))
    cloud = sample_point_cloud(scene, num_points, seed)
    if observed_only:  # as a ScanNet mesh, fused from its frames: only surfaces some frame saw
        cloud = keep_points(cloud, observed_points(scene, cloud["xyz"], [f.c2w_opencv for f in frames], K,
                                                   width, height) > 0)

    if layout == "scannet":
        seed_ply = _write_scannet(root, scene_name, frames, K, cloud)
    else:
        seed_ply = _write_nerfstudio(root, frames, K, width, height, cloud,
                                     {i.id: i.class_name for i in scene.instances})
    write_point_cloud_ply(root / "gt" / "points.ply", cloud)
    meta = _scene_json(scene, layout, scene_name, seed, width, height, K, frames, fraction, seed_ply)
    meta["point_cloud_observed_only"] = observed_only
    if variation is not None:  # absent for default rooms: their scene.json stays as it always was
        meta["variation"] = variation.to_json()
        meta["camera_path"] = camera_path
    (root / "gt" / "scene.json").write_text(json.dumps(meta, indent=2))
    return meta
