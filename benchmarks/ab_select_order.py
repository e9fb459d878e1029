"""A/B of the selection walk's sample order (tile-major vs the sampler's vs random) at one N: python benchmarks/ab_select_order.py 3e6."""
import sys, time, math, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent)); sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_scale import prepare, teacher_masks, PIXELS_PER_MASK, K
from qrender_ns.features.losses import sample_mask_pixels
from qrender_ns.render import rows as R
n = int(float(sys.argv[1]))
(m2d, con), opac, offsets, ids, (W, H, T) = prepare(n)
mask_ids, _ = teacher_masks(W, H)
orig = R.tile_major_order
res = {"sorted": [], "unsorted": [], "random": []}
for rep in range(9):
    pix, _ = sample_mask_pixels(mask_ids, PIXELS_PER_MASK, torch.Generator().manual_seed(rep))
    for name in res:
        if name == "sorted":
            R.tile_major_order = orig
        elif name == "unsorted":
            R.tile_major_order = lambda p, *a: torch.arange(p.numel())
        else:
            R.tile_major_order = lambda p, *a: torch.randperm(p.numel(), generator=torch.Generator().manual_seed(0))
        t = time.perf_counter()
        R.select_pixels(m2d, con, opac, W, H, T, offsets, ids, pix, K, "cpu")
        res[name].append(time.perf_counter() - t)
for k, v in res.items():
    v = sorted(v[1:]); print(n, k, "min %.4f median %.4f" % (v[0], v[len(v)//2]))
