"""3D selection rule, before / after, on held-out generated rooms (issue 30 item 3).

For each seed: `qsplat make-scene` (ScanNet layout, 12 images), `qsplat extract-features --teacher synthetic`, a
short CPU `ns-train q-splat` (the demo's command, fewer steps), then `qsplat eval-scannet --classes scene` with the
new default rule ("wins") and with `--selection absolute` (the old rule at 0.55 and its sweep). Writes the raw
per-room JSON and a summary to --out (benchmarks/results/selection_rule.json by default).

    PYTHONPATH=. python benchmarks/bench_selection.py --seeds 11 12 13 14 --work /tmp/sel
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

from qrender_ns.eval import write_text  # noqa: E402  (atomic)


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def _run(cmd) -> None:
    print("$ " + " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True)


def train_room(seed: int, work: Path, steps: int, images: int, warmup: int) -> Path:
    room = work / f"room{seed}"
    config = room / "outputs" / "scene" / "q-splat" / "run" / "config.yml"
    if config.is_file() and any((config.parent / "nerfstudio_models").glob("*.ckpt")):
        return config
    _run([_bin("qsplat"), "make-scene", "--out", room / "scene", "--layout", "scannet", "--seed", seed,
          "--num-images", images, "--overwrite"])
    _run([_bin("qsplat"), "extract-features", "--data", room / "scene", "--teacher", "synthetic"])
    _run([_bin("ns-train"), "q-splat", "--data", room / "scene", "--machine.device-type", "cpu", "--vis", "tensorboard",
          "--max-num-iterations", steps, "--pipeline.model.feature-warmup-steps", warmup,
          "--pipeline.model.num-downscales", "0", "--pipeline.model.num-quantiles", "10",
          "--output-dir", room / "outputs", "--timestamp", "run", "--steps-per-save", steps])
    return config


def evaluate(config: Path, out: Path, selection: str) -> dict:
    _run([_bin("qsplat"), "eval-scannet", "--load-config", config, "--classes", "scene", "--output", out,
          "--selection", selection, "--no-timing", "--no-supervision-diagnostic"])
    return json.loads((out / "scannet3d_scene.json").read_text())


def _row(sel: dict) -> dict:
    return {k: sel[k] for k in ("precision", "recall", "iou", "classes_selecting_nothing")}


def summarise(seed: int, wins: dict, absolute: dict) -> dict:
    old = absolute["selection_3d"]
    best = max(old["sweep"], key=lambda r: (np.nan_to_num(r["iou"]), r["threshold"]))
    new = wins["selection_3d"]
    return {"seed": seed, "scene_miou": wins["miou"],
            "wins": {**_row(new), "per_class": {n: {k: v[k] for k in ("precision", "recall", "iou", "selected", "gt")}
                                                for n, v in new["per_class"].items() if v["gt"] > 0}},
            "absolute_0.55": {"threshold": old["threshold"], **_row(old)},
            "absolute_best_sweep_by_iou": {"threshold": best["threshold"], **_row(best)},
            "absolute_sweep": [{"threshold": r["threshold"], **_row(r)} for r in old["sweep"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13, 14])
    parser.add_argument("--work", type=Path, default=Path("/tmp/sel"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "selection_rule.json")
    args = parser.parse_args()
    rooms = []
    for seed in args.seeds:
        config = train_room(seed, args.work, args.steps, args.images, args.warmup)
        wins = evaluate(config, args.work / f"room{seed}" / "eval_wins", "wins")
        absolute = evaluate(config, args.work / f"room{seed}" / "eval_absolute", "absolute")
        rooms.append(summarise(seed, wins, absolute))
    mean = {key: {m: float(np.nanmean([r[key][m] for r in rooms])) for m in ("precision", "recall", "iou")}
            for key in ("wins", "absolute_0.55", "absolute_best_sweep_by_iou")}
    result = {"rooms": rooms, "mean_over_rooms": mean,
              "settings": {"steps": args.steps, "images": args.images, "feature_warmup_steps": args.warmup,
                           "layout": "scannet", "teacher": "synthetic", "classes": "scene"}}
    write_text(args.out, json.dumps(result, indent=2))
    print(json.dumps(mean, indent=2))


if __name__ == "__main__":
    main()
