"""Per-scene optimisation on a TrainingScene with GS-Net's loss: a feature table from scratch (the per-scene
baseline) or a short fine-tune of GS-Net (or of a table initialised from its prediction).

Both use `train.scene_loss` unchanged: the table is a module with GS-Net's call signature, so the loss, the
rendering (Q-Render K or dense) and the pixel sampling are exactly those of cross-scene training.
"""

from __future__ import annotations

import copy
import time
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qrender_ns.workflows.train_gsnet import TrainGSNet, scene_loss


class FeatureTable(nn.Module):
    """One free feature per Gaussian, called like GS-Net (`table(**scene.gaussians.gsnet_inputs(), units_per_metre=)`)
    and returning unit rows."""

    def __init__(self, num_gaussians: int, feature_dim: int, init: Optional[Tensor] = None, seed: int = 0):
        super().__init__()
        if init is None:
            init = torch.randn(num_gaussians, feature_dim, generator=torch.Generator().manual_seed(seed))
        if tuple(init.shape) != (num_gaussians, feature_dim):
            raise ValueError(f"init has shape {tuple(init.shape)}, expected {(num_gaussians, feature_dim)}")
        self.table = nn.Parameter(init.detach().clone().float())

    def forward(self, means: Tensor, colors: Tensor, opacities: Tensor, scales: Tensor = None, quats: Tensor = None,
                units_per_metre: float = 1.0) -> Tensor:
        if means.shape[0] != self.table.shape[0]:
            raise ValueError(f"the table holds {self.table.shape[0]} Gaussians, the scene has {means.shape[0]}")
        return F.normalize(self.table, dim=-1)


def optimise_on_scene(module: nn.Module, scene, steps: int, lr: float, cfg: Optional[TrainGSNet] = None,
                      seed: int = 0, freeze_norm: bool = True) -> Dict[str, float]:
    """Adam on `module` for `steps` steps of `scene_loss` on one scene (views_per_scene random training views per
    step, as cross-scene training). `freeze_norm`: batch-norm layers keep their running statistics (a one-scene
    fine-tune must not re-estimate them from a single scene). Returns first/last loss and seconds."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    cfg = cfg or TrainGSNet(scenes=(scene.root,))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    module.train()
    if freeze_norm:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss, _ = scene_loss(module, scene, cfg, generator)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    module.eval()
    return {"steps": steps, "first_loss": losses[0] if losses else float("nan"),
            "last_loss": losses[-1] if losses else float("nan"), "seconds": time.perf_counter() - start}


def fit_feature_table(scene, steps: int, lr: float = 0.01, init: Optional[Tensor] = None,
                      cfg: Optional[TrainGSNet] = None, seed: int = 0):
    """(features [N, C] unit, stats): a feature table trained on this scene alone (from `init` or random)."""
    dim = init.shape[1] if init is not None else int(scene.teacher.feature_dim)
    table = FeatureTable(scene.gaussians.num, dim, init, seed).to(scene.gaussians.means.device)
    stats = optimise_on_scene(table, scene, steps, lr, cfg, seed)
    with torch.no_grad():
        return table(**scene.gaussians.gsnet_inputs()), stats


def finetune_gsnet(net: nn.Module, scene, steps: int, lr: float = 1e-4, cfg: Optional[TrainGSNet] = None,
                   seed: int = 0):
    """(features [N, C], stats): a copy of `net` fine-tuned on this scene alone, then run on it (`net` unchanged)."""
    tuned = copy.deepcopy(net)
    stats = optimise_on_scene(tuned, scene, steps, lr, cfg, seed)
    with torch.no_grad():
        return tuned(**scene.gaussians.gsnet_inputs(), units_per_metre=scene.units_per_metre), stats
