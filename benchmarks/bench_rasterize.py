"""Dense vs quantile feature rasterization: ms per frame, memory, and quantile error.

Writes benchmarks/results/rasterize_<device>.json and prints a table. Every ratio is measured
side by side in one run, on the same projected and binned Gaussians:

    python benchmarks/bench_rasterize.py                       # the full grid (slow on CPU)
    python benchmarks/bench_rasterize.py --num-gaussians 1e5 --channels 512 --quantiles 8

Scene: N Gaussians scattered in a view frustum (depth 2..6), sized so that every pixel is
covered by ~64 Gaussians' 3-sigma footprints whatever N, opacities U(0.05, 0.6).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qrender_ns.render import _backend, rasterize_to_pixels  # noqa: E402
from qrender_ns.render.binning import isect_offset_encode, isect_tiles  # noqa: E402
from qrender_ns.render.projection import project_gaussians  # noqa: E402

WIDTH, HEIGHT, TILE = 640, 480, 16


def make_scene(num_gs: int, device: torch.device, seed: int = 0, overlap: float = 64.0):
    gen = torch.Generator().manual_seed(seed)
    focal = 0.9 * WIDTH
    depth = 2 + 4 * torch.rand(num_gs, generator=gen)
    x = (torch.rand(num_gs, generator=gen) - 0.5) * WIDTH / focal * depth * 1.1
    y = (torch.rand(num_gs, generator=gen) - 0.5) * HEIGHT / focal * depth * 1.1
    means = torch.stack([x, y, depth], -1)
    # pi (3 sigma_px)^2 * N = overlap * W * H  ->  sigma_px, then to world units at its depth
    sigma_px = math.sqrt(overlap * WIDTH * HEIGHT / (num_gs * 9 * math.pi))
    scales = (sigma_px * depth / focal)[:, None] * (0.5 + torch.rand(num_gs, 3, generator=gen))
    quats = torch.randn(num_gs, 4, generator=gen)
    opacities = 0.05 + 0.55 * torch.rand(num_gs, generator=gen)
    viewmat = torch.eye(4)[None]
    K = torch.tensor([[focal, 0, WIDTH / 2], [0, focal, HEIGHT / 2], [0, 0, 1.0]])[None]
    return [t.to(device) for t in (means, quats, scales, opacities, viewmat, K)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up (first call also loads the kernel)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def peak_mem(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run(args):
    device = torch.device(args.device)
    results = []
    for num_gs in args.num_gaussians:
        means, quats, scales, opac, viewmat, K = make_scene(int(num_gs), device)
        t0 = time.perf_counter()
        radii, means2d, depths, conics = project_gaussians(means, quats, scales, viewmat, K, WIDTH, HEIGHT)
        tw, th = math.ceil(WIDTH / TILE), math.ceil(HEIGHT / TILE)
        keys, ids = isect_tiles(means2d, radii, depths, TILE, tw, th)
        offsets = isect_offset_encode(keys, 1, tw, th)
        sync(device)
        prep_ms = 1000 * (time.perf_counter() - t0)
        means2d, conics = means2d.detach().contiguous(), conics.detach().contiguous()
        opac2 = opac[None].expand(1, -1).contiguous()
        print(f"N={int(num_gs):>8}: {ids.numel() / (WIDTH * HEIGHT / TILE**2):.0f} Gaussians per tile, "
              f"projection+binning {prep_ms:.0f} ms", flush=True)
        for channels in args.channels:
            feats = torch.nn.functional.normalize(
                torch.randn(int(num_gs), channels, generator=torch.Generator().manual_seed(1)), dim=-1
            ).to(device)

            def render(k, features=feats):
                return rasterize_to_pixels(means2d, conics, features, opac2, WIDTH, HEIGHT, TILE,
                                           offsets, ids, num_quantiles=k, validate_values=False)

            def render_backward(k):
                f = feats.clone().requires_grad_()
                m = means2d.clone().requires_grad_()
                out, alpha = rasterize_to_pixels(m, conics, f, opac2, WIDTH, HEIGHT, TILE, offsets, ids,
                                                 num_quantiles=k, validate_values=False)
                (out.sum() + alpha.sum()).backward()

            dense, dense_alpha = render(None)
            blended = blend_counts(means2d, conics, feats[:, :1], opac2, offsets, ids, 0, device)
            normalised = dense / dense_alpha.clamp(min=1e-8)
            modes = [None] + list(args.quantiles)
            row = {}
            for k in modes:
                fwd = timed(lambda: render(k), device, args.repeats)
                do_bwd = args.backward or (channels == 512 and k in (None, 8))
                bwd = timed(lambda: render_backward(k), device, 1) if do_bwd else None
                entry = dict(num_gaussians=int(num_gs), channels=channels,
                             num_quantiles=k, mode="dense" if k is None else "quantile",
                             forward_ms=fwd, forward_backward_ms=bwd,
                             peak_mem_mib=peak_mem(lambda: render(k), device),
                             saved_for_backward_bytes_per_pixel=4 if k is None else 4 * (k + 1))
                if k is not None:
                    quant, quant_alpha = render(k)
                    mask = (quant_alpha[..., 0] > 0) & (dense_alpha[..., 0] > 0)
                    cos = torch.nn.functional.cosine_similarity(quant[mask], normalised[mask], dim=-1)
                    entry["mean_cosine_vs_normalised_dense"] = float(cos.mean()) if cos.numel() else None
                    entry["selected_pixel_fraction"] = float((quant_alpha > 0).float().mean())
                    selected = blend_counts(means2d, conics, feats[:, :1], opac2, offsets, ids, k, device)
                    entry["mean_selected_per_pixel"] = selected
                    entry["mean_blended_per_pixel_dense"] = blended
                    # Feature-work bound n C / (n + k C) from the measured mean counts.
                    entry["per_pixel_bound"] = blended * channels / (blended + selected * channels)
                    entry["speedup_vs_dense_forward"] = row[None]["forward_ms"] / fwd
                    if bwd and row[None]["forward_backward_ms"]:
                        entry["speedup_vs_dense_forward_backward"] = row[None]["forward_backward_ms"] / bwd
                row[k] = entry
                results.append(entry)
                print(f"  C={channels:>3} {'dense' if k is None else f'K={k}':>6}: fwd {fwd:9.1f} ms"
                      + (f"  fwd+bwd {bwd:9.1f} ms" if bwd else "")
                      + (f"  x{entry['speedup_vs_dense_forward']:.1f} vs dense"
                         f" (bound x{entry['per_pixel_bound']:.1f})"
                         f"  cos {entry['mean_cosine_vs_normalised_dense']:.4f}" if k else
                         f"  {blended:.1f} Gaussians blended per pixel"), flush=True)
            if device.type == "cuda" and args.gsplat:
                results.extend(bench_gsplat(means2d, conics, feats, opac2, offsets, ids, row, args, device))
    return results


def blend_counts(means2d, conics, feats, opac2, offsets, ids, k, device):
    """Mean number of Gaussians blended per pixel (dense) or selected (quantile K=k)."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    fwd = getattr(_backend.load_extension(with_cuda=kind == "cuda"), f"rasterize_forward_{kind}")
    out = fwd(means2d, conics, feats.contiguous(), opac2, None, WIDTH, HEIGHT, TILE, offsets, ids, k)
    return float(out[4].float().mean())


