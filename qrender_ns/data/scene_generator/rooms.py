"""Procedural room layout: furniture footprint placement and `build_scene` (default or varied rooms)."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from qrender_ns.data.scene_generator.furniture import (_COLORS, _OBJECT_SIZES, _PART_BUILDERS, _jitter_color,
                                                       _random_surface)
from qrender_ns.data.scene_generator.scene import (FACE_NAMES, FURNITURE_CLASSES, Instance, Primitive, Room, Scene,
                                                   _rot_z, class_id)
from qrender_ns.data.scene_generator.variation import SceneVariation, _build_varied_scene

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
