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
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Literal, Optional, Sequence, Tuple

import cv2
import numpy as np

CLASS_NAMES: Tuple[str, ...] = (
    "wall", "floor", "ceiling",
    "chair", "table", "sofa", "bed", "lamp", "cabinet", "bookshelf", "plant",
)
STRUCTURE_CLASSES: Tuple[str, ...] = ("wall", "floor", "ceiling")
FURNITURE_CLASSES: Tuple[str, ...] = tuple(c for c in CLASS_NAMES if c not in STRUCTURE_CLASSES)
BACKGROUND_ID = 0
DEPTH_UNIT_SCALE_FACTOR = 1e-3  # depth PNGs hold millimetres
MIN_LABEL_PIXELS = 20  # smaller visible pieces get no LeRF-style label polygon
JPEG_QUALITY = 95
FACE_NAMES = ("x-", "x+", "y-", "y+", "floor", "ceiling")  # room faces, in instance-id order 1..6

# Directional light for view-independent Lambertian shading (a 3DGS can fit it exactly).
_LIGHT = np.array([0.35, 0.55, 0.76]) / np.linalg.norm([0.35, 0.55, 0.76])
_T_EPS = 1e-6  # ray hits closer than this are ignored


def class_id(name: str) -> int:
    return CLASS_NAMES.index(name) + 1


# ----------------------------------------------------------------------------------------------------
# Scene description
# ----------------------------------------------------------------------------------------------------


@dataclass
class Surface:
    """Identity and appearance shared by room faces and object primitives."""

    instance_id: int
    color: Tuple[float, float, float]  # base RGB in [0, 1]
    cell: float  # checker cell size in metres (world-space texture)
    wave: Tuple[float, float, float, float]  # kx, ky, kz (rad/m), phase: a sine stripe on top of it


@dataclass
class Primitive:
    """kind "box": size = half extents (hx, hy, hz), rotated by yaw about +z around center.
    kind "sphere": size = (radius,). kind "cylinder" (vertical axis): size = (radius, half_height)."""

    kind: Literal["box", "sphere", "cylinder"]
    center: Tuple[float, float, float]
    size: Tuple[float, ...]
    yaw: float
    surface: Surface


@dataclass
class Room:
    """Interior of [-half_x, half_x] x [-half_y, half_y] x [0, height]; faces in FACE_NAMES order."""

    half_x: float
    half_y: float
    height: float
    faces: List[Surface]


@dataclass
class Instance:
    id: int
    class_id: int
    class_name: str


@dataclass
class Scene:
    room: Room
    prims: List[Primitive]
    instances: List[Instance]

    def surfaces(self) -> List[Surface]:
        """Surface index s: 0-5 the room faces, 6+j primitive j (the order the ray caster uses)."""
        return list(self.room.faces) + [p.surface for p in self.prims]

    def class_of_instance(self) -> np.ndarray:
        """Lookup table instance id -> class id (index 0 = none)."""
        lut = np.zeros(max(i.id for i in self.instances) + 1, dtype=np.int64)
        for inst in self.instances:
            lut[inst.id] = inst.class_id
        return lut

    def to_json(self) -> dict:
        def surf(s: Surface) -> dict:
            return {"instance_id": s.instance_id, "color": list(s.color), "cell": s.cell, "wave": list(s.wave)}

        return {
            "room": {
                "half_x": self.room.half_x, "half_y": self.room.half_y, "height": self.room.height,
                "faces": [dict(face=n, **surf(s)) for n, s in zip(FACE_NAMES, self.room.faces)],
            },
            "primitives": [
                {"kind": p.kind, "center": list(p.center), "size": list(p.size), "yaw": p.yaw, **surf(p.surface)}
                for p in self.prims
            ],
            "instances": [
                {"id": i.id, "class_id": i.class_id, "class_name": i.class_name,
                 "primitives": [j for j, p in enumerate(self.prims) if p.surface.instance_id == i.id]}
                for i in self.instances
            ],
        }

    @staticmethod
    def from_json(d: dict) -> "Scene":
        def surf(s: dict) -> Surface:
            return Surface(int(s["instance_id"]), tuple(s["color"]), float(s["cell"]), tuple(s["wave"]))

        r = d["room"]
        room = Room(float(r["half_x"]), float(r["half_y"]), float(r["height"]), [surf(f) for f in r["faces"]])
        prims = [Primitive(p["kind"], tuple(p["center"]), tuple(p["size"]), float(p["yaw"]), surf(p))
                 for p in d["primitives"]]
        insts = [Instance(int(i["id"]), int(i["class_id"]), i["class_name"]) for i in d["instances"]]
        return Scene(room, prims, insts)


def load_scene(path: Path) -> Scene:
    """Rebuild the analytic scene from a generated scene folder or its gt/scene.json."""
    path = Path(path)
    if path.is_dir():
        path = path / "gt" / "scene.json"
    return Scene.from_json(json.loads(path.read_text()))


# ----------------------------------------------------------------------------------------------------
# Procedural layout
# ----------------------------------------------------------------------------------------------------

# Per class: footprint length (local x), depth (local y), height ranges in metres, and part colours.
_OBJECT_SIZES = {
    "chair": ((0.45, 0.55), (0.45, 0.55), (0.8, 1.0)),
    "table": ((0.9, 1.3), (0.6, 0.9), (0.7, 0.78)),
    "sofa": ((1.4, 1.8), (0.8, 0.95), (0.75, 0.9)),
    "bed": ((1.9, 2.1), (0.9, 1.3), (0.45, 0.6)),
    "lamp": ((0.3, 0.4), (0.3, 0.4), (1.3, 1.7)),
    "cabinet": ((0.6, 1.0), (0.4, 0.5), (0.8, 1.1)),
    "bookshelf": ((0.8, 1.0), (0.3, 0.4), (1.6, 1.9)),
    "plant": ((0.4, 0.6), (0.4, 0.6), (0.6, 1.1)),
}
_COLORS = {  # (main, accent) base colours, jittered per scene
    "wall": ((0.82, 0.78, 0.70), None), "floor": ((0.55, 0.38, 0.22), None), "ceiling": ((0.92, 0.92, 0.90), None),
    "chair": ((0.20, 0.35, 0.65), (0.15, 0.15, 0.18)), "table": ((0.62, 0.46, 0.30), (0.35, 0.25, 0.15)),
    "sofa": ((0.65, 0.15, 0.15), (0.50, 0.10, 0.10)), "bed": ((0.90, 0.90, 0.95), (0.35, 0.22, 0.12)),
    "lamp": ((0.95, 0.85, 0.45), (0.15, 0.15, 0.15)), "cabinet": ((0.25, 0.50, 0.35), None),
    "bookshelf": ((0.45, 0.30, 0.20), None), "plant": ((0.15, 0.55, 0.15), (0.70, 0.35, 0.20)),
}
# A part is (kind, local centre, size, colour key); local frame: footprint centred at 0, z from 0 (floor).
_Part = Tuple[str, Tuple[float, float, float], Tuple[float, ...], str]


