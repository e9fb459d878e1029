"""A real capture end to end: 11 photos of the Chateau de Sceaux with their COLMAP reconstruction (OPENCV
camera with strong radial distortion, 2832x2128 px; ../shared/data/sceaux_castle), trained the way a user
would: one `ns-train q-splat --data <scene>` that fills its own teacher cache (tiny random Grounded-SAM2 +
CLIP models: `--pipeline.datamanager.teacher-weights random-tiny`), then ns-eval, qsplat query and a viewer
render. The images are served downscaled by 16 and undistorted (cropped), and the teacher sees exactly those.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("open_clip", reason="open_clip_torch is not installed (the `teachers` extra)")
pytest.importorskip("sam2", reason="sam2 is not installed (the `teachers` extra)")

BIN = Path(sys.executable).parent
SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "sceaux_castle"
STEPS = 200
DOWNSCALE = 16
PROMPTS = "castle,tree,sky"


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    return env


def _run(args, timeout=1800):
    start = time.perf_counter()
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=_env(),
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{args[:3]} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result, time.perf_counter() - start


def copy_capture(dest: Path) -> Path:
    """The read-only capture copied (images + COLMAP model) so the test may write next to it."""
    if not (SOURCE / "colmap" / "sparse" / "0" / "cameras.bin").is_file():
        pytest.skip(f"the real capture is not at {SOURCE}")
    shutil.copytree(SOURCE, dest, ignore=shutil.ignore_patterns("qsplat_teacher"))
    for path in [dest, *dest.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)
    return dest


def train_command(scene: Path, out: Path, steps: int = STEPS):
    return [BIN / "ns-train", "q-splat", "--data", scene, "--output-dir", out, "--experiment-name", "castle",
            "--timestamp", "test", "--machine.device-type", "cpu", "--vis", "tensorboard",
            "--max-num-iterations", steps, "--steps-per-save", steps, "--steps-per-eval-image", 10 ** 6,
            "--steps-per-eval-all-images", 10 ** 6,
            "--pipeline.model.num-downscales", 0, "--pipeline.model.feature-warmup-steps", 60,
            "--pipeline.datamanager.teacher-weights", "random-tiny", "--pipeline.datamanager.prompts", PROMPTS,
            "qsplat-data", "--downscale-factor", DOWNSCALE]


@pytest.fixture(scope="module")
def castle_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("castle")
    scene = copy_capture(root / "sceaux_castle")
    out = root / "outputs"
    result, seconds = _run(train_command(scene, out))
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    config = out / "castle" / "q-splat" / "test" / "config.yml"
    assert config.is_file(), result.stdout[-3000:]
    print(f"\n[real capture] ns-train {STEPS} steps incl. teacher + start-up: {seconds:.1f} s, peak RSS {peak_mb:.0f} MB")
    progress = [line.strip() for line in result.stdout.splitlines() if "%)" in line]
    print("[real capture] nerfstudio's last progress rows (step, time per iteration, ...):", *progress[-2:], sep="\n  ")
    return dict(scene=scene, out=out, config=config, train_seconds=seconds, train_stdout=result.stdout)


def mean_colour_psnr(scene: Path) -> float:
    """PSNR of the held-out views predicted as the mean training colour (what a model that learnt nothing
    about the scene's layout scores): the bar a trained model must clear."""
    from qrender_ns.method.datamanager import QSplatDataManagerConfig
    from qrender_ns.data.dataparser import QSplatDataParserConfig

    dm = QSplatDataManagerConfig(dataparser=QSplatDataParserConfig(data=scene, downscale_factor=DOWNSCALE),
                                 teacher="none").setup(device="cpu", test_mode="val")
    mean = np.mean([d["image"].numpy().reshape(-1, 3).mean(0) for d in dm.cached_train], axis=0) / 255.0
    scores = []
    for data in dm.cached_eval:
        image = data["image"].numpy().astype(np.float64) / 255.0
        scores.append(-10 * math.log10(float(((image - mean) ** 2).mean())))
    return float(np.mean(scores))


def test_one_command_trains_a_real_capture_and_fills_its_teacher_cache(castle_run):
    from qrender_ns.teachers.cache import TeacherCache

    scene = castle_run["scene"]
    cache = TeacherCache(scene / "qsplat_teacher" / "grounded-sam2-clip")
    train_keys = [k for k in cache.keys()]
    assert len(train_keys) == 9 and all(k.startswith("images/100_71") for k in train_keys)  # 11 - 2 held out
    entry = cache.entry(train_keys[0])
    # 2832x2128 / 16 = 177x133, minus the undistortion crop: the teacher saw the served images
    assert (entry["width"], entry["height"]) != (177, 133) and 160 <= entry["width"] <= 177
    assert cache.teacher_info["clip"]["random_init"] is True
    assert "grounded-sam2-clip teacher: 9 images computed" in castle_run["train_stdout"].replace("\n", " ")

    # Training again finds the cache current: nothing is recomputed (the same code fills it, resumably).
    from qrender_ns.method.datamanager import QSplatDataManagerConfig
    from qrender_ns.data.dataparser import QSplatDataParserConfig

    files = sorted(p.name for p in cache.root.glob("*.npz"))
    QSplatDataManagerConfig(dataparser=QSplatDataParserConfig(data=scene, downscale_factor=DOWNSCALE),
                            teacher_weights="random-tiny", prompts=PROMPTS).setup(device="cpu", test_mode="val")
    assert sorted(p.name for p in cache.root.glob("*.npz")) == files


def test_ns_eval_psnr_clears_the_mean_colour_baseline(castle_run, tmp_path):
    out = tmp_path / "metrics.json"
    _run([BIN / "ns-eval", "--load-config", castle_run["config"], "--output-path", out])
    metrics = json.loads(out.read_text())["results"]
    baseline = mean_colour_psnr(castle_run["scene"])
    print(f"\n[real capture] held-out PSNR {metrics['psnr']:.2f} dB vs mean-colour baseline {baseline:.2f} dB, "
          f"SSIM {metrics['ssim']:.3f}")
    assert metrics["psnr"] > baseline + 3.0
    assert all(math.isfinite(metrics[k]) for k in ("psnr", "ssim", "feature_ms_dense", "feature_ms_quantile"))


def test_query_and_viewer_render_on_the_real_capture(castle_run, tmp_path):
    import torch

    from nerfstudio.utils.eval_utils import eval_setup

    ply = tmp_path / "castle.ply"
    result, _ = _run([BIN / "qsplat", "query", "--load-config", castle_run["config"], "--text", "castle",
                      "--output", ply, "--threshold", "0.0", "--cameras", "0"])
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert ply.is_file() and summary["num_selected"] > 0
    assert all(Path(p).is_file() for p in summary["relevancy_pngs"])

    _, pipeline, _, _ = eval_setup(castle_run["config"], test_mode="test")
    model = pipeline.model
    camera, batch = pipeline.datamanager.fixed_indices_eval_dataloader[0]
    model.set_query("castle")
    with torch.no_grad():
        outputs = model.get_outputs_for_camera(camera)
    assert outputs["rgb"].shape[:2] == batch["image"].shape[:2] and outputs["relevancy"].shape[-1] == 1
    assert torch.isfinite(outputs["relevancy"]).all()


@pytest.mark.slow
def test_real_demo_from_photos_through_ns_process_data(tmp_path):
    """`make real-demo`: plain photos -> ns-process-data (Debian's COLMAP) -> ns-train q-splat -> ns-eval."""
    if not (SOURCE / "images").is_dir():
        pytest.skip(f"the real capture is not at {SOURCE}")
    script = Path(__file__).resolve().parents[1] / "scripts" / "real_demo.sh"
    env = dict(_env(), OUT=str(tmp_path / "demo"), STEPS="300", QSPLAT_REAL_CAPTURE=str(SOURCE))
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=3600, env=env,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())["results"]
    assert metrics["psnr"] > 12.0 and (tmp_path / "demo" / "castle.ply").is_file()
