"""Render only what is needed: sampled pixels, query space, and the full map against its floor.

Writes benchmarks/results/speed_<device>.json and prints a table. Every ratio is measured side
by side in one run (the variants alternate, min over --repeats), on the same projected and
binned Gaussians of bench_rasterize.py's scene (640x480, ~56 Gaussians blended per pixel):

    python benchmarks/bench_speed.py                     # all parts
    python benchmarks/bench_speed.py --parts train query # some

Parts:
  train  the feature part of a training step (render 512-D features, paper loss at the pixels
         sampled from every teacher mask, backward): full map (today's path, also with the
         kernel of --before, if given) vs sampled pixels. Time and peak RSS growth.
  query  scores cos(F(p), t_q) for Q = 1, 5, 20: full map + normalise + matmul vs query space
         (with --before, also the full map of that kernel + normalise + matmul).
  projection  the query space's per-Gaussian [features . T^T, |features|] for Q = 1, 5, 20:
         the CPU kernel's one pass over the rows vs a torch matmul and a norm.
  floor  the full map: dense and quantile K=8 forward vs the time to allocate and write
         H*W*C floats, and the quantile speedup vs the per-pixel bound n C / (n + K C). The
         renders reuse the pages of the previous map (the CPU kernel's page recycling, as a
         viewer or evaluation loop gets them); *_fresh_pages release them first, so every map
         is first-touched (what each call cost before the recycling).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_rasterize import HEIGHT, TILE, WIDTH, make_scene  # noqa: E402
from qrender_ns.features.losses import paper_contrastive_loss, sample_mask_pixels  # noqa: E402
from qrender_ns.render import _backend, rasterize_query_scores, rasterize_to_pixels, release_cpu_maps  # noqa: E402
from qrender_ns.render.binning import isect_offset_encode, isect_tiles  # noqa: E402
from qrender_ns.render.projection import project_gaussians  # noqa: E402
from qrender_ns.render.reference import query_scores  # noqa: E402

CHANNELS = 512


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_growth(fn) -> float:
    """MiB the resident set grows by at its peak while fn runs (Linux: VmHWM reset via clear_refs).
    Run it first thing in a fresh process: memory freed earlier and kept by the allocator would
    be reused unseen."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = rss_mib("VmRSS")
    fn()
    return rss_mib("VmHWM") - base


