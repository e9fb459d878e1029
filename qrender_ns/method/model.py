"""QSplatModel: nerfstudio's splatfacto + per-Gaussian 512-D features rendered with Q-Render.

RGB, densification, optimisers and RGB losses are splatfacto's. Added: a feature head
(a per-Gaussian table, GS-Net: a sparse 3D U-Net over the Gaussians, or the training-free
back-projection of the teacher's masks), the quantile feature
map, the contrastive loss of the paper against cached teacher masks, a viewer text query, and
feature metrics for ns-eval; where the data has depth, an L1 depth loss on the expected depth (`depth_loss`)
and depth-error metrics.
Rendering is splatfacto's get_outputs rewritten as one path for every device (`render_rgb`): the device
picks only the kernels (qrender_ns.render.kernels: gsplat's rasterization and Triton on CUDA, our projection,
binning and compiled kernel on the CPU), so the CPU tests cover the GPU logic; splatfacto's `.cuda()` calls and
its torch.compile'd get_viewmat are not on it.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Literal, Optional, Tuple, Type, Union

import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics.image.lpip as lpip_module
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.models.splatfacto import RGB2SH, SplatfactoModel, SplatfactoModelConfig
from nerfstudio.utils.rich_utils import CONSOLE
from rich.markup import escape
from torch.nn import Parameter

from qrender_ns.data import gaussian_ply
from qrender_ns.data.checks import check_feature_dim
from qrender_ns.data.depth import BATCH_KEY as DEPTH_KEY
from qrender_ns.features.losses import infonce_loss, paper_contrastive_loss, sample_mask_pixels
from qrender_ns.features.metrics import mean_class_iou
from qrender_ns.features.relevancy import relevancy, relevancy_from_cosines
from qrender_ns.features.selection import FEATURE_PARAM as SELECTION_FEATURE_PARAM
from qrender_ns.gsnet.backproject import backproject_views
from qrender_ns.gsnet.gsnet import GSNetConfig
from qrender_ns.gsnet.integration import GSNetFeatures, build_gsnet
from qrender_ns.method.sparse_adam import feature_table, rows_follow_densification, touched_rows
from qrender_ns.method.viewer import QueryPanel
from qrender_ns.render import (gsplat_shim, kernels, rasterize_pixels_of_rows, rasterize_query_scores,
                               rasterize_to_pixels)
from qrender_ns.render.projection import project_and_bin, viewmat_from_c2w
from qrender_ns.render.rows import compact_view, gather_rows
from qrender_ns.render.validate import check_num_quantiles
from qrender_ns.teachers.cache import TeacherCache
from qrender_ns.teachers.text import load_text_encoder
from qrender_ns.utils.compat import torch_problem
from qrender_ns.utils.memory import huge_page_empty

FEATURE_PARAM = SELECTION_FEATURE_PARAM  # the table head's parameter name (one definition: features/selection.py)
SUPERVISED_STATE = "qsplat_feature_supervised"  # key of the flags in splatfacto's strategy_state
WEIGHT_STATE = "qsplat_feature_weight"  # key of the accumulated supervision weight in splatfacto's strategy_state
FEATURE_CHUNK_ROWS = 262_144  # rows per block of gaussian_feature_chunks (512 MiB of 512-D float32)
BACKPROJECT_STATE = "qsplat_backproject_features"  # feature_head=backproject: densified as strategy state
TILE_SIZE = 16
FROZEN_PARAMS = ("means", "scales", "quats", "features_dc", "features_rest", "opacities")  # gaussians-ply: fixed


@dataclass
class QSplatModelConfig(SplatfactoModelConfig):
    """q-splat: splatfacto geometry + 512-D features rendered with quantile rendering."""

    _target: Type = field(default_factory=lambda: QSplatModel)
    num_quantiles: Optional[int] = 10
    """K quantile Gaussians blended per pixel for feature maps (paper default 10); None = dense."""
    feature_dim: int = 512
    """Feature channels (512 = CLIP ViT-B-16)."""
    feature_precision: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """feature_head=table: the dtype the [N, feature_dim] table is stored in. Renders upcast the rows they gather
    (float32 accumulation); RowSparseAdam updates them in float32 and writes bfloat16 back with stochastic
    rounding. float32: the table as before (4x the bytes with its optimiser state; docs/scale.md)."""
    sparse_feature_grad: bool = True
    """feature_head=table: the feature loss's gradient holds only the rows its sampled pixels selected (a sparse
    COO gradient, <= pixels x K rows) and the optimiser (RowSparseAdam) updates only those, so a step's feature
    cost follows the pixels, not the scene (docs/scale.md). False: a dense [N, feature_dim] gradient every step."""
    gsnet_predict_rows: bool = True
    """feature_head=gsnet: a training step's sampled-pixel render has GS-Net predict the features of the Gaussians
    its pixels select only (the U-Net still runs on every voxel); False: all N features every step, as before."""
    feature_head: Literal["table", "gsnet", "backproject"] = "table"
    """table: a learnable feature per Gaussian; gsnet: the sparse 3D U-Net (GS-Net, docs/gsnet.md);
    backproject: training-free, the teacher's mask embeddings averaged onto the Gaussians with their
    blending weights over the training views (computed, not optimised; docs/gsnet.md)."""
    backproject_render_scale: float = 1.0
    """feature_head=backproject: render the training views at this fraction of their resolution."""
    gsnet: GSNetConfig = field(default_factory=GSNetConfig)
    """GS-Net architecture for feature_head=gsnet (voxel size, widths, sparse-conv backend)."""
    gsnet_checkpoint: Optional[Path] = None
    """Pretrained GS-Net (`qsplat train-gsnet`) for feature_head=gsnet; its architecture replaces `gsnet`."""
    freeze_gsnet: bool = False
    """feature_head=gsnet: keep the GS-Net weights fixed (feed-forward features, no fine-tuning)."""
    feature_loss: Literal["paper", "infonce"] = "paper"
    """paper: Eq. 2 (cosine, no temperature, positive excluded from the denominator);
    infonce: cross-entropy over cosine / learnable temperature."""
    feature_loss_weight: float = 1.0
    feature_warmup_steps: int = 500
    """Steps of RGB-only training before the feature loss starts (geometry settles first)."""
    pixels_per_mask: int = 256
    """Rendered pixels sampled per teacher mask for the contrastive loss."""
    infonce_init_temperature: float = 0.07
    detach_geometry_for_features: bool = True
    """The feature loss updates features only, never the Gaussians' geometry/opacity."""
    rasterizer_backend: Literal["auto", "cpu", "cuda", "triton", "torch"] = "auto"
    """Feature rasterizer implementation (auto: the compiled kernel of the device)."""
    relevancy_negatives: Tuple[str, ...] = ("object", "things", "stuff", "texture")
    """Canonical negatives for relevancy maps (as LERF)."""
    depth_loss: Literal["auto", "on", "off"] = "auto"
    """L1 between the rendered expected depth and the data's depth images (ScanNet depth/, generated scenes,
    transforms.json depth_file_path), in metres, where the depth is valid (> 0). auto: on when the training
    images have depth; on: an error at start-up if they have none. Turns on output_depth_during_training."""
    depth_loss_mult: float = 0.2
    """Weight of the depth loss (its L1 is in metres; the RGB loss is splatfacto's L1/SSIM of colours in [0, 1]).
    0.2: on generated rooms the lowest depth error of 0.05/0.2/1.0, +4 points ScanNet-19 mIoU, -0.2 dB PSNR
    (benchmarks/bench_depth.py); 1.0 costs ~2 dB."""
    allow_random_text_encoder: bool = False
    """Accept a teacher cache made with a randomly initialised CLIP (plumbing tests): its text queries and
    class metrics mean nothing. Off: such a cache's text encoder is refused with an error."""
    gaussians_ply: Optional[Path] = None
    """A trained 3DGS PLY (Inria's point_cloud.ply, `ns-export gaussian-splat`'s splat.ply, `qsplat export`'s) whose
    Gaussians replace the fit from seed points: every parameter (means, log scales, quaternions, opacity logits, SH
    colours) is loaded from it, brought into the dataparser's frame (--pipeline.model.gaussians-ply-frame), and by
    default only the features train (geometry and colours frozen, no densification, no feature warm-up, the PLY's
    full SH degree from the first step). Its SH degree may be at most --pipeline.model.sh-degree (lower: the higher
    bands are zero). docs/usage.md, "Bring your own 3DGS"."""
    gaussians_ply_frame: Literal["auto", "data", "dataparser"] = "auto"
    """Frame of --pipeline.model.gaussians-ply. data: the dataset's world frame (COLMAP / ScanNet / transforms.json;
    Inria's point_cloud.ply); dataparser: nerfstudio's normalised frame (what `ns-export gaussian-splat` writes);
    auto: the frame recorded by `qsplat export`, else detected by overlap with the training cameras (an error
    sentence when both frames overlap about equally: then name it)."""
    gaussians_ply_train_geometry: bool = False
    """--pipeline.model.gaussians-ply: also train geometry and colours (splatfacto's optimisers and densification
    from the loaded Gaussians); off: features only."""


