"""What the depth loss (`--pipeline.model.depth-loss`) does: q-splat trained with and without it, same steps, on
generated rooms (exact depth, exact synthetic teacher). Per run: eval-image PSNR, depth error (metres, abs-rel),
Gaussian count and the ScanNet-19 protocol mIoU (`qsplat eval-scannet --classes 19`). Writes
benchmarks/results/depth_<device>.json:

    python benchmarks/bench_depth.py                               # 2 rooms x (off, 0.2), 240 CPU steps
    python benchmarks/bench_depth.py --mults 0.05 0.2 1.0 --seeds 2

Runs are sequential (one training at a time); each is nerfstudio's Trainer as in tests/test_method.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from qrender_ns.data.scene_generator import generate_scene  # noqa: E402
from qrender_ns.eval.scannet3d import EvalScannet, run_eval_scannet  # noqa: E402
from qrender_ns.teachers.synthetic import SyntheticTeacher  # noqa: E402
from test_method import make_config, train  # noqa: E402

KEYS = ("psnr", "ssim", "depth_mae_m", "depth_abs_rel", "feature_miou", "num_gaussians")


def run_one(scene: Path, out: Path, steps: int, mult: float) -> dict:
    """mult 0: depth loss off."""
    model = dict(depth_loss="off") if mult == 0 else dict(depth_loss="on", depth_loss_mult=mult)
    torch.manual_seed(0)
    start = time.perf_counter()
    config = make_config(scene, out, steps=steps, **model)
    trainer, history = train(config, steps)
    train_s = time.perf_counter() - start
    pipeline = trainer.pipeline
    pipeline.eval()
    metrics = pipeline.get_average_eval_image_metrics()
    miou = run_eval_scannet(EvalScannet(load_config=config.get_base_dir() / "config.yml", classes="19",
                                        output=out / "eval", timing=False, supervision_diagnostic=False),
                            pipeline=pipeline)
    row = {"depth_loss_mult": mult, "steps": steps, "train_s": round(train_s, 1),
           **{k: float(metrics[k]) for k in KEYS if k in metrics},
           "scannet19_miou": miou["miou"], "scannet19_macc": miou["macc"],
           "scannet19_present_classes": miou["num_present_classes"],
           "final_depth_loss": history[-1].get("depth_loss")}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--mults", type=float, nargs="+", default=[0.0, 0.2], help="0 = depth loss off")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--views", type=int, default=14)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out_path = args.out or Path(__file__).parent / "results" / f"depth_{device}.json"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            scene = Path(tmp) / f"room{seed}"
            generate_scene(scene, layout="scannet", seed=seed, num_images=args.views, width=args.width,
                           height=args.height, num_eval=2)
            SyntheticTeacher(scene).run(progress=False)
            for mult in args.mults:
                rows.append({"seed": seed, **run_one(scene, Path(tmp) / f"runs{seed}_{mult}", args.steps, mult)})
    result = {"benchmark": "depth loss on/off (generated scannet-layout rooms, exact synthetic teacher)",
              "device": device, "host": platform.node(), "threads": torch.get_num_threads(),
              "scene": {"width": args.width, "height": args.height, "views": args.views, "eval_views": 2},
              "runs": rows}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(result, indent=2))
    os.replace(tmp_path, out_path)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