def peak_rss_in_child(args, mode: str, k) -> float:
    """peak_rss_growth of one training-step variant, in a fresh interpreter (no warm-up there:
    the kernels are already built, so the first call only loads them)."""
    cmd = [sys.executable, __file__, "--memory-child", mode, "--num-gaussians", str(args.num_gaussians),
           "--num-masks", str(args.num_masks), "--pixels-per-mask", str(args.pixels_per_mask),
           "--train-quantiles", str(k)] + (["--before", args.before] if args.before else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def side_by_side(fns: dict, repeats: int) -> dict:
    """ms per call of each fn: one warm-up each, then `repeats` rounds alternating the fns; min."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(1000 * (time.perf_counter() - t0))
    return {name: min(t) for name, t in times.items()}


def load_before(commit: str):
    """The CPU kernel of an older commit (e.g. today's main), built once next to ours."""
    from torch.utils import cpp_extension

    src = Path(tempfile.mkdtemp(prefix="qsplat_before_")) / "csrc"
    listed = subprocess.check_output(["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", commit, "cuda_ext/csrc"],
                                     text=True).split()
    rels = [p.removeprefix("cuda_ext/csrc/") for p in listed if p.endswith((".h", ".cpp"))]  # no CUDA sources
    for rel in rels:
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(subprocess.check_output(["git", "-C", str(ROOT), "show", f"{commit}:cuda_ext/csrc/{rel}"]))
    sha = subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", "--short=12", commit], text=True).strip()
    name = f"qrender_cpu_before_{sha}"
    build = _backend.ext_dir() / name
    build.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name=name, sources=[str(src / rel) for rel in rels if rel.endswith(".cpp")],
                              extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                              build_directory=str(build)), sha


class with_kernel:
    """Within: rasterize_to_pixels' compiled CPU backend is `module` (an older build)."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.saved = _backend._MODULES.get("cpu")
        _backend._MODULES["cpu"] = self.module

    def __exit__(self, *exc):
        if self.saved is None:
            _backend._MODULES.pop("cpu", None)
        else:
            _backend._MODULES["cpu"] = self.saved


def prepare(num_gs: int):
    means, quats, scales, opac, viewmat, K = make_scene(num_gs, torch.device("cpu"))
    radii, means2d, depths, conics = project_gaussians(means, quats, scales, viewmat, K, WIDTH, HEIGHT)
    tw, th = math.ceil(WIDTH / TILE), math.ceil(HEIGHT / TILE)
    keys, ids = isect_tiles(means2d, radii, depths, TILE, tw, th)
    offsets = isect_offset_encode(keys, 1, tw, th)
    feats = F.normalize(torch.randn(num_gs, CHANNELS, generator=torch.Generator().manual_seed(1)), dim=-1)
    opac2 = opac[None].contiguous()
    return dict(means2d=means2d.detach().contiguous(), conics=conics.detach().contiguous(), features=feats,
                opacities=opac2, isect_offsets=offsets, flatten_ids=ids)


def geometry_args(s, features):
    return (s["means2d"], s["conics"], features, s["opacities"], WIDTH, HEIGHT, TILE, s["isect_offsets"],
            s["flatten_ids"])


def teacher_masks(num_masks: int, seed: int = 0):
    """A [H, W] mask-id map of `num_masks` blobs (nearest of random centres) and their embeddings."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(num_masks, 2, generator=gen) * torch.tensor([WIDTH, HEIGHT])
    ys, xs = torch.meshgrid(torch.arange(HEIGHT), torch.arange(WIDTH), indexing="ij")
    grid = torch.stack([xs, ys], -1).reshape(-1, 1, 2).float()
    mask_ids = (grid - centres).norm(dim=-1).argmin(-1).reshape(HEIGHT, WIDTH)
    return mask_ids, torch.randn(num_masks, CHANNELS, generator=gen)


def empty_hugepages(numel: int) -> torch.Tensor:
    """torch.empty advised for transparent huge pages, as the CPU kernel allocates its maps."""
    import ctypes

    t = torch.empty(numel)
    huge = 1 << 21
    begin = (t.data_ptr() + huge - 1) & ~(huge - 1)
    end = (t.data_ptr() + numel * 4) & ~(huge - 1)
    if end > begin:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), 14)  # MADV_HUGEPAGE
    return t


# ------------------------------------------------------------------------------------ parts
def train_steps(s, args, before, k):
    """The feature part of a training step, per variant: {name: fn}."""
    mask_ids, embeddings = teacher_masks(args.num_masks)
    pixels, targets = sample_mask_pixels(mask_ids, args.pixels_per_mask, torch.Generator().manual_seed(0))
    table = torch.nn.Parameter(s["features"].clone())

    def full_map(k):
        def step():
            table.grad = None
            out, _ = rasterize_to_pixels(*geometry_args(s, table), num_quantiles=k, validate_values=False)
            loss = paper_contrastive_loss(out.reshape(-1, CHANNELS)[pixels], targets, embeddings)
            loss.backward()
        return step

    def sampled(k):
        def step():
            table.grad = None
            out, _ = rasterize_to_pixels(*geometry_args(s, table), num_quantiles=k, validate_values=False,
                                         pixel_ids=pixels)
            paper_contrastive_loss(out, targets, embeddings).backward()
        return step

    fns = {"full_map": full_map(k), "sampled_pixels": sampled(k)}
    if before is not None:
        module = before[0]

        def today(step=full_map(k)):
            with with_kernel(module):
                step()
        fns["full_map_before"] = today
    return fns, pixels


def bench_train(s, args, before):
    rows = []
    for k in args.train_quantiles:
        fns, pixels = train_steps(s, args, before, k)
        ms = side_by_side(fns, args.repeats)
        mem = {name: peak_rss_in_child(args, name, k) for name in fns}
        baseline = "full_map_before" if before is not None else "full_map"
        row = dict(num_quantiles=k, sampled_pixels=int(pixels.numel()), num_masks=args.num_masks,
                   ms=ms, peak_rss_growth_mib=mem,
                   speedup_sampled_vs_today=ms[baseline] / ms["sampled_pixels"],
                   memory_ratio_today_vs_sampled=mem[baseline] / max(mem["sampled_pixels"], 1e-3),
                   speedup_sampled_vs_full_map_new_kernel=ms["full_map"] / ms["sampled_pixels"],
                   today=baseline)
        rows.append(row)
        print(f"train K={k}: " + "  ".join(f"{n} {ms[n]:.0f} ms / {mem[n]:.0f} MiB" for n in fns)
              + f"  -> x{row['speedup_sampled_vs_today']:.1f} faster, x{row['memory_ratio_today_vs_sampled']:.0f} "
              f"less memory than {baseline}", flush=True)
    return rows


