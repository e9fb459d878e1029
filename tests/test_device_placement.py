"""Tensors the model creates land on the model's device, not the CPU (issue 26: item 2, defect 1).

No GPU here, so two stand-ins for "the model is on another device than the CPU default":
- checkpoint loads: the model is moved to PyTorch's `meta` device (shapes only, no storage), which mixes with
  CPU tensors no better than CUDA does; a tensor `load_state_dict` builds on the CPU shows up as a CPU buffer,
  or as "Tensor on device cpu is not on the expected device meta" when it meets a model tensor;
- a run (training with densification, eval, query, evaluations): the model stays on the CPU and every tensor
  q-splat's own code makes without naming a device goes to `meta` instead (tests/device_audit.py).
"""

import pytest
import torch

from nerfstudio.data.scene_box import SceneBox

from qrender_ns.method.model import QSplatModelConfig

NUM_GAUSSIANS = 120


def _model(**config):
    config = QSplatModelConfig(num_random=NUM_GAUSSIANS, feature_dim=16, **config)
    box = SceneBox(aabb=torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))
    return config.setup(scene_box=box, num_train_data=4, metadata={})


def _checkpoint(model, keep: int, drop=()):
    """The model's state dict on the CPU (nerfstudio loads with map_location="cpu"), cut to `keep` Gaussians
    as densification would have left it."""
    state = {}
    for key, value in model.state_dict().items():
        if key in drop:
            continue
        value = value.detach().cpu().clone()
        if key.startswith("gauss_params.") or key in ("feature_supervised", "feature_weight", "backproject_features"):
            value = value[:keep]
        state[key] = value
    return state


def _off_device(model, device_type: str):
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, t in tensors if t.device.type != device_type]


@pytest.mark.parametrize("head,drop", [("table", ()), ("table", ("feature_supervised", "feature_weight")), ("backproject", ()),
                                       ("gsnet", ())], ids=["table", "table-old-checkpoint", "backproject", "gsnet"])
def test_load_state_dict_builds_on_the_models_device(head, drop):
    model = _model(feature_head=head)
    state = _checkpoint(model, NUM_GAUSSIANS - 20, drop)
    model.to("meta")  # as nerfstudio: to the device first, then load the CPU checkpoint
    model.load_state_dict(state, strict=False)
    assert _off_device(model, "meta") == []
    assert model.gauss_params["means"].shape[0] == NUM_GAUSSIANS - 20
    if head == "gsnet":
        return  # its features need voxelization, whose output size depends on the values (meta has none)
    model.eval()
    features = model.gaussian_features  # table * supervised flags: a device mismatch raised here on CUDA
    assert features.device.type == "meta" and features.shape == (NUM_GAUSSIANS - 20, 16)


# ------------------------------------------------------------------ the rest of a run, audited
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from qrender_ns.data.scene_generator import generate_scene
    from qrender_ns.teachers.synthetic import SyntheticTeacher
    from test_method import make_config, train

    root = tmp_path_factory.mktemp("placement_scene") / "room"
    generate_scene(root, layout="scannet", seed=3, num_images=5, width=32, height=24, num_eval=1, num_points=400)
    SyntheticTeacher(root).run(progress=False)
    config = make_config(root, tmp_path_factory.mktemp("placement_runs"), steps=2, feature_warmup_steps=0,
                         pixels_per_mask=8, refine_every=2, warmup_length=1)
    trainer, _ = train(config, 2)
    return trainer


def test_our_code_names_the_device_of_every_tensor_it_makes(tiny_run):
    """Training steps with densification, a checkpoint load, eval outputs and metrics, a viewer query, the
    per-Gaussian relevancy of `qsplat query`, the teacher batches and the evaluations' projections, with
    every tensor q-splat's code makes without a device put on `meta` (tests/device_audit.py): on a GPU those
    would be CPU tensors beside a CUDA model."""
    from device_audit import our_factories_on_meta, tensors_on_meta
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    from qrender_ns.eval import lerf_ovs, scannet3d
    from qrender_ns.workflows.query import gaussian_relevancy

    trainer = tiny_run
    model = trainer.pipeline.model
    before = model.num_points
    with our_factories_on_meta():
        for step in range(2, 10):  # splatfacto refines at steps 6 and 8 here
            for location in (TrainingCallbackLocation.BEFORE_TRAIN_ITERATION, None,
                             TrainingCallbackLocation.AFTER_TRAIN_ITERATION):
                if location is None:
                    trainer.train_iteration(step)
                for callback in trainer.callbacks if location is not None else ():
                    callback.run_callback_at_location(step, location=location)
    assert model.num_points != before and tensors_on_meta(model) == []
    old_checkpoint = _checkpoint(model, model.num_points, drop=("feature_supervised", "feature_weight"))
    model.eval()
    camera, batch = trainer.pipeline.datamanager.fixed_indices_eval_dataloader[0]
    try:
        with our_factories_on_meta():
            model.load_state_dict(old_checkpoint, strict=False)
            outputs = model.get_outputs_for_camera(camera)
            metrics, _ = model.get_image_metrics_and_images(outputs, batch)
            model.set_query("chair")
            relevancy = model.get_outputs_for_camera(camera)["relevancy"]
            scores = gaussian_relevancy(model, "chair")
            weights, _ = scannet3d.supervision_weights(trainer.pipeline, 2)
            lerf_ovs.project_view(model, camera)
    finally:
        model.set_query("")
        model.train()
    assert tensors_on_meta(model) == []
    for value in (*outputs.values(), relevancy, scores):
        assert value.device.type == "cpu"
    assert "feature_miou" in metrics and weights.shape == (model.num_points,)


def test_gsnet_prediction_names_the_device_of_every_tensor_it_makes():
    # GS-Net's feed-forward pass (voxelize, sparse U-Net, de-voxelize, head) with every tensor our code makes
    # without a device sent to `meta`: one would meet the CPU inputs and fail (on a GPU: a CPU tensor beside CUDA).
    from device_audit import our_factories_on_meta
    from qrender_ns.gsnet.gsnet import GSNet, GSNetConfig

    net = GSNet(GSNetConfig(stem_channels=8, enc_channels=(8, 16, 16, 16), dec_channels=(16, 16, 8, 8),
                            gaussian_mlp_channels=8, head_channels=32, backend="torch", feature_dim=16)).eval()
    gen = torch.Generator().manual_seed(0)
    n = 500
    means, colors = torch.rand(n, 3, generator=gen) * 2, torch.rand(n, 3, generator=gen)
    opacities, scales = torch.rand(n, generator=gen), torch.rand(n, 3, generator=gen) * 0.05
    with torch.no_grad(), our_factories_on_meta():
        features = net(means, colors, opacities, scales)
    assert features.shape == (n, 16) and features.device.type == "cpu" and torch.isfinite(features).all()