def _parts_chair(w, d, h) -> List[_Part]:
    seat = 0.45
    leg_h = (seat - 0.06) / 2  # half height
    legs = [("box", (sx * (w / 2 - 0.04), sy * (d / 2 - 0.04), leg_h), (0.025, 0.025, leg_h), "accent")
            for sx in (-1, 1) for sy in (-1, 1)]
    return [("box", (0, 0, seat - 0.03), (w / 2, d / 2, 0.03), "main"),
            ("box", (0, d / 2 - 0.03, (seat + h) / 2), (w / 2, 0.03, (h - seat) / 2), "main")] + legs


def _parts_table(w, d, h) -> List[_Part]:
    leg_h = (h - 0.05) / 2  # half height
    legs = [("cylinder", (sx * (w / 2 - 0.06), sy * (d / 2 - 0.06), leg_h), (0.035, leg_h), "accent")
            for sx in (-1, 1) for sy in (-1, 1)]
    return [("box", (0, 0, h - 0.025), (w / 2, d / 2, 0.025), "main")] + legs


def _parts_sofa(w, d, h) -> List[_Part]:
    return [("box", (0, 0, 0.21), (w / 2, d / 2, 0.21), "main"),
            ("box", (0, d / 2 - 0.1, h / 2), (w / 2, 0.1, h / 2), "accent"),
            ("box", (-(w / 2 - 0.075), 0, 0.3), (0.075, d / 2, 0.3), "accent"),
            ("box", (w / 2 - 0.075, 0, 0.3), (0.075, d / 2, 0.3), "accent")]


def _parts_bed(w, d, h) -> List[_Part]:
    return [("box", (0, 0, 0.15), (w / 2, d / 2, 0.15), "accent"),
            ("box", (0.02, 0, (0.3 + h) / 2), (w / 2 - 0.06, d / 2 - 0.03, (h - 0.3) / 2), "main"),
            ("box", (-(w / 2 - 0.04), 0, (h + 0.45) / 2), (0.04, d / 2, (h + 0.45) / 2), "accent")]


def _parts_lamp(w, d, h) -> List[_Part]:
    shade_h = 0.35
    return [("cylinder", (0, 0, 0.02), (0.15, 0.02), "accent"),
            ("cylinder", (0, 0, (h - shade_h) / 2), (0.02, (h - shade_h) / 2), "accent"),
            ("cylinder", (0, 0, h - shade_h / 2), (min(w, d) / 2, shade_h / 2), "main")]


def _parts_box(w, d, h) -> List[_Part]:
    return [("box", (0, 0, h / 2), (w / 2, d / 2, h / 2), "main")]


def _parts_plant(w, d, h) -> List[_Part]:
    r = min(w, d) / 2
    pot_h = 0.3 * h
    return [("cylinder", (0, 0, pot_h / 2), (0.6 * r, pot_h / 2), "accent"),
            ("sphere", (0, 0, max(pot_h + 0.6 * r, h - r)), (r,), "main")]


_PART_BUILDERS: Dict[str, Callable[[float, float, float], List[_Part]]] = {
    "chair": _parts_chair, "table": _parts_table, "sofa": _parts_sofa, "bed": _parts_bed,
    "lamp": _parts_lamp, "cabinet": _parts_box, "bookshelf": _parts_box, "plant": _parts_plant,
}


def _jitter_color(rng: np.random.Generator, base) -> Tuple[float, float, float]:
    return tuple(float(c) for c in np.clip(np.asarray(base) + rng.uniform(-0.08, 0.08, 3), 0.03, 0.97))


def _random_surface(rng: np.random.Generator, instance_id: int, color) -> Surface:
    k = rng.normal(size=3)
    k = k / np.linalg.norm(k) * rng.uniform(8.0, 20.0)
    return Surface(instance_id, color, float(rng.uniform(0.12, 0.35)),
                   (float(k[0]), float(k[1]), float(k[2]), float(rng.uniform(0, 2 * np.pi))))


