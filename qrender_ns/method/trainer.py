"""nerfstudio's Trainer with crash-safe checkpoints (see QSplatTrainer)."""

from __future__ import annotations

from pathlib import Path

from nerfstudio.engine.trainer import Trainer
from nerfstudio.utils.decorators import check_main_thread

from qrender_ns.method import checkpoint


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
        checkpoint.register_safe_globals()
        if self.config.load_dir is not None and self.config.load_step is None:
            # the zip check reads only each file's end: no second full load of a large checkpoint
            step, _, _ = checkpoint.latest_loadable_step(self.config.load_dir)
            self.config.load_step = step
        super()._load_checkpoint()
