"""Scale (issue 27): the feature part of a training step at 1e5 .. 3e6 Gaussians, today's path vs the row-sparse one.

Writes benchmarks/results/scale_cpu.json and prints a table. Each (path, N) runs in a fresh interpreter, one at a
time under the caller's `nice`, so its peak RSS (ru_maxrss) is its own:

    nice python benchmarks/bench_scale.py                              # N = 1e5, 1e6, 3e6 (guarded), both paths
    nice python benchmarks/bench_scale.py --num-gaussians 1e5 --paths dense

Scene: bench_rasterize's synthetic frustum (~64 Gaussians' 3-sigma footprints per pixel whatever N), one 640x480
view, 10,240 pixels sampled from 40 teacher-mask blobs (256 per mask), K = 10, the paper's contrastive loss.

Paths (both mirror what QSplatModel does per step for a table head):
- dense (today, cf5b224): a float32 [N, 512] nn.Parameter, rasterize_to_pixels(pixel_ids) forward + backward
  (a dense [N, 512] gradient), the supervised flag from grad.abs().amax(-1) > 0, torch.optim.Adam(eps=1e-15), grads
  set to None (nerfstudio's zero_grad).
- gsnet / gsnet_rows: the GS-Net head (default architecture, torch sparse-conv backend, float32, Adam on the
  network): all N features predicted and rendered densely every step (gsnet, --pipeline.model.gsnet-predict-rows
  False), or the U-Net on every voxel and the per-Gaussian head for the rows the pixels select only
  (gsnet_rows, the default; rasterize_pixels_of_rows). The scene's means are bench_rasterize's, in metres;
  voxel edge GSNET_VOXEL.
- sparse (new): the table as QSplatModel stores it (bfloat16 by default), rasterize_to_pixels(pixel_ids,
  sparse_grad=True) (a row-sparse gradient of the touched rows), the flag from the gradient's row ids,
  RowSparseAdam (per-row step counts, moments as configured) updating the touched rows only.

Bytes per Gaussian = (peak RSS of the child - its RSS high-water mark before the feature table existed) / N: the
scene geometry, projection and tile lists are not counted, everything the feature part adds (table, optimiser
state, gradients, the step's temporaries) is. Step time: min and median of `--repeats` steps after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CHANNELS, K, NUM_MASKS, PIXELS_PER_MASK = 512, 10, 40, 256
RESULTS = Path(__file__).resolve().parent / "results" / "scale_cpu.json"
# bytes per Gaussian the path needs, for the guard (measured at 1e5/1e6, rounded up), and the geometry's
GUARD_BYTES = {"dense": 13_000, "sparse": 2_500, "gsnet": 11_000, "gsnet_rows": 1_000}  # measured, rounded up
# GS-Net's voxel edge here: 0.2 m keeps its U-Net (O(voxels), bounded by the scene's volume, not by N; ~4k voxels
# in this frustum) cheap on CPU's torch sparse-conv backend, so the rows show what grows with N (the per-Gaussian
# head and its [N, 512] output). At the paper's 5 cm the U-Net alone took ~30 s a step at 2e4 Gaussians here.
GSNET_VOXEL = 0.2
GEOMETRY_BYTES = 700


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def load() -> str:
    return " ".join(os.getloadavg().__repr__().strip("()").split(", "))


def prepare(num_gs: int):
    from bench_rasterize import HEIGHT, TILE, WIDTH, make_scene
    from qrender_ns.render.binning import isect_offset_encode, isect_tiles
    from qrender_ns.render.projection import project_gaussians

    means, quats, scales, opac, viewmat, Kmat = make_scene(num_gs, torch.device("cpu"))
    radii, means2d, depths, conics = project_gaussians(means, quats, scales, viewmat, Kmat, WIDTH, HEIGHT)
    tw, th = math.ceil(WIDTH / TILE), math.ceil(HEIGHT / TILE)
    keys, ids = isect_tiles(means2d, radii, depths, TILE, tw, th)
    offsets = isect_offset_encode(keys, 1, tw, th)
    del means, quats, scales, radii, depths, keys
    geometry = (means2d.detach().contiguous(), conics.detach().contiguous())
    return geometry, opac[None].contiguous(), offsets, ids, (WIDTH, HEIGHT, TILE)


def teacher_masks(width, height, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(NUM_MASKS, 2, generator=gen) * torch.tensor([width, height])
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    grid = torch.stack([xs, ys], -1).reshape(-1, 1, 2).float()
    mask_ids = (grid - centres).norm(dim=-1).argmin(-1).reshape(height, width)
    return mask_ids, torch.randn(NUM_MASKS, CHANNELS, generator=gen)


def child(path: str, num_gs: int, repeats: int, precision: str, moments: str) -> dict:
    """One (path, N) in this fresh process: {peak_rss, bytes_per_gaussian, step times, ...}."""
    from qrender_ns.features.losses import paper_contrastive_loss, sample_mask_pixels
    from qrender_ns.render import rasterize_to_pixels

    torch.manual_seed(0)
    (means2d, conics), opac, offsets, ids, (width, height, tile) = prepare(num_gs)
    mask_ids, embeddings = teacher_masks(width, height)
    gens = [torch.Generator().manual_seed(s) for s in range(repeats + 1)]
    samples = [sample_mask_pixels(mask_ids, PIXELS_PER_MASK, g) for g in gens]
    geometry_rss = maxrss_bytes()
    t_setup = time.perf_counter()
    if path == "dense":
        table = torch.nn.Parameter(torch.randn(num_gs, CHANNELS) * 0.1)
        opt = torch.optim.Adam([table], lr=0.01, eps=1e-15)
        supervised = torch.zeros(num_gs, dtype=torch.bool)

        def step(pixels, targets):
            out, _ = rasterize_to_pixels(means2d, conics, table, opac, width, height, tile, offsets, ids,
                                         num_quantiles=K, validate_values=False, pixel_ids=pixels)
            paper_contrastive_loss(out, targets, embeddings).backward()
            opt.step()
            supervised.__ior__(table.grad.detach().abs().amax(dim=-1) > 0)  # the model's flag
            opt.zero_grad(set_to_none=True)
            return 0
    elif path in ("gsnet", "gsnet_rows"):
        from bench_rasterize import make_scene
        from qrender_ns.gsnet.gsnet import GSNet, GSNetConfig
        from qrender_ns.render import rasterize_pixels_of_rows

        means = make_scene(num_gs, torch.device("cpu"))[0]
        colors = torch.rand(num_gs, 3, generator=torch.Generator().manual_seed(1))
        gs_opac = opac.reshape(-1)
        net = GSNet(GSNetConfig(backend="torch", feature_dim=CHANNELS, voxel_size=GSNET_VOXEL))
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        touched_count = [0]

        def step(pixels, targets):  # what QSplatModel does per step with feature_head=gsnet
            if path == "gsnet":  # all N features, the dense sampled-pixel render of them (gsnet_predict_rows off)
                table = net(means, colors, gs_opac)
                out, _ = rasterize_to_pixels(means2d, conics, table, opac, width, height, tile, offsets, ids,
                                             num_quantiles=K, validate_values=False, pixel_ids=pixels)
            else:  # the rows the pixels select only

                def features_of(rows):
                    touched_count[0] = int(rows.numel())
                    return net(means, colors, gs_opac, rows=rows)

                out, _ = rasterize_pixels_of_rows(means2d, conics, features_of, opac, width, height, tile, offsets,
                                                  ids, pixels, K)
            paper_contrastive_loss(out, targets, embeddings).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return touched_count[0]
    else:
        from qrender_ns.method.sparse_adam import RowSparseAdam, feature_table
        from qrender_ns.method.sparse_adam import touched_rows

        table = feature_table(num_gs, CHANNELS, precision)
        opt = RowSparseAdam([table], lr=0.01, eps=1e-15, moments=moments)
        supervised = torch.zeros(num_gs, dtype=torch.bool)

        def step(pixels, targets):
            out, _ = rasterize_to_pixels(means2d, conics, table, opac, width, height, tile, offsets, ids,
                                         num_quantiles=K, validate_values=False, pixel_ids=pixels, sparse_grad=True)
            paper_contrastive_loss(out, targets, embeddings).backward()
            opt.step()
            rows = touched_rows(table.grad)
            supervised[rows] = True
            opt.zero_grad(set_to_none=True)
            return int(rows.numel())
    setup_s = time.perf_counter() - t_setup
    touched = step(*samples[0])  # warm-up: the optimiser state exists from here on
    times = []
    for pixels, targets in samples[1:]:
        t0 = time.perf_counter()
        touched = step(pixels, targets)
        times.append(time.perf_counter() - t0)
    peak = maxrss_bytes()
    times.sort()
    if path.startswith("gsnet"):
        precision, moments = "float32 (GS-Net output)", "float32 (torch.optim.Adam on the network)"
    return {"path": path, "num_gaussians": num_gs, "precision": precision if path != "dense" else "float32",
            "moments": moments if path != "dense" else "float32 (torch.optim.Adam)",
            "peak_rss_gib": peak / 2**30, "geometry_rss_gib": geometry_rss / 2**30,
            "feature_bytes_per_gaussian": (peak - geometry_rss) / num_gs,
            "step_s_min": times[0], "step_s_median": times[len(times) // 2], "steps_timed": len(times),
            "touched_rows_last_step": touched, "table_init_s": setup_s, "load_after": load()}


def run_child(path, num_gs, args) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--num-gaussians", str(num_gs), "--repeats", str(args.repeats),
           "--precision", args.precision, "--moments", args.moments]
    before = load()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"path": path, "num_gaussians": num_gs, "error": done.stderr[-2000:], "load_before": before}
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["load_before"] = before
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-gaussians", type=float, nargs="+", default=[1e5, 1e6, 3e6])
    parser.add_argument("--paths", nargs="+", default=["dense", "sparse"], choices=list(GUARD_BYTES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--moments", default="auto")
    parser.add_argument("--memory-cap-gib", type=float, default=10.0,
                        help="skip a run whose estimated peak exceeds this or MemAvailable - 2 GiB")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, int(args.num_gaussians[0]), args.repeats, args.precision, args.moments)))
        return
    rows = []
    previous = json.loads(args.output.read_text()) if args.output.is_file() else {}
    for num in args.num_gaussians:
        n = int(num)
        for path in args.paths:
            estimate = n * (GUARD_BYTES[path] + GEOMETRY_BYTES) + 0.6 * 2**30
            limit = min(args.memory_cap_gib * 2**30, mem_available_bytes() - 2 * 2**30)
            if estimate > limit:
                row = {"path": path, "num_gaussians": n, "skipped": (
                    f"estimated peak {estimate / 2**30:.1f} GiB > limit {limit / 2**30:.1f} GiB (cap "
                    f"{args.memory_cap_gib} GiB, MemAvailable - 2 GiB; machine shared)")}
            else:
                row = run_child(path, n, args)
            print(json.dumps(row), flush=True)
            rows.append(row)
    keep = [r for r in previous.get("rows", []) if (r["path"], r["num_gaussians"], r.get("precision")) not in
            {(r2["path"], r2["num_gaussians"], r2.get("precision")) for r2 in rows}]
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "note": "2-core VM shared with other jobs; load averages recorded per run"},
              "setup": {"width": 640, "height": 480, "pixels": NUM_MASKS * PIXELS_PER_MASK, "num_quantiles": K,
                        "channels": CHANNELS},
              "rows": keep + rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