def _rot_z(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


# Furniture stays inside this fraction of the room half extents; cameras live outside it (see _make_cameras).
_OBJECT_REGION = 0.7
_CAMERA_RING = 0.85


def _place_footprints(rng, room: Room, classes: Sequence[str], dims: Dict[str, Tuple[float, float, float]]):
    """Rejection-sample non-overlapping (axis-aligned bounding box + gap) footprints, biggest first.
    Returns {class: (x, y, yaw)} for the classes that fit."""
    placed: Dict[str, Tuple[float, float, float]] = {}
    boxes = []  # (x, y, ex, ey) of placed footprints
    gap = 0.15
    for name in sorted(classes, key=lambda c: -dims[c][0] * dims[c][1]):
        w, d, _ = dims[name]
        for _ in range(200):
            yaw = float(rng.integers(0, 4) * np.pi / 2 + rng.uniform(-0.35, 0.35))
            ex = abs(math.cos(yaw)) * w / 2 + abs(math.sin(yaw)) * d / 2
            ey = abs(math.sin(yaw)) * w / 2 + abs(math.cos(yaw)) * d / 2
            lim_x, lim_y = _OBJECT_REGION * room.half_x - ex, _OBJECT_REGION * room.half_y - ey
            if lim_x <= 0 or lim_y <= 0:
                continue
            x, y = float(rng.uniform(-lim_x, lim_x)), float(rng.uniform(-lim_y, lim_y))
            if all(abs(x - bx) > ex + bex + gap or abs(y - by) > ey + bey + gap for bx, by, bex, bey in boxes):
                placed[name] = (x, y, yaw)
                boxes.append((x, y, ex, ey))
                break
    return placed


def build_scene(seed: int, variation: Optional["SceneVariation"] = None) -> Scene:
    """The analytic scene for `seed` (layout only; cameras are drawn separately). With a `SceneVariation`
    the room is drawn from its wider ranges (another random stream); without, exactly as always."""
    if variation is not None:
        return _build_varied_scene(seed, variation)
    rng = np.random.default_rng([seed, 1])
    room = Room(float(rng.uniform(1.9, 2.2)), float(rng.uniform(2.3, 2.7)), float(rng.uniform(2.4, 2.7)), [])
    instances: List[Instance] = []
    for face_index, face in enumerate(FACE_NAMES):
        name = "wall" if face_index < 4 else face
        inst = Instance(face_index + 1, class_id(name), name)
        instances.append(inst)
        room.faces.append(_random_surface(rng, inst.id, _jitter_color(rng, _COLORS[name][0])))

    while True:  # redraw until at least 5 pieces fit (deterministic: the rng stream just continues)
        wanted = list(rng.choice(FURNITURE_CLASSES, size=int(rng.integers(5, 8)), replace=False))
        dims = {c: tuple(float(rng.uniform(*r)) for r in _OBJECT_SIZES[c]) for c in wanted}
        placement = _place_footprints(rng, room, wanted, dims)
        if len(placement) >= 5:
            break

    prims: List[Primitive] = []
    for name in wanted:  # keep the drawn order so ids do not depend on placement order
        if name not in placement:
            continue
        inst = Instance(len(instances) + 1, class_id(name), name)
        instances.append(inst)
        main, accent = _COLORS[name]
        colors = {"main": _jitter_color(rng, main), "accent": _jitter_color(rng, accent or main)}
        x, y, yaw = placement[name]
        rot = _rot_z(yaw)
        for kind, local_c, size, color_key in _PART_BUILDERS[name](*dims[name]):
            cx, cy, cz = rot @ np.asarray(local_c, dtype=float) + np.array([x, y, 0.0])
            prims.append(Primitive(kind, (float(cx), float(cy), float(cz)), tuple(float(s) for s in size),
                                   yaw if kind == "box" else 0.0,
                                   _random_surface(rng, inst.id, colors[color_key])))
    return Scene(room, prims, instances)


@dataclass(frozen=True)
class SceneVariation:
    """Wider ranges for a multi-scene dataset (`qsplat make-dataset`, `make-scene --vary`). Without one
    (`variation=None`, the default everywhere) rooms are drawn exactly as before: same seed, same scene.
    Sizes in metres; (lo, hi) ranges are uniform."""

    half_x: Tuple[float, float] = (1.5, 3.0)
    """Room half extent along x (default rooms: 1.9-2.2)."""
    half_y: Tuple[float, float] = (1.8, 3.4)
    """Room half extent along y (default rooms: 2.3-2.7)."""
    height: Tuple[float, float] = (2.3, 3.0)
    num_objects: Tuple[int, int] = (3, 8)
    """Pieces of furniture wanted, inclusive (fewer are kept when they do not fit; at least the low end)."""
    repeat_classes: bool = True
    """A class may occur more than once (several chairs): instance and class are not the same thing."""
    size_jitter: float = 0.25
    """Each dimension of a piece is scaled by U(1 - s, 1 + s) on top of its class range."""
    wall_fraction: float = 0.35
    """Probability that a piece stands with its back against a wall (else anywhere in the free region)."""
    object_region: Tuple[float, float] = (0.55, 0.8)
    """Free-standing pieces stay inside this fraction of the half extents (drawn per room)."""
    color_jitter: float = 0.15
    """Per-channel jitter of the class colours (default rooms: 0.08)."""
    off_palette: float = 0.2
    """Probability that a piece (or a room face, at half that rate) gets a uniformly random colour, so a
    class cannot be told from its colour alone."""
    camera_paths: Tuple[Literal["ring", "two-rings", "walk"], ...] = ("ring", "two-rings", "walk")
    """Camera path kinds, one drawn per room: one ring, two rings at two heights and radii, or a closed walk
    whose radius and height drift."""
    camera_ring: Tuple[float, float] = (0.5, 0.9)
    """Ring radius as a fraction of the distance from the room centre to the wall."""
    camera_height: Tuple[float, float] = (0.8, 2.1)
    look_at_objects: float = 0.5
    """Probability that a camera looks at a piece of furniture (else at a point near the room centre)."""

    def __post_init__(self):
        lo, hi = self.num_objects
        if not 1 <= lo <= hi:
            raise ValueError(f"num_objects must be (lo, hi) with 1 <= lo <= hi, got {self.num_objects}")
        if not 0 <= self.size_jitter < 0.6:
            raise ValueError(f"size_jitter must be in [0, 0.6), got {self.size_jitter}")
        for name in ("half_x", "half_y", "height", "object_region", "camera_ring", "camera_height"):
            a, b = getattr(self, name)
            if not 0 < a <= b:
                raise ValueError(f"{name} must be (lo, hi) with 0 < lo <= hi, got {(a, b)}")
        if min(self.half_x[0], self.half_y[0]) < 1.0 or self.height[0] < 2.0:
            raise ValueError("rooms need half extents >= 1.0 m and a height >= 2.0 m (cameras need free space)")
        if self.object_region[1] > 0.9 or self.camera_ring[1] > 0.95:
            raise ValueError("object_region and camera_ring must stay <= 0.9 / 0.95 of the half extents")
        bad = [p for p in self.camera_paths if p not in ("ring", "two-rings", "walk")]
        if not self.camera_paths or bad:
            raise ValueError(f"camera_paths must be among ring, two-rings, walk; got {self.camera_paths}")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# Lowest heights at which the part builders still make sense (seat at 0.45 m, mattress on a 0.3 m frame, ...).
_MIN_HEIGHT = {"chair": 0.6, "sofa": 0.5, "bed": 0.36, "lamp": 1.0, "table": 0.45}


def _varied_color(rng, base, var: SceneVariation, off_palette: float) -> Tuple[float, float, float]:
    if rng.random() < off_palette:
        return tuple(float(c) for c in rng.uniform(0.05, 0.95, 3))
    return tuple(float(c) for c in np.clip(np.asarray(base) + rng.uniform(-var.color_jitter, var.color_jitter, 3),
                                           0.03, 0.97))


def _footprint_extent(yaw: float, w: float, d: float) -> Tuple[float, float]:
    return (abs(math.cos(yaw)) * w / 2 + abs(math.sin(yaw)) * d / 2,
            abs(math.sin(yaw)) * w / 2 + abs(math.cos(yaw)) * d / 2)


# Yaw that turns a piece's back (local +y: chair and sofa backs) towards each wall x-, x+, y-, y+.
_WALL_YAW = (math.pi / 2, -math.pi / 2, math.pi, 0.0)


def _place_varied(rng, room: Room, pieces: Sequence[Tuple[str, Tuple[float, float, float]]],
                  var: SceneVariation) -> List[Optional[Tuple[float, float, float]]]:
    """(x, y, yaw) per piece, or None for a piece that did not fit; biggest first, no overlaps (+ gap)."""
    region = float(rng.uniform(*var.object_region))
    placed: List[Optional[Tuple[float, float, float]]] = [None] * len(pieces)
    boxes = []
    gap = 0.15
    for k in sorted(range(len(pieces)), key=lambda k: -pieces[k][1][0] * pieces[k][1][1]):
        w, d, _ = pieces[k][1]
        for _ in range(200):
            if rng.random() < var.wall_fraction:
                wall = int(rng.integers(0, 4))
                yaw = _WALL_YAW[wall]
                ex, ey = _footprint_extent(yaw, w, d)
                if wall < 2:
                    lim = room.half_y - ey - 0.05
                    x, y = (-1 if wall == 0 else 1) * (room.half_x - ex - 0.03), float(rng.uniform(-lim, lim))
                else:
                    lim = room.half_x - ex - 0.05
                    x, y = float(rng.uniform(-lim, lim)), (-1 if wall == 2 else 1) * (room.half_y - ey - 0.03)
                if lim <= 0:
                    continue
            else:
                yaw = float(rng.uniform(-math.pi, math.pi))
                ex, ey = _footprint_extent(yaw, w, d)
                lim_x, lim_y = region * room.half_x - ex, region * room.half_y - ey
                if lim_x <= 0 or lim_y <= 0:
                    continue
                x, y = float(rng.uniform(-lim_x, lim_x)), float(rng.uniform(-lim_y, lim_y))
            if all(abs(x - bx) > ex + bex + gap or abs(y - by) > ey + bey + gap for bx, by, bex, bey in boxes):
                placed[k] = (float(x), float(y), float(yaw))
                boxes.append((x, y, ex, ey))
                break
    return placed


def _build_varied_scene(seed: int, var: SceneVariation) -> Scene:
    rng = np.random.default_rng([seed, 1, 1])  # its own stream: never the default rooms' numbers
    room = Room(float(rng.uniform(*var.half_x)), float(rng.uniform(*var.half_y)), float(rng.uniform(*var.height)), [])
    instances: List[Instance] = []
    for face_index, face in enumerate(FACE_NAMES):
        name = "wall" if face_index < 4 else face
        inst = Instance(face_index + 1, class_id(name), name)
        instances.append(inst)
        color = _varied_color(rng, _COLORS[name][0], var, var.off_palette / 2)
        room.faces.append(_random_surface(rng, inst.id, color))

    lo, hi = var.num_objects
    while True:  # redraw until at least `lo` pieces fit (deterministic)
        count = int(rng.integers(lo, hi + 1))
        if var.repeat_classes:  # at most one bed and three of any other class
            drawn, wanted = list(rng.choice(FURNITURE_CLASSES, size=count, replace=True)), []
            for name in drawn:
                if wanted.count(name) < (1 if name == "bed" else 3):
                    wanted.append(name)
        else:
            wanted = list(rng.choice(FURNITURE_CLASSES, size=min(count, len(FURNITURE_CLASSES)), replace=False))
        pieces = []
        for name in wanted:
            dims = [float(rng.uniform(*r)) * float(rng.uniform(1 - var.size_jitter, 1 + var.size_jitter))
                    for r in _OBJECT_SIZES[name]]
            dims[2] = max(dims[2], _MIN_HEIGHT.get(name, 0.3))
            pieces.append((str(name), tuple(dims)))
        placement = _place_varied(rng, room, pieces, var)
        if sum(p is not None for p in placement) >= lo:
            break

    prims: List[Primitive] = []
    for (name, dims), where in zip(pieces, placement):
        if where is None:
            continue
        inst = Instance(len(instances) + 1, class_id(name), name)
        instances.append(inst)
        main, accent = _COLORS[name]
        colors = {"main": _varied_color(rng, main, var, var.off_palette),
                  "accent": _varied_color(rng, accent or main, var, var.off_palette / 2)}
        x, y, yaw = where
        rot = _rot_z(yaw)
        for kind, local_c, size, color_key in _PART_BUILDERS[name](*dims):
            cx, cy, cz = rot @ np.asarray(local_c, dtype=float) + np.array([x, y, 0.0])
            prims.append(Primitive(kind, (float(cx), float(cy), float(cz)), tuple(float(s) for s in size),
                                   yaw if kind == "box" else 0.0,
                                   _random_surface(rng, inst.id, colors[color_key])))
    return Scene(room, prims, instances)


# ----------------------------------------------------------------------------------------------------
# Ray casting (rays: one origin o [3], directions d [N,3], not normalised; t is in units of |d|)
# ----------------------------------------------------------------------------------------------------


def _safe(d: np.ndarray) -> np.ndarray:
    return np.where(np.abs(d) < 1e-12, 1e-12, d)


def _hit_box(p: Primitive, o, d):
    rot = _rot_z(p.yaw)
    ol = (o - np.asarray(p.center)) @ rot  # world -> local (row vectors: v @ R == R^T v)
    dl = _safe(d @ rot)
    h = np.asarray(p.size)
    t1, t2 = (-h - ol) / dl, (h - ol) / dl
    tmin, tmax = np.minimum(t1, t2), np.maximum(t1, t2)
    t_near, t_far = tmin.max(axis=1), tmax.min(axis=1)
    hit = (t_near <= t_far) & (t_near > _T_EPS)
    axis = tmin.argmax(axis=1)
    rows = np.arange(len(d))
    n_local = np.zeros_like(dl)
    n_local[rows, axis] = -np.sign(dl[rows, axis])
    return np.where(hit, t_near, np.inf), n_local @ rot.T


def _hit_sphere(p: Primitive, o, d):
    c, r = np.asarray(p.center), p.size[0]
    oc = o - c
    a = (d * d).sum(1)
    b = 2.0 * d @ oc
    disc = b * b - 4.0 * a * (oc @ oc - r * r)
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2.0 * a)
    hit = (disc > 0) & (t > _T_EPS)
    n = (oc + t[:, None] * d) / r
    return np.where(hit, t, np.inf), n


