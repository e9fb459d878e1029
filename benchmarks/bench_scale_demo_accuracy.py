"""Accuracy of the row-sparse bf16 default against dense Adam / float32 on the demo scene (issue 27's target).

What `make demo` trains (qrender_ns/workflows/demo.py: a generated ScanNet-layout room, seed 2, 24 images, 500 CPU
steps, K = 10, synthetic teacher), once per variant from the same scene and teacher cache, then `ns-eval` (2D mIoU
`feature_miou` on the eval views, PSNR) and `qsplat eval-scannet --classes 19` (the paper's 3D protocol). Adds the
rows to benchmarks/results/scale_accuracy_cpu.json under "demo".

    nice python benchmarks/bench_scale_demo_accuracy.py --out /tmp/scale_demo
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "scale_accuracy_cpu.json"
VARIANTS = {
    "sparse_bf16_rowwise (default)": [],
    "dense_fp32_adam": ["--pipeline.model.sparse-feature-grad", "False", "--pipeline.model.feature-precision",
                        "float32"],
    "sparse_fp32_rowsparse_adam": ["--pipeline.model.feature-precision", "float32"],
}


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def run(cmd, log: Path) -> float:
    start = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/scale_demo"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "bench.log"
    scene = out / "scene"
    if not (out / "scene.done").is_file():
        run([_bin("qsplat"), "make-scene", "--out", str(scene), "--layout", "scannet", "--seed", "2",
             "--num-images", "24", "--overwrite"], log)
        run([_bin("qsplat"), "extract-features", "--data", str(scene), "--teacher", "synthetic"], log)
        (out / "scene.done").write_text("")
    rows = []
    for name in args.variants:
        tag = name.split(" ")[0]
        runs = out / f"runs_{tag}"
        shutil.rmtree(runs, ignore_errors=True)
        load_before = os.getloadavg()
        t_train = run([_bin("ns-train"), "q-splat", "--data", str(scene), "--machine.device-type", "cpu", "--vis",
                       "tensorboard", "--max-num-iterations", str(args.steps),
                       "--pipeline.model.feature-warmup-steps", "150", "--pipeline.model.num-downscales", "0",
                       "--pipeline.model.num-quantiles", "10", "--output-dir", str(runs), "--timestamp", "demo",
                       "--steps-per-save", str(args.steps), *VARIANTS[name]], log)
        config = runs / "scene" / "q-splat" / "demo" / "config.yml"
        metrics = out / f"metrics_{tag}.json"
        run([_bin("ns-eval"), "--load-config", str(config), "--output-path", str(metrics)], log)
        run([_bin("qsplat"), "eval-scannet", "--load-config", str(config), "--classes", "19", "--output",
             str(out / f"eval_{tag}")], log)
        results = json.loads(metrics.read_text())["results"]
        scannet = json.loads((out / f"eval_{tag}" / "scannet3d_19.json").read_text())
        row = {"variant": name, "options": VARIANTS[name], "steps": args.steps,
               "miou_2d": results.get("feature_miou"), "psnr": results.get("psnr"),
               "scannet19_miou": scannet["miou"], "scannet19_macc": scannet.get("macc"),
               "train_s": t_train, "load_before": load_before, "load_after": os.getloadavg()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    previous = json.loads(args.output.read_text()) if args.output.is_file() else {}
    keep = [r for r in previous.get("demo", []) if r["variant"] not in {r2["variant"] for r2 in rows}]
    previous["demo"] = keep + rows
    previous["demo_setup"] = ("make demo's scene and training (seed 2, 24 images, 500 steps, K=10, synthetic "
                              "teacher); miou_2d = ns-eval feature_miou, scannet19_miou = qsplat eval-scannet "
                              "--classes 19")
    args.output.write_text(json.dumps(previous, indent=1))


if __name__ == "__main__":
    main()