def bench_gsplat(means2d, conics, feats, opac2, offsets, ids, row, args, device):
    """gsplat's own CUDA rasterize_to_pixels with C channels, against our quantile kernel."""
    from gsplat import rasterize_to_pixels as gsplat_rasterize

    channels = feats.shape[-1]
    colors = feats[None].contiguous()
    ms = timed(lambda: gsplat_rasterize(means2d, conics, colors, opac2, WIDTH, HEIGHT, TILE, offsets, ids),
               device, args.repeats)
    out = dict(num_gaussians=feats.shape[0], channels=channels, mode="gsplat_dense", forward_ms=ms,
               peak_mem_mib=peak_mem(lambda: gsplat_rasterize(means2d, conics, colors, opac2, WIDTH, HEIGHT,
                                                              TILE, offsets, ids), device))
    for k, entry in row.items():
        if k is not None:
            entry["speedup_vs_gsplat_forward"] = ms / entry["forward_ms"]
    print(f"  C={channels:>3} gsplat: fwd {ms:9.1f} ms", flush=True)
    return [out]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-gaussians", type=float, nargs="+", default=[1e4, 1e5, 1e6])
    parser.add_argument("--channels", type=int, nargs="+", default=[3, 64, 512])
    parser.add_argument("--quantiles", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backward", action="store_true",
                        help="time forward+backward for every row (default: C=512, dense and K=8 only)")
    parser.add_argument("--no-gsplat", dest="gsplat", action="store_false",
                        help="on CUDA, skip gsplat's own rasterizer as a baseline")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = run(args)
    out = args.out or Path(__file__).parent / "results" / f"rasterize_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(width=WIDTH, height=HEIGHT, tile_size=TILE, device=args.device, torch=torch.__version__,
                threads=torch.get_num_threads(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
                max_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                timing="min over --repeats runs after one warm-up; forward+backward: one run",
                date=time.strftime("%Y-%m-%d"))
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