class QSplatModel(SplatfactoModel):
    config: QSplatModelConfig

    # ------------------------------------------------------------------ setup
    def populate_modules(self):
        unsupported = torch_problem()
        if unsupported:
            raise SystemExit(f"[q-splat] {unsupported}")
        check_num_quantiles(self.config.num_quantiles)
        if self.config.gsnet_checkpoint is not None and self.config.feature_head != "gsnet":
            raise ValueError("--pipeline.model.gsnet-checkpoint needs --pipeline.model.feature-head gsnet "
                             "(for a trained table model, `qsplat predict-features` fills its features)")
        metadata = self.kwargs.get("metadata") or {}
        loaded = self._gaussians_from_ply(metadata) if self.config.gaussians_ply is not None else None
        seed, random_init = self.seed_points, self.config.random_init
        if self.config.gaussians_ply is not None:  # splatfacto's init from 4 dummy points (no kNN over a big cloud)
            self.seed_points, self.config.random_init = (torch.rand(4, 3), torch.zeros(0, 3)), False
        has_colors = seed is not None and not self.config.random_init and seed[1].shape[0] > 0
        if has_colors:  # splatfacto would build the SH tensor with .cuda(): hide the colours
            self.seed_points = (seed[0], seed[1][:0])
        try:
            with _lpips_when_available() as lpips_state:
                super().populate_modules()
        finally:
            self.seed_points, self.config.random_init = seed, random_init
        self.lpips_available = lpips_state["available"]
        if has_colors:
            self._init_colors_from_seed(seed[1])
        if loaded is not None:
            self._set_gaussians(loaded)
        self.geometry_frozen = self.config.gaussians_ply is not None and not self.config.gaussians_ply_train_geometry
        self._freeze_geometry()
        num_points = self.gauss_params["means"].shape[0]
        if self.config.feature_head == "gsnet":
            self.gsnet = build_gsnet(self.config.gsnet, self.config.feature_dim, self.config.gsnet_checkpoint,
                                     self.config.freeze_gsnet)
            self._gsnet_features = GSNetFeatures(self.gsnet, self.config.freeze_gsnet)
        elif self.config.feature_head == "backproject":
            # Computed from the training views when first needed and before every checkpoint (prepare_checkpoint);
            # in between it follows densification as strategy state (children inherit their parent's feature).
            self.register_buffer("backproject_features", torch.zeros(num_points, self.config.feature_dim))
            self._backproject_key = None  # the Gaussians the buffer was computed (or loaded) for
        else:
            self.gauss_params[FEATURE_PARAM] = feature_table(num_points, self.config.feature_dim,
                                                             self.config.feature_precision)
        # Table head: which Gaussians a feature gradient ever reached. The others keep their random
        # initialisation for training but read as zero features outside it (no relevancy where nothing was
        # learnt). Carried through densification as strategy state (gsplat copies/splits/prunes its tensors).
        self.register_buffer("feature_supervised", torch.zeros(num_points, dtype=torch.bool)
                             if self.config.feature_head == "table" else None)
        # Table head: how much supervision each Gaussian received, the Q-Render blending weight it had in the
        # views of the feature-loss steps, summed over training (issue 30 item 4: the confidence of the 3D
        # selection's kNN smoothing, qrender_ns.features.selection). Densified like the flags.
        self.register_buffer("feature_weight", torch.zeros(num_points)
                             if self.config.feature_head == "table" else None)
        self.log_temperature = Parameter(torch.tensor(math.log(self.config.infonce_init_temperature)))
        self.class_names: List[str] = list(metadata.get("qsplat_class_names") or [])
        self.teacher_cache_root: Optional[str] = metadata.get("qsplat_teacher_cache")
        # `--pipeline.datamanager.teacher-weights random-tiny` asked for random models on purpose (smoke test)
        self.random_tiny_teacher = bool(metadata.get("qsplat_teacher_random"))
        if self.teacher_cache_root and (Path(self.teacher_cache_root) / "manifest.json").is_file():
            check_feature_dim(self.config.feature_dim, TeacherCache(self.teacher_cache_root).feature_dim,
                              self.teacher_cache_root)
        self.units_per_metre = float(metadata.get("qsplat_units_per_metre") or 1.0)  # GS-Net voxels are in metres
        self.depth_units_per_metre = float(metadata.get("qsplat_depth_units_per_metre") or 1.0)
        self.use_depth_loss = self._resolve_depth_loss(metadata)
        if self.use_depth_loss:  # splatfacto's switch: training renders "RGB+ED" (CPU path: same flag)
            self.config.output_depth_during_training = True
        self._text_encoder = None
        # Eval outputs carry the [H, W, C] feature map ("features", "feature_alpha"); callers that
        # only need scores (relevancy, class maps: query-space renders) switch it off.
        self.feature_map_outputs = True
        self._add_viewer_controls()

    def _resolve_depth_loss(self, metadata) -> bool:
        """depth_loss auto/on/off -> whether this run trains with it (one line says which, for auto)."""
        mode = self.config.depth_loss
        if mode == "off":
            return False
        # a model built outside q-splat's datamanager: nerfstudio's own metadata says whether depth exists
        missing = metadata.get("qsplat_depth_missing", None if metadata.get("depth_filenames") else
                               "the dataparser lists no depth images")
        if mode == "on" and missing is not None:
            raise ValueError(
                f"--pipeline.model.depth-loss on, but the training data has no usable depth: {missing}. Depth is "
                f"read from a ScanNet scene's depth/ folder or from transforms.json's depth_file_path per frame (16-bit "
                f"PNG in mm, or .npy); pass --pipeline.model.depth-loss auto (or off) to train without it.")
        if mode == "auto":
            if missing is None:
                CONSOLE.print("\\[q-splat] depth loss on (the training images have depth; "
                              "--pipeline.model.depth-loss off to train without it)")
            else:
                CONSOLE.print(f"\\[q-splat] depth loss off: {escape(missing)}")  # \\[: a literal [ for rich
        return missing is None

    def _init_colors_from_seed(self, rgb: torch.Tensor) -> None:
        """Splatfacto's SH initialisation from the seed colours, on the CPU."""
        dim_sh = self.gauss_params["features_rest"].shape[1] + 1
        shs = torch.zeros((rgb.shape[0], dim_sh, 3))
        if self.config.sh_degree > 0:
            shs[:, 0, :3] = RGB2SH(rgb / 255)
        else:
            shs[:, 0, :3] = torch.logit(rgb / 255, eps=1e-10)
        self.gauss_params["features_dc"] = Parameter(shs[:, 0, :])
        self.gauss_params["features_rest"] = Parameter(shs[:, 1:, :])

    # ------------------------------------------------------------------ a trained 3DGS as input
    def _gaussians_from_ply(self, metadata) -> Optional[gaussian_ply.GaussianPly]:
        """--pipeline.model.gaussians-ply in the dataparser frame (None outside training: ns-eval / ns-viewer load
        the checkpoint's Gaussians, the PLY need not exist any more). Every problem: SystemExit, one sentence."""
        if metadata.get("qsplat_test_mode", "val") != "val":
            return None
        if "qsplat_dataparser_transform" not in metadata:
            raise SystemExit("[q-splat] --pipeline.model.gaussians-ply needs q-splat's datamanager (it passes the "
                             "dataparser transform and the cameras to the model)")
        try:
            resolved = resolve_gaussians_ply(self.config, metadata["qsplat_dataparser_transform"],
                                             metadata["qsplat_dataparser_scale"],
                                             metadata["qsplat_train_camera_centers"])
        except gaussian_ply.GaussianPlyError as e:
            raise SystemExit(f"[q-splat] {e}") from None
        g = resolved.gaussians
        CONSOLE.print(f"\\[q-splat] {g.n} Gaussians (SH degree {g.sh_degree}) from {escape(str(self.config.gaussians_ply))}"
                      f", frame {resolved.source_frame} ({escape(resolved.how)}); "
                      + ("training geometry and features" if self.config.gaussians_ply_train_geometry else
                         "training the features only (geometry and colours frozen, no densification)"))
        return g

    def _set_gaussians(self, g: gaussian_ply.GaussianPly) -> None:
        """The PLY's Gaussians (dataparser frame) as splatfacto's parameters; SH padded to the model's degree."""
        k_model = self.gauss_params["features_rest"].shape[1]
        rest = torch.from_numpy(np.ascontiguousarray(g.sh_rest, dtype=np.float32))
        dc = torch.from_numpy(np.ascontiguousarray(g.sh_dc, dtype=np.float32))
        if self.config.sh_degree == 0:  # splatfacto keeps sigmoid-activated colours at degree 0
            dc = torch.logit((dc * gaussian_ply.SH_C0 + 0.5).clamp(1e-6, 1 - 1e-6))
        padded = torch.zeros(g.n, k_model, 3)
        padded[:, : rest.shape[1]] = rest
        params = {"means": g.means, "scales": g.log_scales, "quats": g.quats_wxyz,
                  "opacities": np.asarray(g.opacity_logits)[:, None]}
        for name, value in params.items():
            self.gauss_params[name] = Parameter(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))
        self.gauss_params["features_dc"] = Parameter(dc)
        self.gauss_params["features_rest"] = Parameter(padded)

    def _freeze_geometry(self) -> None:
        """Features-only training on loaded Gaussians: no gradient (and no optimiser) for geometry and colours."""
        if self.geometry_frozen:
            for name in FROZEN_PARAMS:
                self.gauss_params[name].requires_grad_(False)

    def _add_viewer_controls(self) -> None:
        self.query_panel = QueryPanel(self)  # a plain object: nerfstudio finds the elements below on the model
        self.viewer_query = self.query_panel.box
        self.viewer_query_run = self.query_panel.run_button
        self.viewer_query_status = self.query_panel.status
        self.viewer_control = self.query_panel.control

    @contextlib.contextmanager
    def scores_only(self):
        """Within: eval outputs skip the [H, W, C] feature map (relevancy / class maps are rendered
        in query space from the last view's projection, see relevancy_maps)."""
        previous, self.feature_map_outputs = self.feature_map_outputs, False
        try:
            yield self
        finally:
            self.feature_map_outputs = previous

    def set_query(self, text: str) -> Optional[str]:
        """Apply a relevancy query (as the viewer box does); returns why it was refused, or None."""
        return self.query_panel.submit(text)

    @property
    def query_text(self) -> str:
        return self.query_panel.text

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            if not self.teacher_cache_root:
                raise RuntimeError("No teacher cache is known for this model, so no text encoder either")
            allow = self.config.allow_random_text_encoder or self.random_tiny_teacher
            if self.random_tiny_teacher:
                CONSOLE.print("[yellow]\\[q-splat] teacher-weights random-tiny: text queries use a random CLIP and "
                              "mean nothing (a smoke test of the pipeline).[/yellow]")
            self._text_encoder = load_text_encoder(self.teacher_cache_root, allow_random_init=allow)
        return self._text_encoder

    @property
    def gaussian_features(self) -> torch.Tensor:
        """[N, feature_dim]. Table head outside training: zero for never-supervised Gaussians."""
        if self.config.feature_head == "gsnet":
            return self._gsnet_features(self.gauss_params, self.config.sh_degree, self.units_per_metre)
        if self.config.feature_head == "backproject":
            if self._backproject_key is None:
                self.backproject()
            return self.backproject_features
        table = self.gauss_params[FEATURE_PARAM]
        if self.training:
            return table if table.dtype == torch.float32 else table.float()
        self._check_supervised(table)
        return table.float() * self.feature_supervised[:, None].float()

    def gaussian_feature_chunks(self, chunk: int = FEATURE_CHUNK_ROWS) -> Iterator[Tuple[int, torch.Tensor]]:
        """(start, float32 [<= chunk, feature_dim]) over the Gaussians in order: `gaussian_features` a block of rows
        at a time. Table head: each block upcast (and outside training masked by the supervised flags) on its
        own, so the extra memory is one block (256k x 512 float32 = 512 MiB) instead of a float32 [N, D] copy
        (issue 27: the 3D protocols and `qsplat query` at millions of Gaussians)."""
        if self.config.feature_head != "table":
            features = self.gaussian_features.detach()
            for start in range(0, features.shape[0], chunk):
                yield start, features[start:start + chunk].float()
            return
        table = self.gauss_params[FEATURE_PARAM].detach()
        if not self.training:
            self._check_supervised(table)
        for start in range(0, table.shape[0], chunk):
            rows = table[start:start + chunk].float()
            if not self.training:
                rows = rows * self.feature_supervised[start:start + chunk, None].to(rows)
            yield start, rows

    def _check_supervised(self, table: torch.Tensor) -> None:
        supervised = self.feature_supervised
        if supervised.shape[0] != table.shape[0]:
            raise RuntimeError(f"feature_supervised has {supervised.shape[0]} entries for {table.shape[0]} Gaussians: "
                               "whatever resized gauss_params must resize it too (it is densified as strategy state)")

    # ------------------------------------------------------------------ back-projection head
    def _gaussians_key(self):
        """Identity and in-place version of the geometry the back-projection depends on."""
        return tuple((t.data_ptr(), t._version, tuple(t.shape))
                     for t in (self.gauss_params[k] for k in ("means", "scales", "quats", "opacities")))

    @torch.no_grad()
    def backproject(self) -> torch.Tensor:
        """feature_head=backproject: recompute every Gaussian's feature from the training views' teacher masks
        (one rasterizer pass per view, K = num_quantiles; qrender_ns.gsnet.backproject). Returns the features."""
        provider = (self.kwargs.get("metadata") or {}).get("qsplat_train_views")
        if provider is None or not self.teacher_cache_root:
            raise RuntimeError(
                "feature_head backproject needs the training views and their teacher cache (none known here: "
                "trained with --pipeline.datamanager.teacher none, or the cache was deleted?). Run "
                "`qsplat extract-features` for the scene, or use --pipeline.model.feature-head table")
        cameras, keys = provider()
        views = []
        for i, key in enumerate(keys):
            camera = cameras[i:i + 1].to(self.device)
            camera.metadata = {"cam_idx": i}  # the camera optimiser's refined pose of this training view
            viewmat = viewmat_from_c2w(self.camera_optimizer.apply_to_camera(camera))[0]
            views.append((viewmat, camera.get_intrinsics_matrices()[0], int(camera.width), int(camera.height), key))
        params = self.gauss_params
        start = time.perf_counter()
        features, weights = backproject_views(
            params["means"], params["quats"], torch.exp(params["scales"]), torch.sigmoid(params["opacities"]).reshape(-1),
            views, TeacherCache(self.teacher_cache_root), self.config.num_quantiles, self.config.backproject_render_scale,
            self.config.rasterizer_backend, progress=True, description="back-projection")
        self.backproject_features = features.to(self.backproject_features)
        self._backproject_key = self._gaussians_key()
        CONSOLE.print(f"\\[q-splat] back-projected {features.shape[0]} features from {len(views)} views in "
                      f"{time.perf_counter() - start:.1f} s ({int((weights <= 0).sum())} Gaussians never reached)")
        return self.backproject_features

    def prepare_checkpoint(self) -> None:
        """Called by the trainer before it saves: a checkpoint holds the back-projection of its own Gaussians."""
        if self.config.feature_head == "backproject" and self._backproject_key != self._gaussians_key():
            self.backproject()

    def step_post_backward(self, step):
        """Mark the Gaussians this step's feature loss reached, then densify (the flags follow their Gaussians)."""
        if self.geometry_frozen:  # loaded Gaussians, features only: no densification
            grad = self.gauss_params[FEATURE_PARAM].grad if FEATURE_PARAM in self.gauss_params else None
            if self.feature_supervised is not None and grad is not None:  # row-sparse or dense
                self.feature_supervised[touched_rows(grad).to(self.feature_supervised.device)] = True
            return None
        if self.config.feature_head == "backproject":
            self.strategy_state[BACKPROJECT_STATE] = self.backproject_features
            super().step_post_backward(step)
            self.backproject_features = self.strategy_state[BACKPROJECT_STATE]
            return None
        if self.feature_supervised is None:
            return super().step_post_backward(step)
        param = self.gauss_params[FEATURE_PARAM]
        rows = touched_rows(param.grad)  # a row-sparse or dense gradient: the rows it reached
        self.feature_supervised[rows.to(self.feature_supervised.device)] = True
        self.strategy_state[SUPERVISED_STATE] = self.feature_supervised
        self.strategy_state[WEIGHT_STATE] = self.feature_weight
        optimizer = getattr(self, "optimizers", {}).get(FEATURE_PARAM)
        with rows_follow_densification(optimizer, self.gauss_params, FEATURE_PARAM):  # RowSparseAdam's state
            super().step_post_backward(step)
        self.feature_supervised = self.strategy_state[SUPERVISED_STATE].bool()
        self.feature_weight = self.strategy_state[WEIGHT_STATE].float()

    def load_state_dict(self, state_dict, **kwargs):  # type: ignore
        if self.config.feature_head == "backproject":
            if "backproject_features" not in state_dict:
                raise ValueError("this checkpoint has no back-projected features (trained with another feature "
                                 "head?); load it with the --pipeline.model.feature-head it was trained with")
            # nerfstudio moves the model to its device, then loads with map_location="cpu": build on the model's
            self.backproject_features = torch.zeros_like(state_dict["backproject_features"], device=self.device)
            result = super().load_state_dict(state_dict, **kwargs)
            self._backproject_key = self._gaussians_key()  # the saved features are those of the saved Gaussians
            self._freeze_geometry()
            return result
        if self.feature_supervised is not None:
            if "feature_supervised" in state_dict:  # resize to the checkpoint's Gaussian count
                self.feature_supervised = torch.zeros_like(state_dict["feature_supervised"], dtype=torch.bool,
                                                           device=self.device)
            else:  # a checkpoint from before the flag: every feature counts as learnt (the old behaviour)
                state_dict["feature_supervised"] = torch.ones(state_dict["gauss_params.means"].shape[0],
                                                              dtype=torch.bool, device=self.device)
                self.feature_supervised = torch.zeros_like(state_dict["feature_supervised"], device=self.device)
            if "feature_weight" not in state_dict:  # a checkpoint from before the weight: the flags as 0 / 1 weights
                state_dict["feature_weight"] = state_dict["feature_supervised"].float()
            self.feature_weight = torch.zeros_like(state_dict["feature_weight"], dtype=torch.float32, device=self.device)
        result = super().load_state_dict(state_dict, **kwargs)
        table = self.gauss_params.get(FEATURE_PARAM) if FEATURE_PARAM in self.gauss_params else None
        want = getattr(torch, self.config.feature_precision)
        if table is not None and table.dtype != want:  # splatfacto rebuilds it in float32 to load into
            stored = huge_page_empty(table.shape, want, table.device).copy_(table.detach())  # utils/memory.py
            self.gauss_params[FEATURE_PARAM] = Parameter(stored, requires_grad=table.requires_grad)
        self._freeze_geometry()  # splatfacto's load made new Parameters
        return result

    def get_training_callbacks(self, training_callback_attributes):
        if self.config.feature_head == "backproject" and not (
                self.teacher_cache_root and (Path(self.teacher_cache_root) / "manifest.json").is_file()):
            raise ValueError("--pipeline.model.feature-head backproject averages the teacher's mask embeddings, but "
                             "there is no teacher cache (--pipeline.datamanager.teacher none?)")
        return super().get_training_callbacks(training_callback_attributes)

    def get_gaussian_param_groups(self) -> Dict[str, List[Parameter]]:
        groups = super().get_gaussian_param_groups()
        if self.geometry_frozen:  # not handed to an optimiser at all: no update, no Adam state
            groups = {name: params for name, params in groups.items() if name not in FROZEN_PARAMS}
        if FEATURE_PARAM in self.gauss_params:
            groups[FEATURE_PARAM] = [self.gauss_params[FEATURE_PARAM]]
        return groups

    def step_cb(self, optimizers, step):
        super().step_cb(optimizers, step)
        self._rebind_optimizers()

    def _rebind_optimizers(self) -> None:
        """After `--load-dir`, splatfacto's load_state_dict swaps in new Parameter objects (resized
        to the checkpoint's Gaussian count) while the optimisers still hold the old ones, so the
        first densification indexes stale tensors. Point each optimiser at the live parameter and
        carry its (checkpoint-loaded) state over."""
        for name, param in self.gauss_params.items():
            optimizer = self.optimizers.get(name)
            if optimizer is None:
                continue
            group = optimizer.param_groups[0]
            old = group["params"][0]
            if old is not param:
                group["params"][0] = param
                if old in optimizer.state:
                    optimizer.state[param] = optimizer.state.pop(old)

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        groups = super().get_param_groups()
        if self.config.feature_loss == "infonce":
            groups["feature_head"] = [self.log_temperature]
        if self.config.feature_head == "gsnet" and not self.config.freeze_gsnet:
            groups["gsnet"] = list(self.gsnet.parameters())
        return groups

    # ------------------------------------------------------------------ rendering
    def _crop_ids(self) -> Optional[torch.Tensor]:
        if self.crop_box is None or self.training:
            return None
        return self.crop_box.within(self.means).squeeze()

    def get_outputs(self, camera: Cameras) -> Dict[str, Union[torch.Tensor, List]]:
        if not isinstance(camera, Cameras):
            return {}
        crop_ids = self._crop_ids()
        if crop_ids is not None and crop_ids.sum() == 0:
            return self.get_empty_outputs(int(camera.width.item()), int(camera.height.item()), self.background_color)
        outputs = self.render_rgb(camera, crop_ids)
        # Training renders no feature map: the feature loss renders its sampled pixels only
        # (get_loss_dict). Relevancy is a query-space render, not a function of the map.
        if not self.training:
            if self.feature_map_outputs:
                outputs.update(self.render_features(crop_ids, self.config.num_quantiles))
            # always listed, so the viewer's output choice survives an empty query
            outputs["relevancy"] = self.query_panel.relevancy(outputs, crop_ids)
        return outputs

    def _wants_features(self) -> bool:
        if self.geometry_frozen:  # loaded, settled geometry: no RGB-only warm-up
            return True
        return not self.training or self.step >= self.config.feature_warmup_steps

    def render_rgb(self, camera: Cameras, crop_ids=None) -> Dict[str, Union[torch.Tensor, List]]:
        """splatfacto's get_outputs, one path on every device: the device picks only the kernels
        (render_kernels: gsplat's rasterization on CUDA, our projection, binning and compiled dense kernel on
        the CPU). Leaves the view's projection and tiles in self.info for the feature renders."""
        if self.training:
            assert camera.shape[0] == 1, "Only one camera at a time"
            camera_to_world = self.camera_optimizer.apply_to_camera(camera)
        else:
            camera_to_world = camera.camera_to_worlds
        params = {name: (p if crop_ids is None else p[crop_ids]) for name, p in self.gauss_params.items()}
        scale = self._get_downscale_factor()
        camera.rescale_output_resolution(1 / scale)
        viewmat = viewmat_from_c2w(camera_to_world)  # splatfacto's get_viewmat without torch.compile
        K = camera.get_intrinsics_matrices().to(self.device)
        W, H = int(camera.width.item()), int(camera.height.item())
        self.last_size = (H, W)
        camera.rescale_output_resolution(scale)
        if self.config.rasterize_mode not in ("antialiased", "classic"):
            raise ValueError(f"Unknown rasterize_mode: {self.config.rasterize_mode!r} (antialiased or classic)")
        with_depth = self.config.output_depth_during_training or not self.training
        gsplat_kernels = kernels.render_kernels(self.device).rgb == "gsplat"
        rasterize_rgb = self._rasterize_rgb_gsplat if gsplat_kernels else self._rasterize_rgb_cpu
        render, alpha, self.info = rasterize_rgb(params, viewmat, K, W, H, with_depth)
        if self.training and not self.geometry_frozen:
            self.strategy.step_pre_backward(self.gauss_params, self.optimizers, self.strategy_state, self.step, self.info)
        background = self._get_background_color()
        rgb = torch.clamp(render[..., :3] + (1 - alpha) * background, 0.0, 1.0)
        if self.config.use_bilateral_grid and self.training:
            if camera.metadata is not None and "cam_idx" in camera.metadata:
                rgb = self._apply_bilateral_grid(rgb, camera.metadata["cam_idx"], H, W)
        depth = None
        if with_depth:  # expected depth (render's last channel, already divided by alpha), as gsplat's "RGB+ED"
            depth = torch.where(alpha > 0, render[..., 3:4], render[..., 3:4].detach().max()).squeeze(0)
        if background.shape[0] == 3 and not self.training:
            background = background.expand(H, W, 3)
        return {"rgb": rgb.squeeze(0), "depth": depth, "accumulation": alpha.squeeze(0), "background": background}

    def _sh_degree_to_use(self) -> Optional[int]:
        if self.config.sh_degree == 0:
            return None
        if self.config.gaussians_ply is not None:  # trained colours: their full degree from the first step
            return self.config.sh_degree
        return min(self.step // self.config.sh_degree_interval, self.config.sh_degree)

    def _rasterize_rgb_gsplat(self, params, viewmat, K, W, H, with_depth):
        """gsplat.rasterization (its CUDA ops), called as splatfacto calls it."""
        from gsplat.rendering import rasterization

        degree = self._sh_degree_to_use()
        colors = torch.cat((params["features_dc"][:, None, :], params["features_rest"]), dim=1)
        if degree is None:
            colors = torch.sigmoid(colors).squeeze(1)  # [N, 1, 3] -> [N, 3]
        return rasterization(
            means=params["means"], quats=params["quats"], scales=torch.exp(params["scales"]),
            opacities=torch.sigmoid(params["opacities"]).squeeze(-1), colors=colors, viewmats=viewmat, Ks=K,
            width=W, height=H, tile_size=TILE_SIZE, packed=False, near_plane=0.01, far_plane=1e10,
            render_mode="RGB+ED" if with_depth else "RGB", sh_degree=degree, sparse_grad=False,
            absgrad=self.strategy.absgrad, rasterize_mode=self.config.rasterize_mode)

    def _rasterize_rgb_cpu(self, params, viewmat, K, W, H, with_depth):
        """gsplat.rasterization's steps with our kernels: projection (gsplat's torch math), antialiasing
        compensation, SH colours, tile binning, dense blending (compiled CPU kernel), expected depth."""
        means, quats = params["means"], params["quats"]
        antialiased = self.config.rasterize_mode == "antialiased"
        radii, means2d, depths, conics, compensations, isect_offsets, flatten_ids = project_and_bin(
            means, quats, torch.exp(params["scales"]), viewmat, K, W, H, TILE_SIZE, calc_compensations=antialiased)
        opacities = torch.sigmoid(params["opacities"]).squeeze(-1)[None]
        if antialiased:
            opacities = opacities * compensations
        colors = self._colors(params, means, viewmat)  # [1, N, 3]
        if with_depth:
            colors = torch.cat([colors, depths[..., None]], dim=-1)
        if means2d.requires_grad:
            means2d.retain_grad()
        render, alpha = rasterize_to_pixels(
            means2d, conics, colors, opacities, W, H, TILE_SIZE, isect_offsets, flatten_ids,
            absgrad=self.strategy.absgrad and self.training, backend="cpu")
        if with_depth:
            render = torch.cat([render[..., :3], render[..., 3:4] / alpha.clamp(min=1e-10)], dim=-1)
        info = dict(means2d=means2d, radii=radii, depths=depths, conics=conics, opacities=opacities,
                    isect_offsets=isect_offsets, flatten_ids=flatten_ids, tile_size=TILE_SIZE,
                    width=W, height=H, n_cameras=1, camera_ids=None, gaussian_ids=None)
        return render, alpha, info

    def _colors(self, params, means, viewmat) -> torch.Tensor:
        colors = torch.cat((params["features_dc"][:, None, :], params["features_rest"]), dim=1)
        degree = self._sh_degree_to_use()
        if degree is None:
            return torch.sigmoid(colors).squeeze(1)[None]
        campos = torch.linalg.inv(viewmat)[:, :3, 3]
        dirs = means[None] - campos[:, None]
        return torch.clamp_min(gsplat_shim.spherical_harmonics(degree, dirs, colors[None].expand(dirs.shape[0], -1, -1, -1)) + 0.5, 0.0)

    def _feature_inputs(self, crop_ids, table_mode: str = "rows"):
        """Projected geometry of the last view (self.info, shared with its RGB) and the features.

        Table head: the Gaussians the view's tile lists reference, renamed, with their gathered rows (upcast, and
        outside training masked by the supervised flags): no [N, C] copy of the table (render/rows.py
        compact_view; the gradient of a training render is row-sparse). `table_mode` "table": the whole table as
        stored (the row-sparse sampled-pixel path); "dense": the whole table in float32 (sparse_feature_grad off)."""
        info = self.info
        geometry = [info["means2d"], info["conics"], info["opacities"]]
        if self.config.detach_geometry_for_features:
            geometry = [t.detach() for t in geometry]
        flatten_ids = info["flatten_ids"]
        if table_mode == "none":  # the caller computes the features (GS-Net's rows)
            feats = None
        elif self.config.feature_head != "table":
            feats = self.gaussian_features if crop_ids is None else self.gaussian_features[crop_ids]
        else:
            table = self.gauss_params[FEATURE_PARAM]
            index = None if crop_ids is None else torch.nonzero(crop_ids.reshape(-1)).squeeze(-1) \
                if crop_ids.dtype == torch.bool else crop_ids.reshape(-1)
            if table_mode != "rows":
                if table_mode == "dense" and table.dtype != geometry[0].dtype:
                    table = table.to(geometry[0].dtype)  # the old path: a dense gradient through the cast
                feats = table if index is None else table[index]
            else:
                view_rows, (means2d, conics, opacities, flatten_ids) = compact_view(*geometry, flatten_ids)
                geometry = [means2d, conics, opacities]
                rows = view_rows if index is None else index[view_rows]
                feats = gather_rows(table, rows, means2d.dtype)
                if not self.training:
                    self._check_supervised(table)
                    feats = feats * self.feature_supervised[rows][:, None].to(feats.dtype)
        return (geometry[0], geometry[1], feats, geometry[2], int(info["width"]), int(info["height"]),
                int(info["tile_size"]), info["isect_offsets"], flatten_ids)

    def render_features(self, crop_ids, num_quantiles: Optional[int],
                        pixel_ids: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Feature map of the last projected view (same projection and tiles as its RGB):
        {"features": [H, W, C], "feature_alpha": [H, W, 1]}, or [P, C] / [P, 1] at the flat
        pixel indices `pixel_ids` (y * W + x) only, forward and backward (training losses)."""
        if (pixel_ids is not None and self.training and self.config.feature_head == "gsnet"
                and self.config.gsnet_predict_rows and num_quantiles is not None):
            # GS-Net predicts the features of the rows the sampled pixels select only (its U-Net still sees all)
            m2d, con, _, opac, width, height, tile, offsets, ids = self._feature_inputs(crop_ids, "none")
            features_of = self._gsnet_features.rows_of(self.gauss_params, self.config.sh_degree,
                                                       self.units_per_metre)
            if crop_ids is not None:
                index = torch.nonzero(crop_ids.reshape(-1)).squeeze(-1) if crop_ids.dtype == torch.bool \
                    else crop_ids.reshape(-1)
                features_of = (lambda f, idx: (lambda rows: f(idx[rows])))(features_of, index)
            out, alpha = rasterize_pixels_of_rows(m2d, con, features_of, opac, width, height, tile, offsets, ids,
                                                  pixel_ids, num_quantiles, backend=self.config.rasterizer_backend)
            return {"features": out, "feature_alpha": alpha}
        table_mode, sparse = "rows", False
        if pixel_ids is not None and self.training and self.config.feature_head == "table":
            sparse = self.config.sparse_feature_grad and num_quantiles is not None
            table_mode = "table" if sparse else "dense"
        # the row-sparse sampled-pixel path reads the table as stored; the others its gathered rows
        out, alpha = rasterize_to_pixels(
            *self._feature_inputs(crop_ids, table_mode), num_quantiles=num_quantiles,
            backend=self.config.rasterizer_backend, validate_values=False, pixel_ids=pixel_ids,
            sparse_grad=sparse)  # NaNs surface in the losses
        if pixel_ids is not None:
            return {"features": out, "feature_alpha": alpha}
        return {"features": out[0], "feature_alpha": alpha[0]}

    @torch.no_grad()
    def render_query_scores(self, queries: torch.Tensor, crop_ids=None,
                            num_quantiles: Optional[int] = -1) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos(F(p), t_q) of the last projected view against embeddings `queries` [Q, C]:
        (scores [H, W, Q], feature_alpha [H, W, 1]), rendered in query space (no [H, W, C] map;
        equal to normalising the feature map and multiplying). num_quantiles -1: the model's K."""
        k = self.config.num_quantiles if num_quantiles == -1 else num_quantiles
        scores, alpha = rasterize_query_scores(
            *self._feature_inputs(crop_ids), queries.to(self.info["means2d"]), num_quantiles=k,
            backend=self.config.rasterizer_backend, validate_values=False)
        return scores[0], alpha[0]

    def relevancy_maps(self, texts: List[str], crop_ids=None) -> torch.Tensor:
        """LERF relevancy [H, W, len(texts)] of every text in the last projected view, from one
        query-space render of the texts and the canonical negatives (0.5 where the feature is zero)."""
        negatives = list(self.config.relevancy_negatives)
        embeddings = self.text_encoder.encode([*texts, *negatives])
        scores, alpha = self.render_query_scores(embeddings, crop_ids)
        pos, neg = scores[..., : len(texts)], scores[..., len(texts):]
        # A pixel with a zero feature (nothing rendered) scores 0.5, as LangSplat's relevancy formula gives it.
        return relevancy_from_cosines(pos, neg[..., None, :].expand(*pos.shape, len(negatives)))

    def relevancy_map(self, text, features: Optional[torch.Tensor] = None, crop_ids=None) -> torch.Tensor:
        """[H, W, 1] relevancy of `text`: query-space render of the last projected view, or from a
        given feature map `features` [H, W, C]. (The old argument order (features, text) still works.)"""
        if isinstance(text, torch.Tensor):
            text, features = features, text
        if features is None:
            return self.relevancy_maps([text], crop_ids)
        embeddings = self.text_encoder.encode([text, *self.config.relevancy_negatives]).to(features)
        return relevancy(features, embeddings[0], embeddings[1:])[..., None]

    # ------------------------------------------------------------------ losses
    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, torch.Tensor]:
        loss_dict = super().get_loss_dict(outputs, batch, metrics_dict)
        if self.training and self.use_depth_loss:
            error = self.depth_error(outputs, batch)
            if error is not None:
                loss_dict["depth_loss"] = self.config.depth_loss_mult * error
        if (self.training and self._wants_features() and "mask_ids" in batch
                and self.config.feature_head != "backproject"):  # backproject: nothing to optimise
            loss = self.sampled_feature_loss(batch["mask_ids"], batch["mask_embeddings"])
            if loss is not None:
                loss_dict["feature_loss"] = self.config.feature_loss_weight * loss
        if self.training and self.geometry_frozen and "feature_loss" not in loss_dict:
            # nothing to learn from this view (< 2 masks, no teacher): a zero the trainer can call backward on
            loss_dict["feature_loss"] = 0.0 * self.log_temperature
        return loss_dict

    def depth_error(self, outputs, batch, relative: bool = False) -> Optional[torch.Tensor]:
        """Mean |rendered expected depth - data depth| in metres over the pixels with valid depth (> 0, inside
        batch["mask"] if any), at the render size (data depth nearest-neighbour resized); relative: mean of
        |error| / depth. None if the batch has no depth or no valid pixel."""
        gt, pred = batch.get(DEPTH_KEY), outputs.get("depth")
        if gt is None or pred is None:
            return None
        gt = _nearest_resize(gt.to(pred.device), *pred.shape[:2])
        valid = (gt > 0) & torch.isfinite(gt)
        if "mask" in batch:
            valid &= _nearest_resize(batch["mask"].to(pred.device), *pred.shape[:2]).bool()
        if not valid.any():
            return None
        error = (pred[valid] - gt[valid]).abs()
        return (error / gt[valid]).mean() if relative else error.mean() / self.depth_units_per_metre

    def _sample_targets(self, mask_ids: torch.Tensor, height: int, width: int):
        """Pixels (flat y * W + x at the render size) sampled per teacher mask, and their mask ids;
        None if fewer than 2 masks are present."""
        mask_ids = _nearest_resize(mask_ids, height, width)  # training at a downscaled resolution
        pixels, targets = sample_mask_pixels(mask_ids, self.config.pixels_per_mask)
        if torch.unique(targets).numel() < 2:
            return None
        return pixels, targets

    def sampled_feature_loss(self, mask_ids: torch.Tensor, embeddings: torch.Tensor) -> Optional[torch.Tensor]:
        """Contrastive loss of the last projected view, rendering only the sampled pixels (forward
        and backward): no [H, W, C] feature map exists in a training step. None if < 2 masks."""
        sample = self._sample_targets(mask_ids, int(self.info["height"]), int(self.info["width"]))
        if sample is None:
            return None
        pixels, targets = sample
        pixel_feats = self.render_features(None, self.config.num_quantiles, pixel_ids=pixels)["features"]
        if self.feature_weight is not None:
            # the whole view, not the sampled pixels: the loss samples every mask alike, so a wall Gaussian behind
            # a small object would collect that object's oversampled pixels (measured on validation rooms 21-22:
            # sampled-pixel weights make the selection's smoothing worse than no weighting; docs/evaluation.md)
            self.feature_weight += self.pixel_weights(None)
        return self._contrastive_loss(pixel_feats, targets, embeddings)

    def pixel_weights(self, pixel_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """[N] Q-Render blending weight of every Gaussian summed over the flat pixels `pixel_ids` of the last
        projected view (None: all its pixels; the model's K): how much each Gaussian shapes the rendered
        features there. The gradient of a 1-channel render of ones (its own small forward and backward)."""
        means2d, conics, _, opacities, *rest = self._feature_inputs(None, table_mode="table")  # all N Gaussians
        ones = torch.ones(means2d.shape[-2], 1, device=means2d.device, requires_grad=True)
        with torch.enable_grad():
            out, _ = rasterize_to_pixels(means2d.detach(), conics.detach(), ones, opacities.detach(), *rest,
                                         num_quantiles=self.config.num_quantiles,
                                         backend=self.config.rasterizer_backend, validate_values=False,
                                         pixel_ids=pixel_ids)
            (grad,) = torch.autograd.grad(out.sum(), ones)
        return grad[:, 0].detach()

    @property
    def gaussian_confidence(self) -> torch.Tensor:
        """[N] >= 0: the supervision each Gaussian's feature received, for the 3D selection's smoothing. Table
        head: the accumulated blending weight (`feature_weight`; checkpoints from before it: 1 for supervised
        Gaussians); other heads: 1 where the feature is non-zero."""
        if self.feature_weight is not None and self.feature_weight.shape[0] == self.num_points:
            return self.feature_weight.detach() * self.feature_supervised.to(self.feature_weight.dtype)
        return (self.gaussian_features.detach().abs().amax(-1) > 0).float()

    def feature_loss(self, features: torch.Tensor, mask_ids: torch.Tensor, embeddings: torch.Tensor) -> Optional[torch.Tensor]:
        """Contrastive loss at sampled pixels of every teacher mask of a rendered map [H, W, C] (None if < 2 masks)."""
        sample = self._sample_targets(mask_ids, *features.shape[:2])
        if sample is None:
            return None
        pixels, targets = sample
        return self._contrastive_loss(features.reshape(-1, features.shape[-1])[pixels], targets, embeddings)

    def _contrastive_loss(self, pixel_feats: torch.Tensor, targets: torch.Tensor, embeddings: torch.Tensor):
        if self.config.feature_loss == "paper":
            loss = paper_contrastive_loss(pixel_feats, targets, embeddings)
        else:
            loss = infonce_loss(pixel_feats, targets, embeddings, self.log_temperature)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                "q-splat feature loss is NaN/Inf: check the teacher cache for corrupt embeddings "
                "(`qsplat extract-features --overwrite`) or lower the feature learning rate."
            )
        return loss

    def get_metrics_dict(self, outputs, batch) -> Dict[str, torch.Tensor]:
        metrics = super().get_metrics_dict(outputs, batch)
        if not torch.isfinite(outputs["rgb"]).all():
            raise FloatingPointError("q-splat rendered NaN colours; the last checkpoint is still usable (--load-dir)")
        return metrics

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def get_image_metrics_and_images(self, outputs, batch):
        metrics, images = super().get_image_metrics_and_images(outputs, batch)
        if not self.lpips_available:
            metrics.pop("lpips", None)
        depth_mae = self.depth_error(outputs, batch)
        if depth_mae is not None:  # where the eval images have depth, with or without the depth loss
            metrics["depth_mae_m"] = float(depth_mae)
            metrics["depth_abs_rel"] = float(self.depth_error(outputs, batch, relative=True))
        if not hasattr(self, "info"):
            return metrics, images
        metrics.update(self._feature_speed_metrics(outputs))
        if self.feature_supervised is not None:
            metrics["num_gaussians"] = float(self.feature_supervised.numel())
            metrics["num_unsupervised_gaussians"] = float((~self.feature_supervised).sum())
        elif self.config.feature_head == "backproject":
            reached = self.gaussian_features.abs().amax(dim=-1) > 0
            metrics["num_gaussians"] = float(reached.numel())
            metrics["num_unsupervised_gaussians"] = float((~reached).sum())
        if "gt_classes" in batch and self.class_names and self.teacher_cache_root:
            miou, prediction = self.class_miou(None, None, batch["gt_classes"])  # query-space class scores
            metrics["feature_miou"] = miou
            images["classes"] = _colorize_classes(prediction, len(self.class_names))
        return metrics, images

    def _feature_speed_metrics(self, outputs) -> Dict[str, float]:
        """ms per 512-D map, dense vs quantile, and their agreement, on this eval view."""
        timings, maps = {}, {}
        for mode, k in (("dense", None), ("quantile", self.config.num_quantiles or None)):
            self.render_features(self._crop_ids(), k)  # warm-up
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            maps[mode] = self.render_features(self._crop_ids(), k)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            timings[mode] = 1000 * (time.perf_counter() - t0)
        dense, alpha = maps["dense"]["features"], maps["dense"]["feature_alpha"]
        quant, quant_alpha = maps["quantile"]["features"], maps["quantile"]["feature_alpha"]
        valid = (alpha[..., 0] > 0) & (quant_alpha[..., 0] > 0) & (dense.norm(dim=-1) > 0) & (quant.norm(dim=-1) > 0)
        cos = F.cosine_similarity(quant[valid], (dense / alpha.clamp(min=1e-8))[valid], dim=-1)
        return {"feature_ms_dense": timings["dense"], "feature_ms_quantile": timings["quantile"],
                "feature_speedup_quantile_vs_dense": timings["dense"] / max(timings["quantile"], 1e-9),
                "feature_cosine_quantile_vs_dense": float(cos.mean()) if cos.numel() else float("nan")}

    def class_miou(self, features, feature_alpha, gt_classes) -> Tuple[float, torch.Tensor]:
        """2D mIoU of the class argmax of rendered features (class id = index + 1, 0 = none).
        features / feature_alpha None: class scores rendered in query space for the last view."""
        text = self.text_encoder.encode(self.class_names)
        if features is None:
            logits, feature_alpha = self.render_query_scores(text, self._crop_ids())
            nonzero = logits.abs().amax(-1) > 0  # a zero feature has zero cosines
        else:
            logits = F.normalize(features, dim=-1) @ F.normalize(text.to(features), dim=-1).T
            nonzero = features.norm(dim=-1) > 0
        prediction = logits.argmax(-1) + 1
        rendered = (feature_alpha[..., 0] > 0) & nonzero  # zero: only never-supervised Gaussians
        prediction = torch.where(rendered, prediction, torch.zeros_like(prediction))
        if gt_classes.shape != prediction.shape:
            raise ValueError(f"ground-truth class map {tuple(gt_classes.shape)} != render {tuple(prediction.shape)}")
        return mean_class_iou(prediction, gt_classes), prediction


_RESOLVED: Dict[tuple, "gaussian_ply.ResolvedGaussians"] = {}  # the trainer's early check, reused by the model


def resolve_gaussians_ply(config: QSplatModelConfig, transform, scale, camera_centers) -> "gaussian_ply.ResolvedGaussians":
    """config.gaussians_ply read, checked and brought into the dataparser frame of ``transform``/``scale``
    (``camera_centers``: the training cameras, dataparser frame). Raises GaussianPlyError (one sentence). The
    answer for the same file, frame and transform is computed once (the trainer checks before the teacher runs)."""
    path = Path(config.gaussians_ply)
    T = np.asarray(transform.detach().cpu() if hasattr(transform, "detach") else transform, dtype=np.float64)[:3]
    cams = np.asarray(camera_centers.detach().cpu() if hasattr(camera_centers, "detach") else camera_centers,
                      dtype=np.float64)
    stat = path.stat() if path.is_file() else None
    key = (str(path.resolve()), stat and (stat.st_mtime_ns, stat.st_size), config.gaussians_ply_frame,
           T.tobytes(), float(scale), cams.tobytes())
    if stat is None or key not in _RESOLVED:
        _RESOLVED.clear()
        _RESOLVED[key] = gaussian_ply.gaussians_in_dataparser_frame(
            path, config.gaussians_ply_frame, T, float(scale), cams, option="--pipeline.model.gaussians-ply-frame")
    resolved = _RESOLVED[key]
    degree = resolved.gaussians.sh_degree
    if degree > config.sh_degree:
        raise gaussian_ply.GaussianPlyError(
            f"{path} has SH degree {degree} colours but the model renders degree {config.sh_degree}: pass "
            f"--pipeline.model.sh-degree {degree}")
    return resolved


def _nearest_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[h, w, ...] -> [height, width, ...] by nearest neighbour (labels and depth are never interpolated)."""
    if image.shape[:2] == (height, width):
        return image
    rows = (torch.arange(height, device=image.device) * image.shape[0]) // height
    cols = (torch.arange(width, device=image.device) * image.shape[1]) // width
    return image[rows][:, cols]


def _colorize_classes(prediction: torch.Tensor, num_classes: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)  # the same colours on every device: drawn on the CPU, then moved
    palette = torch.cat([torch.zeros(1, 3, device="cpu"), torch.rand(num_classes, 3, generator=gen, device="cpu")])
    palette = palette.to(prediction.device)
    return palette[prediction]


_LPIPS_WEIGHTS = "alexnet-owt-7be5be79.pth"
_lpips_warned = False


@contextlib.contextmanager
def _lpips_when_available():
    """splatfacto builds an LPIPS metric whose AlexNet weights download on construction; offline
    that raises URLError. Without the weights in the torch hub cache, build a NaN-returning
    stand-in instead (for the duration of this call only) and report LPIPS as unavailable."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", _LPIPS_WEIGHTS)
    state = {"available": os.path.exists(path)}
    if state["available"]:
        yield state
        return
    global _lpips_warned
    if not _lpips_warned:
        CONSOLE.print(f"[yellow]LPIPS disabled: AlexNet weights not found at {path} (no download offline). "
                      f"Copy {_LPIPS_WEIGHTS} there to report LPIPS.[/yellow]")
        _lpips_warned = True
    original = lpip_module.LearnedPerceptualImagePatchSimilarity
    lpip_module.LearnedPerceptualImagePatchSimilarity = _UnavailableLPIPS
    try:
        yield state
    finally:
        lpip_module.LearnedPerceptualImagePatchSimilarity = original


class _UnavailableLPIPS(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, *args, **kwargs):
        device = args[0].device if args and isinstance(args[0], torch.Tensor) else "cpu"
        return torch.tensor(float("nan"), device=device)
