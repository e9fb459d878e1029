"""Accuracy of the table head's storage/optimiser variants (issue 27) on bench_scale's synthetic view.

A table is trained with the paper's contrastive loss against 40 teacher-mask blobs (random 512-D embeddings), 10,240
sampled pixels per step, K = 10, for `--steps` steps with each variant from the same initial table (rounded to the
variant's dtype), then the whole view is rendered from the gathered rows and every pixel classified by its most
similar embedding: 2D mIoU against the mask map, and the final loss. Writes benchmarks/results/scale_accuracy_cpu.json.

    nice python benchmarks/bench_scale_accuracy.py --num-gaussians 2e4 --steps 150
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import K, PIXELS_PER_MASK, prepare, teacher_masks  # noqa: E402
from qrender_ns.features.losses import paper_contrastive_loss, sample_mask_pixels  # noqa: E402
from qrender_ns.features.metrics import mean_class_iou  # noqa: E402
from qrender_ns.method.sparse_adam import RowSparseAdam  # noqa: E402
from qrender_ns.render import rasterize_to_pixels  # noqa: E402

VARIANTS = {  # name: (table dtype, sparse gradient, optimiser moments or None for torch.optim.Adam)
    "dense_fp32_adam (today)": (torch.float32, False, None),
    "sparse_fp32_rowsparse_adam_fp32": (torch.float32, True, "float32"),
    "sparse_bf16_moments_bf16": (torch.bfloat16, True, "bfloat16"),
    "sparse_bf16_m_bf16_v_rowwise (default)": (torch.bfloat16, True, "bfloat16-rowwise"),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-gaussians", type=float, default=2e4)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results" / "scale_accuracy_cpu.json")
    args = parser.parse_args()
    n = int(args.num_gaussians)
    (means2d, conics), opac, offsets, ids, (width, height, tile) = prepare(n)
    mask_ids, embeddings = teacher_masks(width, height)
    init = torch.randn(n, 512, generator=torch.Generator().manual_seed(0)) * 0.1
    rows = []
    for name, (dtype, sparse, moments) in VARIANTS.items():
        t0 = time.perf_counter()
        table = torch.nn.Parameter(init.to(dtype))
        opt = (torch.optim.Adam([table], lr=0.01, eps=1e-15) if moments is None
               else RowSparseAdam([table], lr=0.01, eps=1e-15, moments=moments))
        losses = []
        for step in range(args.steps):
            pixels, targets = sample_mask_pixels(mask_ids, PIXELS_PER_MASK, torch.Generator().manual_seed(step + 1))
            out, _ = rasterize_to_pixels(means2d, conics, table, opac, width, height, tile, offsets, ids,
                                         num_quantiles=K, validate_values=False, pixel_ids=pixels, sparse_grad=sparse)
            loss = paper_contrastive_loss(out, targets, embeddings)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        with torch.no_grad():
            full, alpha = rasterize_to_pixels(means2d, conics, table.float(), opac, width, height, tile, offsets, ids,
                                              num_quantiles=K, validate_values=False)
            pred = (F.normalize(full[0], dim=-1) @ F.normalize(embeddings, dim=-1).T).argmax(-1) + 1
            pred = torch.where(alpha[0, ..., 0] > 0, pred, torch.zeros_like(pred))
            miou = mean_class_iou(pred, mask_ids + 1)
        row = {"variant": name, "miou_2d": float(miou), "final_loss_mean_last10": sum(losses[-10:]) / 10,
               "seconds": time.perf_counter() - t0, "load": os.getloadavg()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.output.write_text(json.dumps({"num_gaussians": n, "steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
