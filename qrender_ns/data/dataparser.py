"""`qsplat-data`: one dataparser for every scene layout q-splat reads, delegating to nerfstudio's own parsers.

Detected layouts (`detect_layout`), each read by the nerfstudio parser named:

- generated (`qsplat make-scene`, has `gt/scene.json`): ScanNet or nerfstudio layout below, with the scene's
  exact world frame (no re-centring / re-scaling) and its recorded eval split;
- ScanNet (`color/ depth/ pose/ intrinsic/` + `*_vh_clean_2.ply`): `scannet-data`, with the PLY found in the
  scene folder (its default `ply_file_path` is a fixed example path; a missing file silently gives random
  init);
- COLMAP (`images/` + `sparse/0/`, `colmap/sparse/0/` or `sparse/` with cameras/images/points3D): `colmap`,
  seed points from COLMAP's points. This is also how LangSplat distributes LeRF-OVS and how Mip-NeRF 360
  ships;
- nerfstudio / `ns-process-data` (`transforms.json` with `fl_x`): `nerfstudio-data`. Without a
  `ply_file_path` but with `colmap/sparse/0` (older ns-process-data) the COLMAP points seed it through the
  `colmap` parser instead of nerfstudio's interactive question;
- instant-ngp (`transforms.json` with `camera_angle_x` and no `fl_x`): `instant-ngp-data`.

Frames whose image file is missing are skipped with a warning that counts them (all missing is an error).

Downscaling (`downscale_factor`): images are resized when they are loaded (nerfstudio's dataset scale
factor), so no `images_N` folder has to exist and nothing is written next to the data; `None` picks the
smallest power of two that brings the longest side to at most `max_image_size` (1600 px, nerfstudio's rule),
1 for generated scenes. The teacher runs on the served (resized, undistorted, cropped) images, so its masks
always match what the model renders.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Literal, Optional, Tuple, Type

import torch
from nerfstudio.data.dataparsers.base_dataparser import DataParser, DataParserConfig, DataparserOutputs
from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.data.utils import colmap_parsing_utils as readers
from nerfstudio.plugins.registry_dataparser import DataParserSpecification
from nerfstudio.utils.rich_utils import CONSOLE

from qrender_ns.data.checks import check_image_count, check_images_readable, check_poses, check_seed_points
from qrender_ns.data.keys import SCANNET_DIRS  # noqa: F401  (also imported from here)
from qrender_ns.data.scene_generator import nerfstudio_parser_config, scannet_parser_config

COLMAP_MODEL_DIRS = ("sparse/0", "colmap/sparse/0", "sparse")
MAX_AUTO_IMAGE_SIZE = 1600  # nerfstudio's MAX_AUTO_RESOLUTION
Layout = Literal["scannet", "nerfstudio", "instant-ngp", "colmap"]
LAYOUTS: Tuple[str, ...] = ("scannet", "nerfstudio", "instant-ngp", "colmap")


class SceneLayoutError(ValueError):
    """The data folder is not in a layout q-splat can read, or its content is unusable."""


# ----------------------------------------------------------------------------------------------------------
# Layout detection
# ----------------------------------------------------------------------------------------------------------


def _colmap_model_dir(data: Path) -> Optional[Path]:
    """The COLMAP reconstruction folder (holding cameras.bin/txt) under one of the usual places."""
    for rel in COLMAP_MODEL_DIRS:
        folder = data / rel
        if (folder / "cameras.bin").is_file() or (folder / "cameras.txt").is_file():
            return folder
    return None


def read_transforms(path: Path) -> dict:
    """transforms.json, with a clear error for invalid JSON, no frames, or frames without a pose."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SceneLayoutError(f"{path}: not readable as JSON ({e}). Fix or regenerate it (ns-process-data).") from None
    frames = meta.get("frames") if isinstance(meta, dict) else None
    if not isinstance(frames, list) or not frames:
        raise SceneLayoutError(f"{path}: no frames (a 'frames' list with one entry per image is needed); "
                               f"zero images cannot be trained on.")
    missing = [str(f.get("file_path", f"frame #{i}")) if isinstance(f, dict) else f"frame #{i}"
               for i, f in enumerate(frames)
               if not isinstance(f, dict) or "transform_matrix" not in f or "file_path" not in f]
    if missing:
        raise SceneLayoutError(f"{path}: {len(missing)} of {len(frames)} frames lack 'transform_matrix' or "
                               f"'file_path' (first: {missing[:3]}). Every frame needs a camera-to-world pose.")
    return meta


