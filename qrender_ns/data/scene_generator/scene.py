"""Scene description: class ids, the analytic room / primitive / instance dataclasses, scene.json I/O."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Literal, Tuple

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


def class_id(name: str) -> int:
    return CLASS_NAMES.index(name) + 1


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


def _rot_z(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