def _hit_cylinder(p: Primitive, o, d):
    """Vertical cylinder seen from outside: nearest of the side (entering root) and the two caps."""
    oc = o - np.asarray(p.center)
    r, hh = p.size
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = 2.0 * (d[:, 0] * oc[0] + d[:, 1] * oc[1])
    disc = b * b - 4.0 * a * (oc[0] ** 2 + oc[1] ** 2 - r * r)
    t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2.0 * np.maximum(a, 1e-12))
    side_ok = (disc > 0) & (a > 1e-12) & (t_side > _T_EPS) & (np.abs(oc[2] + t_side * d[:, 2]) <= hh)
    t = np.where(side_ok, t_side, np.inf)
    n = np.zeros_like(d)
    n[:, :2] = oc[:2] + t_side[:, None] * d[:, :2]
    n /= r
    dz = _safe(d[:, 2])
    for sign in (1.0, -1.0):
        t_cap = (sign * hh - oc[2]) / dz
        q = oc[:2] + t_cap[:, None] * d[:, :2]
        cap_ok = (t_cap > _T_EPS) & ((q ** 2).sum(1) <= r * r) & (t_cap < t)
        t = np.where(cap_ok, t_cap, t)
        n[cap_ok] = (0.0, 0.0, sign)
    return t, n


