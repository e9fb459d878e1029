"""Deterministic procedural indoor scenes with exact ground truth, written in nerfstudio-readable layouts.

A scene is a closed box room (floor, ceiling, 4 walls) with 5-7 pieces of furniture built from analytic
primitives (yaw-rotated boxes, spheres, vertical cylinders). Views are rendered by numpy ray casting
(vectorised over pixels), so RGB, depth, instance and class maps are exact and cost a few seconds.

World frame: metres, +z up, floor at z=0, the room centred on the xy origin. Parser configs returned by
`scannet_parser_config` / `nerfstudio_parser_config` keep this frame (no re-centring, no re-scaling), so
ground truth in `gt/scene.json` applies directly to the dataparser outputs.

Ids: class id = 1 + index in `CLASS_NAMES`, 0 = none (a ray that hits nothing; cannot happen inside the
closed room). Instance ids: 1-4 the four walls (one instance per wall, all class "wall"), 5 the floor,
6 the ceiling, 7.. one per piece of furniture (a piece may be several primitives, e.g. a table top and legs).

On-disk layouts (`layout=`):

scannet (what nerfstudio's `scannet-data` parser reads)::

    <scene>/color/<i>.jpg  depth/<i>.png (uint16 mm z-depth)  pose/<i>.txt (4x4 c2w, OpenCV axes)
    <scene>/intrinsic/{intrinsic,extrinsic}_{color,depth}.txt (4x4)
    <scene>/<scene>_vh_clean_2.ply (labelled points; pass it as ply_file_path, see scannet_parser_config)

nerfstudio::

    <scene>/transforms.json (OpenGL c2w, OPENCV model, explicit train/val/test_filenames, ply_file_path)
    <scene>/images/frame_00001.png  depths/frame_00001.png (uint16 mm)  sparse_pc.ply
    <scene>/label/frame_XXXXX.json (LeRF-OVS / LangSplat-style polygons, eval frames, furniture only)

both::

    <scene>/gt/scene.json  gt/instances/<frame>.png (uint16)  gt/classes/<frame>.png (uint8)  gt/points.ply

`<frame>` is the image file stem of the layout ("0", "1", ... for scannet; "frame_00001", ... for
nerfstudio). Eval frames are the ones nerfstudio's ScanNet parser puts in its eval split for the
recorded train_split_fraction (spread over the sequence); the nerfstudio layout uses the same frames.

Modules (each imports only the ones before it): `scene` (ids, dataclasses, scene.json), `furniture` (part
builders, colours), `variation` (SceneVariation, varied rooms), `rooms` (placement, `build_scene`), `render`
(ray casting), `point_cloud` (signed distances, labelled points, PLY), `cameras` (poses, eval split), `writers`
(the on-disk layouts, `_write_scene`), `parser_configs` (nerfstudio dataparser configs); this package module
holds the entry point `generate_scene` and the `make-scene` CLI options, and re-exports the names above.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Literal, Optional

from qrender_ns.data.scene_generator.cameras import (_camera_is_free,  # noqa: F401  (tests use them from here)
                                                     _make_cameras, _make_varied_cameras, eval_split, intrinsics_matrix,
                                                     look_at_opencv, opencv_to_opengl)
from qrender_ns.data.scene_generator.furniture import _COLORS  # noqa: F401  (tests use it from here)
from qrender_ns.data.scene_generator.parser_configs import nerfstudio_parser_config, scannet_parser_config
from qrender_ns.data.scene_generator.point_cloud import (instance_surface_distance, keep_points, observed_points,
                                                         read_point_cloud_ply, sample_point_cloud,
                                                         write_point_cloud_ply)
from qrender_ns.data.scene_generator.render import cast_rays, render_view, surface_colors
from qrender_ns.data.scene_generator.rooms import build_scene
from qrender_ns.data.scene_generator.scene import (BACKGROUND_ID, CLASS_NAMES, DEPTH_UNIT_SCALE_FACTOR, FACE_NAMES,
                                                   FURNITURE_CLASSES, JPEG_QUALITY, MIN_LABEL_PIXELS, STRUCTURE_CLASSES,
                                                   Instance, Primitive, Room, Scene, Surface, class_id, load_scene)
from qrender_ns.data.scene_generator.variation import SceneVariation
from qrender_ns.data.scene_generator.writers import _write_scene, lerf_label

__all__ = [
    "CLASS_NAMES", "STRUCTURE_CLASSES", "FURNITURE_CLASSES", "BACKGROUND_ID", "DEPTH_UNIT_SCALE_FACTOR",
    "MIN_LABEL_PIXELS", "JPEG_QUALITY", "FACE_NAMES", "class_id", "Surface", "Primitive", "Room", "Instance",
    "Scene", "load_scene", "build_scene", "SceneVariation", "cast_rays", "surface_colors", "render_view",
    "instance_surface_distance", "sample_point_cloud", "observed_points", "keep_points", "write_point_cloud_ply",
    "read_point_cloud_ply", "intrinsics_matrix", "look_at_opencv", "opencv_to_opengl", "eval_split", "lerf_label",
    "SceneInfo", "generate_scene", "scannet_parser_config", "nerfstudio_parser_config", "ns_train_hint",
    "MakeScene",
]
# `generate_scene` below looks `_write_scene` up in this module (tests monkeypatch it here), so the entry point
# lives in the package module itself.


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------


@dataclass
class SceneInfo:
    """Where a generated scene lives (all paths absolute, in the final folder)."""

    root: Path
    layout: str
    scene_name: str
    seed: int
    width: int
    height: int
    classes: Dict[int, str]  # class id -> name (0 = none is not listed)
    instance_classes: Dict[int, int]  # instance id -> class id
    frame_names: List[str]
    eval_frames: List[str]
    image_paths: List[Path]
    depth_paths: List[Path]
    instance_map_paths: List[Path]
    class_map_paths: List[Path]
    point_cloud_path: Path  # the seed PLY the dataparser reads
    gt_points_path: Path
    scene_json_path: Path
    label_dir: Optional[Path]
    seconds: float = 0.0


def _prepare_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Swap the finished folder in; the old one (if any) is moved aside first and deleted last."""
    old = None
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    elif out_dir.exists() or out_dir.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        old.rmdir()
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None and old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    elif old is not None:
        old.unlink()


