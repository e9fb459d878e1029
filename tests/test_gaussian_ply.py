"""qrender_ns.data.gaussian_ply: the 3DGS PLY (Inria point_cloud.ply / ns-export gaussian-splat) and its
features sidecar, read back with plain plyfile, bad inputs as one sentence naming the file, frame changes."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest
from plyfile import PlyData, PlyElement

from qrender_ns.data import gaussian_ply as gp
from qrender_ns.data.gaussian_ply import GaussianPly, GaussianPlyError


def make_gaussians(n=200, deg=3, c=0, seed=0, feat_dtype=np.float16) -> GaussianPly:
    rng = np.random.default_rng(seed)
    k = (deg + 1) ** 2 - 1
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    return GaussianPly(means=f(n, 3), sh_dc=f(n, 3), sh_rest=f(n, k, 3), opacity_logits=f(n),
                       log_scales=f(n, 3) - 3, quats_wxyz=f(n, 4),
                       features=rng.normal(size=(n, c)).astype(feat_dtype) if c else None)


def assert_same(a: GaussianPly, b: GaussianPly, features=True):
    for name in ("means", "sh_dc", "sh_rest", "opacity_logits", "log_scales", "quats_wxyz"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == np.float32, name
        assert x.shape == y.shape and np.array_equal(x, y), name
    if features:
        assert (a.features is None) == (b.features is None)
        if a.features is not None:
            assert a.features.dtype == b.features.dtype and np.array_equal(a.features, b.features)


def one_sentence(err: Exception, path) -> str:
    msg = str(err)
    assert str(path) in msg, msg
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("deg", [0, 1, 3])
def test_round_trip_exact_and_plain_plyfile(tmp_path, deg):
    g = make_gaussians(deg=deg)
    path = gp.write_gaussian_ply(tmp_path / "scene.ply", g, features=None)
    assert_same(g, gp.read_gaussian_ply(path))

    # plain plyfile, as Inria's load_ply and every viewer read it
    ply = PlyData.read(str(path))
    assert ply.text is False and ply.byte_order == "<"
    assert [e.name for e in ply.elements] == ["vertex"]
    v = ply["vertex"]
    k = (deg + 1) ** 2 - 1
    names = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(3 * k)]
             + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])
    assert [p.name for p in v.properties] == names
    assert all(v.data.dtype[p].str == "<f4" for p in names)
    for i, ax in enumerate("xyz"):
        assert np.array_equal(v[ax], g.means[:, i])
        assert np.array_equal(v["n" + ax], np.zeros(g.n, np.float32))
    for c in range(3):
        assert np.array_equal(v[f"f_dc_{c}"], g.sh_dc[:, c])
        for j in range(k):  # channel-major, as Inria's save_ply (features_rest.transpose(1, 2).flatten(1))
            assert np.array_equal(v[f"f_rest_{c * k + j}"], g.sh_rest[:, j, c])
    assert np.array_equal(v["opacity"], g.opacity_logits)
    for i in range(3):
        assert np.array_equal(v[f"scale_{i}"], g.log_scales[:, i])
    for i in range(4):
        assert np.array_equal(v[f"rot_{i}"], g.quats_wxyz[:, i])


def test_inria_style_file_reads(tmp_path):
    """A PLY written as Inria's save_ply does it (plyfile, structured array) reads into the same arrays."""
    g = make_gaussians(n=50, deg=3)
    n, k = g.n, 15
    attrs = np.concatenate([g.means, np.zeros_like(g.means), g.sh_dc, g.sh_rest.transpose(0, 2, 1).reshape(n, -1),
                            g.opacity_logits[:, None], g.log_scales, g.quats_wxyz], axis=1)
    names = gp.property_names(3)
    assert len(names) == attrs.shape[1] == 3 + 3 + 3 + 3 * k + 1 + 3 + 4
    el = np.empty(n, dtype=[(a, "f4") for a in names])
    el[:] = list(map(tuple, attrs))
    PlyData([PlyElement.describe(el, "vertex")]).write(str(tmp_path / "point_cloud.ply"))
    assert_same(g, gp.read_gaussian_ply(tmp_path / "point_cloud.ply"))


