"""GS-Net: voxelization, the sparse-conv backends, the network, checkpoints, DDP training, generalization
to an unseen scene, and the q-splat integration (feature_head=gsnet, qsplat predict-features)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qrender_ns.gsnet import (GSNet, GSNetConfig, available_backends, devoxelize, devoxelize_trilinear, get_backend,
                              pool_to_voxels, voxelize)
from qrender_ns.gsnet.backbone import MinkUNet, calibrate_permutation

TINY = dict(stem_channels=8, enc_channels=(8, 16, 16, 16), dec_channels=(16, 16, 8, 8), gaussian_mlp_channels=8,
            head_channels=32, backend="torch")
REPO = Path(__file__).resolve().parents[1]


def _surface_points(n, seed=0):
    """Points on the faces of a 2 x 1.5 x 1 m box (a surface, like Gaussians)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n, 3, generator=g) * torch.tensor([2.0, 1.5, 1.0])
    axis = torch.randint(0, 3, (n,), generator=g)
    side = torch.randint(0, 2, (n,), generator=g).float()
    p[torch.arange(n), axis] = side * torch.tensor([2.0, 1.5, 1.0])[axis]
    return p


# ------------------------------------------------------------------------------------------- voxelize
def test_voxelize_devoxelize_round_trip():
    means = _surface_points(5000) - 0.37  # negative coordinates too
    vox = voxelize(means, 0.05)
    assert vox.coords.dtype == torch.long and vox.is_center_sampled
    assert torch.unique(vox.coords, dim=0).shape[0] == vox.num_voxels  # merged duplicates
    counts = torch.bincount(vox.pair_voxel, minlength=vox.num_voxels)
    assert int(counts.min()) >= 1 and int(counts.sum()) == 5000  # no empty voxel, every Gaussian once
    expected = torch.floor((means - vox.origin) / 0.05).long()
    assert torch.equal(vox.coords[vox.center_voxel], expected)  # each Gaussian sits in its centre's voxel
    voxel_features = torch.randn(vox.num_voxels, 6)
    per_gaussian = devoxelize(vox, voxel_features)
    assert torch.equal(per_gaussian, voxel_features[vox.center_voxel])
    # mean pooling against a loop over a few voxels
    values = torch.randn(5000, 4, dtype=torch.float64)
    pooled = pool_to_voxels(vox, values)
    for v in (0, vox.num_voxels // 2, vox.num_voxels - 1):
        assert torch.allclose(pooled[v], values[vox.center_voxel == v].mean(0))


def test_trilinear_devoxelize_reproduces_linear_fields_and_renormalises():
    torch.manual_seed(0)
    # a full 6x6x6 block of voxels: inside it, trilinear interpolation of a linear field is exact
    grid = torch.stack(torch.meshgrid(*[torch.arange(6)] * 3, indexing="ij"), -1).reshape(-1, 3).double()
    centres = (grid + 0.5) * 0.1
    inner = 0.15 + torch.rand(300, 3, dtype=torch.float64) * 0.3  # between voxel centres, away from the border
    vox = voxelize(torch.cat([centres, inner]), 0.1, origin=torch.zeros(3, dtype=torch.float64))
    assert vox.num_voxels == 216
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    field = vox.voxel_centers() @ a + b  # [V, 4], linear in the voxel centre
    out = devoxelize_trilinear(vox, field, torch.cat([centres, inner]))
    torch.testing.assert_close(out, torch.cat([centres, inner]) @ a + b)
    # at a voxel centre it is that voxel's feature (the gather)
    torch.testing.assert_close(out[:216], devoxelize(vox, field)[:216])
    # a lone voxel: every other corner is empty, the weights renormalise onto it
    lone = voxelize(torch.tensor([[0.0, 0.0, 0.0], [1.02, 1.03, 1.01]]), 0.1, origin=torch.zeros(3))
    feats = torch.randn(lone.num_voxels, 3, requires_grad=True)
    got = devoxelize_trilinear(lone, feats, torch.tensor([[0.0, 0.0, 0.0], [1.02, 1.03, 1.01]]))
    torch.testing.assert_close(got, feats[lone.center_voxel])
    got.sum().backward()
    assert torch.equal(feats.grad, torch.ones_like(feats))
    with pytest.raises(ValueError, match="points must have shape"):
        devoxelize_trilinear(lone, feats, torch.zeros(3, 3))


def test_gsnet_trilinear_devoxelization_trains():
    torch.manual_seed(0)
    n = 2000
    inputs = dict(means=_surface_points(n), colors=torch.rand(n, 3), opacities=torch.rand(n),
                  scales=torch.rand(n, 3) * 0.02, quats=torch.randn(n, 4))
    for mlp in (8, 0):  # per-Gaussian MLP, and the paper's per-voxel head
        net = GSNet(GSNetConfig(**{**TINY, "gaussian_mlp_channels": mlp}, devoxelize="trilinear"))
        out = net(**inputs)
        assert torch.allclose(out.norm(dim=-1), torch.ones(n), atol=1e-5)
        out[:, 0].sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)
        voxel_net = GSNet(GSNetConfig(**{**TINY, "gaussian_mlp_channels": mlp}))
        voxel_net.load_state_dict(net.state_dict())
        assert not torch.allclose(voxel_net(**inputs), out.detach())  # the option changes the result


