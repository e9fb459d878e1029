"""`ns-train q-splat` end to end on CPU: registration, training, ns-eval, query, viewer, bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qrender_ns.data.scene_generator import generate_scene
from qrender_ns.teachers.synthetic import SyntheticTeacher
from selection_by_hand import wins_by_hand

BIN = Path(sys.executable).parent
EVAL_KEYS = {"psnr", "ssim", "feature_miou", "feature_ms_dense", "feature_ms_quantile",
             "feature_speedup_quantile_vs_dense", "feature_cosine_quantile_vs_dense", "num_gaussians",
             "num_unsupervised_gaussians"}


def make_config(data: Path, out: Path, steps: int, **model):
    from qrender_ns.method.config import qsplat_trainer_config

    config = qsplat_trainer_config()
    config.machine.device_type = "cpu"
    config.vis = "tensorboard"
    config.output_dir = out
    config.timestamp = "test"
    config.max_num_iterations = steps
    config.steps_per_save = steps
    config.pipeline.datamanager.data = data
    config.logging.local_writer.enable = False
    for key, value in {**dict(num_downscales=0, feature_warmup_steps=10, refine_every=20, warmup_length=20),
                       **model}.items():
        setattr(config.pipeline.model, key, value)
    config.set_timestamp()
    return config


def train(config, steps: int):
    """Nerfstudio's own Trainer, iterated by hand so the test sees every loss."""
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    config.save_config()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    history = []
    start = trainer._start_step
    for step in range(start, start + steps):
        for cb in trainer.callbacks:
            cb.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
        _, loss_dict, _ = trainer.train_iteration(step)
        for cb in trainer.callbacks:
            cb.run_callback_at_location(step, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
        history.append({k: float(v) for k, v in loss_dict.items()})
    trainer.save_checkpoint(start + steps - 1)
    return trainer, history


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("scene") / "room"
    generate_scene(root, layout="scannet", seed=2, num_images=12, width=64, height=48, num_eval=2)
    SyntheticTeacher(root).run(progress=False)
    return root


@pytest.fixture(scope="module")
def trained(scene, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    config = make_config(scene, out, steps=120)
    trainer, history = train(config, 120)
    return dict(config=config, trainer=trainer, history=history,
                config_path=config.get_base_dir() / "config.yml")


def test_method_is_registered():
    from nerfstudio.plugins.registry import discover_methods

    methods, _ = discover_methods()
    assert "q-splat" in methods
    assert methods["q-splat"].method_name == "q-splat"
    result = subprocess.run([str(BIN / "ns-train"), "q-splat", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for option in ("--pipeline.model.num-quantiles", "--pipeline.model.feature-dim",
                   "--pipeline.model.feature-head", "--pipeline.model.feature-loss-weight"):
        assert option in result.stdout


def test_bare_ns_train_restarts_once_with_passive_openmp_waits(tmp_path):
    """nerfstudio loads torch (libgomp) before the plugin: without OMP_WAIT_POLICY, `ns-train q-splat` starts over
    once with it set to PASSIVE (spinning waits made two trainings on 2 cores 9.9x slower); an explicit setting or
    another method is left alone."""
    probe = tmp_path / "sitecustomize.py"  # reports the policy each ns-train process starts with
    probe.write_text("import os, sys\nif 'ns-train' in sys.argv[0]:\n"
                     "    print('policy at start:', os.environ.get('OMP_WAIT_POLICY'), file=sys.stderr)\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env.get('PYTHONPATH', '')}"
    bare = subprocess.run([str(BIN / "ns-train"), "q-splat", "--help"], capture_output=True, text=True, timeout=180,
                          env=env)
    assert bare.returncode == 0, bare.stderr[-2000:]
    assert bare.stderr.count("restarting ns-train with OMP_WAIT_POLICY=PASSIVE") == 1
    assert bare.stderr.count("policy at start: None") == 1 and bare.stderr.count("policy at start: PASSIVE") == 1
    assert "--pipeline.model.num-quantiles" in bare.stdout
    explicit = subprocess.run([str(BIN / "ns-train"), "q-splat", "--help"], capture_output=True, text=True,
                              timeout=180, env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert explicit.returncode == 0 and "restarting" not in explicit.stderr
    assert explicit.stderr.count("policy at start: ACTIVE") == 1


def test_training_lowers_rgb_and_feature_losses(trained):
    history = trained["history"]
    rgb = [h["main_loss"] for h in history]
    feat = [h["feature_loss"] for h in history if "feature_loss" in h]
    assert len(feat) >= 100  # starts after the 10-step warm-up
    assert sum(rgb[-10:]) / 10 < 0.8 * sum(rgb[:10]) / 10, (rgb[:10], rgb[-10:])
    assert sum(feat[-10:]) / 10 < sum(feat[:10]) / 10 - 0.1, (feat[:10], feat[-10:])
    model = trained["trainer"].pipeline.model
    assert model.gaussian_features.shape == (model.num_points, 512)  # in sync after densification


def _truncated_newer_checkpoint(config) -> Path:
    """A step-*.ckpt newer than any real one, cut short as a kill -9 during torch.save leaves it."""
    ckpt_dir = config.get_checkpoint_dir()
    good = max(ckpt_dir.glob("step-*.ckpt"))
    bad = ckpt_dir / "step-000099999.ckpt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    return bad


def test_training_step_renders_only_sampled_feature_pixels(trained, monkeypatch):
    """The feature loss renders its sampled pixels: no [H, W, 512] map exists in a training step."""
    import qrender_ns.method.model as model_module

    renders = []
    real = model_module.rasterize_to_pixels

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        renders.append((kwargs.get("pixel_ids") is not None, tuple(out[0].shape)))
        return out

    monkeypatch.setattr(model_module, "rasterize_to_pixels", spy)
    trainer = trained["trainer"]
    assert trainer.pipeline.model.training
    _, loss_dict, _ = trainer.train_iteration(trainer._start_step + 120)
    assert "feature_loss" in loss_dict
    sampled = [shape for is_sampled, shape in renders if is_sampled]
    assert sampled and all(len(shape) == 2 and shape[1] == 512 for shape in sampled)
    assert all(shape[-1] <= 4 for is_sampled, shape in renders if not is_sampled)  # RGB (+depth) only


def test_ns_eval_writes_metrics(trained, tmp_path):
    out = tmp_path / "metrics.json"
    bad = _truncated_newer_checkpoint(trained["config"])
    try:
        result = subprocess.run([str(BIN / "ns-eval"), "--load-config", str(trained["config_path"]),
                                 "--output-path", str(out)], capture_output=True, text=True, timeout=600)
    finally:
        bad.unlink()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"skipping checkpoint {bad}" in result.stderr and "using step 119" in result.stderr, result.stderr[-3000:]
    metrics = json.loads(out.read_text())["results"]
    assert EVAL_KEYS <= set(metrics), metrics.keys()
    assert metrics["feature_miou"] > 0.3  # 120 steps on 64x48 images; the demo trains longer
    assert 0.5 < metrics["feature_cosine_quantile_vs_dense"] <= 1.0 + 1e-6
    assert all(math.isfinite(metrics[k]) for k in EVAL_KEYS)
    assert 0 < metrics["num_unsupervised_gaussians"] < metrics["num_gaussians"]


def test_query_writes_ply_and_relevancy_pngs(trained, tmp_path):
    from plyfile import PlyData

    ply = tmp_path / "chair.ply"
    # " Chair": the viewer's rule, case and extra whitespace do not matter (one start-up less than a
    # separate call for it)
    result = subprocess.run([str(BIN / "qsplat"), "query", "--load-config", str(trained["config_path"]),
                             "--text", " Chair", "--output", str(ply), "--cameras", "0", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    vertices = PlyData.read(str(ply))["vertex"]
    assert len(vertices) == summary["num_selected"] > 0
    assert len(summary["relevancy_pngs"]) == 2 and all(Path(p).is_file() for p in summary["relevancy_pngs"])
    # the default rule (wins: chair beats the scene's other classes and the canonical negatives), recomputed here
    # on the saved checkpoint as qsplat query loads it (earlier tests train the in-process model further)
    from qrender_ns.eval import load_pipeline

    model = load_pipeline(trained["config_path"])[0].model
    wins = wins_by_hand(model, "chair") & (torch.sigmoid(model.opacities).squeeze(-1) > 0.1).numpy()
    assert summary["selection"] == "wins" and summary["num_selected"] == int(wins.sum())

    # the old rule, as an explicit option
    old = subprocess.run([str(BIN / "qsplat"), "query", "--load-config", str(trained["config_path"]), "--text", "chair",
                          "--output", str(tmp_path / "old.ply"), "--output-format", "points", "--cameras", "0",
                          "--selection", "absolute",
                          "--threshold", "0.55"], capture_output=True, text=True, timeout=600)
    assert old.returncode == 0, old.stdout[-3000:] + old.stderr[-3000:]
    old_summary = json.loads(old.stdout[old.stdout.index("{"):])
    assert old_summary["selection"] == "absolute" and old_summary["threshold"] == 0.55
    assert min(PlyData.read(str(tmp_path / "old.ply"))["vertex"]["relevancy"]) > 0.55
    assert old_summary["num_selected"] != summary["num_selected"]
    from qrender_ns.workflows.query import Query, _selection

    with pytest.raises(SystemExit, match="^qsplat query: the absolute selection needs a finite relevancy threshold"):
        _selection(model, Query(load_config=trained["config_path"], text="chair", selection="absolute",
                                threshold=float("nan")))

    unknown = subprocess.run([str(BIN / "qsplat"), "query", "--load-config", str(trained["config_path"]),
                              "--text", "spaceship"], capture_output=True, text=True, timeout=600)
    assert unknown.returncode != 0 and "closed-vocabulary" in unknown.stderr


def test_viewer_query_renders_relevancy_without_browser(trained):
    pipeline = trained["trainer"].pipeline
    model = pipeline.model
    model.eval()
    camera, batch = pipeline.datamanager.fixed_indices_eval_dataloader[0]
    outputs = model.get_outputs_for_camera(camera)
    assert not outputs["relevancy"].any()  # listed before any query: neutral
    model.viewer_query.cb_hook(type("Element", (), {"value": "Chair "})())  # case/whitespace-insensitive
    assert model.query_text == "chair"
    outputs = model.get_outputs_for_camera(camera)
    rel = outputs["relevancy"]
    assert rel.shape == (*outputs["rgb"].shape[:2], 1)
    assert 0 <= float(rel.min()) and float(rel.max()) <= 1
    chair = batch["gt_classes"] == 1 + model.class_names.index("chair")
    if chair.any():
        assert float(rel[..., 0][chair].mean()) > float(rel[..., 0][~chair].mean()) + 0.1
    for word in ("zebra", "cha"):  # refused in the panel, and no map
        model.viewer_query.cb_hook(type("Element", (), {"value": word})())
        assert model.query_text == "" and "closed-vocabulary" in model.viewer_query_status.content
        assert not model.get_outputs_for_camera(camera)["relevancy"].any()
    model.viewer_query.cb_hook(type("Element", (), {"value": ""})())
    assert "relevancy" in model.get_outputs_for_camera(camera)  # stays listed (neutral) after clearing
    model.train()


def test_viewer_render_interrupt_reaches_the_render_thread(trained):
    """nerfstudio's viewer interrupts a render by raising IOChangeException from a trace function at any Python line;
    its render thread catches exactly that type. Raised while torch.compile compiled splatfacto's get_viewmat it came
    out as InternalTorchDynamoError, the thread died and the page froze (seen in the browser test). The model's one
    render path (CPU and CUDA) compiles nothing."""
    import torch._dynamo
    from nerfstudio.viewer_legacy.server import viewer_utils

    pipeline = trained["trainer"].pipeline
    model = pipeline.model
    camera, _ = pipeline.datamanager.fixed_indices_eval_dataloader[0]
    model.eval()
    try:
        for after in (3, 300, None):  # None: at the first line torch.compile runs, if it runs
            torch._dynamo.reset()  # whatever is compiled compiles again inside the interrupted render
            count, raised = [0], []

            def trace(frame, event, arg):
                if event == "line":
                    count[0] += 1
                    if count[0] == after or (after is None and not raised and "_dynamo" in frame.f_code.co_filename):
                        raised.append(frame.f_code.co_filename)
                        raise viewer_utils.IOChangeException
                return trace

            try:  # any other exception type fails the test
                with torch.no_grad(), viewer_utils.SetTrace(trace):
                    model.get_outputs_for_camera(camera)
            except viewer_utils.IOChangeException:
                assert raised
            else:
                assert after is None and not raised, (after, count[0])
        assert model.get_outputs_for_camera(camera)["rgb"].isfinite().all()  # and the next render works
    finally:
        model.train()


def test_ns_eval_checks_output_path_first(trained, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = subprocess.run([str(BIN / "ns-eval"), "--load-config", str(trained["config_path"]),
                             "--output-path", str(blocker / "metrics.json")], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode != 0 and "cannot write --output-path" in result.stderr, result.stderr[-3000:]
    assert "Loading latest checkpoint" not in result.stdout  # refused before any work


def test_never_supervised_gaussians_have_zero_features(trained):
    model = trained["trainer"].pipeline.model
    flags = model.feature_supervised
    assert flags.dtype == torch.bool and flags.shape == (model.num_points,)  # in sync after densification
    assert 0 < int(flags.sum()) < model.num_points, int(flags.sum())
    model.eval()
    features = model.gaussian_features
    assert (features[~flags] == 0).all() and (features[flags].norm(dim=-1) > 0).all()
    model.train()
    assert (model.gaussian_features[~flags] != 0).any()  # training still sees (and can reach) them
    state = torch.load(trained["config"].get_checkpoint_dir() / "step-000000119.ckpt", weights_only=False)
    assert torch.equal(state["pipeline"]["_model.feature_supervised"].cpu(), flags.cpu())


def test_feature_weight_is_the_supervision_each_gaussian_received(trained):
    """Issue 30 item 4: the table head sums, over training, the Q-Render blending weight of every Gaussian in the
    views of the feature-loss steps; it follows densification, is positive wherever a feature gradient
    arrived, lands in the checkpoint, and is the derivative of the loss's own feature render."""
    model = trained["trainer"].pipeline.model
    weight, flags = model.feature_weight, model.feature_supervised
    assert weight.dtype == torch.float32 and weight.shape == (model.num_points,)  # in sync after densification
    assert (weight >= 0).all() and (weight[flags] > 0).all()  # a feature gradient needs a blending weight
    assert torch.equal(model.gaussian_confidence, weight * flags)
    state = torch.load(trained["config"].get_checkpoint_dir() / "step-000000119.ckpt", weights_only=False)
    assert state["pipeline"]["_model.feature_weight"].shape == (model.num_points,)
    # pixel_weights == d(sum of the rendered feature channel at those pixels) / d(each Gaussian's feature)
    was_training = model.training
    camera = trained["trainer"].pipeline.datamanager.train_dataset.cameras[0:1]
    model.eval()
    with torch.no_grad():
        model.render_rgb(camera)  # projects the view (model.info)
    model.train()  # the raw table (training's features), as the loss renders it
    pixels = torch.arange(0, int(model.info["width"]) * int(model.info["height"]), 7)
    stored = model.gauss_params["clip_features"]  # bf16 by default: the gradient below is taken in float32
    model.gauss_params["clip_features"] = torch.nn.Parameter(stored.detach().float())
    table = model.gauss_params["clip_features"]
    try:
        with torch.enable_grad():
            rendered = model.render_features(None, model.config.num_quantiles, pixel_ids=pixels)["features"]
            (grad,) = torch.autograd.grad(rendered[:, 0].sum(), table)
        grad = grad.to_dense() if grad.is_sparse else grad  # the row-sparse training gradient
        weights = model.pixel_weights(pixels)
    finally:
        model.gauss_params["clip_features"] = stored
    model.train(was_training)
    assert weights.shape == (model.num_points,) and weights.sum() > 0
    assert torch.allclose(weights, grad[:, 0], atol=1e-5, rtol=1e-4)


def test_resume_from_checkpoint(trained, tmp_path, capfd):
    config = trained["config"]
    config.load_dir = config.get_checkpoint_dir()
    bad = _truncated_newer_checkpoint(config)
    try:
        trainer, history = train(config, 5)
    finally:
        bad.unlink(missing_ok=True)  # the resumed run's save (save_only_latest_checkpoint) deletes it anyway
        config.load_step = None
    assert trainer._start_step == 120
    assert f"skipping checkpoint {bad}" in capfd.readouterr().err
    assert all(math.isfinite(h["main_loss"]) for h in history)


def test_nerfstudio_layout_trains(tmp_path):
    root = tmp_path / "ns_room"
    generate_scene(root, layout="nerfstudio", seed=5, num_images=8, width=48, height=32, num_eval=2)
    SyntheticTeacher(root).run(progress=False)
    _, history = train(make_config(root, tmp_path / "runs", steps=15), 15)
    assert any("feature_loss" in h for h in history)


# ------------------------------------------------------------------------------ bad input
def test_bad_data_folders(tmp_path, scene):
    from qrender_ns.data.dataparser import SceneLayoutError, detect_layout

    with pytest.raises(SceneLayoutError, match="does not exist"):
        detect_layout(tmp_path / "missing")
    (tmp_path / "color").mkdir()
    with pytest.raises(SceneLayoutError, match="not a scene layout q-splat reads"):
        detect_layout(tmp_path)


def test_images_without_poses_rejected(tmp_path):
    from qrender_ns.data.dataparser import QSplatDataParserConfig, SceneLayoutError

    root = tmp_path / "room"
    generate_scene(root, layout="scannet", seed=1, num_images=6, width=32, height=24, num_eval=1)
    (root / "pose" / "3.txt").unlink()
    with pytest.raises(SceneLayoutError, match="one pose and one depth per colour image"):
        QSplatDataParserConfig(data=root).setup().get_dataparser_outputs("train")


def test_missing_teacher_cache_is_filled_or_named(tmp_path):
    from qrender_ns.teachers.cache import TeacherCache, TeacherCacheError

    root = tmp_path / "room"
    generate_scene(root, layout="scannet", seed=1, num_images=6, width=32, height=24, num_eval=1)
    config = make_config(root, tmp_path / "runs", steps=1)
    config.pipeline.datamanager.fill_teacher_cache = False
    with pytest.raises(TeacherCacheError, match="qsplat extract-features --data"):
        config.pipeline.datamanager.setup(device="cpu")
    config.pipeline.datamanager.fill_teacher_cache = True  # the default: ns-train fills it itself
    datamanager = config.pipeline.datamanager.setup(device="cpu")
    assert datamanager.teacher_cache.teacher_name == "synthetic"
    assert len(TeacherCache(root / "qsplat_teacher" / "synthetic")) == len(datamanager.train_dataset)


def test_nan_feature_loss_is_a_clear_error(trained):
    model = trained["trainer"].pipeline.model
    ids = torch.tensor([[0, 1], [1, 0]])
    emb = torch.full((2, 512), float("nan"))
    with pytest.raises(FloatingPointError, match="feature loss is NaN"):
        model.feature_loss(torch.randn(2, 2, 512), ids, emb)
