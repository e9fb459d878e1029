"""Tensors the model creates land on the model's device, not the CPU (defect 1 of issue 26).

No GPU here: the model is moved to PyTorch's `meta` device (shapes only, no storage), which mixes with CPU
tensors no better than CUDA does. A tensor a method builds on the CPU shows up as a CPU buffer, or as
"Tensor on device cpu is not on the expected device meta" when it meets a model tensor.
"""

import pytest
import torch

from nerfstudio.data.scene_box import SceneBox

from qrender_ns.model import QSplatModelConfig

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
        if key.startswith("gauss_params.") or key in ("feature_supervised", "backproject_features"):
            value = value[:keep]
        state[key] = value
    return state


def _off_device(model, device_type: str):
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, t in tensors if t.device.type != device_type]


@pytest.mark.parametrize("head,drop", [("table", ()), ("table", ("feature_supervised",)), ("backproject", ()),
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