def test_extent_sampling_max_reduces():
    means = torch.tensor([[0.02, 0.02, 0.02], [0.55, 0.55, 0.55]])
    scales = torch.tensor([[0.2, 0.001, 0.001], [0.001, 0.001, 0.001]])  # the first spans 3 voxels along x
    quats = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    vox = voxelize(means, 0.1, origin=torch.zeros(3), sampling="extent", scales=scales, quats=quats)
    touched = vox.pair_voxel[vox.pair_gaussian == 0]
    assert touched.numel() == 3 and vox.coords[touched][:, 0].tolist() == [-2, 0, 2]
    feats = torch.randn(vox.num_voxels, 5)
    out = devoxelize(vox, feats)
    assert torch.equal(out[0], feats[touched].max(0).values)
    assert torch.equal(out[1], feats[vox.center_voxel[1]])


# ------------------------------------------------------------------------------------------- backends
def _grid(g):
    return torch.stack(torch.meshgrid(*[torch.arange(g)] * 3, indexing="ij"), -1).reshape(-1, 3)


def test_torch_backend_matches_dense_conv3d():
    torch.manual_seed(0)
    tb = get_backend("torch")
    cin, cout = 3, 5
    coords = _grid(4)  # fully occupied 4^3 grid: sparse = dense (zero padding outside)
    x = torch.randn(64, cin, dtype=torch.float64)
    dense = x.reshape(4, 4, 4, cin).permute(3, 0, 1, 2)[None]
    w3 = torch.randn(27, cin, cout, dtype=torch.float64)
    y = tb.conv3(tb.init(coords, x), w3).features
    ref = F.conv3d(dense, w3.reshape(3, 3, 3, cin, cout).permute(4, 3, 0, 1, 2), padding=1)
    assert torch.allclose(y, ref[0].permute(1, 2, 3, 0).reshape(-1, cout), atol=1e-10)
    w2 = torch.randn(8, cin, cout, dtype=torch.float64)
    fine = tb.init(coords, x)
    coarse = tb.down2(fine, w2)
    ref = F.conv3d(dense, w2.reshape(2, 2, 2, cin, cout).permute(4, 3, 0, 1, 2), stride=2)[0]
    assert torch.allclose(coarse.features, ref.permute(1, 2, 3, 0).reshape(-1, cout), atol=1e-10)
    wu = torch.randn(8, cout, cin, dtype=torch.float64)
    up = tb.up2(coarse, fine, wu)
    ref = F.conv_transpose3d(ref[None], wu.reshape(2, 2, 2, cout, cin).permute(3, 4, 0, 1, 2), stride=2)[0]
    assert torch.allclose(up.features, ref.permute(1, 2, 3, 0).reshape(-1, cin), atol=1e-10)