def generate_scene(out_dir: Path, layout: Literal["scannet", "nerfstudio"] = "scannet", seed: int = 0,
                   num_images: int = 24, width: int = 160, height: int = 120, num_eval: int = 4,
                   num_points: int = 40000, overwrite: bool = False,
                   ns_image_ext: Literal["png", "jpg"] = "png", observed_only: bool = True,
                   variation: Optional[SceneVariation] = None) -> SceneInfo:
    """Generate one procedural room into out_dir (see the module docstring for the layout).

    The scene is written into a hidden sibling folder and renamed into place at the end, so a crash
    never leaves a half-written scene. `ns_image_ext="jpg"` makes the nerfstudio layout name its images
    like LeRF-OVS (LangSplat's evaluation parses the frame index out of "frame_XXXXX.jpg").
    `observed_only` keeps only the surface points at least one view sees (seed and labelled clouds alike),
    as a real ScanNet mesh, which is fused from the scan's own frames, contains only observed surfaces.
    `variation` draws the room, its furniture and the camera path from wider ranges (`SceneVariation`,
    recorded in scene.json); None (the default) gives exactly the rooms generated before it existed."""
    if layout not in ("scannet", "nerfstudio"):
        raise ValueError(f"unknown layout {layout!r}")
    if width < 8 or height < 8:
        raise ValueError("width and height must be >= 8")
    start = time.perf_counter()
    out_dir = Path(out_dir).absolute()
    _prepare_target(out_dir, overwrite)
    eval_split(num_images, num_eval)  # validate before doing any work
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        meta = _write_scene(tmp, out_dir.name, layout, seed, num_images, width, height, num_eval, num_points,
                            ns_image_ext, observed_only, variation)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cams = meta["cameras"]
    return SceneInfo(
        root=out_dir, layout=layout, scene_name=out_dir.name, seed=seed, width=width, height=height,
        classes={c["id"]: c["name"] for c in meta["classes"]},
        instance_classes={i["id"]: i["class_id"] for i in meta["instances"]},
        frame_names=[c["frame"] for c in cams],
        eval_frames=list(meta["eval_frames"]),
        image_paths=[out_dir / c["image"] for c in cams],
        depth_paths=[out_dir / c["depth"] for c in cams],
        instance_map_paths=[out_dir / c["instance_map"] for c in cams],
        class_map_paths=[out_dir / c["class_map"] for c in cams],
        point_cloud_path=out_dir / meta["seed_point_cloud"],
        gt_points_path=out_dir / meta["point_cloud"],
        scene_json_path=out_dir / "gt" / "scene.json",
        label_dir=out_dir / "label" if layout == "nerfstudio" else None,
        seconds=time.perf_counter() - start,
    )


def ns_train_hint(info: SceneInfo) -> str:
    """The q-splat command for this scene (`qsplat-data` applies the parser settings of `parser_configs`; training
    fills the synthetic teacher's cache itself)."""
    return f"ns-train q-splat --data {info.root} --machine.device-type cpu"


@dataclass
class MakeScene:
    """Generate a small procedural indoor scene (RGB, depth, poses, labelled points, ground truth)."""

    out: Path
    """Scene folder to create (must not exist or be empty, unless --overwrite)."""
    layout: Literal["scannet", "nerfstudio"] = "scannet"
    """On-disk layout: nerfstudio's scannet-data or nerfstudio-data parser format."""
    seed: int = 0
    num_images: int = 24
    width: int = 160
    height: int = 120
    num_eval: int = 4
    """Views held out for evaluation (val/test split)."""
    num_points: int = 40000
    """Points sampled on the surfaces (hidden ones are dropped, see --observed-only)."""
    observed_only: bool = True
    """Keep only the points some view sees, as in a ScanNet mesh fused from its frames (no unseen ceiling)."""
    overwrite: bool = False
    vary: bool = False
    """Draw the room from the wide ranges of a multi-scene dataset (SceneVariation: room size, furniture count,
    sizes, placement and colours, camera path); off: the fixed ranges of the default rooms."""

    def main(self) -> None:
        info = generate_scene(self.out, layout=self.layout, seed=self.seed, num_images=self.num_images,
                              width=self.width, height=self.height, num_eval=self.num_eval,
                              num_points=self.num_points, overwrite=self.overwrite,
                              observed_only=self.observed_only, variation=SceneVariation() if self.vary else None)
        objects = sorted({info.classes[c] for c in info.instance_classes.values()} - set(STRUCTURE_CLASSES))
        print(f"[q-splat] {info.layout} scene (seed {info.seed}) in {info.root} ({info.seconds:.1f} s)")
        print(f"  {len(info.frame_names)} views {info.width}x{info.height}, "
              f"eval frames: {', '.join(info.eval_frames)}")
        print(f"  objects: {', '.join(objects)}")
        print(f"  seed points: {info.point_cloud_path}")
        labels = f", labels: {info.label_dir}" if info.label_dir else ""
        print(f"  ground truth: {info.scene_json_path.parent}{labels}")
        print(f"  train with: {ns_train_hint(info)}")
