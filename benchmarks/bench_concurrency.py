"""Shared machines: wall time of demo trainings (`ns-train q-splat` on the demo scene, CPU) run
one alone vs N at once, under OpenMP's default waiting and under OMP_WAIT_POLICY=passive.

    qsplat make-scene --out /tmp/demo/scene --layout scannet --seed 2 --num-images 24
    qsplat extract-features --data /tmp/demo/scene --teacher synthetic
    python benchmarks/bench_concurrency.py --scene /tmp/demo/scene --steps 100

    python benchmarks/bench_concurrency.py --proxy --seconds 30   # no nerfstudio: a step proxy

Writes benchmarks/results/concurrency_cpu.json. Each training uses torch's default thread count
(all cores) unless --threads is given; the feature loss starts at step --feature-warmup-steps.
--proxy runs, instead of ns-train, a loop of what a CPU training step does (RGB render 160x120
forward+backward with the kernel, the sampled-pixel 512-D feature loss, a few small torch ops)
for --seconds and reports steps per second: same OpenMP behaviour, no startup.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_cmd(scene: Path, out: Path, steps: int, warmup: int, tag: str):
    ns_train = Path(sys.executable).parent / "ns-train"
    return [str(ns_train), "q-splat", "--data", str(scene), "--machine.device-type", "cpu", "--vis", "tensorboard",
            "--max-num-iterations", str(steps), "--pipeline.model.feature-warmup-steps", str(warmup),
            "--pipeline.model.num-downscales", "0", "--output-dir", str(out), "--timestamp", tag,
            "--steps-per-save", str(steps * 10), "--logging.local-writer.enable", "False"]


def proxy_worker(seconds: float) -> None:
    """Training-step proxy: prints seconds per step after running for `seconds`."""
    import math

    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    from qrender_ns.features.losses import paper_contrastive_loss
    from qrender_ns.render import rasterize_to_pixels
    from scenes import make_scene

    scene = make_scene(num_cams=1, num_gs=3000, width=160, height=120, channels=4, seed=0)
    table = torch.nn.Parameter(torch.randn(3000, 512) * 0.1)
    colors = torch.nn.Parameter(torch.rand(3000, 4))
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 160 * 120, (2000,), generator=gen)
    targets = torch.randint(0, 20, (2000,), generator=gen)
    emb = torch.randn(20, 512, generator=gen)

    def step():
        means2d = scene.means2d.clone().requires_grad_()
        rgb, alpha = rasterize_to_pixels(means2d, scene.conics, colors, scene.opacities, 160, 120,
                                         scene.tile_size, scene.isect_offsets, scene.flatten_ids, backend="cpu")
        loss = (rgb - 0.5).abs().mean() + 0.1 * (1 - alpha).mean()
        feats, _ = rasterize_to_pixels(means2d.detach(), scene.conics, table, scene.opacities, 160, 120,
                                       scene.tile_size, scene.isect_offsets, scene.flatten_ids, num_quantiles=10,
                                       backend="cpu", pixel_ids=pixels)
        loss = loss + paper_contrastive_loss(feats, targets, emb)
        loss.backward()
        with torch.no_grad():  # optimiser-like small ops
            for p in (table, colors):
                p.add_(p.grad, alpha=-1e-3)
                p.grad = None
        return math.isfinite(float(loss))

    step()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        count += 1
    print((time.perf_counter() - t0) / max(count, 1))


def run_proxy_group(count: int, env: dict, args) -> list:
    """Start `count` proxy workers at once; seconds per step of each."""
    cmd = [sys.executable, __file__, "--worker", "--seconds", str(args.seconds)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(count)]
    return [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def run_group(count: int, env: dict, args, out: Path) -> list:
    """Start `count` trainings at once; wall seconds of each."""
    if args.proxy:
        return run_proxy_group(count, env, args)
    procs = []
    for i in range(count):
        log = open(out / f"train_{len(list(out.iterdir()))}_{i}.log", "w")
        cmd = train_cmd(args.scene, out / "runs", args.steps, args.feature_warmup_steps, f"c{count}_{i}_{time.time_ns()}")
        procs.append((time.perf_counter(), subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    walls = []
    for t0, proc, log in procs:
        code = proc.wait()
        log.close()
        if code != 0:
            raise SystemExit(f"training failed (exit {code}), see {log.name}")
        walls.append(time.perf_counter() - t0)
    return walls


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scene", type=Path, default=None, help="a generated scene with its teacher cache")
    parser.add_argument("--proxy", action="store_true", help="training-step proxy instead of ns-train")
    parser.add_argument("--seconds", type=float, default=30, help="--proxy: seconds each worker runs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--feature-warmup-steps", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each training")
    parser.add_argument("--policies", nargs="+", default=["default", "passive"])
    parser.add_argument("--load", default="", help="machine load to record")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "concurrency_cpu.json")
    args = parser.parse_args()
    if args.worker:
        return proxy_worker(args.seconds)
    if not args.proxy and args.scene is None:
        parser.error("--scene is required without --proxy")
    work = Path(tempfile.mkdtemp(prefix="qsplat_concurrency_"))
    results = []
    for policy in args.policies:
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        load0 = os.getloadavg()
        alone = run_group(1, env, args, work)
        together = run_group(args.concurrent, env, args, work)
        row = dict(omp_wait_policy=policy, mode="proxy s/step" if args.proxy else "ns-train wall s",
                   steps=None if args.proxy else args.steps, alone_s=alone[0], concurrent=args.concurrent,
                   concurrent_s=together, slowdown=max(together) / alone[0],
                   slowdown_per_training_vs_fair_share=max(together) / (alone[0] * args.concurrent),
                   loadavg_start=load0, loadavg_end=os.getloadavg())
        results.append(row)
        print(f"{policy}: alone {alone[0]:.0f} s, {args.concurrent} at once {', '.join(f'{t:.0f}' for t in together)} s"
              f" -> x{row['slowdown']:.2f} ({row['slowdown_per_training_vs_fair_share']:.2f} of the fair share)",
              flush=True)
    meta = dict(cpu_count=os.cpu_count(), threads=args.threads, scene=str(args.scene), load_note=args.load,
                date=time.strftime("%Y-%m-%d"),
                note="wall time of the whole ns-train process (startup included); a fair share of N at once is N x alone")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
