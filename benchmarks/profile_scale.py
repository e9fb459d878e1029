"""Where the feature part of a row-sparse training step spends its time, stage by stage, at several N (issue 27).

    nice python benchmarks/profile_scale.py --num-gaussians 1e5 3e6     # -> benchmarks/results/profile_scale_cpu.json

Same scene and step as bench_scale.py's "sparse" path (640x480, 10,240 sampled pixels, K=10, 512-D bf16 table,
RowSparseAdam), run in one fresh child process per N, one after the other. The step is taken apart into the
stages rasterize_to_pixels(..., sparse_grad=True) runs (qrender_ns/render/rows.py), each timed on its own
(min over `--repeats` steps after a warm-up); the projection and the tile binning, which the RGB render computes
for every step anyway and the feature render shares, are timed once for reference ("shared_*").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results" / "profile_scale_cpu.json"


def child(num_gs: int, repeats: int) -> dict:
    import torch.nn.functional as F

    from bench_rasterize import HEIGHT, TILE, WIDTH, make_scene
    from bench_scale import CHANNELS, K, PIXELS_PER_MASK, teacher_masks
    from qrender_ns.features.losses import paper_contrastive_loss, sample_mask_pixels
    from qrender_ns.method.sparse_adam import RowSparseAdam, feature_table, touched_rows
    from qrender_ns.render import rows as R
    from qrender_ns.render.binning import isect_offset_encode, isect_tiles
    from qrender_ns.render.projection import project_gaussians
    from qrender_ns.render.validate import _check_pixel_ids, _check_pixel_inputs

    torch.manual_seed(0)
    means, quats, scales, opac, viewmat, Kmat = make_scene(num_gs, torch.device("cpu"))
    t0 = time.perf_counter()
    radii, means2d, depths, conics = project_gaussians(means, quats, scales, viewmat, Kmat, WIDTH, HEIGHT)
    t_proj = time.perf_counter() - t0
    tw, th = math.ceil(WIDTH / TILE), math.ceil(HEIGHT / TILE)
    t0 = time.perf_counter()
    keys, ids = isect_tiles(means2d, radii, depths, TILE, tw, th)
    offsets = isect_offset_encode(keys, 1, tw, th)
    t_bin = time.perf_counter() - t0
    means2d, conics, opac = means2d.detach().contiguous(), conics.detach().contiguous(), opac[None].contiguous()
    del means, quats, scales, radii, depths, keys
    mask_ids, embeddings = teacher_masks(WIDTH, HEIGHT)
    table = feature_table(num_gs, CHANNELS, "bfloat16")
    opt = RowSparseAdam([table], lr=0.01, eps=1e-15)
    supervised = torch.zeros(num_gs, dtype=torch.bool)
    kind = "cpu"
    stats = {}

    def clock(name, fn):
        t = time.perf_counter()
        out = fn()
        stats.setdefault(name, []).append(time.perf_counter() - t)
        return out

    walked = []
    for rep in range(repeats + 1):
        pixels, targets = sample_mask_pixels(mask_ids, PIXELS_PER_MASK, torch.Generator().manual_seed(rep))
        t_all = time.perf_counter()
        pix = clock("validate", lambda: (_check_pixel_inputs(means2d, conics, table, opac, WIDTH, HEIGHT, TILE,
                                                             offsets, ids, None, False, half_features=True),
                                         _check_pixel_ids(pixels, HEIGHT * WIDTH, means2d.device))[1])
        gid = clock("select", lambda: R.select_pixels(means2d, conics, opac, WIDTH, HEIGHT, TILE, offsets, ids, pix,
                                                      K, kind))
        weights, norm = clock("weights", lambda: R.pixel_weights(means2d, conics, opac, WIDTH, HEIGHT, pix, gid))

        def blend():
            if hasattr(R, "blend_selected"):  # the product's blend (the fused C++ one on the CPU since 2026-12-07)
                return R.blend_selected(table, gid, weights, num_gs, means2d.dtype, kind)
            valid = gid >= 0  # the blend before it (as rows.py had it inline)
            rows = torch.where(valid, gid % num_gs, torch.zeros_like(gid))
            touched, inverse = torch.unique(rows[valid], sorted=True, return_inverse=True)
            slot = torch.zeros_like(rows)
            slot[valid] = inverse
            gathered = R.gather_rows(table, touched, means2d.dtype)
            return F.embedding_bag(slot, gathered, per_sample_weights=weights.to(gathered.dtype), mode="sum")

        out = clock("unique_gather_blend", blend)
        loss = clock("loss", lambda: paper_contrastive_loss(out, targets, embeddings))
        clock("backward", loss.backward)
        clock("optimizer_step", opt.step)
        clock("supervised_flag", lambda: supervised.__setitem__(touched_rows(table.grad), True))
        num_touched = int(touched_rows(table.grad).numel())
        clock("zero_grad", lambda: opt.zero_grad(set_to_none=True))
        stats.setdefault("total", []).append(time.perf_counter() - t_all)
        # entries of the sampled pixels' tile lists (an upper bound on what the walk reads)
        tiles = (pix // WIDTH // TILE) * tw + (pix % WIDTH) // TILE
        flat = offsets.reshape(-1).long()
        ends = torch.cat([flat[1:], torch.tensor([ids.numel()])])
        walked.append(int((ends[tiles] - flat[tiles]).sum()))
    result = {"num_gaussians": num_gs, "intersections": int(ids.numel()),
              "mean_tile_list_at_samples": walked[-1] / pixels.numel(),
              "shared_projection_s": t_proj, "shared_binning_s": t_bin,
              "touched_rows": num_touched,
              "stages_s_min": {k: min(v[1:]) for k, v in stats.items()},
              "stages_s_median": {k: sorted(v[1:])[len(v[1:]) // 2] for k, v in stats.items()},
              "load": os.getloadavg()}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-gaussians", type=float, nargs="+", default=[1e5, 3e6])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--label", default="current")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.num_gaussians[0]), args.repeats)))
        return
    rows = []
    for num in args.num_gaussians:
        cmd = [sys.executable, __file__, "--child", "--num-gaussians", str(num), "--repeats", str(args.repeats)]
        before = os.getloadavg()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["load_before"], row["label"] = before, args.label
        print(json.dumps(row), flush=True)
        rows.append(row)
    previous = json.loads(args.output.read_text()) if args.output.is_file() else {"rows": []}
    keep = [r for r in previous["rows"] if r.get("label") != args.label]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"rows": keep + rows}, indent=1))


if __name__ == "__main__":
    main()
