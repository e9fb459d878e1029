"""Scenes for GS-Net training and evaluation: Gaussians + training cameras + the teacher's cache.

A scene is named by one path:
- a q-splat / splatfacto run: its `config.yml` (or the folder holding it). Gaussians come from the
  newest `nerfstudio_models/step-*.ckpt`, cameras from the run's own dataparser (so both share
  the frame nerfstudio trained in), the teacher cache from its datamanager settings.
- a scene folder (ScanNet or nerfstudio layout). Gaussians come from `<scene>/gaussians.ply` (a
  3DGS PLY, e.g. from `ns-export gaussian-splat`, in the dataparser's frame) when present, else
  from a point cloud turned into small isotropic Gaussians: `gt/points.ply` of a generated scene
  (its labels then give a 3D ground truth), or the dataparser's seed PLY.
Generated scenes (`gt/scene.json`) read their cameras from scene.json (their world frame is the
dataparser's, exactly); others go through the `qsplat-data` dataparser.

GS-Net wants metres: `units_per_metre` is the dataparser's scale (1 for generated scenes); for a
capture that is not metric, pass `--units-per-metre` yourself.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from qrender_ns.data import gaussian_ply
from qrender_ns.data.dataparser import QSplatDataParserConfig
from qrender_ns.method.checkpoint import register_safe_globals
from qrender_ns.method.datamanager import QSplatDataManagerConfig
from qrender_ns.render.projection import viewmat_from_c2w
from qrender_ns.teachers.cache import TeacherCache, default_cache_root, extract_command, image_key
from qrender_ns.teachers.setup import existing_cache_root

PathLike = Union[str, Path]
SH_C0 = 0.28209479177387814


@dataclass
class SceneGaussians:
    means: Tensor  # [N, 3]
    quats: Tensor  # [N, 4] wxyz
    scales: Tensor  # [N, 3] linear
    opacities: Tensor  # [N] in [0, 1]
    colors: Tensor  # [N, 3] RGB in [0, 1]
    labels: Optional[Tensor] = None  # [N] class ids (generated scenes' point clouds), 0 = none
    source: str = ""

    @property
    def num(self) -> int:
        return int(self.means.shape[0])

    def to(self, device) -> "SceneGaussians":
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return SceneGaussians(**moved)

    def gsnet_inputs(self) -> Dict[str, Tensor]:
        return {"means": self.means, "colors": self.colors, "opacities": self.opacities, "scales": self.scales,
                "quats": self.quats}


@dataclass
class SceneViews:
    """Training (or eval) cameras in gsplat's convention (world-to-camera, OpenCV axes)."""

    viewmats: Tensor  # [V, 4, 4]
    Ks: Tensor  # [V, 3, 3]
    width: int
    height: int
    image_keys: List[str]  # teacher-cache keys
    class_maps: List[Optional[Path]] = field(default_factory=list)  # ground-truth class PNGs when known


@dataclass
class TrainingScene:
    name: str
    root: Path  # scene data folder
    gaussians: SceneGaussians
    train: SceneViews
    eval: Optional[SceneViews]
    teacher_root: Path
    units_per_metre: float = 1.0
    class_names: List[str] = field(default_factory=list)
    class_ids: List[int] = field(default_factory=list)  # id of each class name (labels / class maps use ids)

    _teacher = None

    @property
    def teacher(self):
        if self._teacher is None:
            self._teacher = TeacherCache(self.teacher_root)
        return self._teacher


# ---------------------------------------------------------------------------------------------------
# Gaussians
# ---------------------------------------------------------------------------------------------------


def gaussians_from_points(xyz: np.ndarray, rgb: np.ndarray, labels: Optional[np.ndarray] = None,
                          scale: Optional[float] = None, opacity: float = 0.9, source: str = "") -> SceneGaussians:
    """Isotropic Gaussians at points; scale = mean distance to the 3 nearest neighbours (clipped to
    [2 mm, 10 cm] in the points' units) unless given."""
    xyz = np.asarray(xyz, dtype=np.float32)
    if scale is None:
        from scipy.spatial import cKDTree

        if len(xyz) > 3:
            dist, _ = cKDTree(xyz).query(xyz, k=4)
            scale_per = np.clip(dist[:, 1:].mean(1), 0.002, 0.1).astype(np.float32)
        else:
            scale_per = np.full(len(xyz), 0.01, np.float32)
    else:
        scale_per = np.full(len(xyz), float(scale), np.float32)
    n = len(xyz)
    rgb = np.asarray(rgb, dtype=np.float32)
    rgb = rgb / 255.0 if rgb.max(initial=0) > 1.0 else rgb
    return SceneGaussians(
        means=torch.from_numpy(xyz), quats=torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
        scales=torch.from_numpy(scale_per)[:, None].repeat(1, 3), opacities=torch.full((n,), float(opacity)),
        colors=torch.from_numpy(rgb).clamp(0, 1),
        labels=None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64)), source=source)