def bench_query(s, args, before=None):
    rows = []
    gen = torch.Generator().manual_seed(3)
    for k in args.query_quantiles:
        for q in args.num_queries:
            text = torch.randn(q, CHANNELS, generator=gen)

            def full():
                out, _ = rasterize_to_pixels(*geometry_args(s, s["features"]), num_quantiles=k,
                                             validate_values=False)
                return query_scores(out, text)

            def query():
                return rasterize_query_scores(*geometry_args(s, s["features"]), text, num_quantiles=k,
                                              validate_values=False)[0]

            fns = {"full_map_normalise_matmul": full, "query_space": query}
            if before is not None:  # the full map of the kernel before this work (fresh pages, no walk in lanes)
                def full_before():
                    with with_kernel(before[0]):
                        return full()
                fns["full_map_before_normalise_matmul"] = full_before
            ms = side_by_side(fns, args.repeats)
            err = float((full() - query()).abs().max())
            row = dict(num_quantiles=k, num_queries=q, ms=ms, max_abs_diff=err,
                       speedup=ms["full_map_normalise_matmul"] / ms["query_space"])
            if before is not None:
                row["speedup_vs_before"] = ms["full_map_before_normalise_matmul"] / ms["query_space"]
            rows.append(row)
            print(f"query {'dense' if k is None else f'K={k}'} Q={q:>2}: full+matmul "
                  f"{ms['full_map_normalise_matmul']:.0f} ms, query space {ms['query_space']:.0f} ms "
                  f"-> x{row['speedup']:.1f} (max |diff| {err:.1e})"
                  + (f"; vs the --before kernel's full map + matmul {ms['full_map_before_normalise_matmul']:.0f} ms "
                     f"x{row['speedup_vs_before']:.1f}" if before is not None else ""), flush=True)
    return rows


def bench_projection(s, args):
    ext = _backend.load_extension(with_cuda=False)
    feats, rows, gen = s["features"], [], torch.Generator().manual_seed(4)
    for q in args.num_queries:
        unit = F.normalize(torch.randn(q, CHANNELS, generator=gen), dim=-1)
        fns = {"matmul_and_norm": lambda: torch.cat([feats @ unit.T, feats.norm(dim=-1, keepdim=True)], dim=-1),
               "one_pass": lambda: ext.project_rows_cpu(feats, unit)}
        ms = side_by_side(fns, args.repeats)
        err = float((fns["one_pass"]() - fns["matmul_and_norm"]()).abs().max())
        rows.append(dict(num_queries=q, ms=ms, max_abs_diff=err, speedup=ms["matmul_and_norm"] / ms["one_pass"]))
        print(f"projection Q={q:>2}: matmul + norm {ms['matmul_and_norm']:.1f} ms, one pass {ms['one_pass']:.1f} ms "
              f"-> x{rows[-1]['speedup']:.1f} (max |diff| {err:.1e})", flush=True)
    return rows


