"""A real `ns-train q-splat` at millions of Gaussians (issue 27): peak RSS and step time of features-only training.

The demo's generated room (seed 2, 24 images, synthetic teacher; made by bench_scale_demo_accuracy.py or
`qsplat make-scene` + `qsplat extract-features`) with N Gaussians loaded through `--pipeline.model.gaussians-ply`:
N points drawn on the room's mesh vertices (scene_vh_clean_2.ply, data frame) with 1 cm jitter, 1-2 cm scales,
random colours, opacity 0.5. Geometry is frozen (the loaded-PLY default), so the step is the RGB render (no
gradient) plus the feature part. Peak RSS of the whole ns-train process tree (`/usr/bin/time -v`, or ru_maxrss of
the children), step time from nerfstudio's per-step log (median of the logged iteration times).

    nice python benchmarks/bench_scale_train.py --scene /tmp/scale_demo/scene --num-gaussians 2e6 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results" / "scale_cpu.json"


def write_ply(scene: Path, num: int, out: Path) -> None:
    from plyfile import PlyData

    from qrender_ns.data.gaussian_ply import GaussianPly, write_gaussian_ply

    mesh = PlyData.read(str(scene / "scene_vh_clean_2.ply"))["vertex"]
    xyz = np.stack([mesh["x"], mesh["y"], mesh["z"]], -1).astype(np.float32)
    rng = np.random.default_rng(0)
    pick = rng.integers(0, xyz.shape[0], num)
    means = xyz[pick] + rng.normal(scale=0.01, size=(num, 3)).astype(np.float32)
    f = np.float32
    g = GaussianPly(means=means, sh_dc=rng.normal(scale=0.5, size=(num, 3)).astype(f),
                    sh_rest=np.zeros((num, 0, 3), f), opacity_logits=np.zeros(num, f),
                    log_scales=np.log(rng.uniform(0.01, 0.02, size=(num, 3))).astype(f),
                    quats_wxyz=np.tile(np.array([1, 0, 0, 0], f), (num, 1)), features=None)
    write_gaussian_ply(out, g)


def logged_step_times(text: str):
    """Iteration times (s) of nerfstudio's per-step table rows: "7 (35.00%)   2 s, 376.761 ms   ..." or "412.3 ms"."""
    out = {}  # the table is reprinted every step: one time per step number
    for step, cell in re.findall(r"^\s*(\d+) \(\s*[\d.]+%\)\s+((?:\d+ s, )?[\d.]+ (?:ms|s))", text, flags=re.M):
        if ", " in cell:
            sec, ms = cell.split(", ")
            out[int(step)] = float(sec.split()[0]) + float(ms.split()[0]) / 1000
        elif cell.endswith("ms"):
            out[int(step)] = float(cell.split()[0]) / 1000
        else:
            out[int(step)] = float(cell.split()[0])
    return [out[k] for k in sorted(out)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scene", type=Path, default=Path("/tmp/scale_demo/scene"))
    parser.add_argument("--num-gaussians", type=float, default=2e6)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--work", type=Path, default=Path("/tmp/scale_train"))
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--extra", nargs="*", default=[])
    args = parser.parse_args()
    num = int(args.num_gaussians)
    args.work.mkdir(parents=True, exist_ok=True)
    ply = args.work / f"gaussians_{num}.ply"
    if not ply.is_file():
        write_ply(args.scene, num, ply)
    runs = args.work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    cmd = [str(Path(sys.executable).with_name("ns-train")), "q-splat", "--data", str(args.scene),
           "--machine.device-type", "cpu", "--vis", "tensorboard", "--max-num-iterations", str(args.steps),
           "--pipeline.model.gaussians-ply", str(ply), "--pipeline.model.gaussians-ply-frame", "data",
           "--pipeline.model.num-downscales", "0", "--pipeline.model.num-quantiles", "10",
           "--pipeline.model.feature-warmup-steps", "0", "--output-dir", str(runs), "--timestamp", "big",
           "--steps-per-save", "100000", "--logging.steps-per-log", "1", *args.extra]
    load_before = os.getloadavg()
    start = time.perf_counter()
    log = args.work / "train.log"
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    text = log.read_text()
    times = logged_step_times(text)
    row = {"path": "ns-train q-splat (features only, loaded PLY)", "num_gaussians": num, "steps": args.steps,
           "returncode": done.returncode, "peak_rss_gib": peak / 2**30, "wall_s": wall,
           "step_s_median_logged": float(np.median(times)) if times else None,
           "step_s_min_logged": min(times) if times else None, "steps_logged": len(times),
           "options": cmd[2:], "load_before": load_before, "load_after": os.getloadavg()}
    if done.returncode != 0:
        row["error"] = text[-1500:]
    print(json.dumps(row), flush=True)
    result = json.loads(args.output.read_text()) if args.output.is_file() else {"rows": []}
    result["ns_train"] = [r for r in result.get("ns_train", []) if r["num_gaussians"] != num] + [row]
    args.output.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
