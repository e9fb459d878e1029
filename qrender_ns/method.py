"""nerfstudio method registration: `ns-train q-splat` (entry point nerfstudio.method_configs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Type

from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.pipelines.base_pipeline import VanillaPipelineConfig
from nerfstudio.plugins.types import MethodSpecification
from nerfstudio.utils.decorators import check_main_thread

from . import checkpoint  # (also makes our checkpoints loadable by ns-eval / ns-viewer with torch >= 2.6)
from .data.datamanager import QSplatDataManagerConfig
from .model import FEATURE_PARAM, QSplatModelConfig

MAX_STEPS = 30000

# nerfstudio imports this module while it discovers methods, before ns-eval / ns-viewer / ns-render / ns-export
# read their --load-config: a missing or broken file gets a sentence here instead of a traceback there.
checkpoint.check_ns_command_line()


def _adam(lr, final=None, warmup=0):
    scheduler = None
    if final is not None:
        scheduler = ExponentialDecaySchedulerConfig(lr_final=final, max_steps=MAX_STEPS, warmup_steps=warmup,
                                                    lr_pre_warmup=0 if warmup else 1e-8)
    return {"optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15), "scheduler": scheduler}


class QSplatTrainer(Trainer):
    """nerfstudio's Trainer with crash-safe checkpoints: saved to a temporary and renamed (a kill -9 mid-save
    leaves the previous checkpoints intact), and `--load-dir` without `--load-step` resumes from the newest
    checkpoint that loads, naming any corrupt newer one it skips."""

    @check_main_thread
    def save_checkpoint(self, step: int) -> None:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stale_partials(self.checkpoint_dir)
        ckpt_path: Path = self.checkpoint_dir / f"step-{step:09d}.ckpt"
        pipeline = self.pipeline.module if hasattr(self.pipeline, "module") else self.pipeline
        if hasattr(getattr(pipeline, "model", None), "prepare_checkpoint"):  # e.g. feature_head=backproject: features of these Gaussians
            pipeline.model.prepare_checkpoint()
        checkpoint.atomic_torch_save_or_exit(
            {
                "step": step,
                "pipeline": pipeline.state_dict(),
                "optimizers": {k: v.state_dict() for (k, v) in self.optimizers.optimizers.items()},
                "schedulers": {k: v.state_dict() for (k, v) in self.optimizers.schedulers.items()},
                "scalers": self.grad_scaler.state_dict(),
            },
            ckpt_path,
        )
        if self.config.save_only_latest_checkpoint:  # only once the new one is in place
            for f in self.checkpoint_dir.glob("*.ckpt"):
                if f != ckpt_path:
                    f.unlink()

    def _load_checkpoint(self) -> None:
        if self.config.load_dir is not None and self.config.load_step is None:
            # the zip check reads only each file's end: no second full load of a large checkpoint
            step, _, _ = checkpoint.latest_loadable_step(self.config.load_dir)
            self.config.load_step = step
        super()._load_checkpoint()


@dataclass
class QSplatTrainerConfig(TrainerConfig):
    """TrainerConfig whose trainer saves atomically; ns-eval / ns-viewer of such a run skip a corrupt latest
    checkpoint and ns-eval checks its --output-path before evaluating (see checkpoint.preflight)."""

    _target: Type = field(default_factory=lambda: QSplatTrainer)

    def save_config(self) -> None:
        # ns-train writes config.yml first: the first place a read-only or full output folder shows
        from .fsio import check_writable_dir

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
            FEATURE_PARAM: _adam(0.01),
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