_HIT = {"box": _hit_box, "sphere": _hit_sphere, "cylinder": _hit_cylinder}


def _hit_room(room: Room, o, d):
    """Exit point of the room box from inside: t, inward normal, face index (FACE_NAMES order)."""
    lo = np.array([-room.half_x, -room.half_y, 0.0])
    hi = np.array([room.half_x, room.half_y, room.height])
    ds = _safe(d)
    t_axis = np.where(ds > 0, (hi - o) / ds, (lo - o) / ds)
    axis = t_axis.argmin(axis=1)
    rows = np.arange(len(d))
    t = t_axis[rows, axis]
    positive = ds[rows, axis] > 0
    n = np.zeros_like(d)
    n[rows, axis] = np.where(positive, -1.0, 1.0)
    return t, n, axis * 2 + positive


def cast_rays(scene: Scene, origin: np.ndarray, dirs: np.ndarray):
    """Nearest hit per ray: t [N], normal [N,3] (facing the free space), surface index [N] (Scene.surfaces)."""
    t, n, s = _hit_room(scene.room, origin, dirs)
    for j, prim in enumerate(scene.prims):
        tj, nj = _HIT[prim.kind](prim, origin, dirs)
        closer = tj < t
        t = np.where(closer, tj, t)
        n[closer] = nj[closer]
        s[closer] = 6 + j
    return t, n, s


def surface_colors(scene: Scene, points: np.ndarray, normals: np.ndarray, surf_idx: np.ndarray) -> np.ndarray:
    """Base colour x world-space checker/stripe texture x Lambertian shading, in [0, 1]. Depends only on
    the surface point, so every view (and the point cloud) sees the same colour."""
    surfaces = scene.surfaces()
    color = np.array([s.color for s in surfaces])[surf_idx]
    cell = np.array([s.cell for s in surfaces])[surf_idx]
    wave = np.array([s.wave for s in surfaces])[surf_idx]
    # Evaluate the texture slightly inside the solid so faces lying on a cell boundary do not flicker.
    q = points - 1e-4 * normals
    checker = np.floor(q / cell[:, None]).sum(1) % 2 * 2.0 - 1.0
    stripes = np.sin((q * wave[:, :3]).sum(1) + wave[:, 3])
    pattern = 1.0 + 0.15 * checker + 0.07 * stripes
    shading = 0.6 + 0.4 * np.maximum(normals @ _LIGHT, 0.0)
    return np.clip(color * (pattern * shading)[:, None], 0.0, 1.0)


def render_view(scene: Scene, c2w_opencv: np.ndarray, K: np.ndarray, width: int, height: int) -> dict:
    """Render one pinhole view. c2w uses OpenCV camera axes (x right, y down, z forward).
    Returns rgb uint8 [H,W,3], depth float64 [H,W] (metric z-depth), instance uint16, cls uint8 [H,W]."""
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)  # pixel centres, as nerfstudio
    d_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1).reshape(-1, 3)
    dirs = d_cam @ c2w_opencv[:3, :3].T  # z component 1 in camera => t is the z-depth
    origin = c2w_opencv[:3, 3].astype(float)
    t, n, s = cast_rays(scene, origin, dirs)
    points = origin + t[:, None] * dirs
    rgb = surface_colors(scene, points, n, s)
    inst_of_surface = np.array([sf.instance_id for sf in scene.surfaces()])
    instance = np.where(np.isfinite(t), inst_of_surface[s], BACKGROUND_ID)
    cls = scene.class_of_instance()[instance]
    shape = (height, width)
    return {
        "rgb": np.round(rgb * 255).astype(np.uint8).reshape(*shape, 3),
        "depth": np.where(np.isfinite(t), t, 0.0).reshape(shape),
        "instance": instance.astype(np.uint16).reshape(shape),
        "cls": cls.astype(np.uint8).reshape(shape),
    }