def test_features_sidecar_round_trip(tmp_path):
    g = make_gaussians(n=300, c=512)
    path = gp.write_gaussian_ply(tmp_path / "scene.ply", g)  # sidecar by default
    side = tmp_path / "scene.features.npz"
    assert side.exists() and gp.sidecar_path(path) == side
    assert "f_lang_0" not in [p.name for p in PlyData.read(str(path))["vertex"].properties]
    back = gp.read_gaussian_ply(path)
    assert back.features.dtype == np.float16 and back.features.shape == (300, 512)
    assert_same(g, back)
    assert np.array_equal(gp.read_features(side), g.features)
    with np.load(side, allow_pickle=False) as z:  # documented layout, no pickle
        header = json.loads(str(z["header"][()]))
        assert z["features"].dtype == np.float16
    assert header == {"format": "qsplat-gaussian-features", "version": 1, "n": 300, "c": 512, "dtype": "float16",
                      "ply": "scene.ply", "positions_sha256": gp.positions_sha256(g.means)}
    # rewritten without features: the stale sidecar goes
    gp.write_gaussian_ply(path, g, features=None)
    assert not side.exists() and gp.read_gaussian_ply(path).features is None


def test_features_as_properties(tmp_path):
    g = make_gaussians(n=100, c=16, feat_dtype=np.float32)
    path = gp.write_gaussian_ply(tmp_path / "scene.ply", g, features="properties")
    assert not gp.sidecar_path(path).exists()
    names = [p.name for p in PlyData.read(str(path))["vertex"].properties]
    assert names == gp.property_names(3, 16) and names[-16:] == [f"f_lang_{i}" for i in range(16)]
    assert_same(g, gp.read_gaussian_ply(path))
    # float16 in -> float32 properties (PLY has no half type), exact values
    g16 = make_gaussians(n=100, c=16)
    back = gp.read_gaussian_ply(gp.write_gaussian_ply(tmp_path / "h.ply", g16, features="properties"))
    assert back.features.dtype == np.float32 and np.array_equal(back.features, g16.features.astype(np.float32))


def test_transform_recorded_in_comment(tmp_path):
    g = make_gaussians(n=20)
    T = np.hstack([_rot(1), [[0.5], [-1.0], [2.0]]])
    g.transform = {"frame": "data", "transform": T.tolist(), "scale": 0.25}
    path = gp.write_gaussian_ply(tmp_path / "scene.ply", g)
    comments = PlyData.read(str(path)).comments
    tc = [c for c in comments if c.startswith("qsplat_transform ")]
    assert len(tc) == 1 and json.loads(tc[0].split(" ", 1)[1])["scale"] == 0.25
    back = gp.read_gaussian_ply(path)
    assert back.transform["frame"] == "data" and np.allclose(back.transform["transform"], T, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ bad input


def _write_vertices(path, props: dict, comments=()):
    n = len(next(iter(props.values())))
    arr = np.empty(n, dtype=[(k, np.asarray(v).dtype.str) for k, v in props.items()])
    for k, v in props.items():
        arr[k] = v
    PlyData([PlyElement.describe(arr, "vertex")], comments=list(comments)).write(str(path))
    return path


def _props(g: GaussianPly) -> "OrderedDict[str, np.ndarray]":
    return OrderedDict((k, np.array(v, np.float32)) for k, v in gp._columns(g).items())  # copies


def test_not_a_ply(tmp_path):
    p = tmp_path / "notes.ply"
    p.write_text("hello\n")
    with pytest.raises(GaussianPlyError) as e:
        gp.read_gaussian_ply(p)
    assert "is not a PLY file" in one_sentence(e.value, p)
    q = tmp_path / "missing.ply"
    with pytest.raises(GaussianPlyError) as e:
        gp.read_gaussian_ply(q)
    assert "does not exist" in one_sentence(e.value, q)


def test_truncated_ply(tmp_path):
    p = gp.write_gaussian_ply(tmp_path / "scene.ply", make_gaussians(n=100), features=None)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GaussianPlyError) as e:
        gp.read_gaussian_ply(p)
    assert "not a readable PLY" in one_sentence(e.value, p)


