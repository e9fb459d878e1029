"""One model code path (issue 26, item 4): the device picks only the kernels. The model's RGB render with the
CPU kernels equals the same render through gsplat.rasterization (its CUDA ops replaced by CPU stand-ins), in
both rasterize modes, in training (camera optimiser, SH degree) and in eval."""

import pytest
import torch

from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.scene_box import SceneBox

import gsplat_standins
from qrender_ns.method.model import QSplatModelConfig
from qrender_ns.render import kernels


def _model(mode):
    torch.manual_seed(0)
    config = QSplatModelConfig(num_random=300, random_scale=2.0, feature_dim=8, rasterize_mode=mode,
                               sh_degree_interval=1, num_downscales=0, background_color="white")
    box = SceneBox(aabb=torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))
    model = config.setup(scene_box=box, num_train_data=1, metadata={})
    model.step = 5  # SH degree 3 in use
    with torch.no_grad():
        model.gauss_params["features_rest"].normal_(0, 0.2)
    return model


def _camera():
    c2w = torch.tensor([[1.0, 0, 0, 0.1], [0, 1, 0, -0.1], [0, 0, 1, 2.5]])[None]  # looks down -z at the origin
    return Cameras(camera_to_worlds=c2w, fx=40.0, fy=40.0, cx=24.0, cy=16.0, width=48, height=32,
                   metadata={"cam_idx": 0})


def _render(model, monkeypatch, kernel_choice):
    with monkeypatch.context() as patch:
        if kernel_choice is kernels.GPU_KERNELS:
            gsplat_standins.patch_gsplat(patch)
        patch.setattr(kernels, "render_kernels", lambda device: kernel_choice)
        outputs = model.render_rgb(_camera())
    return outputs, model.info


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", ["classic", "antialiased"])
def test_cpu_and_gpu_kernels_render_the_same(mode, training, monkeypatch):
    model = _model(mode)
    model.train(training)
    model.strategy_state, model.optimizers = model.strategy.initialize_state(), {}
    cpu, cpu_info = _render(model, monkeypatch, kernels.CPU_KERNELS)
    gpu, gpu_info = _render(model, monkeypatch, kernels.GPU_KERNELS)
    assert float(cpu["accumulation"].mean()) > 0.2
    for key in ("rgb", "accumulation", "depth"):
        torch.testing.assert_close(cpu[key], gpu[key], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(cpu_info["flatten_ids"].long(), gpu_info["flatten_ids"].long())
    visible = cpu_info["radii"] > 0
    torch.testing.assert_close(cpu_info["opacities"][visible], gpu_info["opacities"][visible])