# ----------------------------------------------------------------------------------------------------
# Signed distances and the labelled point cloud
# ----------------------------------------------------------------------------------------------------


def _sdf(p: Primitive, x: np.ndarray) -> np.ndarray:
    """Signed distance from points x [N,3] to a primitive (negative inside)."""
    local = x - np.asarray(p.center)
    if p.kind == "sphere":
        return np.linalg.norm(local, axis=1) - p.size[0]
    if p.kind == "box":
        q = np.abs(local @ _rot_z(p.yaw)) - np.asarray(p.size)
    else:  # cylinder: 2-D box in (radial distance, height)
        q = np.stack([np.linalg.norm(local[:, :2], axis=1) - p.size[0], np.abs(local[:, 2]) - p.size[1]], 1)
    return np.linalg.norm(np.maximum(q, 0.0), axis=1) + np.minimum(q.max(axis=1), 0.0)


def instance_surface_distance(scene: Scene, instance_id: int, points: np.ndarray) -> np.ndarray:
    """Distance from points [N,3] to the surface of one instance (its primitives, or its room face)."""
    face = next((k for k, f in enumerate(scene.room.faces) if f.instance_id == instance_id), None)
    if face is not None:
        axis, upper = face // 2, face % 2 == 1
        bound = [(-scene.room.half_x, scene.room.half_x), (-scene.room.half_y, scene.room.half_y),
                 (0.0, scene.room.height)][axis][int(upper)]
        return np.abs(points[:, axis] - bound)
    prims = [p for p in scene.prims if p.surface.instance_id == instance_id]
    if not prims:
        raise KeyError(f"no instance {instance_id}")
    return np.min([np.abs(_sdf(p, points)) for p in prims], axis=0)


def _sample_box(rng, p: Primitive, n: int):
    h = np.asarray(p.size)
    face_areas = np.array([h[1] * h[2], h[0] * h[2], h[0] * h[1]]).repeat(2)  # -x +x -y +y -z +z
    face = rng.choice(6, size=n, p=face_areas / face_areas.sum())
    axis, sign = face // 2, np.where(face % 2 == 1, 1.0, -1.0)
    local = rng.uniform(-1.0, 1.0, (n, 3)) * h
    rows = np.arange(n)
    local[rows, axis] = sign * h[axis]
    normal = np.zeros((n, 3))
    normal[rows, axis] = sign
    rot = _rot_z(p.yaw)
    return local @ rot.T + np.asarray(p.center), normal @ rot.T


def _sample_sphere(rng, p: Primitive, n: int):
    normal = rng.normal(size=(n, 3))
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    return np.asarray(p.center) + p.size[0] * normal, normal


def _sample_cylinder(rng, p: Primitive, n: int):
    r, hh = p.size
    areas = np.array([2 * np.pi * r * 2 * hh, np.pi * r * r, np.pi * r * r])  # side, top, bottom
    part = rng.choice(3, size=n, p=areas / areas.sum())
    phi = rng.uniform(0, 2 * np.pi, n)
    rad = np.where(part == 0, r, r * np.sqrt(rng.uniform(0, 1, n)))  # uniform on the cap discs
    z = np.where(part == 0, rng.uniform(-hh, hh, n), np.where(part == 1, hh, -hh))
    local = np.stack([rad * np.cos(phi), rad * np.sin(phi), z], 1)
    normal = np.where((part == 0)[:, None], np.stack([np.cos(phi), np.sin(phi), np.zeros(n)], 1),
                      np.stack([np.zeros(n), np.zeros(n), np.where(part == 1, 1.0, -1.0)], 1))
    return local + np.asarray(p.center), normal


def _sample_room_face(rng, room: Room, face: int, n: int):
    axis, upper = face // 2, face % 2 == 1
    lo = np.array([-room.half_x, -room.half_y, 0.0])
    hi = np.array([room.half_x, room.half_y, room.height])
    pts = rng.uniform(lo, hi, (n, 3))
    pts[:, axis] = hi[axis] if upper else lo[axis]
    normal = np.zeros((n, 3))
    normal[:, axis] = -1.0 if upper else 1.0  # inward
    return pts, normal


_SAMPLE = {"box": _sample_box, "sphere": _sample_sphere, "cylinder": _sample_cylinder}


def _surface_area(p: Primitive) -> float:
    if p.kind == "box":
        hx, hy, hz = p.size
        return 8 * (hx * hy + hx * hz + hy * hz)
    if p.kind == "sphere":
        return 4 * np.pi * p.size[0] ** 2
    r, hh = p.size
    return 2 * np.pi * r * (2 * hh + r)


def sample_point_cloud(scene: Scene, num_points: int, seed: int) -> dict:
    """Points on the visible surfaces: xyz float32, rgb uint8, label (class id) int32, instance int32.
    Furniture is sampled 3x denser per m^2 than the room shell; points hidden inside another solid or
    outside the room (e.g. the floor under a bed, the bottom of a cabinet) are dropped, so the count is
    a little below num_points."""
    rng = np.random.default_rng([seed, 3])
    room = scene.room
    hx, hy, hz = room.half_x, room.half_y, room.height
    face_areas = [4 * hy * hz] * 2 + [4 * hx * hz] * 2 + [4 * hx * hy] * 2
    weights = np.array(face_areas + [3.0 * _surface_area(p) for p in scene.prims])
    counts = rng.multinomial(num_points, weights / weights.sum())
    pts, nrm, sid = [], [], []
    for s, count in enumerate(counts):
        if s < 6:
            x, n = _sample_room_face(rng, room, s, count)
        else:
            prim = scene.prims[s - 6]
            x, n = _SAMPLE[prim.kind](rng, prim, count)
        pts.append(x), nrm.append(n), sid.append(np.full(count, s))
    pts, nrm, sid = np.concatenate(pts), np.concatenate(nrm), np.concatenate(sid)

    # A point is visible-ish if a step along its outward normal lands in free space.
    probe = pts + 2e-3 * nrm
    free = ((np.abs(probe[:, 0]) < room.half_x) & (np.abs(probe[:, 1]) < room.half_y)
            & (probe[:, 2] > 0) & (probe[:, 2] < room.height))
    for prim in scene.prims:
        free &= _sdf(prim, probe) > 0
    pts, nrm, sid = pts[free], nrm[free], sid[free]

    inst_of_surface = np.array([sf.instance_id for sf in scene.surfaces()])
    instance = inst_of_surface[sid]
    return {
        "xyz": pts.astype(np.float32),
        "rgb": np.round(surface_colors(scene, pts, nrm, sid) * 255).astype(np.uint8),
        "label": scene.class_of_instance()[instance].astype(np.int32),
        "instance": instance.astype(np.int32),
    }