def test_point_cloud_is_not_a_3dgs_ply(tmp_path):
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(30, 3)).astype(np.float32)
    rgb = rng.integers(0, 255, size=(30, 3)).astype(np.uint8)
    p = _write_vertices(tmp_path / "points3D.ply", {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2],
                                                    "red": rgb[:, 0], "green": rgb[:, 1], "blue": rgb[:, 2]})
    with pytest.raises(GaussianPlyError) as e:
        gp.read_gaussian_ply(p)
    msg = one_sentence(e.value, p)
    assert "is a point cloud (x y z red green blue), not a 3DGS PLY" in msg
    assert "f_dc_0..2, opacity, scale_0..2 and rot_0..3" in msg


def test_missing_properties_listed(tmp_path):
    props = _props(make_gaussians(n=10, deg=0))
    for k in ("opacity", "rot_2", "rot_3"):
        del props[k]
    p = _write_vertices(tmp_path / "partial.ply", props)
    with pytest.raises(GaussianPlyError) as e:
        gp.read_gaussian_ply(p)
    assert "lacks opacity, rot_2..3" in one_sentence(e.value, p)


def test_nonfinite_values(tmp_path):
    g = make_gaussians(n=50)
    props = _props(g)
    props["scale_1"][[3, 7]] = np.nan
    props["opacity"][7] = np.inf
    props["f_rest_44"][9] = -np.inf
    p = _write_vertices(tmp_path / "nan.ply", props)
    with pytest.raises(GaussianPlyError) as e:
        gp.read_gaussian_ply(p)
    msg = one_sentence(e.value, p)
    assert "NaN/inf values in 3 of 50 Gaussians (1 in f_rest_44, 1 in opacity, 2 in scale_1)" in msg
    kept = gp.read_gaussian_ply(p, nonfinite="drop")
    assert kept.n == 47 and np.isfinite(kept.log_scales).all()
    # and the writer refuses them
    g.log_scales[0, 0] = np.nan
    with pytest.raises(GaussianPlyError) as e:
        gp.write_gaussian_ply(tmp_path / "out.ply", g)
    assert "refusing to write NaN/inf values in 1 of 50 Gaussians" in one_sentence(e.value, tmp_path / "out.ply")


def test_zero_vertices(tmp_path):
    props = OrderedDict((k, v[:0]) for k, v in _props(make_gaussians(n=5)).items())
    p = _write_vertices(tmp_path / "empty.ply", props)
    with pytest.raises(GaussianPlyError) as e:
        gp.read_gaussian_ply(p)
    assert "has zero vertices" in one_sentence(e.value, p)


def test_inconsistent_f_rest(tmp_path):
    props = _props(make_gaussians(n=5, deg=1))  # 9 f_rest
    del props["f_rest_8"]
    p = _write_vertices(tmp_path / "rest8.ply", props)
    with pytest.raises(GaussianPlyError) as e:
        gp.read_gaussian_ply(p)
    assert "has 8 f_rest_* properties; a 3DGS PLY has 3*((deg+1)^2-1)" in one_sentence(e.value, p)
    props = _props(make_gaussians(n=5, deg=1))
    props["f_rest_9"] = props.pop("f_rest_0")
    p = _write_vertices(tmp_path / "gap.ply", props)
    with pytest.raises(GaussianPlyError) as e:
        gp.read_gaussian_ply(p)
    assert "not numbered 0..n-1" in one_sentence(e.value, p)


def test_sidecar_of_another_ply(tmp_path):
    a = make_gaussians(n=100, c=8, seed=1)
    b = make_gaussians(n=120, c=8, seed=2)
    pa = gp.write_gaussian_ply(tmp_path / "a.ply", a)
    gp.write_gaussian_ply(tmp_path / "b.ply", b)
    side = tmp_path / "a.features.npz"
    side.write_bytes((tmp_path / "b.features.npz").read_bytes())  # wrong N
    with pytest.raises(GaussianPlyError) as e:
        gp.read_gaussian_ply(pa)
    msg = one_sentence(e.value, side)
    assert "holds features for 120 Gaussians but the PLY" in msg and "has 100" in msg
    c = make_gaussians(n=100, c=8, seed=3)  # same N, other positions
    gp.write_features(side, c.features, c.means)
    with pytest.raises(GaussianPlyError) as e:
        gp.read_gaussian_ply(pa)
    assert "was written for other Gaussians" in one_sentence(e.value, side)
    side.write_bytes(b"garbage")
    with pytest.raises(GaussianPlyError) as e:
        gp.read_features(side)
    assert "is not a q-splat features sidecar" in one_sentence(e.value, side)