def detect_layout(data: Path) -> Layout:
    data = Path(data)
    if not data.exists():
        raise SceneLayoutError(
            f"--data {data} does not exist. Pass a scene folder (COLMAP: images/ + sparse/0/; nerfstudio: "
            f"transforms.json; ScanNet), or generate a test scene with `qsplat make-scene --out {data}`.")
    if (data / "transforms.json").is_file():
        meta = read_transforms(data / "transforms.json")
        has_focal = "fl_x" in meta or all("fl_x" in f for f in meta["frames"])
        if not has_focal and "camera_angle_x" in meta:
            return "instant-ngp"
        return "nerfstudio"
    present = [d for d in SCANNET_DIRS if (data / d).is_dir()]
    if len(present) == len(SCANNET_DIRS):
        return "scannet"
    model = _colmap_model_dir(data)
    if model is not None:
        return "colmap"
    raise SceneLayoutError(
        f"{data} is not a scene layout q-splat reads. Expected one of: a COLMAP project (images/ + sparse/0/ "
        f"or colmap/sparse/0/ with cameras, images, points3D), a nerfstudio / instant-ngp scene (transforms.json "
        f"+ images), a ScanNet scene (folders {', '.join(SCANNET_DIRS)}; found only: {', '.join(present) or 'none'}). "
        f"From plain photos: `ns-process-data images --data PHOTOS --output-dir SCENE`.")


def _check_scannet_counts(data: Path) -> None:
    counts = {d: len([p for p in (data / d).iterdir() if p.is_file()]) for d in ("color", "depth", "pose")}
    if counts["color"] == 0:
        raise SceneLayoutError(f"{data}/color holds no images: zero images cannot be trained on.")
    if len(set(counts.values())) != 1:
        raise SceneLayoutError(
            f"{data}: ScanNet layout needs one pose and one depth per colour image, found "
            + ", ".join(f"{k}/: {v} files" for k, v in counts.items())
            + ". Images without poses cannot be used; remove them or export the missing poses.")
    bad = [p.name for p in (data / "color").iterdir() if not p.stem.isdigit()]
    if bad:
        raise SceneLayoutError(f"{data}/color: ScanNet file names must be integers (0.jpg, 1.jpg, ...), got {bad[:3]}")


def _find_scannet_ply(data: Path) -> Optional[Path]:
    plys = sorted(data.glob("*_vh_clean_2.ply")) or sorted(data.glob("*.ply"))
    return plys[0] if plys else None


def _check_colmap(data: Path, model: Path) -> None:
    """Images folder, registered images and a camera model nerfstudio reads, before nerfstudio's asserts."""
    images = data / "images"
    if not images.is_dir():
        raise SceneLayoutError(f"{data}: COLMAP model at {model} but no images/ folder beside it; q-splat reads "
                               f"the photos from {images}.")
    from nerfstudio.process_data import colmap_utils

    binary = (model / "cameras.bin").is_file()
    try:
        cameras = (readers.read_cameras_binary if binary else readers.read_cameras_text)(
            model / ("cameras.bin" if binary else "cameras.txt"))
        registered = (readers.read_images_binary if binary else readers.read_images_text)(
            model / ("images.bin" if binary else "images.txt"))
    except (OSError, ValueError, KeyError, IndexError, EOFError) as e:
        raise SceneLayoutError(f"{model}: unreadable COLMAP model ({type(e).__name__}: {e}). Re-export it with "
                               f"`colmap model_converter`.") from None
    if not registered:
        raise SceneLayoutError(f"{model}: zero registered images (COLMAP could not pose any photo). Re-run the "
                               f"COLMAP mapper with more overlap between photos, or check the feature matching.")
    for camera in cameras.values():
        try:
            colmap_utils.parse_colmap_camera_params(camera)
        except NotImplementedError:
            raise SceneLayoutError(
                f"{model}: camera model {camera.model} is not supported by nerfstudio (supported: SIMPLE_PINHOLE, "
                f"PINHOLE, SIMPLE_RADIAL, RADIAL, OPENCV, OPENCV_FISHEYE, ...). Undistort the images with "
                f"`colmap image_undistorter` or re-run COLMAP with --ImageReader.camera_model OPENCV.") from None
    models = {c.model for c in cameras.values()}
    if len(models) > 1:
        raise SceneLayoutError(f"{model}: several camera models ({sorted(models)}); nerfstudio reads one per scene.")


# ----------------------------------------------------------------------------------------------------------
# Outputs post-processing
# ----------------------------------------------------------------------------------------------------------


