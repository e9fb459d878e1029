"""Cameras: intrinsics, look-at poses, the default ring and the varied paths, the eval split."""

from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np

from qrender_ns.data.scene_generator.point_cloud import _sdf
from qrender_ns.data.scene_generator.rooms import _CAMERA_RING
from qrender_ns.data.scene_generator.scene import Scene
from qrender_ns.data.scene_generator.variation import SceneVariation


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
