"""The `ns-train q-splat` configuration: trainer, pipeline, optimisers (entry point: method/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Type

from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig, OptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.pipelines.base_pipeline import VanillaPipelineConfig
from nerfstudio.plugins.types import MethodSpecification

from qrender_ns.method import checkpoint
from qrender_ns.method.datamanager import QSplatDataManagerConfig
from qrender_ns.method.model import FEATURE_PARAM, QSplatModelConfig
from qrender_ns.method.sparse_adam import RowSparseAdam
from qrender_ns.method.trainer import QSplatTrainer
from qrender_ns.utils.fsio import check_writable_dir

MAX_STEPS = 30000


def _adam(lr, final=None, warmup=0):
    scheduler = None
    if final is not None:
        scheduler = ExponentialDecaySchedulerConfig(lr_final=final, max_steps=MAX_STEPS, warmup_steps=warmup,
                                                    lr_pre_warmup=0 if warmup else 1e-8)
    return {"optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15), "scheduler": scheduler}


@dataclass
class RowSparseAdamOptimizerConfig(OptimizerConfig):
    """The feature table's optimiser: Adam on the rows a step touched (qrender_ns/method/sparse_adam.py)."""

    _target: Type = RowSparseAdam
    eps: float = 1e-15
    moments: str = "auto"
    """auto (float32 moments for a float32 table, bfloat16 first moment + a float32 second moment per row for a
    half-precision one), float32, bfloat16, bfloat16-rowwise (docs/scale.md)."""
    stochastic_rounding: bool = True
    """bfloat16 table: write updated rows back with stochastic rounding."""


@dataclass
class QSplatTrainerConfig(TrainerConfig):
    """TrainerConfig whose trainer saves atomically; ns-eval / ns-viewer of such a run skip a corrupt latest
    checkpoint and ns-eval checks its --output-path before evaluating (see checkpoint.preflight)."""

    _target: Type = field(default_factory=lambda: QSplatTrainer)

    def save_config(self) -> None:
        # ns-train writes config.yml first: the first place a read-only or full output folder shows
        check_writable_dir(self.get_base_dir(), "pass a writable --output-dir (default: ./outputs)")
        super().save_config()

    def get_checkpoint_dir(self) -> Path:
        # eval_setup calls this right before it sets up the pipeline and loads the checkpoint: the first
        # moment the plugin runs inside ns-eval / ns-viewer with nerfstudio fully imported.
        checkpoint.preflight()
        return super().get_checkpoint_dir()


def qsplat_trainer_config() -> TrainerConfig:
    # Optimisers as splatfacto's, plus the per-Gaussian features and the InfoNCE temperature.
    return QSplatTrainerConfig(
        method_name="q-splat",
        steps_per_eval_image=100,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=1000,
        max_num_iterations=MAX_STEPS,
        mixed_precision=False,
        pipeline=VanillaPipelineConfig(
            datamanager=QSplatDataManagerConfig(cache_images_type="uint8"),
            model=QSplatModelConfig(),
        ),
        optimizers={
            "means": _adam(1.6e-4, final=1.6e-6),
            "features_dc": _adam(0.0025),
            "features_rest": _adam(0.0025 / 20),
            "opacities": _adam(0.05),
            "scales": _adam(0.005),
            "quats": _adam(0.001),
            FEATURE_PARAM: {"optimizer": RowSparseAdamOptimizerConfig(lr=0.01), "scheduler": None},
            "feature_head": _adam(1e-3),
            "gsnet": _adam(1e-3),  # feature_head=gsnet: the GS-Net weights
            "camera_opt": _adam(1e-4, final=5e-7, warmup=1000),
            "bilateral_grid": _adam(2e-3, final=1e-4, warmup=1000),
        },
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    )


qsplat_method = MethodSpecification(
    config=qsplat_trainer_config(),
    description="q-splat: 3D Gaussian splatting with 512-D CLIP features rendered by Quantile Rendering (Q-Render).",
)
