"""3D selection with features smoothed in 3D by their supervision (issue 30 item 4), before / after, on held-out
generated rooms: the same trained runs evaluated with `--selection-knn 0` (the 'wins' rule on each Gaussian's own
feature, the state before) and the default `--selection-knn 32`.

ScanNet-layout rooms (bench_selection.py's training: 12 images, 300 CPU steps, synthetic teacher): eval-scannet's
3D selection precision / recall / IoU per class and mean, and its per-Gaussian argmax mIoU (unchanged by the
selection). Nerfstudio-layout rooms (128x96, 2 eval views): eval-lerf-ovs's 2D protocol and the opengaussian-3d
protocol with both settings, and the same protocol with `--oracle-selection` (each category's ground-truth
Gaussians: the protocol's ceiling), so each room's gap 2D - 3D splits into (2D - oracle), what the protocol itself
imposes, and (oracle - ours), what the selection loses. Merges its keys into
benchmarks/results/selection_features.json (the file's other keys are kept).

    PYTHONPATH=. python benchmarks/bench_selection_features.py --seeds 11 12 13 14 --lerf-seeds 11 12 13 14 \
        --work /tmp/sel3d_v2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_selection import _bin, _run, train_room  # noqa: E402
from qrender_ns.eval import write_text  # noqa: E402  (atomic)

KNNS = (0, 32)


def _load(path: Path) -> dict:
    return {**json.loads(path.read_text()), "_loadavg": os.getloadavg()}


def evaluate_scannet(config: Path, out: Path, knn: int) -> dict:
    _run([_bin("qsplat"), "eval-scannet", "--load-config", config, "--classes", "scene", "--output", out,
          "--selection", "wins", "--selection-knn", knn, "--no-timing", "--no-supervision-diagnostic"])
    return _load(out / "scannet3d_scene.json")


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


def _lerf(config: Path, folder: Path, name: str, *options) -> dict:
    _run([_bin("qsplat"), "eval-lerf-ovs", "--load-config", config, "--output", folder, "--no-save-png", *options])
    return _load(folder / name)


def evaluate_lerf(config: Path, room: Path) -> dict:
    out = {"2d": _lerf(config, room / "eval2d", "lerf_ovs_2d.json")}
    for knn in KNNS:
        out[f"3d_knn{knn}"] = _lerf(config, room / f"eval3d_knn{knn}", "lerf_ovs_3d.json", "--protocol", "opengaussian-3d",
                                    "--selection-knn", knn)
    out["3d_oracle"] = _lerf(config, room / "eval3d_oracle", "lerf_ovs_3d_oracle.json", "--protocol", "opengaussian-3d",
                             "--oracle-selection")
    return out


def lerf_row(seed: int, res: dict) -> dict:
    row = {"seed": seed, "miou_2d": res["2d"]["miou"],
           **{f"miou_3d_knn{knn}": res[f"3d_knn{knn}"]["miou"] for knn in KNNS},
           "miou_3d_oracle": res["3d_oracle"]["miou"],
           **{f"acc25_3d_knn{knn}": res[f"3d_knn{knn}"]["macc"] for knn in KNNS},
           "acc25_3d_oracle": res["3d_oracle"]["macc"]}
    # the gap 2D - 3D(ours) = (2D - oracle): the protocol's own (silhouettes include the occluded parts the 2D masks
    # leave out, threshold 0.7, render filters) + (oracle - ours): what our selection loses
    row["gap_protocol_2d_minus_oracle"] = row["miou_2d"] - row["miou_3d_oracle"]
    for knn in KNNS:
        row[f"gap_2d_minus_3d_knn{knn}"] = row["miou_2d"] - row[f"miou_3d_knn{knn}"]
        row[f"gap_selection_oracle_minus_knn{knn}"] = row["miou_3d_oracle"] - row[f"miou_3d_knn{knn}"]
    keys = ("category", "frame", "iou", "selected_gaussians", "rendered_gaussians")
    row["per_query_3d"] = {name: [{k: q.get(k) for k in keys} for q in res[f"3d_{name}"]["per_query"]]
                           for name in (*(f"knn{knn}" for knn in KNNS), "oracle")}
    row["per_query_2d"] = [{k: q.get(k) for k in ("category", "frame", "iou")} for q in res["2d"]["per_query"]]
    row["loadavg_after_evals"] = res["3d_oracle"]["_loadavg"]
    return row


def _sel(result: dict) -> dict:
    sel = result["selection_3d"]
    return {"precision": sel["precision"], "recall": sel["recall"], "iou": sel["iou"],
            "classes_selecting_nothing": sel["classes_selecting_nothing"],
            "per_class": {n: {k: v[k] for k in ("precision", "recall", "iou", "selected", "gt")}
                          for n, v in sel["per_class"].items() if v["gt"] > 0}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13, 14])
    parser.add_argument("--lerf-seeds", type=int, nargs="*", default=[11, 12, 13, 14])
    parser.add_argument("--work", type=Path, default=Path("/tmp/sel3d"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "selection_features.json")
    args = parser.parse_args()
    start, load_start = time.time(), os.getloadavg()
    rooms = []
    for seed in args.seeds:
        t0 = time.time()
        config = train_room(seed, args.work, args.steps, args.images, args.warmup)
        runs = {knn: evaluate_scannet(config, args.work / f"room{seed}" / f"eval_knn{knn}", knn) for knn in KNNS}
        rooms.append({"seed": seed, "scene_miou_argmax_3d": runs[0]["miou"],
                      **{f"knn{knn}": _sel(r) for knn, r in runs.items()},
                      "seconds_this_pass": time.time() - t0, "loadavg_after": os.getloadavg()})
    mean = {f"knn{knn}": {m: float(np.nanmean([r[f"knn{knn}"][m] for r in rooms])) for m in ("precision", "recall", "iou")}
            for knn in KNNS}
    classes = sorted({n for r in rooms for n in r["knn0"]["per_class"]})
    per_class = {n: {f"knn{knn}": {m: float(np.nanmean([r[f"knn{knn}"]["per_class"][n][m] for r in rooms
                                                        if n in r[f"knn{knn}"]["per_class"]]))
                                   for m in ("precision", "recall", "iou")} for knn in KNNS} for n in classes}
    lerf = []
    for seed in args.lerf_seeds:
        t0 = time.time()
        config = train_lerf_room(seed, args.work, args.steps, args.images, args.warmup)
        lerf.append({**lerf_row(seed, evaluate_lerf(config, args.work / f"ns{seed}")), "seconds_this_pass": time.time() - t0})
    lerf_mean = {k: float(np.mean([r[k] for r in lerf])) for k in lerf[0]
                 if k.startswith(("miou_", "acc25_", "gap_"))} if lerf else {}
    command = " ".join(["benchmarks/bench_selection_features.py", *sys.argv[1:]])
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    load_end = os.getloadavg()
    result = {"status": f"measured with `{command}` on commit {commit} (a room already trained in --work is reused)",
              "uptime_during_runs": f"load average (1/5/15 min) {load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f} "
                                    f"at the start, {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f} at the end, "
                                    f"on {os.cpu_count()} cores; {time.time() - start:.0f} s wall",
              "rooms": rooms, "mean_over_rooms": mean, "per_class_mean_over_rooms": per_class,
              "lerf_ovs": {"rooms": lerf, "mean": lerf_mean},
              "run": {"command": command, "seconds": time.time() - start, "loadavg_start": load_start,
                      "loadavg_end": load_end, "cpus": os.cpu_count(), "commit": commit},
              "settings": {"steps": args.steps, "images": args.images, "feature_warmup_steps": args.warmup,
                           "layout": "scannet (lerf: nerfstudio 128x96, 2 eval views)", "teacher": "synthetic",
                           "classes": "scene", "knn": list(KNNS),
                           "knn_0": "the 'wins' rule on each Gaussian's own feature (before)",
                           "knn_32": "features smoothed over the 32 nearest Gaussians weighted by supervision (after)",
                           "oracle": "eval-lerf-ovs --oracle-selection: each category's ground-truth Gaussians (a "
                                     "diagnosis: the opengaussian-3d protocol's ceiling)"}}
    merged = json.loads(args.out.read_text()) if args.out.is_file() else {}
    merged.update(result)  # keys this script does not write (earlier validation-room work) are kept
    write_text(args.out, json.dumps(merged, indent=2))
    print(json.dumps({"mean_over_rooms": mean, "lerf_ovs": lerf_mean}, indent=2))


if __name__ == "__main__":
    main()