def scene_gaussians_from_ply(g: "gaussian_ply.GaussianPly", source: str = "") -> SceneGaussians:
    """A GaussianPly (qrender_ns.data.gaussian_ply) as GS-Net / back-projection inputs (activated parameters)."""
    return SceneGaussians(
        means=torch.from_numpy(np.ascontiguousarray(g.means, dtype=np.float32)),
        quats=torch.from_numpy(np.ascontiguousarray(g.quats_wxyz, dtype=np.float32)),
        scales=torch.from_numpy(np.exp(g.log_scales).astype(np.float32)),
        opacities=torch.sigmoid(torch.from_numpy(np.ascontiguousarray(g.opacity_logits, dtype=np.float32))),
        colors=torch.from_numpy((0.5 + SH_C0 * g.sh_dc).astype(np.float32)).clamp(0, 1), source=source)


def read_ply_gaussians(path: PathLike, point_scale: Optional[float] = None) -> SceneGaussians:
    """A 3DGS PLY (x y z, f_dc_0..2, opacity logit, scale_0..2 log, rot_0..3 wxyz; read and checked by
    qrender_ns.data.gaussian_ply, taken in the frame it is in) or a coloured point cloud (x y z red green blue
    [label]) turned into Gaussians."""
    from plyfile import PlyData

    v = PlyData.read(str(path))["vertex"].data
    names = set(v.dtype.names)
    xyz = np.stack([v["x"], v["y"], v["z"]], 1).astype(np.float32)
    if names & {"opacity", "scale_0", "rot_0", "f_dc_0"}:
        return scene_gaussians_from_ply(gaussian_ply.read_gaussian_ply(path, features=False), str(path))
    if {"red", "green", "blue"} <= names:
        rgb = np.stack([v["red"], v["green"], v["blue"]], 1)
        labels = np.asarray(v["label"]) if "label" in names else None
        return gaussians_from_points(xyz, rgb, labels, scale=point_scale, source=str(path))
    raise ValueError(f"{path}: neither a 3DGS PLY (opacity, scale_*, rot_*, f_dc_*) nor a coloured point cloud "
                     f"(red, green, blue); fields: {sorted(names)}")


def _find_state(pipeline_state: dict, name: str) -> Tensor:
    hits = [k for k in pipeline_state if k.endswith(f"gauss_params.{name}")]
    if len(hits) != 1:
        raise KeyError(f"checkpoint has {len(hits)} entries named *gauss_params.{name}; not a splatfacto/q-splat "
                       f"checkpoint?")
    return pipeline_state[hits[0]]


def read_nerfstudio_gaussians(checkpoint: PathLike) -> SceneGaussians:
    """Gaussians of a splatfacto / q-splat checkpoint (step-*.ckpt), on the CPU."""
    register_safe_globals()  # numpy scalars allow-listed for weights_only loading

    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["pipeline"]
    except pickle.UnpicklingError as e:
        raise ValueError(f"{checkpoint}: cannot be read with torch.load(weights_only=True) ({e}). Export its "
                         "Gaussians with `ns-export gaussian-splat` and pass the scene folder with gaussians.ply "
                         "instead.") from None
    dc, rest = _find_state(state, "features_dc"), _find_state(state, "features_rest")
    colors = (0.5 + SH_C0 * dc) if rest.shape[1] > 0 else torch.sigmoid(dc)
    return SceneGaussians(
        means=_find_state(state, "means").float(), quats=_find_state(state, "quats").float(),
        scales=torch.exp(_find_state(state, "scales").float()),
        opacities=torch.sigmoid(_find_state(state, "opacities").float()).reshape(-1),
        colors=colors.float().clamp(0, 1), source=str(checkpoint))


