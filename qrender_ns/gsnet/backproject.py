"""The training-free baseline head: back-projection of the teacher's mask embeddings (docs/gsnet.md).

Every Gaussian's feature is the blending-weighted average of the mask embeddings of the pixels it
contributes to, over all training views, with the weights of the same rasterizer pass as training
(Q-Render with K = `num_quantiles`, or dense):

    f_i = normalize( sum_v sum_p w_{i,p} e_{m_v(p)} / sum_v sum_p w_{i,p} )

(pixels in no mask are skipped). One pass over the views, no optimisation. A Gaussian no masked
pixel reaches (total weight 0) gets the zero feature, the project's "never supervised" state.

    qsplat backproject --scenes data/room2 outputs/room/q-splat/<time>/config.yml [--num-quantiles 10]

Inside `ns-train q-splat`: `--pipeline.model.feature-head backproject` (qrender_ns/model.py).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..render.backproject import backproject_to_gaussians
from .train import _resize_nearest

FORMAT = "qsplat-backproject/1"
# One view of the back-projection: (viewmat [4, 4] world-to-camera, K [3, 3], width, height, teacher-cache key)
View = Tuple[Tensor, Tensor, int, int, str]


def _progress(items: Sequence, description: str, enabled: bool) -> Iterable:
    if not enabled:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # "\[": a literal bracket (rich would take "[q-splat]" for a markup tag and drop it)
    with Progress(TextColumn(r"\[q-splat] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as bar:
        task = bar.add_task(description, total=len(items))
        for item in items:
            yield item
            bar.advance(task)


def normalize_backprojection(sums: Tensor, weights: Tensor) -> Tensor:
    """Unit features sums / weights, zero where the total weight is 0 (never reached by a masked pixel)."""
    features = F.normalize(sums, dim=-1)
    return torch.where((weights > 0)[:, None], features, torch.zeros_like(features))


def backproject_views(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, views: Sequence[View],
                      teacher, num_quantiles: Optional[int] = 10, render_scale: float = 1.0, backend: str = "auto",
                      progress: bool = False, description: str = "back-projection") -> Tuple[Tensor, Tensor]:
    """Back-project `teacher`'s masks of every view onto the Gaussians (linear scales, opacities in [0, 1]):
    (features [N, D] unit or zero, total weights [N])."""
    if not render_scale > 0:
        raise ValueError(f"render_scale must be > 0, got {render_scale}")
    device, dtype = means.device, means.dtype
    sums = torch.zeros(means.shape[0], int(teacher.feature_dim), device=device, dtype=dtype)
    weights = torch.zeros(means.shape[0], device=device, dtype=dtype)
    for viewmat, K, width, height, key in _progress(list(views), description, progress):
        w, h = max(1, round(width * render_scale)), max(1, round(height * render_scale))
        K = K.clone().to(device=device, dtype=dtype)
        K[:2] *= torch.tensor([w / width, h / height], device=device, dtype=dtype)[:, None]
        mask_ids, embeddings = teacher.read(key)
        mask_ids = _resize_nearest(mask_ids.to(device), h, w)
        s, wt = backproject_to_gaussians(means, quats, scales, opacities, viewmat.to(device=device, dtype=dtype)[None],
                                         K[None], w, h, mask_ids=mask_ids[None], embeddings=embeddings.to(device),
                                         num_quantiles=num_quantiles, backend=backend)
        sums += s
        weights += wt
    return normalize_backprojection(sums, weights), weights


def backproject_scene(scene, num_quantiles: Optional[int] = 10, render_scale: float = 1.0, backend: str = "auto",
                      progress: bool = False) -> Tuple[Tensor, Tensor]:
    """`backproject_views` over a TrainingScene's training views (qrender_ns.gsnet.scenes)."""
    g, v = scene.gaussians, scene.train
    views = [(v.viewmats[i], v.Ks[i], v.width, v.height, key) for i, key in enumerate(v.image_keys)]
    return backproject_views(g.means, g.quats, g.scales, g.opacities, views, scene.teacher, num_quantiles,
                             render_scale, backend, progress, f"back-projection {scene.name}")


@dataclass
class Backproject:
    """Training-free features: back-project the teacher's mask embeddings onto every Gaussian (the baseline
    GS-Net must beat); reports the 3D / 2D mIoU where ground truth exists, and the time."""

    scenes: Tuple[Path, ...]
    """Scenes: run configs (config.yml of q-splat / splatfacto runs) or scene folders, as `train-gsnet`."""
    out: Path = Path("outputs/backproject")
    """Folder for `<scene>.pt` (features [N, D], weights [N]) and summary.json."""
    num_quantiles: Optional[int] = 10
    """K of Q-Render for the blending weights (None = dense)."""
    render_scale: float = 1.0
    """Render at this fraction of the image resolution (teacher masks are resampled nearest)."""
    teacher: str = "synthetic"
    """Teacher cache of scene folders (<scene>/qsplat_teacher/<teacher>)."""
    point_scale: Optional[float] = None
    """Size of the Gaussians made from point clouds (default: mean 3-NN distance)."""
    evaluate: bool = True
    """Report the mIoU of the class argmax (generated scenes: 3D over the labelled Gaussians, 2D on eval views)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    rasterizer_backend: Literal["auto", "cpu", "cuda", "triton", "torch"] = "auto"
    progress: bool = True

    def main(self) -> None:
        run_backproject(self)


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) + ".pt"


def run_backproject(cfg: Backproject) -> List[dict]:
    """Back-project every scene; returns one summary per scene (also written to <out>/summary.json)."""
    from .scenes import load_scene
    from .train import evaluate_features

    if not cfg.scenes:
        raise SystemExit("--scenes: give at least one scene folder or run config.yml")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    cfg.out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for spec in cfg.scenes:
        try:
            scene = load_scene(spec, teacher=cfg.teacher, point_scale=cfg.point_scale, with_eval=cfg.evaluate)
        except FileNotFoundError as e:
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
        summary = {"scene": str(spec), "num_gaussians": scene.gaussians.num, "num_views": len(scene.train.image_keys),
                   "num_unreached": int((weights <= 0).sum()), "seconds": seconds, "device": str(device),
                   "num_quantiles": cfg.num_quantiles, "render_scale": cfg.render_scale, "features": str(path),
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


def main() -> None:
    import tyro

    tyro.cli(Backproject).main()


if __name__ == "__main__":
    main()
