"""Evaluation protocols of the paper (arXiv 2512.20927) and its baselines, on generated and real scenes.

- `scannet3d`: ScanNet 3D semantic segmentation (OpenGaussian's protocol: per-Gaussian class argmax
  over the class names, mIoU / mAcc on the 19 / 15 / 10 class subsets).  `qsplat eval-scannet`
- `lerf_ovs`: LeRF-OVS 2D open-vocabulary segmentation (LangSplat's protocol: thresholded relevancy
  maps vs polygon masks, mIoU + localization accuracy).  `qsplat eval-lerf-ovs`
- `report`: one table from the JSONs these write (and ns-eval's metrics.json), with the paper's
  published numbers as reference rows.  `qsplat report`

The exact definitions, and which numbers are comparable with which papers: docs/evaluation.md.
This module holds the helpers both protocols share; it imports nothing heavy at import time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from qrender_ns.method import checkpoint
from qrender_ns.utils.fsio import atomic_write_bytes, exit_on_write_error

__all__ = ["load_pipeline", "write_json", "write_text", "scene_root_of", "to_world", "feature_timing"]


def load_pipeline(config_path: Path):
    """(pipeline, checkpoint path) of a trained q-splat run, as ns-eval loads it (test split)."""
    config_path = Path(config_path)

    checkpoint.check_run_config(config_path)  # before nerfstudio reads it: sentences, not tracebacks
    from nerfstudio.utils.eval_utils import eval_setup

    checkpoint.install_eval_fallback()  # runs whose config.yml predates QSplatTrainerConfig too
    _, pipeline, checkpoint_path, _ = eval_setup(config_path, test_mode="test")
    return pipeline, checkpoint_path


def _atomic_write(path: Path, data: bytes) -> None:
    """atomic_write_bytes; a read-only folder or full disk is a sentence (--output)."""
    path = Path(path)
    with exit_on_write_error(path, "pass a writable --output folder"):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)


def _json_default(value: Any):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def write_json(path: Path, data: Dict) -> None:
    """Atomic JSON write (NaN is written as null: JSON has no NaN)."""
    text = json.dumps(_nan_to_none(data), indent=2, default=_json_default)
    _atomic_write(path, (text + "\n").encode("utf-8"))


def write_text(path: Path, text: str) -> None:
    _atomic_write(path, text.encode("utf-8"))


def _nan_to_none(value):
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None
    return value


def scene_root_of(pipeline) -> Path:
    """The scene folder the run was trained on."""
    outputs = pipeline.datamanager.train_dataparser_outputs
    root = (outputs.metadata or {}).get("qsplat_scene_root")
    if root:
        return Path(root)
    return Path(pipeline.datamanager.config.data or pipeline.datamanager.config.dataparser.data)


def dataparser_frame(pipeline) -> Tuple[np.ndarray, float]:
    """(transform [3,4], scale) with x_model = scale * (R x_world + t), as nerfstudio's dataparsers apply."""
    outputs = pipeline.datamanager.train_dataparser_outputs
    transform = outputs.dataparser_transform.detach().cpu().numpy().astype(np.float64)
    return transform, float(outputs.dataparser_scale)


def to_world(points_model: np.ndarray, transform: np.ndarray, scale: float) -> np.ndarray:
    """Model (dataparser) frame -> the scene's world frame (the frame of the label point clouds)."""
    rot, trans = transform[:3, :3], transform[:3, 3]
    return (np.asarray(points_model, dtype=np.float64) / scale - trans) @ rot


def feature_timing(pipeline, view: int = 0) -> Optional[Dict[str, Any]]:
    """ms per feature map, dense vs quantile, on eval view `view`, measured exactly as ns-eval does
    (QSplatModel._feature_speed_metrics: one warm-up render, then one timed render per mode)."""
    model = pipeline.model
    eval_dataset = pipeline.datamanager.eval_dataset
    if len(eval_dataset) == 0:
        return None
    view = min(max(view, 0), len(eval_dataset) - 1)
    camera = eval_dataset.cameras[view: view + 1].to(model.device)
    with torch.no_grad():
        outputs = model.get_outputs_for_camera(camera)
        if "features" not in outputs:
            return None
        metrics = model._feature_speed_metrics(outputs)
    height, width = outputs["features"].shape[:2]
    ms_q = metrics["feature_ms_quantile"]
    return {
        **{k: float(v) for k, v in metrics.items()},
        "fps_quantile": 1000.0 / ms_q if ms_q > 0 else float("nan"),
        "fps_dense": 1000.0 / metrics["feature_ms_dense"] if metrics["feature_ms_dense"] > 0 else float("nan"),
        "width": int(width), "height": int(height), "channels": int(outputs["features"].shape[-1]),
        "num_quantiles": model.config.num_quantiles,
        "device": _device_name(model.device),
        "view": f"eval {view} ({Path(eval_dataset.image_filenames[view]).name})",
    }


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def fmt(value, digits: int = 2, scale: float = 100.0) -> str:
    """Percent-style number for the markdown tables; '—' for missing/NaN."""
    if value is None:
        return "—"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not np.isfinite(value):
        return "—"
    return f"{value * scale:.{digits}f}"
