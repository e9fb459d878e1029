"""`qsplat backproject`: the training-free baseline head over whole scenes (features per scene, mIoU, time).
The method itself: gsnet/backproject.py."""

from __future__ import annotations

import json
import re
import time
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from qrender_ns.data.gaussian_ply import GaussianPlyError, read_gaussian_ply, write_gaussian_ply
from qrender_ns.gsnet.backproject import backproject_views
from qrender_ns.workflows.gsnet_scenes import load_scene
from qrender_ns.workflows.options import Backproject
from qrender_ns.workflows.train_gsnet import evaluate_features

FORMAT = "qsplat-backproject/1"


def backproject_scene(scene, num_quantiles: Optional[int] = 10, render_scale: float = 1.0, backend: str = "auto",
                      progress: bool = False) -> Tuple[Tensor, Tensor]:
    """`backproject_views` over a TrainingScene's training views (qrender_ns.workflows.gsnet_scenes)."""
    g, v = scene.gaussians, scene.train
    views = [(v.viewmats[i], v.Ks[i], v.width, v.height, key) for i, key in enumerate(v.image_keys)]
    return backproject_views(g.means, g.quats, g.scales, g.opacities, views, scene.teacher, num_quantiles,
                             render_scale, backend, progress, f"back-projection {scene.name}")


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) + ".pt"


def run_backproject(cfg: Backproject) -> List[dict]:
    """Back-project every scene; returns one summary per scene (also written to <out>/summary.json)."""
    if not cfg.scenes:
        raise SystemExit("--scenes: give at least one scene folder or run config.yml")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if cfg.gaussians_ply is not None and len(cfg.scenes) != 1:
        raise SystemExit(f"--gaussians-ply goes with one scene folder in --scenes, got {len(cfg.scenes)} scenes")
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    cfg.out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for spec in cfg.scenes:
        try:
            scene = load_scene(spec, teacher=cfg.teacher, point_scale=cfg.point_scale, with_eval=cfg.evaluate,
                               gaussians_ply=cfg.gaussians_ply, gaussians_ply_frame=cfg.gaussians_ply_frame)
        except (FileNotFoundError, ValueError) as e:  # GaussianPlyError is a ValueError: one sentence
            raise SystemExit(f"qsplat backproject: {e}") from None
        scene.gaussians = scene.gaussians.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        features, weights = backproject_scene(scene, cfg.num_quantiles, cfg.render_scale, cfg.rasterizer_backend,
                                              cfg.progress)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        metrics = evaluate_features(scene, features, cfg.num_quantiles, cfg.render_scale, cfg.rasterizer_backend) \
            if cfg.evaluate else {}
        path = cfg.out / _file_name(scene.name)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"format": FORMAT, "features": features.cpu(), "weights": weights.cpu(), "scene": str(spec),
                    "gaussians": scene.gaussians.source, "num_quantiles": cfg.num_quantiles,
                    "render_scale": cfg.render_scale}, tmp)
        tmp.replace(path)
        ply = None
        if cfg.gaussians_ply is not None:  # the PLY's Gaussians as read (their frame), with the features
            ply = _write_ply_with_features(cfg.gaussians_ply, features, cfg.out / f"{_file_name(scene.name)[:-3]}.ply")
        summary = {"scene": str(spec), "num_gaussians": scene.gaussians.num, "num_views": len(scene.train.image_keys),
                   "num_unreached": int((weights <= 0).sum()), "seconds": seconds, "device": str(device),
                   "num_quantiles": cfg.num_quantiles, "render_scale": cfg.render_scale, "features": str(path),
                   "ply": None if ply is None else str(ply),
                   **metrics}
        scores = ", ".join(f"{k.replace('miou_', '')} mIoU {v:.3f}" for k, v in metrics.items())
        print(f"[q-splat] back-projection {scene.name}: {summary['num_gaussians']} Gaussians "
              f"({summary['num_unreached']} never reached), {summary['num_views']} views, {seconds:.2f} s"
              f"{'; ' + scores if scores else ''} -> {path}")
        summaries.append(summary)
    summary_path = cfg.out / "summary.json"
    tmp = summary_path.with_name("summary.json.tmp")
    tmp.write_text(json.dumps(summaries, indent=2))
    tmp.replace(summary_path)
    return summaries


def _write_ply_with_features(source, features: Tensor, output):
    """The Gaussians of the PLY ``source`` as read (frame and recorded transform kept) + ``features`` as the
    sidecar (float16): what `qsplat export` writes for a run."""
    g = read_gaussian_ply(source, features=False)
    if g.n != features.shape[0]:
        raise SystemExit(f"{source}: {g.n} Gaussians but {features.shape[0]} features")
    g.features = features.detach().float().cpu().numpy().astype("float16")
    try:
        return write_gaussian_ply(output, g, features="sidecar")
    except (GaussianPlyError, OSError) as e:
        raise SystemExit(f"[q-splat] {e}") from None


def main(cfg: Backproject) -> None:
    """`qsplat` runs this with the parsed options."""
    run_backproject(cfg)