def test_torch_backend_gradcheck():
    from torch.autograd import gradcheck

    from qrender_ns.gsnet.backbone import _PairConv, _TorchLevel

    torch.manual_seed(0)
    level = _TorchLevel(torch.unique(torch.randint(-3, 3, (60, 3)), dim=0))
    x = torch.randn(level.num, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(27, 2, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, b: _PairConv.apply(a, b, level.conv3_pairs(), level.num), (x, w))
    coarse, down, up = level.down()
    w2 = torch.randn(8, 2, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, b: _PairConv.apply(a, b, down, coarse.num), (x, w2))
    xc = torch.randn(coarse.num, 2, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, b: _PairConv.apply(a, b, up, level.num), (xc, w2))


def test_fused_head_matches_modules_and_gradcheck(monkeypatch):
    from torch.autograd import gradcheck

    from qrender_ns.gsnet.gsnet import _FusedHead

    monkeypatch.setattr(_FusedHead, "CHUNK", 7)  # several chunks
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(5, 6).double(), torch.nn.Linear(6, 4).double()
    x = torch.randn(30, 5, dtype=torch.float64, requires_grad=True)
    params = (x, lin1.weight, lin1.bias, lin2.weight, lin2.bias)
    reference = F.normalize(lin2(torch.relu(lin1(x))), dim=-1)
    assert torch.allclose(_FusedHead.apply(*params), reference)
    assert gradcheck(_FusedHead.apply, params)


def test_calibration_recovers_canonical_order():
    tb = get_backend("torch")
    for kind, k in (("conv3", 27), ("down2", 8), ("up2", 8)):
        assert calibrate_permutation(tb, kind).tolist() == list(range(k))


@pytest.mark.parametrize("name", [b for b in ("spconv", "minkowski") if b in available_backends()] or ["none"])
def test_backend_parity_with_torch(name):
    if name == "none":
        pytest.skip("no optional sparse-conv backend (spconv, MinkowskiEngine) is installed")
    torch.manual_seed(0)
    coords = torch.unique(torch.floor(_surface_points(4000) / 0.05).long(), dim=0) + torch.tensor([-7, 3, 5])
    net = MinkUNet(7, 8, (8, 16, 16, 16), (16, 16, 8, 8), norm="batch").eval()
    results = {}
    for backend in ("torch", name):
        x = torch.randn(coords.shape[0], 7, generator=torch.Generator().manual_seed(1), requires_grad=True)
        net.zero_grad()
        out = net(get_backend(backend), coords, x)
        out.square().sum().backward()
        results[backend] = (out.detach(), x.grad, net.stem[0].conv.weight.grad.clone(),
                            net.ups[0].conv.weight.grad.clone())
    for a, b in zip(results["torch"], results[name]):
        assert (a - b).abs().max() <= 1e-4 * a.abs().max(), (a - b).abs().max()


def test_gradients_reach_inputs_and_every_weight():
    torch.manual_seed(0)
    net = MinkUNet(7, 8, (8, 16), (16, 8))
    coords = torch.unique(torch.floor(_surface_points(2000) / 0.1).long(), dim=0)
    x = torch.randn(coords.shape[0], 7, requires_grad=True)
    net(get_backend("torch"), coords, x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------------------- GS-Net
def test_gsnet_outputs_unit_features_and_checkpoints(tmp_path):
    torch.manual_seed(0)
    config = GSNetConfig(**TINY, extra_inputs=("log_scale", "rotation"))
    net = GSNet(config).eval()
    n = 3000
    inputs = dict(means=_surface_points(n), colors=torch.rand(n, 3), opacities=torch.rand(n),
                  scales=torch.rand(n, 3) * 0.02, quats=torch.randn(n, 4))
    out = net(**inputs)
    assert out.shape == (n, 512) and torch.allclose(out.norm(dim=-1), torch.ones(n), atol=1e-5)
    assert net.backend_name == "torch"
    assert net(**{k: v[:0] for k, v in inputs.items()}).shape == (0, 512)
    # centimetres in, same features: positions are converted to metres
    scaled = dict(inputs, means=inputs["means"] * 100, scales=inputs["scales"] * 100)
    assert torch.allclose(net(**scaled, units_per_metre=100.0), out, atol=1e-4)

    path = net.save_checkpoint(tmp_path / "g.ckpt")
    again = GSNet.from_checkpoint(path).eval()
    assert again.config == config and torch.equal(again(**inputs), out)
    with pytest.raises(FileNotFoundError, match="train-gsnet"):
        GSNet.from_checkpoint(tmp_path / "missing.ckpt")
    torch.save({"pipeline": {}}, tmp_path / "ns.ckpt")
    with pytest.raises(ValueError, match="not a GS-Net checkpoint"):
        GSNet.from_checkpoint(tmp_path / "ns.ckpt")
    with pytest.raises(ValueError, match="256-D"):
        GSNet.from_checkpoint(path, expect_feature_dim=256)
    other = GSNet(GSNetConfig(**dict(TINY, stem_channels=4)))
    with pytest.raises(ValueError, match="does not match|shape mismatch"):
        other.load_weights(torch.load(path, weights_only=True)["state_dict"])


def test_model_features_are_cached_without_grad_and_frozen_net_is_fixed():
    from qrender_ns.gsnet.integration import GSNetFeatures, build_gsnet

    n = 500
    params = {"means": _surface_points(n), "features_dc": torch.randn(n, 3), "features_rest": torch.zeros(n, 15, 3),
              "opacities": torch.randn(n, 1), "scales": torch.full((n, 3), -4.0), "quats": torch.randn(n, 4)}
    net = build_gsnet(GSNetConfig(**TINY), 512, None, freeze=True)
    assert not any(p.requires_grad for p in net.parameters())
    features = GSNetFeatures(net, frozen=True)
    first = features(params, sh_degree=3)
    assert not net.training and features(params, sh_degree=3) is first  # cached: nothing changed
    params["means"].add_(0.01)  # a Gaussian moved (in place, as the optimiser does): recomputed
    assert features(params, sh_degree=3) is not first


def test_voxel_head_variant_gives_each_gaussian_its_voxels_feature():
    net = GSNet(GSNetConfig(**dict(TINY, gaussian_mlp_channels=0))).eval()  # the paper's form
    n = 2000
    means = _surface_points(n)
    out = net(means, torch.rand(n, 3), torch.rand(n))
    vox = voxelize(means, 0.05)
    same_voxel = vox.center_voxel[:, None] == vox.center_voxel[None, :]
    assert torch.allclose((out @ out.T)[same_voxel], torch.ones(int(same_voxel.sum())), atol=1e-5)
    assert torch.allclose(out.norm(dim=-1), torch.ones(n), atol=1e-5)


# ------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from qrender_ns.data.scene_generator import generate_scene
    from qrender_ns.teachers.synthetic import SyntheticTeacher

    root = tmp_path_factory.mktemp("gsnet_scenes")
    paths = []
    for seed in (0, 1, 2):
        path = root / f"room{seed}"
        generate_scene(path, layout="scannet", seed=seed, num_images=10, width=64, height=48, num_eval=2,
                       num_points=12000)
        SyntheticTeacher(path).run(progress=False)
        paths.append(path)
    return paths


def _train_config(scenes, out, steps, **kwargs):
    from qrender_ns.workflows.train_gsnet import TrainGSNet

    defaults = dict(scenes=tuple(scenes), out=out, gsnet=GSNetConfig(**TINY), steps=steps, scenes_per_step=2,
                    views_per_scene=2, lr=1e-2, progress=False, save_every=1000)
    return TrainGSNet(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def trained_gsnet(scenes, tmp_path_factory):
    from qrender_ns.workflows.train_gsnet import train_gsnet

    out = tmp_path_factory.mktemp("gsnet_ckpt") / "gsnet.ckpt"
    summary = train_gsnet(_train_config(scenes[:2], out, steps=24))
    return out, summary


def test_training_on_two_scenes_generalizes_to_a_third(scenes, trained_gsnet):
    from qrender_ns.workflows.gsnet_scenes import load_scene
    from qrender_ns.workflows.train_gsnet import evaluate_net

    ckpt, summary = trained_gsnet
    assert summary["steps"] == 24 and Path(ckpt).is_file()
    assert (Path(ckpt).parent / "gsnet_tb").is_dir()  # TensorBoard log
    unseen = load_scene(scenes[2])
    torch.manual_seed(0)
    untrained = evaluate_net(GSNet(GSNetConfig(**TINY)), unseen)
    trained = evaluate_net(GSNet.from_checkpoint(ckpt), unseen)
    print("unseen scene mIoU untrained", untrained, "trained", trained)
    assert trained["miou_3d"] > untrained["miou_3d"] + 0.1, (untrained, trained)
    assert trained["miou_2d"] > untrained["miou_2d"] + 0.1, (untrained, trained)


def test_training_resumes(scenes, trained_gsnet, tmp_path):
    import shutil

    from qrender_ns.workflows.train_gsnet import train_gsnet

    ckpt = tmp_path / "gsnet.ckpt"
    shutil.copy(trained_gsnet[0], ckpt)
    summary = train_gsnet(_train_config(scenes[:2], ckpt, steps=25, tensorboard=False))
    assert summary["steps"] == 25
    state = torch.load(ckpt, weights_only=True)["extra"]["training"]
    assert state["step"] == 25 and state["optimizer"]["state"]
    with pytest.raises(SystemExit, match="another architecture"):
        train_gsnet(_train_config(scenes[:2], ckpt, steps=26, gsnet=GSNetConfig(**dict(TINY, head_channels=16))))


def test_weight_average_follows_the_formula_and_copies_integer_buffers(tmp_path):
    from qrender_ns.workflows.train_gsnet import _WeightAverage

    torch.manual_seed(0)
    net = GSNet(GSNetConfig(**TINY))
    average = _WeightAverage(net, 0.9, tmp_path / "avg.ckpt", step=0)
    before = {k: v.clone() for k, v in average.net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        for name, b in net.named_buffers():
            b.add_(2 if b.dtype.is_floating_point else 3)
    average.update(step=1000)  # past the warm-up: decay 0.9
    live = net.state_dict()
    for key, value in average.net.state_dict().items():
        if value.dtype.is_floating_point:
            assert torch.allclose(value, 0.9 * before[key] + 0.1 * live[key], atol=1e-6), key
        else:
            assert torch.equal(value, live[key]), key
    average.update(step=0)  # warm-up: decay min(0.9, 1/10) = 0.1, mostly the live weights
    w = next(iter(average.net.parameters()))
    assert torch.allclose(w, live[next(iter(dict(net.named_parameters())))], atol=0.2)


def test_training_with_a_weight_average_saves_and_resumes_it(scenes, tmp_path, capsys):
    from qrender_ns.workflows.train_gsnet import ema_path_of, train_gsnet

    out = tmp_path / "gsnet.ckpt"
    summary = train_gsnet(_train_config(scenes[:2], out, steps=3, ema_decay=0.9, tensorboard=False))
    ema = ema_path_of(out)
    assert summary["ema_checkpoint"] == str(ema) and ema.name == "gsnet_ema.ckpt"
    payload = torch.load(ema, weights_only=True)
    assert payload["extra"]["ema"] == {"decay": 0.9, "step": 3}
    live, averaged = GSNet.from_checkpoint(out), GSNet.from_checkpoint(ema)  # a GS-Net checkpoint like any other
    assert any(not torch.equal(a, b) for a, b in zip(live.state_dict().values(), averaged.state_dict().values()))
    capsys.readouterr()
    train_gsnet(_train_config(scenes[:2], out, steps=4, ema_decay=0.9, tensorboard=False))
    assert "resuming the weight average" in capsys.readouterr().out
    assert torch.load(ema, weights_only=True)["extra"]["ema"]["step"] == 4
    # an average out of step with the checkpoint (a kill between the two saves) restarts, with a word
    train_gsnet(_train_config(scenes[:2], out, steps=5, tensorboard=False))  # trained on without the average
    train_gsnet(_train_config(scenes[:2], out, steps=6, ema_decay=0.9, tensorboard=False))
    assert "does not match step 5" in capsys.readouterr().out
    with pytest.raises(ValueError, match="ema-decay"):
        _train_config(scenes[:2], out, steps=6, ema_decay=1.0)


def test_ddp_two_processes_gloo(scenes, tmp_path):
    out = tmp_path / "ddp.ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "qrender_ns.workflows.train_gsnet", "--scenes", str(scenes[0]), str(scenes[1]), "--out", str(out),
               "--steps", "2", "--scenes-per-step", "1", "--views-per-scene", "1", "--no-progress",
               "--gsnet.backend", "torch", "--gsnet.stem-channels", "4", "--gsnet.enc-channels", "4", "8",
               "--gsnet.dec-channels", "8", "4", "--gsnet.gaussian-mlp-channels", "4", "--gsnet.head-channels", "16"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    payload = torch.load(out, weights_only=True)
    assert payload["extra"]["training"]["step"] == 2


# ------------------------------------------------------------------------------------------- q-splat
def test_qsplat_gsnet_head_trains_and_predict_features(scenes, trained_gsnet, tmp_path):
    from test_method import make_config, train

    from qrender_ns.workflows.predict_features import PredictFeatures, run_predict

    ckpt = trained_gsnet[0]
    config = make_config(scenes[2], tmp_path / "runs", steps=8, feature_head="gsnet", gsnet_checkpoint=ckpt)
    config.pipeline.model.feature_warmup_steps = 2
    trainer, history = train(config, 8)
    model = trainer.pipeline.model
    assert "gsnet" in trainer.optimizers.optimizers and "clip_features" not in model.gauss_params
    assert sum("feature_loss" in h for h in history) >= 5
    assert model.gaussian_features.shape == (model.num_points, 512)
    state = torch.load(next((config.get_checkpoint_dir()).glob("*.ckpt")), weights_only=False)["pipeline"]
    assert any(k.startswith("_model.gsnet.") for k in state)

    table = make_config(scenes[2], tmp_path / "runs_table", steps=4)
    table_trainer, _ = train(table, 4)
    from qrender_ns.workflows.gsnet_scenes import load_scene

    run_scene = load_scene(table.get_base_dir() / "config.yml")  # a run as a train-gsnet scene
    assert run_scene.gaussians.num == table_trainer.pipeline.model.num_points
    assert len(run_scene.train.image_keys) == 8
    assert run_scene.teacher.read(run_scene.train.image_keys[0])[1].shape[1] == 512
    summary = run_predict(PredictFeatures(load_config=table.get_base_dir() / "config.yml", gsnet_checkpoint=ckpt))
    assert summary["num_gaussians"] > 0 and summary["seconds"] > 0 and summary["sparse_conv_backend"] == "torch"
    assert Path(summary["config"]).is_file() and Path(summary["checkpoint"]).is_file()
    print("predict-features", json.dumps(summary))
    assert summary["feature_miou_after"] > summary["feature_miou_before"]
    from nerfstudio.utils.eval_utils import eval_setup

    _, pipeline, _, _ = eval_setup(Path(summary["config"]), test_mode="test")  # the new run loads as ns-eval does
    norms = pipeline.model.gauss_params["clip_features"].norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)  # GS-Net's unit features, not the old table

    tta = run_predict(PredictFeatures(load_config=table.get_base_dir() / "config.yml", gsnet_checkpoint=ckpt,
                                      tta_views=4, suffix="-gsnet-tta4"))
    assert tta["tta_views"] == 4 and tta["config"] != summary["config"] and tta["feature_miou_after"] is not None
    with pytest.raises(SystemExit, match="test-time views need a table-head run"):
        run_predict(PredictFeatures(load_config=config.get_base_dir() / "config.yml", gsnet_checkpoint=ckpt,
                                    tta_views=2))
    with pytest.raises(ValueError, match="1 or an even number"):
        run_predict(PredictFeatures(load_config=table.get_base_dir() / "config.yml", gsnet_checkpoint=ckpt,
                                    tta_views=3))


def test_feature_table_and_finetune_on_one_scene(scenes, trained_gsnet):
    """The per-scene rows of the generalization benchmark: a feature table trained from scratch with GS-Net's
    loss learns the scene (3D mIoU well above its random start), and a fine-tune leaves the given net untouched."""
    import torch

    from qrender_ns.workflows.gsnet_finetune import FeatureTable, finetune_gsnet, fit_feature_table
    from qrender_ns.gsnet.gsnet import GSNet
    from qrender_ns.workflows.gsnet_scenes import load_scene
    from qrender_ns.workflows.train_gsnet import TrainGSNet, evaluate_features

    scene = load_scene(scenes[2])
    cfg = TrainGSNet(scenes=(scenes[2],), views_per_scene=2, pixels_per_mask=64)
    start = FeatureTable(scene.gaussians.num, 512)(**scene.gaussians.gsnet_inputs())
    before = evaluate_features(scene, start)["miou_3d"]
    features, stats = fit_feature_table(scene, steps=40, lr=0.05, cfg=cfg)
    after = evaluate_features(scene, features)["miou_3d"]
    assert stats["last_loss"] < stats["first_loss"] and after > before + 0.2, (before, after, stats)
    assert torch.allclose(features.norm(dim=-1), torch.ones(features.shape[0]), atol=1e-5)
    with pytest.raises(ValueError, match="holds 3 Gaussians"):
        FeatureTable(3, 8)(**scene.gaussians.gsnet_inputs())

    net = GSNet.from_checkpoint(trained_gsnet[0]).eval()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    tuned, stats = finetune_gsnet(net, scene, steps=2, lr=1e-3, cfg=cfg)
    assert tuned.shape == (scene.gaussians.num, 512) and stats["steps"] == 2
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