# ------------------------------------------------------------------------------------------------ frames


def _rot(seed) -> np.ndarray:
    q = np.random.default_rng(seed).normal(size=4)
    return gp.quat_wxyz_to_rotmat(q)


def _cov(log_scales, quats) -> np.ndarray:
    Q = gp.quat_wxyz_to_rotmat(quats)
    S = np.exp(np.asarray(log_scales, np.float64))
    M = Q * S[:, None, :]  # Q diag(S)
    return M @ np.swapaxes(M, 1, 2)


def _color(g_sh_dc, g_sh_rest, means, cam):
    """gsplat's view-dependent colour (before the +0.5 and clamp) seen from camera centre ``cam``."""
    deg = int(round(math.sqrt(g_sh_rest.shape[1] + 1))) - 1
    d = means - cam
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    Y = gp.sh_basis(d, deg)
    coeffs = np.concatenate([g_sh_dc[:, None, :], g_sh_rest], axis=1).astype(np.float64)
    return np.einsum("nk,nkc->nc", Y, coeffs)


@pytest.mark.parametrize("improper", [False, True])
def test_frame_transform_identity_and_covariance(improper):
    g = make_gaussians(n=500, deg=3)
    R = _rot(5)
    if improper:
        R = R @ np.diag([1.0, 1.0, -1.0])  # a reflection: quaternions cannot hold it, covariances can
    t, s = np.array([0.3, -2.0, 1.5]), 0.37
    T = np.hstack([R, t[:, None]])
    m2, ls2, q2 = gp.to_dataparser_frame(g.means, g.log_scales, g.quats_wxyz, T, s)
    assert np.allclose(m2, (g.means.astype(np.float64) @ R.T + t) * s, atol=1e-5)
    assert np.allclose(ls2, g.log_scales + math.log(s), atol=1e-6)
    assert np.allclose(np.linalg.norm(q2, axis=1), np.linalg.norm(g.quats_wxyz, axis=1), rtol=1e-5)
    # covariances: s^2 R (Q S S^T Q^T) R^T
    want = s * s * (R @ _cov(g.log_scales, g.quats_wxyz) @ R.T)
    assert np.allclose(_cov(ls2, q2), want, rtol=1e-4, atol=1e-9)
    # and back: the identity (quaternions up to sign)
    m3, ls3, q3 = gp.to_data_frame(m2, ls2, q2, T, s)
    assert np.allclose(m3, g.means, atol=2e-5) and np.allclose(ls3, g.log_scales, atol=1e-5)
    q0 = g.quats_wxyz / np.linalg.norm(g.quats_wxyz, axis=1, keepdims=True)
    q3n = q3 / np.linalg.norm(q3, axis=1, keepdims=True)
    assert np.allclose(np.abs(np.sum(q0 * q3n, axis=1)), 1.0, atol=1e-5)
    # cameras as points, both ways
    cams = np.random.default_rng(9).normal(size=(10, 3))
    assert np.allclose(gp.points_to_data_frame(gp.points_to_dataparser_frame(cams, T, s), T, s), cams, atol=1e-5)
    # view-dependent colour seen from the same camera is unchanged when the SH bands are rotated with R
    sh2 = gp.rotate_sh_rest(g.sh_rest, R)
    cam = np.array([4.0, -3.0, 2.0])
    before = _color(g.sh_dc, g.sh_rest, g.means.astype(np.float64), cam)
    after = _color(g.sh_dc, sh2, m2.astype(np.float64), (R @ cam + t) * s)
    assert np.allclose(before, after, atol=1e-4)
    assert np.allclose(gp.rotate_sh_rest(sh2, R.T), g.sh_rest, atol=1e-5)


