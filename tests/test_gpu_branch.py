"""The model's CUDA kernels' path, run on the CPU (issue 26): gsplat.rasterization with its CUDA ops replaced by
CPU stand-ins (tests/gsplat_standins.py: gsplat's torch math, our binning and blending, NaN where the GPU leaves
memory unwritten) and the Triton feature kernels in Triton's interpreter, through training steps with
densification, a checkpoint, a --load-dir resume, ns-eval, `qsplat query` and a viewer render.

The model's code is one path on every device (qrender_ns.render.kernels picks only the kernels), so what runs
here is what runs on a GPU except the kernels themselves. Tiny scene, few steps: the interpreter is slow.
"""

import json
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the Triton kernels are decorated (first import)

import pytest  # noqa: E402

import gsplat_standins  # noqa: E402
from qrender_ns.data.scene_generator import generate_scene  # noqa: E402
from qrender_ns.render import kernels  # noqa: E402
from qrender_ns.teachers.synthetic import SyntheticTeacher  # noqa: E402
from test_method import make_config, train  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="stand-ins for a machine without a GPU")
STEPS = 10  # splatfacto pauses refinement for num_train_data + refine_every steps: the first is step 9


@pytest.fixture(scope="module")
def gpu_kernels_on_cpu():
    """gsplat's CUDA ops -> stand-ins, and the device's kernel choice -> the CUDA one; counts the calls."""
    import qrender_ns.render.triton.launch as triton_launch

    patch = pytest.MonkeyPatch()
    calls = {"rasterization": 0, "triton": 0, "cpu_kernel_rgb": 0}
    patch.setattr(kernels, "render_kernels", lambda device: kernels.GPU_KERNELS)
    gsplat_standins.patch_gsplat(patch)
    import gsplat.rendering

    def counted(module, name, key):
        original = getattr(module, name)

        def spy(*args, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)
        patch.setattr(module, name, spy)

    counted(gsplat.rendering, "rasterization", "rasterization")
    counted(triton_launch, "rasterize_pixels_triton", "triton")
    counted(triton_launch, "rasterize_to_pixels_triton", "triton")
    from qrender_ns.method.model import QSplatModel

    counted(QSplatModel, "_rasterize_rgb_cpu", "cpu_kernel_rgb")
    from gsplat.strategy import DefaultStrategy

    grow, prune = DefaultStrategy._grow_gs, DefaultStrategy._prune_gs
    patch.setattr(DefaultStrategy, "_grow_gs", lambda *a, **k: calls.setdefault("grown", []).append(grow(*a, **k))
                  or calls["grown"][-1])
    patch.setattr(DefaultStrategy, "_prune_gs", lambda *a, **k: calls.setdefault("pruned", []).append(prune(*a, **k))
                  or calls["pruned"][-1])
    yield calls
    patch.undo()


@pytest.fixture(scope="module")
def run(gpu_kernels_on_cpu, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_scene") / "room"
    generate_scene(root, layout="scannet", seed=3, num_images=5, width=32, height=24, num_eval=1, num_points=400)
    SyntheticTeacher(root).run(progress=False)
    config = make_config(root, tmp_path_factory.mktemp("gpu_runs"), steps=STEPS, feature_warmup_steps=2,
                         refine_every=3, warmup_length=2, pixels_per_mask=8, rasterize_mode="antialiased",
                         sh_degree_interval=2)
    trainer, history = train(config, STEPS)
    return dict(config=config, trainer=trainer, history=history, calls=gpu_kernels_on_cpu)


def test_training_steps_with_densification(run):
    model = run["trainer"].pipeline.model
    calls = run["calls"]
    assert calls["rasterization"] >= STEPS and calls["triton"] > 0 and calls["cpu_kernel_rgb"] == 0, calls
    assert any("feature_loss" in h for h in run["history"])
    assert all(math.isfinite(v) for h in run["history"] for v in h.values())
    grown, pruned = calls.get("grown", []), calls.get("pruned", [])
    assert grown and pruned and sum(map(sum, grown)) + sum(pruned) > 0, (grown, pruned)  # densification changed N
    n = model.gauss_params["means"].shape[0]
    assert model.feature_supervised.shape == (n,) and model.feature_supervised.any()
    assert all(p.shape[0] == n for p in model.gauss_params.values())
    assert all(torch.isfinite(p).all() for p in model.gauss_params.values())


def test_resume_eval_query_and_viewer(run, tmp_path):
    from nerfstudio.scripts.eval import ComputePSNR

    from qrender_ns.workflows.query import Query, run_query

    config = run["config"]
    config.load_dir = config.get_checkpoint_dir()
    try:
        trainer, history = train(config, 2)
    finally:
        config.load_dir = None
    assert trainer._start_step == STEPS and all(math.isfinite(v) for h in history for v in h.values())

    before = dict(run["calls"])
    out = tmp_path / "metrics.json"
    ComputePSNR(load_config=config.get_base_dir() / "config.yml", output_path=out).main()
    metrics = json.loads(out.read_text())["results"]
    assert math.isfinite(metrics["psnr"]) and math.isfinite(metrics["feature_ms_quantile"])
    assert run["calls"]["rasterization"] > before["rasterization"] and run["calls"]["triton"] > before["triton"]

    summary = run_query(Query(load_config=config.get_base_dir() / "config.yml", text="chair",
                              output=tmp_path / "chair.ply", threshold=0.0))
    assert summary["num_gaussians"] > 0 and len(summary["relevancy_pngs"]) == 1

    model = trainer.pipeline.model
    model.eval()
    try:
        camera, _ = trainer.pipeline.datamanager.fixed_indices_eval_dataloader[0]
        model.set_query("chair")
        outputs = model.get_outputs_for_camera(camera)
    finally:
        model.train()
    assert outputs["relevancy"].shape == (*outputs["rgb"].shape[:2], 1)
    assert torch.isfinite(outputs["rgb"]).all() and torch.isfinite(outputs["features"]).all()
    assert run["calls"]["cpu_kernel_rgb"] == 0