def drop_missing_images(outputs: DataparserOutputs, split: str, where: Path) -> Tuple[DataparserOutputs, int]:
    """Remove the frames whose image file does not exist (count returned); all missing is an error."""
    names = list(outputs.image_filenames)
    exists = [Path(f).is_file() for f in names]
    missing = len(names) - sum(exists)
    if missing == 0:
        return outputs, 0
    if missing == len(names):
        raise SceneLayoutError(f"{where}: none of the {len(names)} images of the '{split}' split exists "
                               f"(first: {names[0]}). Check the image paths / the images folder.")
    keep = [i for i, e in enumerate(exists) if e]
    index = torch.tensor(keep, dtype=torch.long)
    outputs.image_filenames = [names[i] for i in keep]
    outputs.cameras = outputs.cameras[index]
    if outputs.mask_filenames is not None:
        outputs.mask_filenames = [outputs.mask_filenames[i] for i in keep]
    for key, value in list(outputs.metadata.items()):
        if isinstance(value, list) and len(value) == len(names):
            outputs.metadata[key] = [value[i] for i in keep]
    return outputs, missing


def auto_downscale(width: int, height: int, max_size: int) -> int:
    """Smallest power of two that brings the longest side to <= max_size (nerfstudio's automatic rule)."""
    longest = max(int(width), int(height))
    return 2 ** max(0, math.ceil(math.log2(longest / max_size))) if longest > max_size else 1


# ----------------------------------------------------------------------------------------------------------
# The parser
# ----------------------------------------------------------------------------------------------------------


@dataclass
class QSplatDataParserConfig(DataParserConfig):
    """Reads COLMAP, nerfstudio / ns-process-data, instant-ngp, ScanNet and generated scenes (auto-detected),
    through nerfstudio's own parsers."""

    _target: Type = field(default_factory=lambda: QSplatDataParser)
    data: Path = Path()
    """Scene folder."""
    layout: Literal["auto", "scannet", "nerfstudio", "instant-ngp", "colmap"] = "auto"
    """Scene layout; auto detects it (docs/usage.md)."""
    ply_file_path: Optional[Path] = None
    """ScanNet layout: seed point cloud (default: the scene's *_vh_clean_2.ply)."""
    downscale_factor: Optional[float] = None
    """Divide the image resolution by this when images are loaded (no images_N folders needed). None: the
    smallest power of two that brings the longest side to <= max-image-size (1 for generated scenes)."""
    max_image_size: int = MAX_AUTO_IMAGE_SIZE
    """Longest image side the automatic downscale factor aims for."""
    eval_interval: int = 8
    """COLMAP / instant-ngp layouts: every eval_interval-th image is held out for evaluation."""


