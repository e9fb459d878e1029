"""Issue 28 items 1-2, measured: the round trip (q-splat run -> `ns-export gaussian-splat` / `qsplat export` ->
`--pipeline.model.gaussians-ply`) held-out PSNR before any step, and the time per training step of features-only
training on loaded Gaussians vs full training, on the same generated room (CPU).

    PYTHONPATH=. python benchmarks/bench_ply_io.py [--steps 200] [--size 96 72] [--images 16] [--timed 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from nerfstudio.engine.callbacks import TrainingCallbackLocation
    from nerfstudio.scripts import exporter

    from qrender_ns.data.scene_generator import generate_scene
    from qrender_ns.teachers.synthetic import SyntheticTeacher
    from qrender_ns.workflows.export import run_export
    from qrender_ns.workflows.options import Export
    from test_method import make_config
    from test_ply_io import heldout_psnr

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--size", type=int, nargs=2, default=(96, 72))
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--timed", type=int, default=15, help="steps timed per mode (median)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_ply_io_"))
    root = tmp / "room"
    generate_scene(root, layout="scannet", seed=2, num_images=args.images, width=args.size[0], height=args.size[1],
                   num_eval=2)
    SyntheticTeacher(root).run(progress=False)

    def setup(config):
        config.save_config()
        trainer = config.setup(local_rank=0, world_size=1)
        trainer.setup()
        return trainer

    def steps(trainer, first, count):
        times = []
        for step in range(first, first + count):
            t0 = time.perf_counter()
            for cb in trainer.callbacks:
                cb.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
            trainer.train_iteration(step)
            for cb in trainer.callbacks:
                cb.run_callback_at_location(step, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
            times.append(time.perf_counter() - t0)
        return times

    model_opts = dict(refine_every=100, warmup_length=100, sh_degree_interval=50)
    config = make_config(root, tmp / "runs", args.steps, **model_opts)
    trainer = setup(config)
    steps(trainer, 0, args.steps)
    full = steps(trainer, args.steps, args.timed)  # full training (features on, densification on schedule)
    trainer.save_checkpoint(args.steps + args.timed - 1)
    n_full = trainer.pipeline.model.num_points
    psnr = heldout_psnr(trainer.pipeline)
    config_path = config.get_base_dir() / "config.yml"
    exporter.ExportGaussianSplat(load_config=config_path, output_dir=tmp / "ns").main()
    run_export(Export(load_config=config_path, output=tmp / "ours" / "scene.ply"))
    out = {"scene": f"generated room, {args.images} images {args.size[0]}x{args.size[1]}", "steps": args.steps,
           "num_gaussians": n_full, "psnr_run": psnr}
    for name, ply, frame in (("ns_export", tmp / "ns" / "splat.ply", "auto"), ("qsplat_export", tmp / "ours" / "scene.ply", "auto")):
        back = setup(make_config(root, tmp / name, 1, gaussians_ply=ply, gaussians_ply_frame=frame, **model_opts))
        out[f"psnr_{name}_before_any_step"] = heldout_psnr(back.pipeline)
        if name == "qsplat_export":
            steps(back, 0, 3)  # warm-up
            frozen = steps(back, 3, args.timed)
    out["full_step_s_median"] = statistics.median(full)
    out["features_only_step_s_median"] = statistics.median(frozen)
    out["speedup"] = out["full_step_s_median"] / out["features_only_step_s_median"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
