"""SceneVariation: the wider ranges of a multi-scene dataset, and the varied rooms drawn from them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Literal, Optional, Sequence, Tuple

import numpy as np

from qrender_ns.data.scene_generator.furniture import _COLORS, _OBJECT_SIZES, _PART_BUILDERS, _random_surface
from qrender_ns.data.scene_generator.scene import (FACE_NAMES, FURNITURE_CLASSES, Instance, Primitive, Room, Scene,
                                                   _rot_z, class_id)


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