class QSplatDataParser(DataParser):
    config: QSplatDataParserConfig

    def __init__(self, config: QSplatDataParserConfig):
        super().__init__(config)
        self._layout: Optional[str] = None
        self._downscale: Optional[float] = None
        self._warned_missing: Dict[str, int] = {}
        self._decoded: set = set()

    @property
    def scene_root(self) -> Path:
        data = Path(self.config.data)
        return data.parent if data.suffix == ".json" else data

    @property
    def layout(self) -> str:
        if self._layout is None:
            self._layout = detect_layout(self.scene_root) if self.config.layout == "auto" else self.config.layout
        return self._layout

    @property
    def generated(self) -> bool:
        return (self.scene_root / "gt" / "scene.json").is_file()

    def delegate_config(self) -> DataParserConfig:
        data, layout = self.scene_root, self.layout
        if layout == "scannet":
            _check_scannet_counts(data)
            if self.generated:
                return scannet_parser_config(data)
            from nerfstudio.data.dataparsers.scannet_dataparser import ScanNetDataParserConfig

            ply = self.config.ply_file_path or _find_scannet_ply(data)
            if ply is None:
                raise SceneLayoutError(
                    f"{data}: no seed point cloud (*_vh_clean_2.ply) found; end the ns-train command with "
                    f"`qsplat-data --ply-file-path PATH` (nerfstudio would silently start from random points).")
            return ScanNetDataParserConfig(data=data, ply_file_path=Path(ply), load_3D_points=True)
        if layout == "colmap":
            return self._colmap_config(data, _colmap_model_dir(data))
        if layout == "instant-ngp":
            from nerfstudio.data.dataparsers.instant_ngp_dataparser import InstantNGPDataParserConfig

            read_transforms(data / "transforms.json")
            return InstantNGPDataParserConfig(data=data, eval_mode="interval", eval_interval=self.config.eval_interval)
        # nerfstudio layout
        if self.generated:
            return nerfstudio_parser_config(data)
        meta = read_transforms(data / "transforms.json")

        if "ply_file_path" not in meta:
            model = data / "colmap" / "sparse" / "0"
            if (model / "points3D.bin").is_file() or (model / "points3D.txt").is_file():
                # nerfstudio's parser would ask an interactive question here (a hang without a terminal).
                return self._colmap_config(data, model)
            _warn(f"{data}/transforms.json has no ply_file_path and there is no COLMAP model: the Gaussians start "
                  f"from random points (splatfacto's random init).")
            return NerfstudioDataParserConfig(data=data, load_3D_points=False, downscale_factor=1)
        return NerfstudioDataParserConfig(data=data, load_3D_points=True, downscale_factor=1)

    def _colmap_config(self, data: Path, model: Path) -> DataParserConfig:
        _check_colmap(data, model)
        return ColmapDataParserConfig(data=data, colmap_path=model.relative_to(data), images_path=Path("images"),
                                      downscale_factor=1, load_3D_points=True, eval_mode="interval",
                                      eval_interval=self.config.eval_interval)

    def _generate_dataparser_outputs(self, split: str = "train", **kwargs) -> DataparserOutputs:
        delegate = self.delegate_config()
        try:
            outputs = delegate.setup()._generate_dataparser_outputs(split, **kwargs)
        except (AssertionError, NotImplementedError, KeyError, IndexError) as e:
            name = type(delegate).__name__.removesuffix("DataParserConfig") or type(delegate).__name__
            raise SceneLayoutError(f"{self.scene_root}: nerfstudio's {name} parser failed on this scene "
                                   f"({type(e).__name__}: {str(e).strip() or 'no message'}).") from e
        if outputs.cameras.camera_to_worlds.dim() != 3:  # nerfstudio's instant-ngp parser on a 1-image split
            raise SceneLayoutError(
                f"{self.scene_root}: the '{split}' split has a single image, which nerfstudio's {self.layout} parser "
                f"turns into a malformed camera; hold out at least two images (e.g. `qsplat-data --eval-interval "
                f"{max(2, len(outputs.image_filenames) and self.config.eval_interval // 2)}`) or add images.")
        outputs, missing = drop_missing_images(outputs, split, self.scene_root)
        if missing and self._warned_missing.get(split) != missing:
            _warn(f"{missing} frames of the '{split}' split have no image file and are skipped "
                  f"({len(outputs.image_filenames)} left).")
            self._warned_missing[split] = missing

        check_image_count(outputs.image_filenames, split, self.scene_root)
        check_poses(outputs.cameras.camera_to_worlds, outputs.image_filenames)
        if split not in self._decoded:  # once per split: every image decodes (a truncated file is named now)
            check_images_readable(outputs.image_filenames)
            self._decoded.add(split)
        if "points3D_xyz" in outputs.metadata:
            check_seed_points(outputs.metadata["points3D_xyz"], getattr(delegate, "ply_file_path", None)
                              or getattr(delegate, "colmap_path", None))
        outputs.metadata["qsplat_scene_root"] = str(self.scene_root.resolve())
        outputs.metadata["qsplat_layout"] = self.layout
        outputs.metadata["qsplat_downscale"] = self.downscale(outputs)
        return outputs

    def downscale(self, outputs: DataparserOutputs) -> float:
        """The factor images are divided by on load (fixed on the first split parsed, so all splits agree)."""
        if self._downscale is None:
            factor = self.config.downscale_factor
            if factor is None:
                if self.generated:
                    factor = 1.0
                else:
                    cams = outputs.cameras
                    factor = float(auto_downscale(int(cams.width.max()), int(cams.height.max()),
                                                  self.config.max_image_size))
                    if factor > 1:
                        _warn(f"images up to {int(cams.width.max())}x{int(cams.height.max())} px: loading them "
                              f"downscaled by {factor:g} (to choose: end the ns-train command with `qsplat-data "
                              f"--downscale-factor N`)")
            if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor >= 1):
                raise SceneLayoutError(f"qsplat-data --downscale-factor must be >= 1, got {factor}")
            self._downscale = float(factor)
        return self._downscale


def _warn(message: str) -> None:
    CONSOLE.print(f"[yellow]\\[q-splat] {message}[/yellow]")



# nerfstudio's dataparser entry point (pyproject: nerfstudio.dataparser_configs): `qsplat-data` for any method,
# e.g. `ns-train splatfacto --data <scene> qsplat-data`.
qsplat_dataparser = DataParserSpecification(
    config=QSplatDataParserConfig(),
    description="q-splat: COLMAP, nerfstudio, instant-ngp, ScanNet and generated scenes, layout auto-detected")
