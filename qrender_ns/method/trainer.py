"""nerfstudio's Trainer with crash-safe checkpoints (see QSplatTrainer)."""

from __future__ import annotations

from pathlib import Path

from nerfstudio.engine.trainer import Trainer
from nerfstudio.utils.decorators import check_main_thread

from qrender_ns.data.gaussian_ply import GaussianPlyError, read_gaussian_ply
from qrender_ns.method import checkpoint
from qrender_ns.method.model import resolve_gaussians_ply


class QSplatTrainer(Trainer):
    """nerfstudio's Trainer with crash-safe checkpoints: saved to a temporary and renamed (a kill -9 mid-save
    leaves the previous checkpoints intact), and `--load-dir` without `--load-step` resumes from the newest
    checkpoint that loads, naming any corrupt newer one it skips."""

    def setup(self, test_mode="val") -> None:
        if test_mode == "val":
            check_gaussians_ply(self.config.pipeline)  # before the datamanager fills the teacher cache
        super().setup(test_mode=test_mode)

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


def check_gaussians_ply(pipeline_config) -> None:
    """--pipeline.model.gaussians-ply checked before any work (the teacher, the model): the file, its properties
    and values, then its frame against the training cameras (parsed here once more, without the image checks).
    SystemExit with one sentence; the model reuses the answer."""
    model = pipeline_config.model
    if getattr(model, "gaussians_ply", None) is None:
        return
    try:
        read_gaussian_ply(model.gaussians_ply, features=False)
    except GaussianPlyError as e:
        raise SystemExit(f"[q-splat] {e}") from None
    datamanager = pipeline_config.datamanager
    try:
        parser_config = datamanager.dataparser
        if getattr(datamanager, "data", None) is not None:
            parser_config.data = Path(datamanager.data)
        parser = parser_config.setup()
        if hasattr(parser, "delegate_config"):  # qsplat-data: nerfstudio's parser underneath, no image decoding
            parser = parser.delegate_config().setup()
        outputs = parser.get_dataparser_outputs("train")
        cameras = outputs.cameras.camera_to_worlds[:, :3, 3]
        transform, scale = outputs.dataparser_transform, outputs.dataparser_scale
    except Exception:  # the datamanager reports problems with the data in its own words
        return
    try:
        resolve_gaussians_ply(model, transform, scale, cameras)
    except GaussianPlyError as e:
        raise SystemExit(f"[q-splat] {e}") from None
