"""The training-free back-projection head: the kernel-level accumulation against the pure-torch reference,
scene-level back-projection (3D mIoU, never-reached Gaussians), `qsplat backproject`, and
`--pipeline.model.feature-head backproject` in a short nerfstudio run."""

import json

import pytest
import torch
import torch.nn.functional as F

from qrender_ns.render import rasterize_features
from qrender_ns.render.backproject import backproject_to_gaussians


def _tiny_gaussians(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * 0.5 + torch.tensor([0.0, 0.0, 3.0])
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.2 + 0.05
    opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    return means, quats, scales, opacities


def _cameras(width, height):
    viewmats = torch.stack([torch.eye(4), torch.eye(4)])
    viewmats[1, 0, 3] = 0.3  # a second, shifted view
    K = torch.tensor([[30.0, 0, width / 2], [0, 30.0, height / 2], [0, 0, 1]])
    return viewmats, K[None].repeat(2, 1, 1)


def _reference_weights(means, quats, scales, opacities, viewmats, Ks, width, height, k):
    """w_{i,p} [V*H*W, N] by rendering the identity features with the pure-torch reference (float64)."""
    n = means.shape[0]
    out, _, _ = rasterize_features(*(t.double() for t in (means, quats, scales, opacities)),
                                   torch.eye(n, dtype=torch.float64), viewmats.double(), Ks.double(), width, height,
                                   num_quantiles=k, backend="torch")
    return out.reshape(-1, n)


@pytest.mark.parametrize("k", [None, 3, 10])
def test_backprojection_matches_reference_weights(k):
    width, height = 37, 29
    gaussians = _tiny_gaussians()
    viewmats, Ks = _cameras(width, height)
    w = _reference_weights(*gaussians, viewmats, Ks, width, height, k)
    assert (w.sum(0) > 0).sum() > 30  # most Gaussians are seen
    g = torch.Generator().manual_seed(1)
    embeddings = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    mask_ids = torch.randint(-1, 5, (2, height, width), generator=g)

    sums, weights = backproject_to_gaussians(*gaussians, viewmats, Ks, width, height, mask_ids=mask_ids,
                                             embeddings=embeddings, num_quantiles=k, backend="cpu")
    flat = mask_ids.reshape(-1)
    onehot = torch.zeros(flat.numel(), 5, dtype=torch.float64)
    onehot[flat >= 0, flat[flat >= 0]] = 1.0  # pixels in no mask count nowhere
    assert torch.allclose(sums.double(), w.T @ onehot @ embeddings.double(), atol=1e-4)
    assert torch.allclose(weights.double(), (w.T @ onehot).sum(-1), atol=1e-4)

    pixel_features = torch.randn(2, height, width, 4, generator=g)
    sums, weights = backproject_to_gaussians(*gaussians, viewmats, Ks, width, height, pixel_features=pixel_features,
                                             num_quantiles=k, backend="cpu")
    assert torch.allclose(sums.double(), w.T @ pixel_features.reshape(-1, 4).double(), atol=1e-4)
    assert torch.allclose(weights.double(), w.sum(0), atol=1e-4)
    if k is not None:  # quantile weights are those of the normalised blend: 1 per covered pixel
        covered = w.sum(1) > 0
        assert torch.allclose(w.sum(1)[covered], torch.ones(int(covered.sum()), dtype=torch.float64), atol=1e-9)


def test_backprojection_input_errors():
    width, height = 16, 16
    gaussians = _tiny_gaussians(8)
    viewmats, Ks = _cameras(width, height)
    with pytest.raises(ValueError, match="either `mask_ids`"):
        backproject_to_gaussians(*gaussians, viewmats, Ks, width, height)
    with pytest.raises(ValueError, match="pass `embeddings`"):
        backproject_to_gaussians(*gaussians, viewmats, Ks, width, height, mask_ids=torch.zeros(2, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"-1\.\.2"):
        backproject_to_gaussians(*gaussians, viewmats, Ks, width, height, mask_ids=torch.full((2, 16, 16), 3),
                                 embeddings=torch.randn(3, 4))
    sums, weights = backproject_to_gaussians(*gaussians, viewmats, Ks, width, height,
                                             mask_ids=torch.full((2, 16, 16), -1), embeddings=torch.randn(3, 4))
    assert sums.shape == (8, 4) and not sums.any() and not weights.any()  # no masked pixel: nothing


# ------------------------------------------------------------------------------------------- scenes
@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from qrender_ns.data.scene_generator import generate_scene
    from qrender_ns.teachers.synthetic import SyntheticTeacher

    root = tmp_path_factory.mktemp("bp_scene") / "room"
    generate_scene(root, layout="scannet", seed=2, num_images=10, width=64, height=48, num_eval=2, num_points=12000)
    SyntheticTeacher(root).run(progress=False)
    return root


def test_scene_backprojection_beats_chance_and_zeroes_unreached(scene):
    from qrender_ns.workflows.backproject import backproject_scene
    from qrender_ns.workflows.gsnet_scenes import load_scene
    from qrender_ns.workflows.train_gsnet import evaluate_features

    loaded = load_scene(scene)
    g = loaded.gaussians
    far = torch.tensor([[1e3, 1e3, 1e3]])  # one Gaussian no camera sees
    g.means, g.quats, g.scales = torch.cat([g.means, far]), torch.cat([g.quats, g.quats[:1]]), torch.cat([g.scales, g.scales[:1]])
    g.opacities, g.colors = torch.cat([g.opacities, g.opacities[:1]]), torch.cat([g.colors, g.colors[:1]])
    g.labels = torch.cat([g.labels, torch.zeros(1, dtype=g.labels.dtype)])
    results = {}
    for k in (10, None):
        features, weights = backproject_scene(loaded, num_quantiles=k)
        norms = features.norm(dim=-1)
        reached = weights > 0
        assert not reached[-1] and not features[-1].any()
        assert torch.equal(norms == 0, ~reached)  # zero exactly where no masked pixel reached the Gaussian
        assert torch.allclose(norms[reached], torch.ones(int(reached.sum())), atol=1e-5)
        results[k] = dict(evaluate_features(loaded, features, num_quantiles=10), reached=int(reached.sum()))
    print("back-projection on a generated room:", results)
    num_classes = len(loaded.class_names)
    assert results[10]["miou_3d"] > max(0.3, 3.0 / num_classes), results  # chance is ~1 / classes
    assert results[None]["miou_3d"] > 0.3 and results[10]["miou_2d"] > 0.3, results
    assert results[None]["reached"] >= results[10]["reached"]  # dense reaches every Gaussian quantile does


def test_cli_writes_features_and_reports(scene, tmp_path, capsys):
    import tyro

    from qrender_ns.cli import commands

    out = tmp_path / "bp"
    tyro.cli(commands(), args=["backproject", "--scenes", str(scene), "--out", str(out), "--render-scale", "0.5",
                             "--no-progress"]).main()
    printed = capsys.readouterr().out
    assert "back-projection room" in printed and "3d mIoU" in printed
    summary = json.loads((out / "summary.json").read_text())[0]
    assert summary["miou_3d"] > 0.3 and summary["seconds"] > 0 and summary["num_quantiles"] == 10
    saved = torch.load(out / "room.pt", weights_only=True)
    assert saved["format"] == "qsplat-backproject/1"
    assert saved["features"].shape == (summary["num_gaussians"], 512) and saved["weights"].shape[0] == summary["num_gaussians"]

    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(scene, bare, ignore=shutil.ignore_patterns("qsplat_teacher"))
    with pytest.raises(SystemExit, match="no teacher cache .*extract-features"):
        tyro.cli(commands(), args=["backproject", "--scenes", str(bare), "--out", str(out), "--no-progress"]).main()


# ------------------------------------------------------------------------------------------- q-splat
def test_qsplat_backproject_head(scene, tmp_path):
    from test_method import make_config, train

    from nerfstudio.utils.eval_utils import eval_setup
    from qrender_ns.workflows.predict_features import _eval_miou

    steps = 45
    config = make_config(scene, tmp_path / "runs", steps=steps, feature_head="backproject")
    trainer, history = train(config, steps)
    model = trainer.pipeline.model
    assert "clip_features" not in model.gauss_params and "clip_features" not in trainer.optimizers.optimizers
    assert not any("feature_loss" in h for h in history)  # nothing to optimise; RGB trains
    initial = len(model.seed_points[0])
    assert model.num_points != initial  # densified: the buffer followed the Gaussians
    saved = torch.load(next(config.get_checkpoint_dir().glob("*.ckpt")), weights_only=False)["pipeline"]
    features = saved["_model.backproject_features"]
    assert features.shape == (model.num_points, 512)
    fresh = model.backproject()  # the checkpoint holds the back-projection of the final Gaussians
    assert torch.allclose(features, fresh, atol=1e-6)
    norms = features.norm(dim=-1)
    assert bool(((norms - 1).abs() < 1e-4).logical_or(norms == 0).all()) and (norms > 0).float().mean() > 0.5

    _, pipeline, _, _ = eval_setup(config.get_base_dir() / "config.yml", test_mode="test")  # as ns-eval loads it
    pipeline.model.backproject = None  # a loaded run uses its saved features, no recomputation
    assert torch.equal(pipeline.model.gaussian_features, features)
    miou = _eval_miou(pipeline)
    print("feature_head backproject: 2D mIoU on the eval views", miou)
    assert miou > 0.2
    metrics = pipeline.get_average_eval_image_metrics()  # ns-eval's metrics
    assert metrics["feature_miou"] > 0.2 and 0 < metrics["num_unsupervised_gaussians"] < metrics["num_gaussians"]

    pipeline.eval()  # get_average_eval_image_metrics ends in train mode; eval-scannet's own loading is in eval
    from qrender_ns.eval.scannet3d import EvalScannet, run_eval_scannet

    result = run_eval_scannet(EvalScannet(load_config=config.get_base_dir() / "config.yml", classes="scene",
                                          output=tmp_path / "eval", timing=False), pipeline=pipeline)
    print("feature_head backproject: eval-scannet 3D mIoU", result["miou"])
    assert result["miou"] > 0.2

    from qrender_ns.workflows.backproject import Backproject, run_backproject

    # `qsplat backproject` on the run (Gaussians from its checkpoint, its dataparser's cameras): the same features
    summary = run_backproject(Backproject(scenes=(config.get_base_dir() / "config.yml",), out=tmp_path / "bp",
                                          progress=False))[0]
    assert summary["num_gaussians"] == features.shape[0] and summary["miou_2d"] > 0.2
    cli_features = torch.load(summary["features"], weights_only=True)["features"]
    assert torch.allclose(cli_features, features, atol=1e-5)


def test_qsplat_backproject_head_without_teacher_is_refused(scene, tmp_path):
    from test_method import make_config

    config = make_config(scene, tmp_path / "runs", steps=1, feature_head="backproject")
    config.pipeline.datamanager.teacher = "none"
    config.save_config()
    trainer = config.setup(local_rank=0, world_size=1)
    with pytest.raises(ValueError, match="feature-head backproject .* no teacher cache"):
        trainer.setup()