def latest_checkpoint(run_dir: Path) -> Path:
    ckpts = sorted((run_dir / "nerfstudio_models").glob("step-*.ckpt"))
    if not ckpts:
        raise FileNotFoundError(f"{run_dir}/nerfstudio_models has no step-*.ckpt: train the run first")
    return ckpts[-1]


# ---------------------------------------------------------------------------------------------------
# Cameras
# ---------------------------------------------------------------------------------------------------


def _generated_views(root: Path, meta: dict, eval_split: bool) -> SceneViews:
    cams = [c for c in meta["cameras"] if bool(c["is_eval"]) == eval_split]
    c2w = torch.tensor(np.array([c["c2w_opencv"] for c in cams]), dtype=torch.float32)
    K = torch.tensor(meta["K"], dtype=torch.float32)
    return SceneViews(viewmats=torch.linalg.inv(c2w), Ks=K[None].repeat(len(cams), 1, 1), width=int(meta["width"]),
                      height=int(meta["height"]), image_keys=[c["image"] for c in cams],
                      class_maps=[root / c["class_map"] for c in cams])


def _dataparser_views(parser_config, scene_root: Path, split: str, transform_out: Optional[list] = None
                      ) -> Tuple[SceneViews, float]:
    # The cameras as training serves them (downscaled on load, undistorted and cropped), matching the teacher
    # cache, which holds the served images.
    datamanager = QSplatDataManagerConfig(dataparser=parser_config, teacher="none").setup(device="cpu", test_mode="val")
    train = split == "train"
    _ = datamanager.cached_train if train else datamanager.cached_eval  # undistortion updates the intrinsics
    outputs = datamanager.train_dataparser_outputs if train else datamanager.eval_dataset._dataparser_outputs
    cams = (datamanager.train_dataset if train else datamanager.eval_dataset).cameras
    widths, heights = cams.width.unique(), cams.height.unique()
    if widths.numel() != 1 or heights.numel() != 1:
        raise ValueError(f"{scene_root}: GS-Net training needs one image size per scene, got "
                         f"{widths.tolist()} x {heights.tolist()}")
    viewmats = viewmat_from_c2w(cams.camera_to_worlds.float())
    keys = [image_key(f, scene_root) for f in outputs.image_filenames]
    maps = [scene_root / "gt" / "classes" / f"{Path(f).stem}.png" for f in outputs.image_filenames]
    views = SceneViews(viewmats=viewmats, Ks=cams.get_intrinsics_matrices().float(), width=int(widths[0]),
                       height=int(heights[0]), image_keys=keys, class_maps=[m if m.is_file() else None for m in maps])
    if transform_out is not None:  # the dataparser transform (data frame -> this frame), for --gaussians-ply
        transform_out[:] = [outputs.dataparser_transform.detach().cpu().numpy()[:3], float(outputs.dataparser_scale)]
    return views, float(outputs.dataparser_scale)


def _gaussians_from_user_ply(path: Path, frame: str, views: SceneViews, transform) -> Tuple[SceneGaussians, "gaussian_ply.ResolvedGaussians"]:
    """--gaussians-ply read, checked and brought into the cameras' (dataparser) frame; ValueError (one sentence)."""
    centres = torch.linalg.inv(views.viewmats.double())[:, :3, 3].numpy()
    T, s = transform
    resolved = gaussian_ply.gaussians_in_dataparser_frame(path, frame, T, s, centres)
    return scene_gaussians_from_ply(resolved.gaussians, str(path)), resolved


def _classes(root: Path, teacher_root: Path) -> Tuple[List[str], List[int]]:
    """(class names, their ids): a generated scene's classes, else the teacher's (ids 1..C)."""
    scene_json = root / "gt" / "scene.json"
    if scene_json.is_file():
        classes = sorted(json.loads(scene_json.read_text())["classes"], key=lambda c: c["id"])
        return [c["name"] for c in classes], [int(c["id"]) for c in classes]
    manifest = teacher_root / "manifest.json"
    names = list(json.loads(manifest.read_text()).get("class_names", [])) if manifest.is_file() else []
    return names, list(range(1, len(names) + 1))


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------


