"""Depth supervision in the RGB stage (`--pipeline.model.depth-loss`): loading, scaling, auto/on/off, the loss."""

import json
import shutil

import numpy as np
import pytest
import torch

from qrender_ns.data.scene_generator import build_scene, generate_scene, render_view


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth_scenes")
    out = {}
    for layout in ("scannet", "nerfstudio"):
        out[layout] = root / layout
        generate_scene(out[layout], layout=layout, seed=3, num_images=10, width=64, height=48, num_eval=2,
                       num_points=4000)
    return out


def _config(data, out, steps=1, downscale=None, **model):
    from test_method import make_config

    config = make_config(data, out, steps, **model)
    config.pipeline.datamanager.teacher = "none"
    config.pipeline.datamanager.dataparser.downscale_factor = downscale
    return config


def _pipeline(config):
    return config.pipeline.setup(device="cpu", test_mode="val")


@pytest.mark.parametrize("layout", ["scannet", "nerfstudio", "scannet-real"])
def test_depth_is_served_in_scene_units_after_downscale(scenes, tmp_path, layout):
    scene = scenes[layout.split("-")[0]]
    meta = json.loads((scene / "gt" / "scene.json").read_text())
    if layout == "scannet-real":  # without gt/: a real ScanNet scene, which nerfstudio re-centres and rescales
        shutil.copytree(scene, tmp_path / "real", ignore=shutil.ignore_patterns("gt"))
        scene = tmp_path / "real"
    pipeline = _pipeline(_config(scene, tmp_path, downscale=2))
    dm, model = pipeline.datamanager, pipeline.model
    assert model.use_depth_loss and model.config.output_depth_during_training
    scale = dm.train_dataparser_outputs.dataparser_scale
    assert (scale == 1.0) == (layout != "scannet-real")
    assert model.depth_units_per_metre == pytest.approx(scale)
    camera, batch = dm.next_train(0)
    depth = batch["depth_image"]
    assert depth.dtype == torch.float32 and depth.shape == (24, 32, 1) == (*batch["image"].shape[:2], 1)
    # the generator's exact z-depth (metres) at the pixel nearest-neighbour picks, in scene units
    name = dm.train_dataset.image_filenames[int(batch["image_idx"])]
    cam = next(c for c in meta["cameras"] if (scene / c["image"]).resolve() == name.resolve())
    exact = render_view(build_scene(meta["seed"]), np.array(cam["c2w_opencv"]), np.array(meta["K"]), 64, 48)["depth"]
    for r, c in ((0, 0), (11, 17), (23, 31)):  # 6e-4 m: the PNG's mm rounding
        assert float(depth[r, c, 0]) == pytest.approx(exact[2 * r, 2 * c] * scale, abs=6e-4 * scale)
    assert (depth > 0).float().mean() > 0.9  # a closed room: depth nearly everywhere
    # the dataparser's scale multiplies the depth (nerfstudio's DepthDataset convention)
    dm.train_depth.scale *= 2.0
    dm.train_depth._cache.clear()
    _, again = dm.next_train(0)
    idx = int(again["image_idx"])
    assert torch.allclose(dm.train_depth.get(idx, 24, 32), 2.0 * _unscaled(dm, idx))
    # eval images carry depth too (the ns-eval metric)
    _, eval_batch = dm.next_eval_image(0)
    assert eval_batch["depth_image"].shape[:2] == eval_batch["image"].shape[:2]


def _unscaled(dm, idx):
    dm.train_depth.scale /= 2.0
    dm.train_depth._cache.clear()
    return dm.train_depth.get(idx, 24, 32)


def test_auto_on_off_and_on_without_depth(scenes, tmp_path):
    scene = tmp_path / "nodepth"
    shutil.copytree(scenes["nerfstudio"], scene)
    meta = json.loads((scene / "transforms.json").read_text())
    for frame in meta["frames"]:
        frame.pop("depth_file_path")
    (scene / "transforms.json").write_text(json.dumps(meta))
    assert not _pipeline(_config(scene, tmp_path / "a")).model.use_depth_loss  # auto, no depth: off
    assert not _pipeline(_config(scenes["scannet"], tmp_path / "b", depth_loss="off")).model.use_depth_loss
    with pytest.raises(ValueError, match=r"--pipeline.model.depth-loss on.*no usable depth.*depth_file_path"):
        _pipeline(_config(scene, tmp_path / "c", depth_loss="on"))
    # a depth file gone: auto trains without depth; on names the missing file
    scene2 = tmp_path / "onegone"
    shutil.copytree(scenes["nerfstudio"], scene2)
    gone = sorted((scene2 / "depths").iterdir())[0]
    gone.unlink()
    assert not _pipeline(_config(scene2, tmp_path / "d")).model.use_depth_loss
    with pytest.raises(ValueError, match=f"1 of .* depth files do not exist.*{gone.name}"):
        _pipeline(_config(scene2, tmp_path / "e", depth_loss="on"))


def _train_view_depth_error(pipeline) -> float:
    """Mean depth error (metres) of the rendered training views."""
    dm, model = pipeline.datamanager, pipeline.model
    model.eval()
    errors = []
    with torch.no_grad():
        for i in range(len(dm.train_dataset)):
            batch = {"depth_image": dm.train_depth.get(i, *dm.cached_train[i]["image"].shape[:2])}
            outputs = model.get_outputs_for_camera(dm.train_dataset.cameras[i : i + 1])
            errors.append(float(model.depth_error(outputs, batch)))
    model.train()
    return float(np.mean(errors))


def test_depth_loss_decreases_and_beats_rgb_only(scenes, tmp_path):
    from test_method import train

    steps = 40  # 5 epochs of the 8 training views; an epoch's mean covers every view once (no view noise)
    errors = {}
    for mode in ("on", "off"):
        config = _config(scenes["scannet"], tmp_path / mode, steps=steps, depth_loss=mode)
        config.pipeline.model.warmup_length = 10**6  # no densification: its splits move the depth for some steps
        trainer, history = train(config, steps)
        errors[mode] = _train_view_depth_error(trainer.pipeline)
        if mode == "on":
            losses = [h["depth_loss"] for h in history]
            assert all(np.isfinite(losses))
            first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    print(f"\n[test_depth] depth_loss first epoch {first:.4f} -> last epoch {last:.4f}; "
          f"training-view depth error with {errors['on']:.4f} m, without {errors['off']:.4f} m")
    assert last < 0.85 * first
    assert errors["on"] < 0.9 * errors["off"]


def test_depth_error_metric(scenes, tmp_path):
    pipeline = _pipeline(_config(scenes["scannet"], tmp_path, depth_loss="off"))
    pipeline.eval()
    camera, batch = pipeline.datamanager.next_eval_image(0)
    outputs = pipeline.model.get_outputs_for_camera(camera)
    metrics, _ = pipeline.model.get_image_metrics_and_images(outputs, batch)
    assert np.isfinite(metrics["depth_mae_m"]) and metrics["depth_mae_m"] > 0 and metrics["depth_abs_rel"] > 0
    # exact depth gives zero error
    perfect = dict(outputs, depth=batch["depth_image"].clone())
    assert float(pipeline.model.depth_error(perfect, batch)) == pytest.approx(0.0, abs=1e-6)
    # invalid (0) pixels are ignored, whatever is rendered there
    batch = dict(batch, depth_image=batch["depth_image"].clone())
    batch["depth_image"][:10] = 0
    perfect["depth"][:10] = 123.0
    assert float(pipeline.model.depth_error(perfect, batch)) == pytest.approx(0.0, abs=1e-6)