def test_gaussians_to_frame_round_trip_through_file(tmp_path):
    g = make_gaussians(n=100, deg=3, c=4)
    T = np.hstack([_rot(2), [[1.0], [2.0], [-3.0]]])
    dp = gp.gaussians_to_frame(g, "dataparser", T, 0.5)  # as the model holds them
    assert dp.transform["frame"] == "dataparser"
    data = gp.gaussians_to_frame(dp, "data")  # what our export writes, transform recorded
    path = gp.write_gaussian_ply(tmp_path / "scene.ply", data)
    back = gp.read_gaussian_ply(path)
    assert back.transform["frame"] == "data" and back.transform["scale"] == 0.5
    again = gp.gaussians_to_frame(back, "dataparser")
    for name, tol in (("means", 2e-5), ("log_scales", 1e-5), ("sh_rest", 1e-4), ("sh_dc", 0), ("opacity_logits", 0)):
        assert np.allclose(getattr(again, name), getattr(dp, name), atol=tol), name
    assert np.allclose(_cov(again.log_scales, again.quats_wxyz), _cov(dp.log_scales, dp.quats_wxyz), rtol=1e-4,
                       atol=1e-9)
    assert np.array_equal(back.features, g.features)


# ------------------------------------------------------------------------------------------------ which frame


def _normalising_transform(cams_data: np.ndarray, seed: int):
    """Like nerfstudio's auto_orient_and_center_poses + auto_scale_poses: a rotation, centre the cameras, scale
    so that max |camera coordinate| = 1."""
    R = _rot(seed)
    t = -R @ cams_data.mean(axis=0)
    s = 1.0 / np.abs(cams_data @ R.T + t).max()
    return np.hstack([R, t[:, None]]), s


def _scene(kind: str, rng):
    if kind == "object":  # an object at (5, -3, 12), cameras on a ring of radius 6 around it
        centre = np.array([5.0, -3.0, 12.0])
        means = centre + rng.normal(scale=0.8, size=(4000, 3))
        a = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        cams = centre + np.stack([6 * np.cos(a), 6 * np.sin(a), 1.5 + 0.5 * np.sin(3 * a)], axis=1)
    elif kind == "room":  # walls of a 6 x 4 x 3 room, cameras walking inside it (COLMAP origin = first camera)
        u = rng.uniform(size=(4000, 3)) * [6, 4, 3]
        face = rng.integers(0, 3, size=4000)
        dims = np.array([6.0, 4.0, 3.0])
        u[np.arange(4000), face] = np.where(rng.uniform(size=4000) < 0.5, 0.0, dims[face])  # on a wall/floor
        cams = np.stack([np.linspace(1, 5, 60), 2 + np.sin(np.linspace(0, 6, 60)), np.full(60, 1.6)], axis=1)
        means, cams = u - cams[0], cams - cams[0]
    else:  # forward-facing: cameras on a 1 x 0.6 grid at z = 0 looking +z at a scene 3..12 away
        gx, gy = np.meshgrid(np.linspace(-0.5, 0.5, 5), np.linspace(-0.3, 0.3, 4))
        cams = np.stack([gx.ravel(), gy.ravel(), np.zeros(gx.size)], axis=1)
        z = rng.uniform(3, 12, size=4000)
        means = np.stack([rng.uniform(-0.6, 0.6, 4000) * z, rng.uniform(-0.4, 0.4, 4000) * z, z], axis=1)
    return means, cams