def observed_points(scene: Scene, xyz: np.ndarray, cams_c2w_opencv: Sequence[np.ndarray], K: np.ndarray,
                    width: int, height: int) -> np.ndarray:
    """[N] number of cameras that see each point: it projects inside the image, in front of the camera, and
    the ray from the camera centre to it hits nothing closer (exact ray cast, not a depth-map lookup)."""
    xyz = np.asarray(xyz, dtype=np.float64)
    count = np.zeros(len(xyz), dtype=np.int32)
    for c2w in cams_c2w_opencv:
        origin = c2w[:3, 3].astype(np.float64)
        cam = (xyz - origin) @ c2w[:3, :3]
        z = cam[:, 2]
        safe_z = np.where(z > 1e-6, z, 1.0)
        u = K[0, 0] * cam[:, 0] / safe_z + K[0, 2]
        v = K[1, 1] * cam[:, 1] / safe_z + K[1, 2]
        inside = (z > 1e-6) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
        offset = xyz - origin
        dist = np.linalg.norm(offset, axis=1)
        t, _, _ = cast_rays(scene, origin, offset / np.maximum(dist, 1e-12)[:, None])
        count += inside & (t >= dist - (2e-3 + 1e-3 * dist))  # the point is (within 2 mm) the first hit
    return count


def keep_points(cloud: dict, keep: np.ndarray) -> dict:
    return {k: v[keep] for k, v in cloud.items()}


def write_point_cloud_ply(path: Path, cloud: dict) -> None:
    """Binary little-endian PLY: x y z (float), red green blue (uchar), label instance (int)."""
    from plyfile import PlyData, PlyElement

    vertex = np.empty(len(cloud["xyz"]), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"),
                                                ("blue", "u1"), ("label", "i4"), ("instance", "i4")])
    for k, axis in enumerate("xyz"):
        vertex[axis] = cloud["xyz"][:, k]
    for k, channel in enumerate(("red", "green", "blue")):
        vertex[channel] = cloud["rgb"][:, k]
    vertex["label"], vertex["instance"] = cloud["label"], cloud["instance"]
    PlyData([PlyElement.describe(vertex, "vertex")], text=False, byte_order="<").write(str(path))


def read_point_cloud_ply(path: Path) -> dict:
    from plyfile import PlyData

    v = PlyData.read(str(path))["vertex"].data
    return {"xyz": np.stack([v["x"], v["y"], v["z"]], 1), "rgb": np.stack([v["red"], v["green"], v["blue"]], 1),
            "label": np.asarray(v["label"]), "instance": np.asarray(v["instance"])}


# ----------------------------------------------------------------------------------------------------
# Cameras and splits
# ----------------------------------------------------------------------------------------------------


def intrinsics_matrix(width: int, height: int) -> np.ndarray:
    return np.array([[0.9 * width, 0.0, width / 2.0], [0.0, 0.9 * width, height / 2.0], [0.0, 0.0, 1.0]])


def look_at_opencv(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """4x4 camera-to-world with OpenCV axes (x right, y down, z forward), world +z up, no roll."""
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([right, down, forward], 1)
    c2w[:3, 3] = eye
    return c2w


def opencv_to_opengl(c2w: np.ndarray) -> np.ndarray:
    """Flip camera y and z axes (what nerfstudio's ScanNet parser does to pose/*.txt)."""
    out = np.array(c2w, dtype=float)
    out[:3, 1:3] *= -1
    return out


def _make_cameras(scene: Scene, seed: int, num_images: int) -> List[np.ndarray]:
    """Cameras on a rectangular ring at _CAMERA_RING x the room half extents (outside the furniture
    region), 1.2-1.8 m high, looking at a jittered point near the room centre at table height."""
    rng = np.random.default_rng([seed, 2])
    room = scene.room
    phase = rng.uniform(0, 2 * np.pi)
    cams = []
    for i in range(num_images):
        angle = phase + 2 * np.pi * (i + rng.uniform(-0.3, 0.3)) / num_images
        c, s = math.cos(angle), math.sin(angle)
        reach = 1.0 / max(abs(c) / room.half_x, abs(s) / room.half_y)  # ray from centre to the room wall
        eye = np.array([_CAMERA_RING * reach * c, _CAMERA_RING * reach * s, rng.uniform(1.2, 1.8)])
        target = np.array([rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), rng.uniform(0.5, 1.0)])
        assert all(_sdf(p, eye[None])[0] > 0.05 for p in scene.prims), "camera inside furniture"
        cams.append(look_at_opencv(eye, target))
    return cams


_CAMERA_CLEARANCE = 0.3  # metres between a varied camera and any wall or piece of furniture


def _camera_is_free(scene: Scene, eye: np.ndarray) -> bool:
    room, c = scene.room, _CAMERA_CLEARANCE
    inside = (abs(eye[0]) < room.half_x - c and abs(eye[1]) < room.half_y - c and c < eye[2] < room.height - c)
    return inside and all(_sdf(p, eye[None])[0] > c for p in scene.prims)


