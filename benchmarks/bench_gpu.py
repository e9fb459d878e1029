"""GPU benchmark: our Triton and CUDA rasterizers against gsplat's `rasterize_to_pixels`.

Writes benchmarks/results/gpu_<gpu name>.json and prints a table. All rows of one run share the
projected and binned Gaussians (bench_rasterize.make_scene: 640x480, ~64 overlapping 3-sigma
footprints per pixel, opacities U(0.05, 0.6)); each ratio is measured side by side:

    python benchmarks/bench_gpu.py                            # 1e5 and 1e6 Gaussians, C = 512
    python benchmarks/bench_gpu.py --backends triton --num-gaussians 1e5 --no-gsplat

Rows: forward ms and forward+backward ms (CUDA events: median of --repeats after a warm-up)
and peak memory of dense and quantile rendering per backend, gsplat's dense blending at the same
C (in channel chunks of 32, as gsplat.rasterization does), Triton's query space (cosines against Q queries, the [H, W, C] map never written), and the peak memory of one feature training step (projection + binning + Q-Render + cosine
loss + backward). Backends that cannot run here (no CUDA toolkit for our CUDA kernel, gsplat not
built) are recorded as skipped with the reason, not silently left out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_rasterize import HEIGHT, TILE, WIDTH, make_scene  # noqa: E402
from qrender_ns.render import rasterize_to_pixels  # noqa: E402
from qrender_ns.render.binning import isect_offset_encode, isect_tiles  # noqa: E402
from qrender_ns.render.projection import _project_torch, _quat_scale_to_covar  # noqa: E402


def cuda_ms(fn, repeats):
    """Median milliseconds of `fn` over `repeats` runs after one warm-up (JIT, autotune, caches)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def project_and_bin(means, quats, scales, viewmat, K):
    """gsplat's projection math in torch (not its CUDA op: the rasterizer rows must not depend on
    gsplat's JIT build, which --no-gsplat skips), then our binning."""
    radii, means2d, depths, conics, _ = _project_torch(means, _quat_scale_to_covar(quats, scales), viewmat, K,
                                                       WIDTH, HEIGHT, 0.01, 1e10, 0.3)
    tw, th = math.ceil(WIDTH / TILE), math.ceil(HEIGHT / TILE)
    keys, ids = isect_tiles(means2d, radii, depths, TILE, tw, th)
    return means2d, conics, isect_offset_encode(keys, 1, tw, th), ids


