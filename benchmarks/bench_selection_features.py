"""3D selection with features smoothed in 3D by their supervision (issue 30 item 4), before / after, on held-out
generated rooms: the same trained runs evaluated with `--selection-knn 0` (the 'wins' rule on each Gaussian's own
feature, the state before) and the default `--selection-knn 32`.

ScanNet-layout rooms (bench_selection.py's training: 12 images, 300 CPU steps, synthetic teacher): eval-scannet's
3D selection precision / recall / IoU per class and mean, and its per-Gaussian argmax mIoU (unchanged by the
selection). Nerfstudio-layout rooms (128x96, 2 eval views): eval-lerf-ovs's 2D protocol and the opengaussian-3d
protocol with both settings. Writes benchmarks/results/selection_features.json.

    PYTHONPATH=. python benchmarks/bench_selection_features.py --seeds 11 12 13 14 --lerf-seeds 11 12 --work /tmp/sel3d
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_selection import _bin, _run, train_room  # noqa: E402
from qrender_ns.eval import write_text  # noqa: E402  (atomic)

KNNS = (0, 32)


def evaluate_scannet(config: Path, out: Path, knn: int) -> dict:
    _run([_bin("qsplat"), "eval-scannet", "--load-config", config, "--classes", "scene", "--output", out,
          "--selection", "wins", "--selection-knn", knn, "--no-timing", "--no-supervision-diagnostic"])
    return json.loads((out / "scannet3d_scene.json").read_text())


def train_lerf_room(seed: int, work: Path, steps: int, images: int, warmup: int) -> Path:
    room = work / f"ns{seed}"
    configs = sorted((room / "outputs").glob("*/q-splat/run/config.yml"))
    if configs and any((configs[0].parent / "nerfstudio_models").glob("*.ckpt")):
        return configs[0]
    _run([_bin("qsplat"), "make-scene", "--out", room / "scene", "--layout", "nerfstudio", "--seed", seed,
          "--num-images", images, "--width", 128, "--height", 96, "--num-eval", 2, "--overwrite"])
    _run([_bin("qsplat"), "extract-features", "--data", room / "scene", "--teacher", "synthetic"])
    _run([_bin("ns-train"), "q-splat", "--data", room / "scene", "--machine.device-type", "cpu", "--vis", "tensorboard",
          "--max-num-iterations", steps, "--pipeline.model.feature-warmup-steps", warmup,
          "--pipeline.model.num-downscales", "0", "--pipeline.model.num-quantiles", "10",
          "--output-dir", room / "outputs", "--timestamp", "run", "--steps-per-save", steps])
    return sorted((room / "outputs").glob("*/q-splat/run/config.yml"))[0]


def evaluate_lerf(config: Path, room: Path) -> dict:
    _run([_bin("qsplat"), "eval-lerf-ovs", "--load-config", config, "--output", room / "eval2d", "--no-save-png"])
    out = {"2d": json.loads((room / "eval2d" / "lerf_ovs_2d.json").read_text())}
    for knn in KNNS:
        folder = room / f"eval3d_knn{knn}"
        _run([_bin("qsplat"), "eval-lerf-ovs", "--load-config", config, "--protocol", "opengaussian-3d",
              "--selection-knn", knn, "--output", folder, "--no-save-png"])
        out[f"3d_knn{knn}"] = json.loads((folder / "lerf_ovs_3d.json").read_text())
    return out


def _sel(result: dict) -> dict:
    sel = result["selection_3d"]
    return {"precision": sel["precision"], "recall": sel["recall"], "iou": sel["iou"],
            "classes_selecting_nothing": sel["classes_selecting_nothing"],
            "per_class": {n: {k: v[k] for k in ("precision", "recall", "iou", "selected", "gt")}
                          for n, v in sel["per_class"].items() if v["gt"] > 0}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13, 14])
    parser.add_argument("--lerf-seeds", type=int, nargs="*", default=[11, 12])
    parser.add_argument("--work", type=Path, default=Path("/tmp/sel3d"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "selection_features.json")
    args = parser.parse_args()
    rooms = []
    for seed in args.seeds:
        config = train_room(seed, args.work, args.steps, args.images, args.warmup)
        runs = {knn: evaluate_scannet(config, args.work / f"room{seed}" / f"eval_knn{knn}", knn) for knn in KNNS}
        rooms.append({"seed": seed, "scene_miou_argmax_3d": runs[0]["miou"],
                      **{f"knn{knn}": _sel(r) for knn, r in runs.items()}})
    mean = {f"knn{knn}": {m: float(np.nanmean([r[f"knn{knn}"][m] for r in rooms])) for m in ("precision", "recall", "iou")}
            for knn in KNNS}
    classes = sorted({n for r in rooms for n in r["knn0"]["per_class"]})
    per_class = {n: {f"knn{knn}": {m: float(np.nanmean([r[f"knn{knn}"]["per_class"][n][m] for r in rooms
                                                        if n in r[f"knn{knn}"]["per_class"]]))
                                   for m in ("precision", "recall", "iou")} for knn in KNNS} for n in classes}
    lerf = []
    for seed in args.lerf_seeds:
        config = train_lerf_room(seed, args.work, args.steps, args.images, args.warmup)
        res = evaluate_lerf(config, args.work / f"ns{seed}")
        lerf.append({"seed": seed, "miou_2d": res["2d"]["miou"],
                     **{f"miou_3d_knn{knn}": res[f"3d_knn{knn}"]["miou"] for knn in KNNS},
                     **{f"acc25_3d_knn{knn}": res[f"3d_knn{knn}"]["macc"] for knn in KNNS},
                     "per_query_3d": {f"knn{knn}": [{k: q.get(k) for k in ("category", "frame", "iou", "selected_gaussians")}
                                                    for q in res[f"3d_knn{knn}"]["per_query"]] for knn in KNNS}})
    lerf_mean = {k: float(np.mean([r[k] for r in lerf])) for k in
                 ("miou_2d", *(f"miou_3d_knn{knn}" for knn in KNNS), *(f"acc25_3d_knn{knn}" for knn in KNNS))} if lerf else {}
    result = {"rooms": rooms, "mean_over_rooms": mean, "per_class_mean_over_rooms": per_class,
              "lerf_ovs": {"rooms": lerf, "mean": lerf_mean},
              "settings": {"steps": args.steps, "images": args.images, "feature_warmup_steps": args.warmup,
                           "layout": "scannet (lerf: nerfstudio 128x96, 2 eval views)", "teacher": "synthetic",
                           "classes": "scene", "knn": list(KNNS),
                           "knn_0": "the 'wins' rule on each Gaussian's own feature (before)",
                           "knn_32": "features smoothed over the 32 nearest Gaussians weighted by supervision (after)"}}
    write_text(args.out, json.dumps(result, indent=2))
    print(json.dumps({"mean_over_rooms": mean, "lerf_ovs": lerf_mean}, indent=2))


if __name__ == "__main__":
    main()
