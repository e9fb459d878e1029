"""The workflow a user types, each step a real command in its own process (what `qsplat demo` runs):
make-scene, extract-features, ns-train q-splat (30 CPU steps), ns-eval, qsplat query, qsplat eval-scannet.
Part of `make test` and of `make test-compat`, where it runs against the package installed into a
nerfstudio environment at the oldest supported versions."""

import json
import math
import subprocess
import sys
from pathlib import Path

from PIL import Image
from plyfile import PlyData


def test_user_workflow_on_a_generated_scene(tmp_path):
    qsplat = Path(sys.executable).parent / "qsplat"
    proc = subprocess.run([str(qsplat), "demo", "--out", str(tmp_path), "--steps", "30", "--num-images", "8",
                           "--feature-warmup-steps", "10"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    results = summary["results"]
    # 30 steps from the seed point cloud: far from converged, but a real image and real features.
    assert math.isfinite(results["psnr"]) and results["psnr"] > 10, results
    assert 0 < results["feature_miou"] <= 1 and 0 < summary["scannet3d_19"]["miou"] <= 1, summary
    metrics = json.loads(Path(summary["metrics"]).read_text())
    assert metrics["results"]["num_gaussians"] > 0
    renders = sorted(Path(summary["renders"]).rglob("*.png")) + sorted(Path(summary["renders"]).rglob("*.jpg"))
    assert renders, "ns-eval wrote no renders"
    selection = PlyData.read(summary["query_ply"])["vertex"]
    assert 0 < selection.count < metrics["results"]["num_gaussians"]
    for png in summary["relevancy_pngs"]:
        with Image.open(png) as image:
            assert image.size[0] > 0 and image.getextrema() != ((0, 0), (0, 0), (0, 0))
