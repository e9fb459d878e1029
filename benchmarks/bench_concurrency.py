"""Shared machines: wall time of demo trainings (`ns-train q-splat` on the demo scene, CPU) run
one alone vs N at once, under OpenMP's default waiting and under OMP_WAIT_POLICY=passive.

    qsplat make-scene --out /tmp/demo/scene --layout scannet --seed 2 --num-images 24
    qsplat extract-features --data /tmp/demo/scene --teacher synthetic
    python benchmarks/bench_concurrency.py --scene /tmp/demo/scene --steps 100

Writes benchmarks/results/concurrency_cpu.json. Each training uses torch's default thread count
(all cores) unless --threads is given; the feature loss starts at step --feature-warmup-steps.
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


def run_group(count: int, env: dict, args, out: Path) -> list:
    """Start `count` trainings at once; wall seconds of each."""
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
    parser.add_argument("--scene", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--feature-warmup-steps", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each training")
    parser.add_argument("--policies", nargs="+", default=["default", "passive"])
    parser.add_argument("--load", default="", help="machine load to record")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "concurrency_cpu.json")
    args = parser.parse_args()
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
        row = dict(omp_wait_policy=policy, steps=args.steps, alone_s=alone[0], concurrent=args.concurrent,
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
