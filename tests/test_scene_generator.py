"""Procedural scene generator: determinism, nerfstudio parsers, geometry of depth/instance maps, labels."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from qrender_ns.data import scene_generator as sg

SMALL = dict(num_images=6, width=64, height=48, num_eval=2, num_points=4000)


@pytest.fixture(scope="module")
def scannet_scene(tmp_path_factory):
    return sg.generate_scene(tmp_path_factory.mktemp("scannet") / "scene0000_00", layout="scannet", seed=0)


@pytest.fixture(scope="module")
def ns_scene(tmp_path_factory):
    return sg.generate_scene(tmp_path_factory.mktemp("ns") / "room", layout="nerfstudio", seed=1)


def _meta(info) -> dict:
    return json.loads(info.scene_json_path.read_text())


# --- determinism and bad input ------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = sg.generate_scene(tmp_path / "a" / "scene", seed=3, **SMALL)
    b = sg.generate_scene(tmp_path / "b" / "scene", seed=3, **SMALL)
    c = sg.generate_scene(tmp_path / "c" / "scene", seed=4, **SMALL)
    for rel in ("color/0.jpg", "depth/1.png", "pose/2.txt", "gt/instances/3.png", "gt/scene.json",
                "scene_vh_clean_2.ply"):
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes(), rel
    for rel in ("color/0.jpg", "gt/scene.json", "scene_vh_clean_2.ply"):
        assert (a.root / rel).read_bytes() != (c.root / rel).read_bytes(), rel


def test_layouts_differ_between_seeds():
    rooms = [sg.build_scene(s) for s in range(4)]
    signatures = {(r.room.half_x, tuple(i.class_name for i in r.instances)) for r in rooms}
    assert len(signatures) == 4
    for r in rooms:
        assert 5 <= len([i for i in r.instances if i.class_name in sg.FURNITURE_CLASSES]) <= 7


def test_refuses_non_empty_target_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    out = tmp_path / "scene"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        sg.generate_scene(out, **SMALL)
    assert (out / "keep.txt").exists()

    info = sg.generate_scene(out, overwrite=True, **SMALL)
    assert not (out / "keep.txt").exists() and (out / "gt" / "scene.json").exists()
    assert info.root == out.absolute()

    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(sg, "_write_scene", crash)
    with pytest.raises(RuntimeError):
        sg.generate_scene(tmp_path / "never", **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene"]  # no half scene, no temp folder


def test_bad_split_is_rejected(tmp_path):
    with pytest.raises(ValueError):
        sg.generate_scene(tmp_path / "s", num_images=4, num_eval=4)


@pytest.mark.parametrize("n,k", [(24, 4), (10, 1), (7, 6), (2, 1), (100, 13)])
def test_eval_split_matches_scannet_parser_formula(n, k):
    fraction, eval_idx = sg.eval_split(n, k)
    num_train = int(np.ceil(n * fraction))
    train = np.linspace(0, n - 1, num_train, dtype=int)
    assert sorted(set(range(n)) - set(train.tolist())) == eval_idx and len(eval_idx) == k


# --- nerfstudio parsers --------------------------------------------------------------------------------


def _check_outputs(config, info):
    parser = config.setup()
    meta = _meta(info)
    c2w = {c["frame"]: sg.opencv_to_opengl(np.array(c["c2w_opencv"])) for c in meta["cameras"]}
    n_eval = len(info.eval_frames)
    for split, expected in (("train", len(info.frame_names) - n_eval), ("val", n_eval), ("test", n_eval)):
        out = parser.get_dataparser_outputs(split)
        names = [p.stem for p in out.image_filenames]
        assert len(names) == expected
        assert (set(names) == set(info.eval_frames)) == (split != "train")
        assert out.metadata["depth_filenames"] is not None and len(out.metadata["depth_filenames"]) == expected
        assert out.metadata["points3D_xyz"].shape[0] > 10000
        assert out.metadata["points3D_rgb"].shape == out.metadata["points3D_xyz"].shape
        # the configs keep the generator's metric world frame: cameras and points are not moved
        assert out.dataparser_scale == 1.0
        np.testing.assert_allclose(out.dataparser_transform.numpy(), np.eye(4)[:3], atol=1e-7)
        np.testing.assert_allclose(out.cameras.camera_to_worlds[0].numpy(), c2w[names[0]][:3], atol=1e-5)
        assert int(out.cameras.width[0]) == info.width and int(out.cameras.height[0]) == info.height
        np.testing.assert_allclose(out.cameras.fx[0].item(), 0.9 * info.width, rtol=1e-6)
    cloud = sg.read_point_cloud_ply(info.point_cloud_path)
    np.testing.assert_allclose(out.metadata["points3D_xyz"].numpy(), cloud["xyz"], atol=1e-6)


def test_scannet_layout_loads_with_nerfstudio_parser(scannet_scene):
    assert {p.name for p in scannet_scene.root.iterdir()} >= {"color", "depth", "pose", "intrinsic", "gt",
                                                              "scene0000_00_vh_clean_2.ply"}
    counts = [len(list((scannet_scene.root / sub).iterdir())) for sub in ("color", "depth", "pose")]
    assert counts == [24, 24, 24]
    _check_outputs(sg.scannet_parser_config(scannet_scene.root), scannet_scene)


def test_nerfstudio_layout_loads_with_nerfstudio_parser(ns_scene):
    transforms = json.loads((ns_scene.root / "transforms.json").read_text())
    assert transforms["ply_file_path"] == "sparse_pc.ply" and transforms["camera_model"] == "OPENCV"
    assert all("depth_file_path" in f for f in transforms["frames"])
    _check_outputs(sg.nerfstudio_parser_config(ns_scene.root), ns_scene)


def test_default_size_is_fast(scannet_scene, ns_scene):
    assert scannet_scene.seconds < 30 and ns_scene.seconds < 30
    assert scannet_scene.width == 160 and scannet_scene.height == 120 and len(scannet_scene.frame_names) == 24


# --- ground truth ---------------------------------------------------------------------------------------


def test_depth_backprojects_onto_the_instance_surface(scannet_scene):
    """Read depth/pose/intrinsics as the parser does, back-project every pixel, and check the point lies
    on the surface of the instance the instance map names."""
    root = scannet_scene.root
    scene = sg.load_scene(root)
    K = np.loadtxt(root / "intrinsic" / "intrinsic_color.txt")[:3, :3]
    for frame in ("0", "5", "13"):
        depth = cv2.imread(str(root / "depth" / f"{frame}.png"), cv2.IMREAD_ANYDEPTH).astype(np.float64) * 1e-3
        inst = cv2.imread(str(root / "gt" / "instances" / f"{frame}.png"), cv2.IMREAD_ANYDEPTH)
        c2w = np.loadtxt(root / "pose" / f"{frame}.txt")
        assert depth.shape == inst.shape == (120, 160) and inst.dtype == np.uint16
        assert (inst > 0).all() and (depth > 0.05).all()  # closed room: every ray hits something
        v, u = np.mgrid[0:120, 0:160] + 0.5
        cam = np.stack([(u - K[0, 2]) / K[0, 0] * depth, (v - K[1, 2]) / K[1, 1] * depth, depth], -1).reshape(-1, 3)
        world = cam @ c2w[:3, :3].T + c2w[:3, 3]
        ids = inst.reshape(-1)
        for inst_id in np.unique(ids):
            sel = ids == inst_id
            assert sg.instance_surface_distance(scene, int(inst_id), world[sel]).max() < 2e-3, (frame, inst_id)


def test_instance_and_class_maps_have_several_classes(scannet_scene):
    meta = _meta(scannet_scene)
    inst_to_class = {i["id"]: i["class_id"] for i in meta["instances"]}
    seen = set()
    for inst_path, cls_path in zip(scannet_scene.instance_map_paths, scannet_scene.class_map_paths):
        inst = cv2.imread(str(inst_path), cv2.IMREAD_ANYDEPTH)
        cls = cv2.imread(str(cls_path), cv2.IMREAD_ANYDEPTH)
        assert cls.dtype == np.uint8
        assert len(np.unique(cls)) >= 3
        np.testing.assert_array_equal(np.vectorize(inst_to_class.get)(inst), cls)
        seen |= set(np.unique(cls).tolist())
    assert {sg.class_id("wall"), sg.class_id("floor")} <= seen
    assert len(seen) >= 6
    assert meta["classes"][0] == {"id": 1, "name": "wall"}


def test_point_cloud_is_labelled_and_on_surfaces(scannet_scene):
    from plyfile import PlyData

    ply = PlyData.read(str(scannet_scene.gt_points_path))
    names = [p.name for p in ply["vertex"].properties]
    assert names == ["x", "y", "z", "red", "green", "blue", "label", "instance"]
    cloud = sg.read_point_cloud_ply(scannet_scene.gt_points_path)
    assert 20000 <= len(cloud["xyz"]) <= 50000
    scene = sg.load_scene(scannet_scene.root)
    lut = scene.class_of_instance()
    np.testing.assert_array_equal(lut[cloud["instance"]], cloud["label"])
    # (the ceiling may be missing: only surfaces some view sees are kept, see the next test)
    assert set(cloud["instance"].tolist()) >= {i.id for i in scene.instances} - {6}
    for inst in scene.instances:
        sel = cloud["instance"] == inst.id
        assert sg.instance_surface_distance(scene, inst.id, cloud["xyz"][sel].astype(np.float64)).max() < 1e-4


def test_point_cloud_keeps_only_observed_surfaces(scannet_scene, tmp_path):
    """Every kept point shows up in some frame's depth map at its projection (an independent check of the
    exact ray test), and switching the filter off brings back unseen surfaces (the ceiling, table undersides)."""
    meta = _meta(scannet_scene)
    assert meta["point_cloud_observed_only"] is True
    cloud = sg.read_point_cloud_ply(scannet_scene.gt_points_path)
    xyz = cloud["xyz"].astype(np.float64)
    K = np.array(meta["K"])
    best = np.full(len(xyz), np.inf)
    for cam, depth_path in zip(meta["cameras"], scannet_scene.depth_paths):
        c2w = np.array(cam["c2w_opencv"])
        depth = cv2.imread(str(depth_path), cv2.IMREAD_UNCHANGED).astype(np.float64) / 1000.0
        p = (xyz - c2w[:3, 3]) @ c2w[:3, :3]
        z = p[:, 2]
        u = np.floor(K[0, 0] * p[:, 0] / np.where(z > 0, z, 1) + K[0, 2]).astype(int)
        v = np.floor(K[1, 1] * p[:, 1] / np.where(z > 0, z, 1) + K[1, 2]).astype(int)
        ok = (z > 0) & (u >= 0) & (u < meta["width"]) & (v >= 0) & (v < meta["height"])
        err = np.full(len(xyz), np.inf)
        # nearest depth pixel in a 3x3 neighbourhood (the point is not at a pixel centre)
        for du in (-1, 0, 1):
            for dv in (-1, 0, 1):
                uu, vv = np.clip(u + du, 0, meta["width"] - 1), np.clip(v + dv, 0, meta["height"] - 1)
                err = np.minimum(err, np.where(ok, np.abs(depth[vv, uu] - z), np.inf))
        best = np.minimum(best, err)
    assert np.quantile(best, 0.99) < 0.05 and np.median(best) < 0.01, np.quantile(best, [0.5, 0.9, 0.99])

    full = sg.generate_scene(tmp_path / "full", layout="scannet", seed=0, observed_only=False)
    all_points = sg.read_point_cloud_ply(full.gt_points_path)
    assert len(all_points["xyz"]) > len(xyz) * 1.1
    scene = sg.load_scene(full.root)
    cams = [np.array(c["c2w_opencv"]) for c in meta["cameras"]]
    seen = sg.observed_points(scene, all_points["xyz"], cams, K, meta["width"], meta["height"]) > 0
    np.testing.assert_array_equal(all_points["xyz"][seen], xyz)
    unseen_ceiling = (all_points["instance"] == 6) & ~seen
    assert unseen_ceiling.sum() > 0.5 * (all_points["instance"] == 6).sum()


def test_lerf_label_jsons(ns_scene):
    meta = _meta(ns_scene)
    labels = sorted(ns_scene.label_dir.glob("*.json"))
    assert [p.stem for p in labels] == ns_scene.eval_frames
    n_objects = 0
    for path in labels:
        label = json.loads(path.read_text())
        info = label["info"]
        assert (info["width"], info["height"]) == (ns_scene.width, ns_scene.height)
        assert (ns_scene.root / "images" / info["name"]).exists()
        inst = cv2.imread(str(ns_scene.root / "gt" / "instances" / f"{path.stem}.png"), cv2.IMREAD_ANYDEPTH)
        for obj in label["objects"]:
            assert obj["category"] in sg.FURNITURE_CLASSES
            poly = np.array(obj["segmentation"])
            assert poly.ndim == 2 and poly.shape[1] == 2 and len(poly) >= 3
            assert (poly >= 0).all() and (poly[:, 0] < info["width"]).all() and (poly[:, 1] < info["height"]).all()
            x1, y1, x2, y2 = obj["bbox"]
            assert 0 <= x1 <= x2 < info["width"] and 0 <= y1 <= y2 < info["height"]
            filled = np.zeros_like(inst, dtype=np.uint8)
            cv2.fillPoly(filled, [poly.astype(np.int32)], 1)
            truth = inst == obj["instance_id"]
            assert (filled.astype(bool) & truth).sum() / (filled.astype(bool) | truth).sum() > 0.5
            n_objects += 1
    assert n_objects >= len(labels)
    assert meta["label_dir"] == "label"


def test_make_scene_cli(tmp_path, capsys):
    import tyro

    args = ["--out", str(tmp_path / "cli_scene"), "--layout", "nerfstudio", "--num-images", "5", "--width", "40",
            "--height", "30", "--num-eval", "1", "--num-points", "2000"]
    tyro.cli(sg.MakeScene, args=args).main()
    out = capsys.readouterr().out
    assert "cli_scene" in out and "ns-train" in out
    assert len(list((tmp_path / "cli_scene" / "images").iterdir())) == 5
