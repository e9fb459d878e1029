"""GS-Net speed and memory on the CPU: forward, backward and feed-forward prediction per sparse-conv backend.

    python benchmarks/bench_gsnet.py [--sizes 100000 1000000] [--backends torch spconv] [--repeats 2]

Gaussians are sampled on the surfaces of a generated room (metric, walls + furniture, ~95 m^2 of
surface) with RGB, opacity U(0.1, 1) and small scales; GS-Net has its default configuration
(5 cm voxels, MinkUNet14A widths, 512-D output). Each (size, backend) runs in its own process so
that its peak resident memory (ru_maxrss) is its own. Times are the minimum over `repeats` runs
after one warm-up; "train_step_ms" = forward + backward of sum(features @ a random unit vector).
Writes benchmarks/results/gsnet_cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gaussians(num: int, seed: int = 0):
    import numpy as np
    import torch

    from qrender_ns.data.scene_generator import build_scene, sample_point_cloud

    cloud = sample_point_cloud(build_scene(seed), int(num * 1.3), seed)  # hidden points are dropped: oversample
    if len(cloud["xyz"]) < num:
        raise RuntimeError(f"sampled only {len(cloud['xyz'])} < {num} surface points")
    rng = np.random.default_rng(seed)
    keep = rng.permutation(len(cloud["xyz"]))[:num]  # a uniform subset (the cloud is ordered by surface)
    cloud = {k: v[keep] for k, v in cloud.items()}
    n = num
    return dict(means=torch.from_numpy(cloud["xyz"]), colors=torch.from_numpy(cloud["rgb"] / 255.0).float(),
                opacities=torch.from_numpy(rng.uniform(0.1, 1.0, n)).float(),
                scales=torch.from_numpy(rng.uniform(0.002, 0.02, (n, 3))).float(),
                quats=torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(n, 4))).float(), dim=-1))


VARIANTS = {"default": {}, "voxel_head": {"gaussian_mlp_channels": 0}}


def run_one(num: int, backend: str, repeats: int, variant: str = "default") -> dict:
    import torch

    from qrender_ns.gsnet import GSNet, GSNetConfig

    torch.manual_seed(0)
    inputs = _gaussians(num)
    net = GSNet(GSNetConfig(backend=backend, **VARIANTS[variant]))
    direction = torch.nn.functional.normalize(torch.randn(512), dim=0)

    def train_step():
        net.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = net(**inputs)
        t1 = time.perf_counter()
        (out @ direction).sum().backward()
        return t1 - t0, time.perf_counter() - t1, dict(net.last_stats)

    def predict():
        t0 = time.perf_counter()
        with torch.no_grad():
            net.eval()
            net(**inputs)
            net.train()
        return time.perf_counter() - t0

    train_step()  # warm-up (kernel-map code paths, allocator)
    forward, backward, stats = min((train_step() for _ in range(repeats)), key=lambda r: r[0] + r[1])
    pred = min(predict() for _ in range(repeats))
    return {
        "num_gaussians": int(inputs["means"].shape[0]), "backend": net.backend_name, "variant": variant,
        "num_voxels": int(stats["num_voxels"]), "voxelize_ms": 1000 * stats["voxelize_s"],
        "forward_ms": 1000 * forward, "backward_ms": 1000 * backward, "train_step_ms": 1000 * (forward + backward),
        "predict_ms": 1000 * pred, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters_m": sum(p.numel() for p in net.parameters()) / 1e6, "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6])
    parser.add_argument("--backends", nargs="+", default=None, help="default: every installed backend")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["default", "voxel_head"], choices=list(VARIANTS),
                        help="default: GSNetConfig(); voxel_head: gaussian_mlp_channels=0 (the paper's per-voxel head)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gsnet_cpu.json")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # internal: run one (size, backend, variant)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(int(float(args.one[0])), args.one[1], args.repeats, args.one[2])))
        return

    from qrender_ns.gsnet import available_backends

    backends = args.backends or available_backends()
    rows = []
    for variant in args.variants:
        for size in args.sizes:
            for backend in backends:
                cmd = [sys.executable, __file__, "--one", str(int(size)), backend, variant,
                       "--repeats", str(args.repeats)]
                result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if result.returncode != 0:
                    row = {"backend": backend, "variant": variant, "returncode": result.returncode,
                           "error": result.stderr[-2000:]}
                else:
                    row = json.loads(result.stdout.strip().splitlines()[-1])
                row["num_gaussians_requested"] = int(size)
                row["load_average_1min"] = os.getloadavg()[0]
                rows.append(row)
                print(json.dumps(row), flush=True)
    import torch

    report = {
        "benchmark": "GS-Net forward/backward on CPU (benchmarks/bench_gsnet.py)",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_at_end": os.getloadavg()},
        "config": "GSNetConfig() defaults: 5 cm voxels, centre sampling, MinkUNet14A (32 | 32 64 128 256 | "
                  "128 128 96 96), per-Gaussian MLP 32 + head 256 -> 512; variant voxel_head: "
                  "gaussian_mlp_channels=0 (head per voxel, gathered: the paper's form)",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
