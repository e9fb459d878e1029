"""Ray casting of the analytic scene: exact RGB, z-depth, instance and class maps of a pinhole view."""

from __future__ import annotations

import numpy as np

from qrender_ns.data.scene_generator.scene import BACKGROUND_ID, Primitive, Room, Scene, _rot_z

# Directional light for view-independent Lambertian shading (a 3DGS can fit it exactly).
_LIGHT = np.array([0.35, 0.55, 0.76]) / np.linalg.norm([0.35, 0.55, 0.76])
_T_EPS = 1e-6  # ray hits closer than this are ignored



# Rays: one origin o [3], directions d [N,3], not normalised; t is in units of |d|.
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
