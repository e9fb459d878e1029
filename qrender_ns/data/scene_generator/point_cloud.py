"""Signed distances, the labelled surface point cloud, its visibility from the cameras, PLY I/O."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from qrender_ns.data.scene_generator.render import cast_rays, surface_colors
from qrender_ns.data.scene_generator.scene import Primitive, Room, Scene, _rot_z


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