@pytest.mark.parametrize("kind", ["object", "room", "forward"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detect_frame_both_frames(kind, seed):
    """An object ringed by cameras away from the COLMAP origin: decided in both frames. A room or a
    forward-facing capture with the COLMAP origin at the first camera: the two frames differ by little more
    than a scale near 1, which overlap alone cannot always tell: "ambiguous" is allowed, a wrong answer not."""
    rng = np.random.default_rng(seed)
    means_data, cams_data = _scene(kind, rng)
    T, s = _normalising_transform(cams_data, seed=seed + 3)
    means_dp = gp.points_to_dataparser_frame(means_data, T, s)
    allowed = {"data"} if kind == "object" else {"data", "ambiguous"}
    det = gp.detect_frame(means_data, cams_data, T, s, path="inria.ply")
    assert det.frame in allowed, det
    det = gp.detect_frame(means_dp, cams_data, T, s, path="splat.ply")
    assert det.frame in ({"dataparser"} if kind == "object" else {"dataparser", "ambiguous"}), det
    if kind == "object":
        assert det.overlap_dataparser > 0.9 and det.overlap_data < 0.05
    # in its own frame each overlaps its cameras
    assert gp.check_frame(means_data, cams_data, "inria.ply") > 0.9
    assert gp.check_frame(means_dp, gp.points_to_dataparser_frame(cams_data, T, s), "splat.ply") > 0.9


def test_detect_frame_identity_transform_is_same():
    means, cams = _scene("object", np.random.default_rng(1))
    assert gp.detect_frame(means, cams, np.eye(4)[:3], 1.0).frame == "same"


def test_check_frame_wrong_frame_names_both_boxes():
    means, cams = _scene("object", np.random.default_rng(0))
    T, s = _normalising_transform(cams, seed=3)
    cams_dp = gp.points_to_dataparser_frame(cams, T, s)
    assert gp.overlap_with_cameras(means, cams) > 0.9
    assert gp.overlap_with_cameras(means, cams_dp) < 0.05
    with pytest.raises(GaussianPlyError) as e:
        gp.check_frame(means, cams_dp, "scene/point_cloud.ply")
    msg = one_sentence(e.value, "scene/point_cloud.ply")
    assert "do not overlap the cameras" in msg and msg.count("..") >= 6  # two boxes, 3 intervals each
    far = means + 1000.0
    with pytest.raises(GaussianPlyError) as e:
        gp.detect_frame(far, cams, T, s, path="other.ply")
    assert "overlap the cameras neither in the data frame" in one_sentence(e.value, "other.ply")


# ------------------------------------------------------------------------------------------------ nerfstudio


def _nerfstudio_exporter():
    try:
        import torch
        from nerfstudio.models.splatfacto import SplatfactoModel, SplatfactoModelConfig
        from nerfstudio.scripts import exporter
    except Exception as e:  # e.g. the installed plugin entry points name another checkout's layout
        pytest.skip(f"nerfstudio's exporter cannot be imported here ({type(e).__name__}: {e})")
    return torch, exporter, SplatfactoModel, SplatfactoModelConfig


@pytest.mark.parametrize("mode", ["sh_coeffs", "rgb"])
def test_reads_ns_export_gaussian_splat(tmp_path, monkeypatch, mode):
    """The file nerfstudio 1.1.5's own `ns-export gaussian-splat` code writes (ExportGaussianSplat.main, its
    transpose of shs_rest, write_ply), from a SplatfactoModel whose parameters we set: no trained run needed."""
    torch, exporter, SplatfactoModel, SplatfactoModelConfig = _nerfstudio_exporter()
    g = make_gaussians(n=64, deg=3, seed=4)
    g.opacity_logits = np.abs(g.opacity_logits)  # the exporter drops opacity logits < logit(1/255)
    model = SplatfactoModel.__new__(SplatfactoModel)  # no populate_modules (it would fetch LPIPS weights)
    torch.nn.Module.__init__(model)
    model.config = SplatfactoModelConfig(sh_degree=3)
    P = lambda a: torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(a)))  # noqa: E731
    model.gauss_params = torch.nn.ParameterDict({
        "means": P(g.means), "scales": P(g.log_scales), "quats": P(g.quats_wxyz), "features_dc": P(g.sh_dc),
        "features_rest": P(g.sh_rest), "opacities": P(g.opacity_logits[:, None])})
    monkeypatch.setattr(exporter, "eval_setup", lambda *a, **k: (None, SimpleNamespace(model=model), None, None))
    exporter.ExportGaussianSplat(load_config=tmp_path / "config.yml", output_dir=tmp_path,
                                 ply_color_mode=mode).main()
    back = gp.read_gaussian_ply(tmp_path / "splat.ply")
    if mode == "sh_coeffs":
        assert_same(g, back)
        assert [p.name for p in PlyData.read(str(tmp_path / "splat.ply"))["vertex"].properties] == gp.property_names(3)
    else:  # uchar colours, no SH rest: SH degree 0 with f_dc = RGB2SH(rgb / 255)
        assert back.sh_rest.shape == (64, 0, 3)
        rgb = np.clip(g.sh_dc * gp.SH_C0 + 0.5, 0, 1)
        assert np.allclose(back.sh_dc * gp.SH_C0 + 0.5, rgb, atol=1 / 255 + 1e-6)
        for name in ("means", "opacity_logits", "log_scales", "quats_wxyz"):
            assert np.array_equal(getattr(back, name), getattr(g, name)), name