def _make_varied_cameras(scene: Scene, seed: int, num_images: int, var: SceneVariation
                         ) -> Tuple[List[np.ndarray], str]:
    """Cameras along a path drawn per room (var.camera_paths): positions are kept `_CAMERA_CLEARANCE` away
    from walls and furniture (pulled towards the centre, then redrawn anywhere free), each looking at a
    piece of furniture or near the room centre. Returns (c2w list, path kind)."""
    rng = np.random.default_rng([seed, 2, 1])
    room = scene.room
    path = str(var.camera_paths[int(rng.integers(0, len(var.camera_paths)))])
    phase = rng.uniform(0, 2 * np.pi)
    lo_h, hi_h = var.camera_height[0], min(var.camera_height[1], room.height - _CAMERA_CLEARANCE - 0.05)
    rings = [(rng.uniform(*var.camera_ring), rng.uniform(lo_h, hi_h)) for _ in range(2)]
    if path == "two-rings":  # one high and wide, one low and close
        (r1, h1), (r2, h2) = rings
        rings = [(max(r1, r2), max(h1, h2)), (min(r1, r2), min(h1, h2))]
    drift_r, drift_h = rings[0]
    centres = [np.asarray(p.center) for p in scene.prims]
    cams = []
    for i in range(num_images):
        angle = phase + 2 * np.pi * (i + rng.uniform(-0.3, 0.3)) / num_images
        if path == "ring":
            radius, height = rings[0][0], rings[0][1] + rng.uniform(-0.1, 0.1)
        elif path == "two-rings":
            radius, height = rings[i % 2][0], rings[i % 2][1] + rng.uniform(-0.1, 0.1)
        else:  # walk: radius and height drift, clipped to their ranges
            drift_r = float(np.clip(drift_r + rng.normal(0, 0.08), *var.camera_ring))
            drift_h = float(np.clip(drift_h + rng.normal(0, 0.12), lo_h, hi_h))
            radius, height = drift_r, drift_h
        c, s = math.cos(angle), math.sin(angle)
        reach = 1.0 / max(abs(c) / room.half_x, abs(s) / room.half_y)
        eye = np.array([radius * reach * c, radius * reach * s, height])
        shrink = 1.0
        while not _camera_is_free(scene, eye) and shrink > 0.3:  # pull towards the centre
            shrink -= 0.05
            eye = np.array([shrink * radius * reach * c, shrink * radius * reach * s, height])
        for _ in range(500):  # still blocked: anywhere free
            if _camera_is_free(scene, eye):
                break
            eye = np.array([rng.uniform(-room.half_x, room.half_x), rng.uniform(-room.half_y, room.half_y),
                            rng.uniform(lo_h, hi_h)])
        else:
            raise RuntimeError(f"seed {seed}: no free camera position in this room; lower num_objects")
        target = None
        if centres and rng.random() < var.look_at_objects:
            target = centres[int(rng.integers(0, len(centres)))] + rng.uniform(-0.15, 0.15, 3)
        if target is None or np.linalg.norm((target - eye)[:2]) < 0.6:
            target = np.array([rng.uniform(-0.3, 0.3) * room.half_x, rng.uniform(-0.3, 0.3) * room.half_y,
                               rng.uniform(0.4, 1.1)])
        if np.linalg.norm((target - eye)[:2]) < 0.3:  # straight down is not a pose look_at can roll-fix
            target = target + np.array([math.cos(angle + np.pi), math.sin(angle + np.pi), 0.0])
        cams.append(look_at_opencv(eye, target))
    return cams, path


def eval_split(num_images: int, num_eval: int) -> Tuple[float, List[int]]:
    """train_split_fraction for nerfstudio's ScanNet parser that yields exactly num_eval eval images,
    and their indices (the parser trains on linspace(0, n-1, ceil(n * fraction)) and evaluates on the rest)."""
    if not 1 <= num_eval < num_images:
        raise ValueError(f"need 1 <= num_eval < num_images, got num_eval={num_eval}, num_images={num_images}")
    fraction = (num_images - num_eval - 0.5) / num_images  # ceil(n * fraction) == n - num_eval
    num_train = math.ceil(num_images * fraction)
    i_train = np.linspace(0, num_images - 1, num_train, dtype=int)
    i_eval = np.setdiff1d(np.arange(num_images), i_train)
    assert len(i_eval) == num_eval
    return fraction, [int(i) for i in i_eval]


# ----------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# nerfstudio dataparser configs that keep the metric, z-up world frame
# ----------------------------------------------------------------------------------------------------


def _read_meta(scene_dir: Path) -> dict:
    return json.loads((Path(scene_dir) / "gt" / "scene.json").read_text())


def scannet_parser_config(scene_dir: Path, **overrides):
    """`ScanNetDataParserConfig` for a generated scannet-layout scene. Its ply_file_path default is a fixed
    example path, so it is set here; the split fraction yields exactly the recorded eval frames; no
    centring/scaling (the default would re-centre on the mean camera and scale to +-1)."""
    from nerfstudio.data.dataparsers.scannet_dataparser import ScanNetDataParserConfig

    meta = _read_meta(scene_dir)
    kwargs = dict(data=Path(scene_dir), ply_file_path=Path(scene_dir) / meta["seed_point_cloud"], load_3D_points=True,
                  point_cloud_color=True, train_split_fraction=meta["scannet_train_split_fraction"],
                  center_method="none", auto_scale_poses=False, scale_factor=1.0, scene_scale=meta["scene_extent"],
                  depth_unit_scale_factor=DEPTH_UNIT_SCALE_FACTOR)
    kwargs.update(overrides)
    return ScanNetDataParserConfig(**kwargs)


def nerfstudio_parser_config(scene_dir: Path, **overrides):
    """`NerfstudioDataParserConfig` for a generated nerfstudio-layout scene: seed points on, no
    re-orientation/centring/scaling, full resolution. The split comes from transforms.json."""
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    meta = _read_meta(scene_dir)
    kwargs = dict(data=Path(scene_dir), load_3D_points=True, orientation_method="none", center_method="none",
                  auto_scale_poses=False, scale_factor=1.0, scene_scale=meta["scene_extent"], downscale_factor=1,
                  depth_unit_scale_factor=DEPTH_UNIT_SCALE_FACTOR)
    kwargs.update(overrides)
    return NerfstudioDataParserConfig(**kwargs)


def ns_train_hint(info: SceneInfo) -> str:
    """The q-splat command for this scene (`qsplat-data` applies the parser settings above; training fills the
    synthetic teacher's cache itself)."""
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
