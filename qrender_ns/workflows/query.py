"""`qsplat query`: select the Gaussians matching a text query, export a PLY, render relevancy PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from nerfstudio.models.splatfacto import SH2RGB
from nerfstudio.utils import colormaps

from qrender_ns.eval import load_pipeline
from qrender_ns.features.selection import SelectionRule, gaussian_relevancy, select_by_rule
from qrender_ns.data.gaussian_ply import points_to_data_frame
from qrender_ns.teachers.vocabulary import vocabulary_error
from qrender_ns.workflows.export import dataparser_transform_of, finite_only, model_gaussians, write_ply_or_exit
from qrender_ns.workflows.options import Query


def _load_pipeline(config_path: Path):
    return load_pipeline(config_path)


def _check_vocabulary(model, text: str) -> None:
    """The viewer's rule (teachers.text.vocabulary_error): case and whitespace do not matter."""
    error = vocabulary_error(text, model.text_encoder, model.class_names)
    if error:
        raise SystemExit(error)


def _selection(model, cfg: "Query") -> torch.Tensor:
    """[G] bool: the rule's selection (qrender_ns.features.selection) among the Gaussians with opacity > min_opacity."""
    rule = SelectionRule(cfg.selection, cfg.threshold, cfg.selection_knn)
    try:
        chosen = select_by_rule(model, cfg.text, rule)
    except ValueError as err:
        raise SystemExit(f"qsplat query: {err}") from None
    opacity = torch.sigmoid(model.opacities).squeeze(-1)
    return chosen & (opacity > cfg.min_opacity)


def write_selection_ply(path: Path, means: np.ndarray, colors: np.ndarray, scores: np.ndarray) -> None:
    from plyfile import PlyData, PlyElement

    vertex = np.empty(len(means), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"),
                                         ("blue", "u1"), ("relevancy", "f4")])
    vertex["x"], vertex["y"], vertex["z"] = means.T
    rgb = np.clip(colors * 255, 0, 255).astype(np.uint8)
    vertex["red"], vertex["green"], vertex["blue"] = rgb.T
    vertex["relevancy"] = scores
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.ply")
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(tmp))
    tmp.replace(path)


def _relevancy_panel(rgb: torch.Tensor, rel: torch.Tensor) -> np.ndarray:
    """[render | render greyed where relevancy <= 0.5, heat map (turbo, 0.5..1) where above]."""
    heat = colormaps.apply_float_colormap(((rel - 0.5) * 2).clamp(0, 1), colormap="turbo")
    grey = rgb.mean(-1, keepdim=True).expand_as(rgb) * 0.5
    overlay = torch.where(rel > 0.5, 0.3 * rgb + 0.7 * heat, grey)
    return torch.cat([rgb, overlay], dim=1).clamp(0, 1).cpu().numpy()


def run_query(cfg: Query) -> dict:
    from PIL import Image

    pipeline, checkpoint_path = _load_pipeline(cfg.load_config)
    model = pipeline.model
    _check_vocabulary(model, cfg.text)
    with torch.no_grad():
        scores = gaussian_relevancy(model, cfg.text)
        selected = _selection(model, cfg)
        colors = SH2RGB(model.features_dc).clamp(0, 1) if model.config.sh_degree > 0 else torch.sigmoid(model.features_dc)
    run_dir = Path(cfg.load_config).parent
    safe = "".join(c if c.isalnum() else "_" for c in cfg.text)
    ply_path = cfg.output or run_dir / "query" / f"{safe}.ply"
    transform, scale = dataparser_transform_of(pipeline)
    if not bool(selected.any()):  # a PLY of nothing is no 3DGS PLY: say so, and still render the relevancy
        print(f"[q-splat] query {cfg.text!r} selects no Gaussian of this run ({cfg.selection} rule): no PLY written")
        ply_path = None
    elif cfg.output_format == "gaussians":  # the selected Gaussians as a 3DGS PLY, data frame (as qsplat export)
        g = model_gaussians(model, transform, scale, "data", features=cfg.with_features)
        g = finite_only(g.select(selected.cpu().numpy()), "qsplat query")
        write_ply_or_exit(ply_path, g, "sidecar" if cfg.with_features else None)
    else:
        means = points_to_data_frame(model.means[selected].detach().cpu().numpy(), transform, scale)
        write_selection_ply(ply_path, means, colors[selected].cpu().numpy(), scores[selected].cpu().numpy())

    png_dir = (cfg.output or run_dir / "query" / f"{safe}.ply").parent
    png_dir.mkdir(parents=True, exist_ok=True)
    png_paths = []
    eval_data = pipeline.datamanager.fixed_indices_eval_dataloader
    model.set_query(cfg.text)
    for index in cfg.cameras:
        if not 0 <= index < len(eval_data):
            raise SystemExit(f"--cameras {index}: the eval split has {len(eval_data)} cameras (0..{len(eval_data) - 1})")
        camera, _ = eval_data[index]
        with model.scores_only():  # the relevancy output is a query-space render
            outputs = model.get_outputs_for_camera(camera)
        png = png_dir / f"{safe}_relevancy_eval{index}.png"
        image = (_relevancy_panel(outputs["rgb"], outputs["relevancy"]) * 255).astype(np.uint8)
        tmp = png.with_suffix(".tmp.png")
        Image.fromarray(image).save(tmp)
        tmp.replace(png)
        png_paths.append(str(png))
    summary = dict(text=cfg.text, checkpoint=str(checkpoint_path), num_gaussians=int(scores.numel()),
                   num_selected=int(selected.sum()), selection=cfg.selection,
                   threshold=cfg.threshold if cfg.selection == "absolute" else None,
                   selection_knn=cfg.selection_knn if cfg.selection == "wins" else None,
                   ply=str(ply_path) if ply_path else None,
                   output_format=cfg.output_format,
                   relevancy_pngs=png_paths)
    print(json.dumps(summary, indent=2))
    return summary


def main(cfg: Query) -> None:
    """`qsplat` runs this with the parsed options."""
    run_query(cfg)
