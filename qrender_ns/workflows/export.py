"""`qsplat export`: a trained q-splat run's Gaussians as the standard 3DGS PLY (Inria's point_cloud.ply layout,
opens in any 3DGS viewer) in the data's frame with the dataparser transform recorded, and the 512-D features in
the sidecar `<name>.features.npz` (qrender_ns.data.gaussian_ply: format, reader `read_features`).

    qsplat export --load-config outputs/room/q-splat/<time>/config.yml --output room.ply

Never-supervised Gaussians (no feature gradient ever reached them) get zero feature rows, as the model reads them.
`qsplat query --output x.ply` writes its selection with the same code (`model_gaussians`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from nerfstudio.models.splatfacto import RGB2SH

from qrender_ns.data.gaussian_ply import GaussianPly, GaussianPlyError, gaussians_to_frame, write_gaussian_ply
from qrender_ns.eval import load_pipeline
from qrender_ns.features.selection import feature_chunks
from qrender_ns.method.model import FEATURE_PARAM
from qrender_ns.workflows.options import Export


def dataparser_transform_of(pipeline):
    """(3x4 transform, scale) of the run's dataparser: data frame -> the frame the model trained in."""
    outputs = pipeline.datamanager.train_dataparser_outputs
    return outputs.dataparser_transform.detach().cpu().numpy()[:3], float(outputs.dataparser_scale)


@torch.no_grad()
def model_gaussians(model, transform, scale, frame: str = "data", features: bool = True,
                    features_dtype=np.float16) -> GaussianPly:
    """The model's Gaussians as a GaussianPly in ``frame`` ("data": the data's frame, geometry and SH rotated;
    "dataparser": as the model holds them), the transform recorded; features as the model reads them outside
    training (zero rows for never-supervised Gaussians of a table head)."""
    was_training = model.training
    model.eval()
    try:
        p = {k: v.detach().float().cpu() for k, v in model.gauss_params.items() if k != FEATURE_PARAM}
        dc = p["features_dc"] if model.config.sh_degree > 0 else RGB2SH(torch.sigmoid(p["features_dc"]))  # as ns-export
        feats = None
        if features:  # block by block into the output array: no float32 [N, D] copy of a half-precision table
            for start, rows in feature_chunks(model):
                if feats is None:
                    feats = np.empty((p["means"].shape[0], rows.shape[1]), dtype=features_dtype)
                feats[start:start + rows.shape[0]] = rows.cpu().numpy()
    finally:
        model.train(was_training)
    g = GaussianPly(means=p["means"].numpy(), sh_dc=dc.numpy(), sh_rest=p["features_rest"].numpy(),
                    opacity_logits=p["opacities"].reshape(-1).numpy(), log_scales=p["scales"].numpy(),
                    quats_wxyz=p["quats"].numpy(), features=feats,
                    transform={"frame": "dataparser", "transform": np.asarray(transform, dtype=float)[:3].tolist(),
                               "scale": float(scale)})
    return gaussians_to_frame(g, frame) if frame != "dataparser" else g


def finite_only(g: GaussianPly, what: str) -> GaussianPly:
    """``g`` without Gaussians holding NaN/inf (a PLY cannot be read back with them), saying how many went."""
    keep = g.finite_mask()
    if not keep.all():
        print(f"[q-splat] {what}: dropped {int((~keep).sum())} of {g.n} Gaussians with NaN/inf parameters")
        g = g.select(keep)
    return g


def write_ply_or_exit(path: Path, g: GaussianPly, features: Optional[str]) -> Path:
    try:
        return write_gaussian_ply(path, g, features=features)
    except (GaussianPlyError, OSError) as e:
        raise SystemExit(f"[q-splat] {' '.join(str(e).split())}") from None


def run_export(cfg: Export) -> Dict:
    pipeline, checkpoint_path = load_pipeline(cfg.load_config)
    model = pipeline.model
    transform, scale = dataparser_transform_of(pipeline)
    dtype = np.float16 if cfg.features_dtype == "float16" else np.float32
    g = model_gaussians(model, transform, scale, cfg.frame, features=cfg.features != "none", features_dtype=dtype)
    g = finite_only(g, "qsplat export")
    output = cfg.output or Path(cfg.load_config).parent / "export" / "gaussians.ply"
    path = write_ply_or_exit(output, g, None if cfg.features == "none" else cfg.features)
    reached = None if g.features is None else int((np.abs(g.features).max(axis=1) > 0).sum())
    summary = {"ply": str(path), "features": str(path.with_name(path.stem + ".features.npz"))
               if cfg.features == "sidecar" else cfg.features, "num_gaussians": g.n, "sh_degree": g.sh_degree,
               "feature_dim": None if g.features is None else int(g.features.shape[1]),
               "num_with_features": reached, "frame": cfg.frame, "checkpoint": str(checkpoint_path),
               "transform": g.transform}
    print(f"[q-splat] wrote {g.n} Gaussians ({cfg.frame} frame) to {path}")
    print(json.dumps(summary, indent=2))
    return summary


def main(cfg: Export) -> None:
    """`qsplat` runs this with the parsed options."""
    run_export(cfg)
