"""Options of the `qsplat` verbs whose code lives in workflows/ (one dataclass per verb; `qsplat --help` reads
them, so this module imports no nerfstudio). Each `main()` makes the verb's one lazy import: its code module."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Literal, Optional, Tuple

import tyro

from qrender_ns.data.scene_generator import SceneVariation
from qrender_ns.gsnet.augment import GSNetAugment
from qrender_ns.gsnet.gsnet import GSNetConfig
from qrender_ns.teachers.settings import TeacherSettings

FitKind = Literal["plain", "depth"]
DEFAULT_FRAME_STRIDE = 20  # every 20th frame of a .sens (OpenGaussian / OpenScene; data/sens.py)


@dataclass
class BuildExt:
    """Compile the rasterizer kernels now (otherwise the first render compiles them)."""

    cuda: bool = False
    """Also build the CUDA kernel (needs nvcc; compiles for $TORCH_CUDA_ARCH_LIST)."""
    verbose: bool = False

    def main(self) -> None:
        from qrender_ns.render import _backend

        _backend.load_extension(with_cuda=False, verbose=self.verbose)
        print(f"[q-splat] CPU kernel ready in {_backend.ext_dir()}")
        if self.cuda:
            _backend.load_extension(with_cuda=True, verbose=self.verbose)
            print(f"[q-splat] CUDA kernel ready in {_backend.ext_dir()}")


@dataclass
class RenderDemo:
    """Render generated Gaussians densely and with Q-Render; write PNGs, print the time ratio."""

    out: Path = Path("demo_out/render")
    """Folder for the PNGs and the JSON summary."""
    num_gaussians: int = 20000
    channels: int = 512
    num_quantiles: int = 8
    width: int = 320
    height: int = 240
    seed: int = 0

    def main(self) -> None:
        from qrender_ns.workflows.render_demo import run_demo

        run_demo(self)


@dataclass
class Demo:
    """The whole workflow on CPU: make a scene, extract teacher features, ns-train, ns-eval, query."""

    out: Path = Path("demo_out")
    seed: int = 2
    """Scene seed (2 has a chair, which the demo queries)."""
    num_images: int = 24
    steps: int = 500
    feature_warmup_steps: int = 150
    num_quantiles: int = 10

    def main(self) -> None:
        from qrender_ns.workflows.demo import run_pipeline_demo

        run_pipeline_demo(self)


@dataclass
class MakeDataset:
    """Generate a multi-scene dataset for GS-Net: varied rooms, each with its synthetic teacher cache, a short
    3DGS fit per --fits kind, and a train/val split file (resumable; docs/gsnet.md, "Multi-scene dataset")."""

    out: Path
    """Dataset folder (created; an existing one is resumed)."""
    scenes: int = 32
    """Number of scenes (train + val)."""
    val_scenes: int = 8
    """The last VAL_SCENES scenes form the validation split."""
    seed: int = 0
    """Dataset seed: scene i is generated with seed SEED * 1000 + i."""
    layout: Literal["scannet", "nerfstudio"] = "scannet"
    width: int = 128
    height: int = 96
    num_images: int = 16
    num_eval: int = 2
    """Views per scene held out from the fit (its PSNR is measured on them)."""
    num_points: int = 30000
    """Surface points sampled per room before hidden ones are dropped (the fit's seed points)."""
    variation: SceneVariation = field(default_factory=SceneVariation)
    """How much rooms differ (room size, furniture count/size/placement/colour, camera path)."""
    fits: Tuple[FitKind, ...] = ("plain",)
    """3DGS fits per scene, each its own run: plain (no depth loss), depth (--pipeline.model.depth-loss on)."""
    fit_steps: int = 300
    """Training steps of each fit (see docs/gsnet.md for the measured PSNR per step count)."""
    depth_loss_mult: Optional[float] = None
    """depth fits: --pipeline.model.depth-loss-mult (default: the model's)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device of the fits (auto: CUDA when available)."""
    synthetic_label_noise: float = 0.0
    """Teacher: probability that a furniture instance is named as another furniture class in all its views (a
    real teacher's consistent misdetection; docs/gsnet.md, "A noisy teacher")."""
    synthetic_miss_rate: float = 0.0
    """Teacher: probability that an instance's mask is missing from a view (a missed detection)."""
    jobs: int = 1
    """Scenes built in parallel, one process each (one torch thread per process)."""
    progress: bool = True

    def main(self) -> None:
        from qrender_ns.workflows.make_dataset import main

        main(self)


@dataclass
class ExtractFeatures(TeacherSettings):
    """Cache per-image masks and 512-D embeddings from a 2D teacher (images already cached are skipped).
    `ns-train q-splat` does this by itself when the cache is missing; the options have the same names there
    (--pipeline.datamanager.NAME)."""

    data: Path = Path(".")
    """Scene folder in any layout `ns-train q-splat` reads (COLMAP, nerfstudio, instant-ngp, ScanNet, generated)."""
    overwrite: bool = False
    """Recompute every image, not only those without a current cache entry (and replace a cache made with other
    settings)."""
    splits: Tuple[str, ...] = ("train",)
    """Dataparser splits whose images get features (training reads the train split)."""
    downscale_factor: Optional[float] = None
    """As `qsplat-data --downscale-factor` of the training run (None: automatic, the same
    rule): the teacher sees the images at the resolution training serves them."""

    def main(self) -> None:
        from qrender_ns.workflows.extract_features import main

        main(self)


@dataclass
class Query:
    """Score every Gaussian of a trained q-splat scene against a text query."""

    load_config: Path
    """config.yml of a q-splat run (as for ns-eval)."""
    text: str
    """The query, e.g. "chair"."""
    output: Optional[Path] = None
    """PLY of the selected Gaussians (default: <run dir>/query/<text>.ply), in the data's frame (as `qsplat export`)."""
    output_format: Literal["gaussians", "points"] = "gaussians"
    """gaussians: a standard 3DGS PLY of the selected Gaussians (any 3DGS viewer; `qsplat export`'s layout); points:
    a coloured point cloud (x y z red green blue relevancy) of their centres."""
    with_features: bool = False
    """--output-format gaussians: also write the selected Gaussians' features (<name>.features.npz)."""
    selection: Literal["wins", "absolute"] = "wins"
    """wins: a Gaussian is selected when the query's cosine beats every other class/prompt of the run's vocabulary
    and the canonical negatives, and it has a (non-zero) learnt feature: no threshold. absolute: relevancy vs the
    canonical negatives > --threshold (the old rule, kept for comparison)."""
    threshold: float = 0.55
    """--selection absolute only: relevancy above which a Gaussian is selected (0.5 = no better than a generic
    word)."""
    selection_knn: int = 32  # = qrender_ns.features.selection.DEFAULT_KNN (this module stays import-light)
    """wins: smooth each Gaussian's feature over its this-many nearest Gaussians in 3D, weighted by the supervision
    each received, before the comparison (0 = its own feature only; 32 chosen on validation rooms, docs/evaluation.md)."""
    min_opacity: float = 0.1
    """Ignore nearly transparent Gaussians."""
    cameras: List[int] = field(default_factory=lambda: [0])
    """Eval cameras for which relevancy PNGs are rendered (indices into the eval split)."""

    def main(self) -> None:
        from qrender_ns.workflows.query import main

        main(self)


@dataclass
class Export:
    """Write a trained q-splat run's Gaussians as a standard 3DGS PLY (any 3DGS viewer opens it) with their 512-D
    features in a sidecar <name>.features.npz (docs/usage.md, "Bring your own 3DGS, export")."""

    load_config: Path
    """config.yml of a q-splat run (as for ns-eval)."""
    output: Optional[Path] = None
    """The PLY to write (default: <run dir>/export/gaussians.ply); the sidecar goes beside it."""
    frame: Literal["data", "dataparser"] = "data"
    """data: the dataset's world frame (COLMAP / ScanNet / transforms.json), like Inria's point_cloud.ply; dataparser:
    nerfstudio's normalised frame the model trained in, like `ns-export gaussian-splat`. The transform is recorded
    in a PLY comment either way (`--pipeline.model.gaussians-ply` reads it back)."""
    features: Literal["sidecar", "properties", "none"] = "sidecar"
    """sidecar: <name>.features.npz (float16 by default, with a hash of the positions); properties: f_lang_* float
    properties in the PLY itself (a self-contained file, ~2x the size, foreign viewers carry 512 columns); none."""
    features_dtype: Literal["float16", "float32"] = "float16"
    """Sidecar precision."""

    def main(self) -> None:
        from qrender_ns.workflows.export import main

        main(self)


@dataclass
class TrainGSNet:
    """Train GS-Net across scenes (contrastive loss on Q-Rendered features vs the teacher's masks)."""

    scenes: Tuple[Path, ...] = ()
    """Scenes: run configs (config.yml of q-splat / splatfacto runs) or scene folders (docs/gsnet.md)."""
    dataset: Optional[Path] = None
    """A `qsplat make-dataset` folder: its train split is added to --scenes, and its val split is evaluated
    (feed-forward mIoU) after training (`<out stem>_val.json`)."""
    fit: Literal["plain", "depth", "none"] = "plain"
    """--dataset: which fits give the Gaussians (plain, depth: the fitted 3DGS runs; none: the scene folders,
    Gaussians made from the labelled point clouds)."""
    eval_val: bool = True
    """--dataset: evaluate the val scenes after training."""
    val_every: int = 0
    """--dataset: also evaluate the val scenes every this many steps (feed-forward mIoU to TensorBoard as
    gsnet/val_<metric>, and `<out stem>_val.json`); 0 = only at the end."""
    out: Path = Path("outputs/gsnet/gsnet.ckpt")
    """Checkpoint to write (and to resume from when it exists)."""
    gsnet: GSNetConfig = field(default_factory=GSNetConfig)
    augment: GSNetAugment = field(default_factory=GSNetAugment)
    """Random rotation about z / mirror / scale / colour jitter of GS-Net's inputs per scene and step (the rendered
    scene is untouched; gsnet/augment.py). --augment.no-enabled turns it off."""
    steps: int = 1000
    """Optimiser steps (total, including resumed ones)."""
    scenes_per_step: int = 4
    """Scenes per optimiser step and process (paper: batch 4)."""
    views_per_scene: int = 4
    """Random training views rendered per scene (paper: 4)."""
    num_quantiles: Optional[int] = 10
    """K of Q-Render for the training renders (None = dense)."""
    render_scale: float = 1.0
    """Render at this fraction of the image resolution (teacher masks are resampled nearest)."""
    pixels_per_mask: int = 256
    loss: Literal["paper", "infonce"] = "paper"
    lr: float = 1e-3
    ema_decay: float = 0.0
    """Also keep an exponential moving average of the weights and BN statistics, this decay per step (0.995
    averages over ~200 steps; warmed up as min(D, (1 + t) / (10 + t))), saved as <out stem>_ema.ckpt with every
    checkpoint and resumed from it. Small noisy batches (2-4 scenes a step) make the last weights a noisy
    sample; the average is the net to predict with. 0 = off."""
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    """Epochs without improvement of the epoch loss before the learning rate is multiplied by plateau_factor."""
    teacher: str = "synthetic"
    """Teacher cache of scene folders (<scene>/qsplat_teacher/<teacher>)."""
    units_per_metre: Optional[float] = None
    """Scene units per metre (default: the dataparser's scale; 1 for generated scenes)."""
    point_scale: Optional[float] = None
    """Size of the Gaussians made from point clouds (default: mean 3-NN distance)."""
    resume: bool = True
    save_every: int = 100
    log_every: int = 10
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_cached_scenes: int = 16
    """Scenes kept in memory per process (others are re-read from disk when drawn)."""
    rasterizer_backend: Literal["auto", "cpu", "cuda", "triton", "torch"] = "auto"
    progress: bool = True
    tensorboard: bool = True

    def main(self) -> None:
        from qrender_ns.workflows.train_gsnet import main

        main(self)

    def __post_init__(self):
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be in [0, 1) (0 = off), got {self.ema_decay}")


@dataclass
class PredictFeatures:
    """Predict every Gaussian's feature of a trained q-splat run with a trained GS-Net."""

    gsnet_checkpoint: Path
    """GS-Net checkpoint from `qsplat train-gsnet`."""
    load_config: Optional[Path] = None
    """config.yml of a q-splat run (as for ns-eval): its features are filled and written as a new run. Or, instead:
    --data and --gaussians-ply."""
    data: Optional[Path] = None
    """With --gaussians-ply instead of a run: the scene folder (images and cameras; any layout ns-train reads)."""
    gaussians_ply: Optional[Path] = None
    """With --data: a trained 3DGS PLY (Inria's point_cloud.ply, ns-export gaussian-splat's, qsplat export's); the
    features are written beside a copy of it (--output)."""
    gaussians_ply_frame: Literal["auto", "data", "dataparser"] = "auto"
    """Frame of --gaussians-ply, as ns-train's --pipeline.model.gaussians-ply-frame."""
    output: Optional[Path] = None
    """--gaussians-ply: the PLY to write (its Gaussians as read, plus <name>.features.npz; default
    <data>/gsnet_features/<ply name>)."""
    teacher: str = "synthetic"
    """--gaussians-ply with --evaluate: teacher cache of the scene whose class names are evaluated."""
    evaluate: bool = True
    """Report the 2D mIoU of the class argmax on the eval views (generated scenes) before and after."""
    units_per_metre: Optional[float] = None
    """Scene units per metre (default: what the run's dataparser recorded, else 1)."""
    suffix: str = "-gsnet"
    """The new run is <run timestamp><suffix>, next to the original."""
    tta_views: int = 1
    """Average GS-Net over this many turned / mirrored copies of the Gaussians (1 = none; an even number:
    V / 2 turns about z, each as is and mirrored). Table-head runs only (a gsnet-head run calls the net itself)."""

    def main(self) -> None:
        from qrender_ns.workflows.predict_features import main

        main(self)

    def __post_init__(self):
        if (self.load_config is None) == (self.data is None or self.gaussians_ply is None):
            raise SystemExit("qsplat predict-features: give either --load-config (a q-splat run) or --data and "
                             "--gaussians-ply (a scene folder and a trained 3DGS PLY)")


@dataclass
class Backproject:
    """Training-free features: back-project the teacher's mask embeddings onto every Gaussian (the baseline
    GS-Net must beat); reports the 3D / 2D mIoU where ground truth exists, and the time."""

    scenes: Tuple[Path, ...]
    """Scenes: run configs (config.yml of q-splat / splatfacto runs) or scene folders, as `train-gsnet`."""
    gaussians_ply: Optional[Path] = None
    """With one scene folder in --scenes: a trained 3DGS PLY (Inria's point_cloud.ply, ns-export gaussian-splat's,
    qsplat export's) whose Gaussians get the features; also written as <out>/<scene>.ply + .features.npz."""
    gaussians_ply_frame: Literal["auto", "data", "dataparser"] = "auto"
    """Frame of --gaussians-ply, as ns-train's --pipeline.model.gaussians-ply-frame."""
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
        from qrender_ns.workflows.backproject import main

        main(self)


@dataclass
class PrepareScannet:
    """Convert a raw ScanNet .sens file into the scene layout `ns-train q-splat --data` reads."""

    sens: tyro.conf.Positional[Path]
    """The ScanNet <scene>.sens file (its <scene>_vh_clean_2.ply and .labels.ply beside it are copied too)."""
    out: Optional[Path] = None
    """Scene folder to write color/ depth/ pose/ intrinsic/ into (default: the folder holding the .sens)."""
    frame_stride: int = DEFAULT_FRAME_STRIDE
    """Keep every Nth frame (20: OpenGaussian / OpenScene's frame_skip; 1 keeps all); names keep the frame index."""
    image_size: Optional[Tuple[int, int]] = None
    """WIDTH HEIGHT of the written colour images (default: native, 1296 968 for ScanNet; intrinsics are scaled)."""
    max_frames: Optional[int] = None
    """Stop after this many selected frames (default: all)."""
    overwrite: bool = False
    """Replace an earlier export in --out (otherwise it is resumed, and other settings are refused)."""
    progress: bool = True
    """Show a progress bar (rich) on a terminal."""

    def main(self) -> None:
        from qrender_ns.workflows.prepare_scannet import main

        main(self)