def bench_floor(s, args, before):
    numel = HEIGHT * WIDTH * CHANNELS
    buffer = torch.empty(numel)
    buffer.fill_(0)
    ext = _backend.load_extension()
    counts = {}
    for k in (None, 8):
        out = ext.rasterize_forward_cpu(*geometry_args(s, s["features"][:, :1].contiguous())[:4], None, WIDTH, HEIGHT,
                                        TILE, s["isect_offsets"], s["flatten_ids"], k or 0)
        counts[k] = float(out[4].float().mean())

    def render(k, fresh_pages=False):
        def call():
            if fresh_pages:  # as without the kernel's page recycling: the map gets pages never touched
                release_cpu_maps()
            return rasterize_to_pixels(*geometry_args(s, s["features"]), num_quantiles=k, validate_values=False)
        return call

    fns = {"write_floor_fresh": lambda: torch.empty(numel).fill_(1.0),
           "write_floor_fresh_hugepages": lambda: empty_hugepages(numel).fill_(1.0),
           "write_floor_mapped": lambda: buffer.fill_(1.0),
           "dense": render(None), "quantile_k8": render(8),
           "dense_fresh_pages": render(None, True), "quantile_k8_fresh_pages": render(8, True)}
    if before is not None:
        for name, k in (("dense_before", None), ("quantile_k8_before", 8)):
            def old(k=k):
                with with_kernel(before[0]):
                    render(k)()
            fns[name] = old
    ms = side_by_side(fns, args.repeats)
    n, kk = counts[None], counts[8]
    bound = n * CHANNELS / (n + kk * CHANNELS)
    row = dict(ms=ms, mean_blended_per_pixel_dense=n, mean_selected_per_pixel_k8=kk, per_pixel_bound=bound,
               quantile_speedup_vs_dense=ms["dense"] / ms["quantile_k8"],
               quantile_speedup_vs_dense_fresh_pages=ms["dense_fresh_pages"] / ms["quantile_k8_fresh_pages"],
               quantile_over_write_floor_mapped=ms["quantile_k8"] / ms["write_floor_mapped"],
               quantile_over_write_floor_fresh=ms["quantile_k8"] / ms["write_floor_fresh"],
               quantile_over_write_floor_hugepages=ms["quantile_k8"] / ms["write_floor_fresh_hugepages"],
               map_mib=numel * 4 / 2**20)
    row["fraction_of_bound"] = row["quantile_speedup_vs_dense"] / bound
    if before is not None:
        row["quantile_speedup_vs_before"] = ms["quantile_k8_before"] / ms["quantile_k8"]
        row["dense_speedup_vs_before"] = ms["dense_before"] / ms["dense"]
        row["before_quantile_speedup_vs_dense"] = ms["dense_before"] / ms["quantile_k8_before"]
    print("floor: " + "  ".join(f"{name} {v:.0f} ms" for name, v in ms.items())
          + f"\n  n={n:.1f} blended, K=8 selects {kk:.1f}: quantile x{row['quantile_speedup_vs_dense']:.2f} vs dense"
          f" (bound x{bound:.2f}, {100 * row['fraction_of_bound']:.0f}% of it); with fresh pages every call "
          f"x{row['quantile_speedup_vs_dense_fresh_pages']:.2f}", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["train", "query", "projection", "floor"],
                        choices=["train", "query", "projection", "floor"])
    parser.add_argument("--num-gaussians", type=int, default=40000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-masks", type=int, default=40, help="teacher masks per view (train part)")
    parser.add_argument("--pixels-per-mask", type=int, default=256, help="the model's default")
    parser.add_argument("--train-quantiles", type=int, nargs="+", default=[10], help="the model's default K")
    parser.add_argument("--query-quantiles", type=lambda v: None if v == "dense" else int(v), nargs="+",
                        default=[8, None])
    parser.add_argument("--num-queries", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--before", default=None,
                        help="git commit whose CPU kernel is 'today' (built once); e.g. the merge base with main")
    parser.add_argument("--load", default="", help="machine load to record, e.g. 'shared with 4 other jobs'")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    before = load_before(args.before) if args.before else None
    s = prepare(args.num_gaussians)
    if args.memory_child:  # one step of one variant in this fresh process: print its peak RSS growth
        _backend.load_extension()
        fns, _ = train_steps(s, args, before, args.train_quantiles[0])
        print(peak_rss_growth(fns[args.memory_child]))
        return
    print(f"N={args.num_gaussians}: {s['flatten_ids'].numel() / (WIDTH * HEIGHT / TILE**2):.0f} Gaussians per tile, "
          f"{torch.get_num_threads()} threads", flush=True)
    load_start = os.getloadavg()
    results = {}
    if "train" in args.parts:
        results["train"] = bench_train(s, args, before)
    if "query" in args.parts:
        results["query"] = bench_query(s, args, before)
    if "projection" in args.parts:
        results["projection"] = bench_projection(s, args)
    if "floor" in args.parts:
        results["floor"] = bench_floor(s, args, before)
    meta = dict(width=WIDTH, height=HEIGHT, tile_size=TILE, channels=CHANNELS, num_gaussians=args.num_gaussians,
                device="cpu", torch=torch.__version__, threads=torch.get_num_threads(),
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                loadavg_start=load_start, loadavg_end=os.getloadavg(), load_note=args.load,
                before_commit=before[1] if before else None,
                timing="min over --repeats alternating rounds after one warm-up each",
                memory="peak RSS growth (VmHWM after clear_refs) during one call", date=time.strftime("%Y-%m-%d"))
    out = args.out or ROOT / "benchmarks" / "results" / "speed_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    merged = {**previous.get("results", {}), **results}
    meta_by_part = {**previous.get("meta_by_part", {}), **{part: meta for part in results}}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(meta_by_part=meta_by_part, results=merged), indent=2))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
