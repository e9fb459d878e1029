"""`qsplat demo` (what `make demo` runs): the whole user workflow on a generated scene, on CPU.

1. `qsplat make-scene`          a procedural room (ScanNet layout) with ground truth
2. `qsplat extract-features`    the synthetic teacher fills the teacher cache
3. `ns-train q-splat`           RGB + 512-D feature training on the CPU
4. `ns-eval`                    PSNR/SSIM + feature mIoU + dense/quantile timing -> JSON
5. `qsplat query --text chair`  3D selection PLY + relevancy PNGs
6. `qsplat eval-scannet`        the paper's ScanNet 3D protocol (19 classes) on the generated room
Each step is the real command a user would type; they are printed as they run.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List


def _bin(name: str) -> str:
    """The console script next to this interpreter (the venv's), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def _run(cmd: List[str], log: Path) -> float:
    """Run one step, showing its output (nerfstudio's progress table included) and logging it."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as handle:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in process.stdout:
            sys.stdout.write(line)
            handle.write(line)
        process.wait()
    if process.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"step failed (exit {process.returncode}): {shlex.join(cmd)}\n--- last lines of {log} ---\n{tail}")
    seconds = time.perf_counter() - t0
    print(f"  done in {seconds:.0f} s (log: {log})", flush=True)
    return seconds


def run_pipeline_demo(cfg) -> dict:
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    scene, runs, log = out / "scene", out / "outputs", out / "demo.log"
    log.write_text("")
    shutil.rmtree(runs / "scene" / "q-splat" / "demo", ignore_errors=True)
    qsplat = _bin("qsplat")
    timings = {}
    timings["make_scene"] = _run([qsplat, "make-scene", "--out", str(scene), "--layout", "scannet", "--seed",
                                  str(cfg.seed), "--num-images", str(cfg.num_images), "--overwrite"], log)
    timings["extract_features"] = _run([qsplat, "extract-features", "--data", str(scene), "--teacher", "synthetic"], log)
    timings["train"] = _run([
        _bin("ns-train"), "q-splat", "--data", str(scene), "--machine.device-type", "cpu", "--vis", "tensorboard",
        "--max-num-iterations", str(cfg.steps), "--pipeline.model.feature-warmup-steps", str(cfg.feature_warmup_steps),
        "--pipeline.model.num-downscales", "0", "--pipeline.model.num-quantiles", str(cfg.num_quantiles),
        "--output-dir", str(runs), "--timestamp", "demo", "--steps-per-save", str(cfg.steps),
    ], log)
    config = runs / "scene" / "q-splat" / "demo" / "config.yml"
    metrics_path, renders = out / "metrics.json", out / "renders"
    timings["eval"] = _run([_bin("ns-eval"), "--load-config", str(config), "--output-path", str(metrics_path),
                            "--render-output-path", str(renders)], log)
    query_ply = out / "query" / "chair.ply"
    timings["query"] = _run([qsplat, "query", "--load-config", str(config), "--text", "chair", "--output",
                             str(query_ply), "--cameras", "0", "1"], log)

    eval_dir = out / "eval"
    timings["eval_scannet"] = _run([qsplat, "eval-scannet", "--load-config", str(config), "--classes", "19",
                                    "--output", str(eval_dir)], log)
    scannet = json.loads((eval_dir / "scannet3d_19.json").read_text())

    results = json.loads(metrics_path.read_text())["results"]
    summary = dict(results=results, timings_s=timings, config=str(config), metrics=str(metrics_path),
                   scannet3d_19={k: scannet[k] for k in ("miou", "macc", "num_present_classes", "json", "markdown")},
                   renders=str(renders), query_ply=str(query_ply),
                   relevancy_pngs=sorted(str(p) for p in query_ply.parent.glob("*.png")))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary, cfg)
    return summary


def _print_summary(summary: dict, cfg) -> None:
    r = summary["results"]
    print("\n" + "=" * 78)
    print(f"q-splat demo: {cfg.steps} CPU training steps on a generated room "
          f"({summary['timings_s']['train']:.0f} s), held-out views:")
    print(f"  PSNR {r['psnr']:.2f} dB   SSIM {r['ssim']:.3f}" + (f"   LPIPS {r['lpips']:.3f}" if "lpips" in r else
                                                                   "   (LPIPS: no AlexNet weights offline)"))
    print(f"  2D mIoU of the class argmax of rendered 512-D features: {r['feature_miou']:.3f}")
    print(f"  512-D feature map: dense {r['feature_ms_dense']:.1f} ms, quantile (K={cfg.num_quantiles}) "
          f"{r['feature_ms_quantile']:.1f} ms -> x{r['feature_speedup_quantile_vs_dense']:.2f}; "
          f"cosine(quantile, dense) {r['feature_cosine_quantile_vs_dense']:.3f}")
    sc = summary["scannet3d_19"]
    print(f"  ScanNet 3D protocol (19 classes, {sc['num_present_classes']} in this room): mIoU {sc['miou']:.3f}  "
          f"mAcc {sc['macc']:.3f}  ({sc['markdown']})")
    print(f"  metrics JSON : {summary['metrics']}")
    print(f"  renders      : {summary['renders']}")
    print(f"  query 'chair': {summary['query_ply']}")
    for png in summary["relevancy_pngs"]:
        print(f"                 {png}")
    print(f"  trained model: {summary['config']}  (ns-viewer --load-config ... ; type a query)")
    print("=" * 78)