def bench_backend(backend, means2d, conics, feats, opac2, offsets, ids, k, repeats):
    def render(m=means2d, f=feats):
        return rasterize_to_pixels(m, conics, f, opac2, WIDTH, HEIGHT, TILE, offsets, ids, num_quantiles=k,
                                   backend=backend, validate_values=False)

    def render_backward():
        f = feats.clone().requires_grad_()
        m = means2d.clone().requires_grad_()
        out, alpha = render(m, f)
        (out.sum() + alpha.sum()).backward()

    out, alpha = render()
    return dict(forward_ms=cuda_ms(render, repeats), forward_backward_ms=cuda_ms(render_backward, max(1, repeats // 2)),
                peak_mem_forward_mib=peak_mib(render), peak_mem_forward_backward_mib=peak_mib(render_backward)), (out, alpha)


GSPLAT_CHANNEL_CHUNK = 32  # as gsplat.rasterization(channel_chunk=32): its backward at C=512 asks for 531 KB of
# shared memory in one block (an H100/H200 block gets 227 KB)


def bench_gsplat(means2d, conics, feats, opac2, offsets, ids, repeats):
    from gsplat import rasterize_to_pixels as gsplat_rasterize

    colors = feats[None].contiguous()

    def render(m=means2d, c=colors):
        chunks = [gsplat_rasterize(m, conics, c[..., i:i + GSPLAT_CHANNEL_CHUNK], opac2, WIDTH, HEIGHT, TILE, offsets,
                                   ids) for i in range(0, c.shape[-1], GSPLAT_CHANNEL_CHUNK)]
        return torch.cat([out for out, _ in chunks], dim=-1), chunks[0][1]

    def render_backward():
        c = colors.clone().requires_grad_()
        m = means2d.clone().requires_grad_()
        out, alpha = render(m, c)
        (out.sum() + alpha.sum()).backward()

    out, alpha = render()
    return dict(forward_ms=cuda_ms(render, repeats), forward_backward_ms=cuda_ms(render_backward, max(1, repeats // 2)),
                peak_mem_forward_mib=peak_mib(render), peak_mem_forward_backward_mib=peak_mib(render_backward)), (out, alpha)


def train_step_peak(backend, means, quats, scales, opac, viewmat, K, channels, k):
    """Peak memory of one feature training step: render C channels with K quantiles, cosine loss
    against random targets, backward to every Gaussian parameter."""
    leaves = [t.clone().requires_grad_() for t in (means, quats, scales)]
    logit = torch.logit(opac.clamp(1e-4, 1 - 1e-4)).clone().requires_grad_()
    feats = torch.randn(means.shape[0], channels, device=means.device, requires_grad=True)
    target = torch.nn.functional.normalize(torch.randn(HEIGHT, WIDTH, channels, device=means.device), dim=-1)

    def step():
        means2d, conics, offsets, ids = project_and_bin(leaves[0], leaves[1], leaves[2], viewmat, K)
        out, alpha = rasterize_to_pixels(means2d, conics, feats, torch.sigmoid(logit)[None], WIDTH, HEIGHT, TILE,
                                         offsets, ids, num_quantiles=k, backend=backend, validate_values=False)
        loss = 1 - torch.nn.functional.cosine_similarity(out[0], target, dim=-1).mean()
        loss.backward()

    step()  # warm-up
    return dict(train_step_peak_mib=peak_mib(step), train_step_ms=cuda_ms(step, 3))


def run(args):
    device = torch.device("cuda")
    results, skipped = [], {}
    for num_gs in args.num_gaussians:
        means, quats, scales, opac, viewmat, K = make_scene(int(num_gs), device)
        means2d, conics, offsets, ids = project_and_bin(means, quats, scales, viewmat, K)
        means2d, conics = means2d.detach().contiguous(), conics.detach().contiguous()
        opac2 = opac[None].contiguous()
        print(f"N={int(num_gs):>8}: {ids.numel() / (WIDTH * HEIGHT / TILE**2):.0f} Gaussians per tile", flush=True)
        for channels in args.channels:
            feats = torch.nn.functional.normalize(torch.randn(int(num_gs), channels, device=device), dim=-1)
            outputs = {}
            for backend in args.backends:
                for k in [None] + list(args.quantiles):
                    name = f"{backend} {'dense' if k is None else f'K={k}'}"
                    try:
                        entry, outputs[(backend, k)] = bench_backend(backend, means2d, conics, feats, opac2,
                                                                     offsets, ids, k, args.repeats)
                    except Exception as err:  # a backend that cannot build/run here: say so, keep going
                        skipped[f"{backend} N={int(num_gs)} C={channels}"] = f"{type(err).__name__}: {err}"
                        traceback.print_exc()
                        break
                    entry.update(num_gaussians=int(num_gs), channels=channels, backend=backend, num_quantiles=k,
                                 mode="dense" if k is None else "quantile")
                    results.append(entry)
                    print(f"  C={channels} {name:>14}: fwd {entry['forward_ms']:8.2f} ms  fwd+bwd "
                          f"{entry['forward_backward_ms']:8.2f} ms  peak {entry['peak_mem_forward_backward_mib']:8.0f} MiB",
                          flush=True)
            if args.gsplat:
                try:
                    entry, outputs[("gsplat", None)] = bench_gsplat(means2d, conics, feats, opac2, offsets, ids,
                                                                   args.repeats)
                    entry.update(num_gaussians=int(num_gs), channels=channels, backend="gsplat", num_quantiles=None,
                                 mode="dense", channel_chunk=GSPLAT_CHANNEL_CHUNK)
                    results.append(entry)
                    print(f"  C={channels} {'gsplat dense':>14}: fwd {entry['forward_ms']:8.2f} ms  fwd+bwd "
                          f"{entry['forward_backward_ms']:8.2f} ms", flush=True)
                except Exception as err:
                    skipped[f"gsplat N={int(num_gs)} C={channels}"] = f"{type(err).__name__}: {err}"
                    traceback.print_exc()
            # Agreement between backends on the same inputs (max abs difference of the features).
            base = outputs.get(("triton", None))
            for key, (out, _) in outputs.items():
                if base is not None and key[1] is None and key[0] != "triton":
                    diff = float((out - base[0]).abs().max())
                    results.append(dict(num_gaussians=int(num_gs), channels=channels, check=f"{key[0]} vs triton dense",
                                        max_abs_diff=diff))
            for k in args.quantiles:
                if ("triton", k) in outputs and ("cuda", k) in outputs:
                    diff = float((outputs[("triton", k)][0] - outputs[("cuda", k)][0]).abs().max())
                    results.append(dict(num_gaussians=int(num_gs), channels=channels,
                                        check=f"cuda vs triton K={k}", max_abs_diff=diff))
            del outputs
            if "triton" in args.backends and args.queries:  # query space: [H,W,Q] scores, F never written
                from qrender_ns.render.triton.launch import query_scores_triton

                queries = torch.randn(args.queries, channels, device=device)
                for k in [None] + list(args.quantiles):
                    ms = cuda_ms(lambda: query_scores_triton(means2d, conics, feats, opac2, WIDTH, HEIGHT, TILE, offsets,
                                                             ids, queries, num_quantiles=k or 0), args.repeats)
                    results.append(dict(num_gaussians=int(num_gs), channels=channels, backend="triton",
                                        num_quantiles=k, mode="query_space", num_queries=args.queries, forward_ms=ms))
                    print(f"  C={channels} triton query Q={args.queries} {'dense' if k is None else f'K={k}'}: "
                          f"{ms:8.2f} ms", flush=True)
            if args.train_step:
                for backend in args.backends:
                    try:
                        entry = train_step_peak(backend, means, quats, scales, opac, viewmat, K, channels,
                                                args.train_k)
                    except Exception as err:
                        skipped[f"train step {backend} N={int(num_gs)}"] = f"{type(err).__name__}: {err}"
                        traceback.print_exc()
                        continue
                    entry.update(num_gaussians=int(num_gs), channels=channels, backend=backend,
                                 num_quantiles=args.train_k, mode="train_step")
                    results.append(entry)
                    print(f"  C={channels} train step {backend} K={args.train_k}: {entry['train_step_ms']:.1f} ms, "
                          f"peak {entry['train_step_peak_mib']:.0f} MiB", flush=True)
    return results, skipped


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-gaussians", type=float, nargs="+", default=[1e5, 1e6])
    parser.add_argument("--channels", type=int, nargs="+", default=[512])
    parser.add_argument("--quantiles", type=int, nargs="+", default=[8, 10])
    parser.add_argument("--backends", nargs="+", default=["triton", "cuda"], choices=["triton", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-gsplat", dest="gsplat", action="store_false",
                        help="skip gsplat's own rasterizer (it JIT-builds all of gsplat on first use)")
    parser.add_argument("--no-train-step", dest="train_step", action="store_false")
    parser.add_argument("--train-k", type=int, default=8)
    parser.add_argument("--queries", type=int, default=16, help="query-space rows with Q queries (0: none)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "on the CPU run benchmarks/bench_rasterize.py")
    started = time.time()
    results, skipped = run(args)
    gpu = torch.cuda.get_device_name()
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu_{gpu.replace(' ', '_').lower()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    import triton

    meta = dict(width=WIDTH, height=HEIGHT, tile_size=TILE, gpu=gpu, torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda, cpu_count=os.cpu_count(),
                timing="CUDA events, median of --repeats after one warm-up (fwd+bwd: repeats // 2)",
                seconds=round(time.time() - started, 1), date=time.strftime("%Y-%m-%d"), skipped=skipped)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    tmp.replace(out)
    print(f"wrote {out}" + (f" ({len(skipped)} skipped: see meta.skipped)" if skipped else ""))


if __name__ == "__main__":
    main()
