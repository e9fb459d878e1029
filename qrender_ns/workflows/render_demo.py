"""`qsplat demo` / `make demo`: render generated Gaussians densely and with Q-Render.

Gaussians are sampled on the surfaces of a few coloured objects in front of a wall; every
object carries one 512-D unit feature (its "class embedding") plus a little noise. The demo
renders RGB and the 512-D feature map with dense blending and with quantile blending on the
CPU kernel, writes PNGs (RGB, a PCA view of both feature maps, their per-pixel disagreement)
and prints the measured time ratio.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qrender_ns.render import rasterize_features, rasterize_to_pixels

OBJECTS = [  # name, centre (x, y, z), radius, RGB
    ("wall", (0.0, 0.0, 5.0), None, (0.75, 0.72, 0.65)),
    ("chair", (-1.0, 0.4, 3.2), 0.45, (0.80, 0.25, 0.20)),
    ("table", (0.3, 0.6, 3.6), 0.60, (0.55, 0.40, 0.25)),
    ("lamp", (1.2, -0.5, 3.0), 0.30, (0.95, 0.90, 0.35)),
    ("plant", (-0.2, -0.6, 2.6), 0.35, (0.20, 0.65, 0.30)),
]


def make_demo_gaussians(num_gaussians: int, channels: int, seed: int = 0):
    """Gaussians on a back wall and on spheres; returns tensors and per-Gaussian object ids."""
    gen = torch.Generator().manual_seed(seed)
    per_object = num_gaussians // len(OBJECTS)
    means, colors, ids, sizes = [], [], [], []
    for index, (_, centre, radius, rgb) in enumerate(OBJECTS):
        count = per_object if index else num_gaussians - per_object * (len(OBJECTS) - 1)
        c = torch.tensor(centre)
        if radius is None:  # the wall: a plane at z = centre
            xy = (torch.rand(count, 2, generator=gen) - 0.5) * torch.tensor([5.0, 4.0])
            pts = torch.cat([xy, torch.full((count, 1), c[2].item())], dim=1)
            area = 5.0 * 4.0
        else:
            d = torch.nn.functional.normalize(torch.randn(count, 3, generator=gen), dim=-1)
            pts = c + radius * d
            area = 4 * math.pi * radius**2
        shade = 0.75 + 0.25 * torch.sin(pts.sum(-1, keepdim=True) * 8)  # texture
        means.append(pts)
        colors.append((torch.tensor(rgb) * shade).clamp(0, 1))
        ids.append(torch.full((count,), index))
        sizes.append(torch.full((count,), math.sqrt(area / count)))  # ~one disc per sample
    means, colors, ids = torch.cat(means), torch.cat(colors), torch.cat(ids)
    scales = torch.cat(sizes)[:, None].repeat(1, 3)
    scales[:, 2] *= 0.2
    scales *= 0.7 + 0.6 * torch.rand(num_gaussians, 3, generator=gen)
    quats = torch.nn.functional.normalize(torch.randn(num_gaussians, 4, generator=gen), dim=-1)
    opacities = 0.4 + 0.5 * torch.rand(num_gaussians, generator=gen)
    class_embeddings = torch.nn.functional.normalize(torch.randn(len(OBJECTS), channels, generator=gen), dim=-1)
    feats = class_embeddings[ids] + 0.05 * torch.randn(num_gaussians, channels, generator=gen)
    feats = torch.nn.functional.normalize(feats, dim=-1)
    return dict(means=means, quats=quats, scales=scales, opacities=opacities, colors=colors,
                features=feats, object_ids=ids, class_embeddings=class_embeddings)


def _camera(width: int, height: int):
    focal = 0.9 * width
    K = torch.tensor([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1.0]])[None]
    return torch.eye(4)[None], K


def _to_png(array: np.ndarray, path: Path) -> None:
    image = Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8))
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp)
    tmp.replace(path)


def _pca_basis(features: torch.Tensor) -> torch.Tensor:
    flat = features.reshape(-1, features.shape[-1])
    flat = flat[flat.norm(dim=-1) > 0]
    centred = flat - flat.mean(0)
    _, _, v = torch.pca_lowrank(centred, q=3, center=False)
    return v


def _pca_image(features: torch.Tensor, basis: torch.Tensor, lo, hi) -> np.ndarray:
    proj = features @ basis
    return ((proj - lo) / (hi - lo)).numpy()


def run_demo(cfg) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    scene = make_demo_gaussians(cfg.num_gaussians, cfg.channels, cfg.seed)
    viewmat, K = _camera(cfg.width, cfg.height)
    common = (scene["means"], scene["quats"], scene["scales"], scene["opacities"])

    def render(features, k):
        return rasterize_features(*common, features, viewmat, K, cfg.width, cfg.height,
                                  num_quantiles=k, backend="cpu")

    t0 = time.perf_counter()
    rgb, _, meta = render(scene["colors"], None)  # also loads / compiles the kernel
    timings = {"projection_binning_and_rgb": 1000 * (time.perf_counter() - t0)}
    projected = (meta["means2d"], meta["conics"], scene["features"], scene["opacities"],
                 cfg.width, cfg.height, meta["tile_size"], meta["isect_offsets"], meta["flatten_ids"])
    outputs = {}
    # Blending only, on the same projected and binned Gaussians: the part Q-Render changes.
    for name, k in (("dense", None), ("quantile", cfg.num_quantiles)):
        rasterize_to_pixels(*projected, num_quantiles=k)  # warm-up
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            outputs[name] = rasterize_to_pixels(*projected, num_quantiles=k)
            best = min(best, time.perf_counter() - t0)
        timings[name] = 1000 * best

    dense, dense_alpha = outputs["dense"][0][0], outputs["dense"][1][0]
    quant, quant_alpha = outputs["quantile"][0][0], outputs["quantile"][1][0]
    normalised = dense / dense_alpha.clamp(min=1e-8)
    cos = torch.nn.functional.cosine_similarity(quant, normalised, dim=-1)
    valid = (quant_alpha[..., 0] > 0) & (dense_alpha[..., 0] > 0)
    # class argmax agreement: what a query would see
    logits_q = quant @ scene["class_embeddings"].T
    logits_d = normalised @ scene["class_embeddings"].T
    agree = (logits_q.argmax(-1) == logits_d.argmax(-1))[valid].float().mean()

    basis = _pca_basis(normalised[valid])
    proj = normalised[valid] @ basis
    lo, hi = proj.min(0).values, proj.max(0).values
    paths = {
        "rgb": out / "rgb_dense.png",
        "features_dense": out / "features_dense_pca.png",
        "features_quantile": out / f"features_quantile_k{cfg.num_quantiles}_pca.png",
        "difference": out / "difference_1_minus_cos.png",
    }
    _to_png(rgb[0].numpy(), paths["rgb"])
    _to_png(_pca_image(normalised, basis, lo, hi) * valid[..., None].numpy(), paths["features_dense"])
    _to_png(_pca_image(quant, basis, lo, hi) * valid[..., None].numpy(), paths["features_quantile"])
    diff = torch.where(valid, 1 - cos, torch.zeros_like(cos))
    _to_png((diff / max(float(diff.max()), 1e-6)).numpy()[..., None].repeat(3, -1), paths["difference"])

    summary = dict(
        num_gaussians=cfg.num_gaussians, channels=cfg.channels, num_quantiles=cfg.num_quantiles,
        width=cfg.width, height=cfg.height, backend=meta["backend"],
        dense_ms=timings["dense"], quantile_ms=timings["quantile"],
        projection_binning_and_rgb_ms=timings["projection_binning_and_rgb"],
        speedup_quantile_vs_dense=timings["dense"] / timings["quantile"],
        mean_cosine_quantile_vs_normalised_dense=float(cos[valid].mean()),
        class_argmax_agreement=float(agree), torch_threads=torch.get_num_threads(),
        outputs={k: str(v) for k, v in paths.items()},
    )
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "summary.json")

    print(f"\nq-splat demo: {cfg.num_gaussians} Gaussians, {cfg.channels}-D features, "
          f"{cfg.width}x{cfg.height}, CPU kernel ({torch.get_num_threads()} threads)")
    print(f"  dense blending        : {timings['dense']:8.1f} ms per {cfg.channels}-D frame")
    print(f"  quantile blending K={cfg.num_quantiles:<3}: {timings['quantile']:8.1f} ms per {cfg.channels}-D frame")
    print(f"  (projection + tile binning + RGB render, first call: {timings['projection_binning_and_rgb']:.1f} ms)")
    print(f"  speed-up quantile vs dense: x{summary['speedup_quantile_vs_dense']:.2f}")
    print(f"  mean cosine(quantile, normalised dense): {summary['mean_cosine_quantile_vs_normalised_dense']:.4f}; "
          f"class argmax agreement: {100 * float(agree):.1f}%")
    print("  images:")
    for name, path in paths.items():
        print(f"    {name:18s} {path}")
    print(f"  summary: {out / 'summary.json'}")
    return summary
