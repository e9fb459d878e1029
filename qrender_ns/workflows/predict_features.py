"""`qsplat predict-features`: fill a trained q-splat scene's Gaussian features with GS-Net, feed-forward.

    qsplat predict-features --load-config outputs/room/q-splat/<time>/config.yml --gsnet-checkpoint gsnet.ckpt

Loads the run (as ns-eval does), runs GS-Net once over its Gaussians and reports the time. The
result is written as a new run next to the original (`<time>-gsnet/`: config.yml + checkpoint), so
`ns-eval`, `ns-viewer` and `qsplat query` work on it unchanged; the original run is not touched.
A table-head run gets the predicted features in its table; a gsnet-head run gets the checkpoint's
weights. With ground truth (generated scenes) the 2D mIoU on the eval views is printed before and
after.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, Optional

import torch
from torch.nn import Parameter

from qrender_ns.gsnet.augment import predict_with_tta, tta_transforms
from qrender_ns.gsnet.gsnet import GSNet
from qrender_ns.gsnet.integration import gaussian_inputs_from_params
from qrender_ns.method import checkpoint
from qrender_ns.method.model import FEATURE_PARAM
from qrender_ns.workflows.options import PredictFeatures


def _eval_miou(pipeline) -> Optional[float]:
    model = pipeline.model
    if not (model.class_names and model.teacher_cache_root):
        return None
    scores = []
    with torch.no_grad():
        for camera, batch in pipeline.datamanager.fixed_indices_eval_dataloader:
            if "gt_classes" not in batch:
                return None
            outputs = model.get_outputs_for_camera(camera)
            miou, _ = model.class_miou(outputs["features"], outputs["feature_alpha"], batch["gt_classes"])
            scores.append(miou)
    return sum(scores) / len(scores) if scores else None


def run_predict(cfg: PredictFeatures) -> Dict:
    if cfg.load_config is None:
        return run_predict_ply(cfg)
    from nerfstudio.utils.eval_utils import eval_setup

    checkpoint.check_run_config(Path(cfg.load_config), "qsplat predict-features")
    checkpoint.install_eval_fallback()

    tta_transforms(cfg.tta_views)  # a bad count fails before anything is loaded
    net_cpu = GSNet.from_checkpoint(cfg.gsnet_checkpoint)  # fails early, before the run is loaded
    config, pipeline, checkpoint_path, step = eval_setup(Path(cfg.load_config), test_mode="test")
    model = pipeline.model
    if model.config.feature_head == "backproject":
        raise SystemExit(f"{cfg.load_config} was trained with --pipeline.model.feature-head backproject (computed "
                         "features, no table or GS-Net to fill); predict-features needs a table or gsnet run")
    if net_cpu.config.feature_dim != model.config.feature_dim:
        raise SystemExit(f"{cfg.gsnet_checkpoint} predicts {net_cpu.config.feature_dim}-D features; the run has "
                         f"{model.config.feature_dim}-D")
    if cfg.tta_views > 1 and model.config.feature_head != "table":
        raise SystemExit(f"--tta-views {cfg.tta_views}: {cfg.load_config} has a gsnet feature head, which runs the net "
                         "itself when it renders; test-time views need a table-head run (or --tta-views 1)")
    before = _eval_miou(pipeline) if cfg.evaluate else None
    net = net_cpu.to(model.device).eval()
    units = cfg.units_per_metre or getattr(model, "units_per_metre", 1.0)
    inputs = gaussian_inputs_from_params(model.gauss_params, model.config.sh_degree)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    features = predict_with_tta(net, inputs, units, cfg.tta_views)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if model.config.feature_head == "table":
        model.gauss_params[FEATURE_PARAM] = Parameter(features.detach().clone())
        model.feature_supervised = torch.ones(features.shape[0], dtype=torch.bool, device=features.device)  # predicted
    else:
        model.gsnet.load_weights(net.state_dict(), str(cfg.gsnet_checkpoint))
    after = _eval_miou(pipeline) if cfg.evaluate else None

    config.timestamp = f"{config.timestamp}{cfg.suffix}"
    config.load_dir = None
    out_dir = config.get_base_dir()
    config.save_config()
    ckpt_dir = out_dir / "nerfstudio_models"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / f"step-{step:09d}.ckpt"
    tmp = ckpt.with_suffix(".tmp")
    torch.save({"step": step, "pipeline": pipeline.state_dict(), "optimizers": {}, "scalers": {}}, tmp)
    tmp.replace(ckpt)
    summary = {
        "num_gaussians": int(features.shape[0]), "num_voxels": int(net.last_stats.get("num_voxels", 0)),
        "seconds": seconds, "voxelize_s": net.last_stats.get("voxelize_s"),
        "network_s": net.last_stats.get("network_s"),
        "sparse_conv_backend": net.backend_name, "device": str(model.device), "feature_head": model.config.feature_head,
        "gsnet_checkpoint": str(cfg.gsnet_checkpoint), "tta_views": cfg.tta_views,
        "source_checkpoint": str(checkpoint_path),
        "config": str(out_dir / "config.yml"), "checkpoint": str(ckpt),
        "feature_miou_before": before, "feature_miou_after": after,
    }
    print(f"[q-splat] GS-Net predicted {summary['num_gaussians']} features in {seconds:.2f} s "
          f"({summary['num_voxels']} voxels, backend {net.backend_name}); new run: {out_dir / 'config.yml'}")
    print(json.dumps(summary, indent=2))
    return summary


def run_predict_ply(cfg: PredictFeatures) -> Dict:
    """--data + --gaussians-ply: GS-Net over the PLY's Gaussians (in the cameras' frame), the features written
    beside a copy of the PLY (qrender_ns.data.gaussian_ply sidecar); the 2D mIoU on the eval views with ground truth."""
    from qrender_ns.workflows.backproject import _write_ply_with_features
    from qrender_ns.workflows.gsnet_scenes import load_scene
    from qrender_ns.workflows.train_gsnet import evaluate_features

    tta_transforms(cfg.tta_views)
    net_cpu = GSNet.from_checkpoint(cfg.gsnet_checkpoint)
    try:
        scene = load_scene(cfg.data, teacher=cfg.teacher, units_per_metre=cfg.units_per_metre, with_eval=cfg.evaluate,
                           gaussians_ply=cfg.gaussians_ply, gaussians_ply_frame=cfg.gaussians_ply_frame,
                           require_teacher=cfg.evaluate)
    except (FileNotFoundError, ValueError) as e:  # GaussianPlyError is a ValueError: one sentence
        raise SystemExit(f"qsplat predict-features: {e}") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = net_cpu.to(device).eval()
    inputs = {k: v.to(device) for k, v in scene.gaussians.gsnet_inputs().items()}
    start = time.perf_counter()
    with torch.no_grad():
        features = predict_with_tta(net, inputs, scene.units_per_metre, cfg.tta_views)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    metrics = {}
    if cfg.evaluate and scene.eval is not None and scene.class_names:
        scene.gaussians = scene.gaussians.to(device)
        metrics = evaluate_features(scene, features)
    output = cfg.output or Path(cfg.data) / "gsnet_features" / Path(cfg.gaussians_ply).name
    ply = _write_ply_with_features(cfg.gaussians_ply, features, output)
    summary = {"num_gaussians": int(features.shape[0]), "seconds": seconds, "device": str(device),
               "frame": scene.resolved.source_frame, "gsnet_checkpoint": str(cfg.gsnet_checkpoint),
               "tta_views": cfg.tta_views, "ply": str(ply), **metrics}
    print(f"[q-splat] GS-Net predicted {summary['num_gaussians']} features in {seconds:.2f} s -> {ply}")
    print(json.dumps(summary, indent=2))
    return summary


def main(cfg: PredictFeatures) -> None:
    """`qsplat` runs this with the parsed options."""
    run_predict(cfg)