def load_scene(spec: PathLike, teacher: str = "synthetic", units_per_metre: Optional[float] = None,
               point_scale: Optional[float] = None, with_eval: bool = True, gaussians_ply: Optional[PathLike] = None,
               gaussians_ply_frame: str = "auto", require_teacher: bool = True) -> TrainingScene:
    """The scene named by `spec` (a run's config.yml / run folder, or a scene folder; module docstring).
    gaussians_ply: with a scene folder, a trained 3DGS PLY (Inria's, ns-export's, qsplat export's) whose
    Gaussians the scene gets, brought into the cameras' frame (`gaussians_ply_frame`: auto / data / dataparser,
    as --pipeline.model.gaussians-ply-frame); the answer's `resolved` attribute says how. GaussianPlyError
    (a ValueError, one sentence naming the file) for a bad PLY or one that does not overlap the cameras."""
    spec = Path(spec)
    resolved = None
    config_path = spec if spec.name.endswith(".yml") else spec / "config.yml"
    if config_path.is_file() and gaussians_ply is not None:
        raise ValueError(f"--gaussians-ply goes with a scene folder, not a run ({config_path}): a run has its Gaussians")
    if config_path.is_file():
        import yaml

        config = yaml.load(config_path.read_text(), Loader=yaml.Loader)
        dm = config.pipeline.datamanager
        root = Path(dm.data if dm.data is not None else dm.dataparser.data)
        parser = dm.dataparser
        parser.data = root
        gaussians = read_nerfstudio_gaussians(latest_checkpoint(config_path.parent))

        teacher_root = existing_cache_root(dm, root) or default_cache_root(root, teacher)
        train, scale = _dataparser_views(parser, root, "train")
        eval_views = _dataparser_views(parser, root, "test")[0] if with_eval else None
        name = f"{root.name}:{config_path.parent.name}"
    else:
        root = spec
        if not root.is_dir():
            raise FileNotFoundError(f"GS-Net scene {spec}: neither a run's config.yml nor a scene folder")
        teacher_root = default_cache_root(root, teacher)
        scene_json = root / "gt" / "scene.json"
        meta = json.loads(scene_json.read_text()) if scene_json.is_file() else None
        if gaussians_ply is not None:
            gaussians = None  # below, once the cameras are known
        elif (root / "gaussians.ply").is_file():
            gaussians = read_ply_gaussians(root / "gaussians.ply", point_scale)
        elif meta is not None:
            gaussians = read_ply_gaussians(root / meta["point_cloud"], point_scale)
        else:
            gaussians = None
        transform = [np.eye(4)[:3], 1.0]  # generated scenes: their world frame is the dataparser's
        if meta is not None:
            train, scale = _generated_views(root, meta, False), 1.0
            eval_views = _generated_views(root, meta, True) if with_eval else None
        else:
            parser = QSplatDataParserConfig(data=root)
            train, scale = _dataparser_views(parser, root, "train", transform)
            eval_views = _dataparser_views(parser, root, "test")[0] if with_eval else None
        if gaussians_ply is not None:
            gaussians, resolved = _gaussians_from_user_ply(Path(gaussians_ply), gaussians_ply_frame, train, transform)
        if meta is None:
            if gaussians is None:
                seed = parser.setup().get_dataparser_outputs("train").metadata.get("points3D_xyz")
                if seed is None:
                    raise FileNotFoundError(f"{root}: no gaussians.ply and no seed point cloud")
                rgb = parser.setup().get_dataparser_outputs("train").metadata["points3D_rgb"]
                gaussians = gaussians_from_points(seed.numpy(), rgb.numpy(), scale=point_scale, source="seed points")
        name = root.name if gaussians_ply is None else f"{root.name}:{Path(gaussians_ply).stem}"
    if require_teacher and not (teacher_root / "manifest.json").is_file():
        raise FileNotFoundError(f"GS-Net scene {spec}: no teacher cache at {teacher_root}. "
                                f"Run `{extract_command(root, teacher)}` first.")
    names, ids = _classes(root, teacher_root)
    scene = TrainingScene(name=name, root=root, gaussians=gaussians, train=train, eval=eval_views,
                          teacher_root=teacher_root, units_per_metre=units_per_metre or scale,
                          class_names=names, class_ids=ids)
    scene.resolved = resolved
    return scene
