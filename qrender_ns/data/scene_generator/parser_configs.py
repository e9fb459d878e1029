"""nerfstudio dataparser configs for generated scenes that keep the metric, z-up world frame."""

from __future__ import annotations

import json
from pathlib import Path

from qrender_ns.data.scene_generator.scene import DEPTH_UNIT_SCALE_FACTOR


def _read_meta(scene_dir: Path) -> dict:
    return json.loads((Path(scene_dir) / "gt" / "scene.json").read_text())


def scannet_parser_config(scene_dir: Path, **overrides):
    """`ScanNetDataParserConfig` for a generated scannet-layout scene. Its ply_file_path default is a fixed
    example path, so it is set here; the split fraction yields exactly the recorded eval frames; no
    centring/scaling (the default would re-centre on the mean camera and scale to +-1)."""
    from nerfstudio.data.dataparsers.scannet_dataparser import ScanNetDataParserConfig

    meta = _read_meta(scene_dir)
    kwargs = dict(data=Path(scene_dir), ply_file_path=Path(scene_dir) / meta["seed_point_cloud"], load_3D_points=True,
                  point_cloud_color=True, train_split_fraction=meta["scannet_train_split_fraction"],
                  center_method="none", auto_scale_poses=False, scale_factor=1.0, scene_scale=meta["scene_extent"],
                  depth_unit_scale_factor=DEPTH_UNIT_SCALE_FACTOR)
    kwargs.update(overrides)
    return ScanNetDataParserConfig(**kwargs)


def nerfstudio_parser_config(scene_dir: Path, **overrides):
    """`NerfstudioDataParserConfig` for a generated nerfstudio-layout scene: seed points on, no
    re-orientation/centring/scaling, full resolution. The split comes from transforms.json."""
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    meta = _read_meta(scene_dir)
    kwargs = dict(data=Path(scene_dir), load_3D_points=True, orientation_method="none", center_method="none",
                  auto_scale_poses=False, scale_factor=1.0, scene_scale=meta["scene_extent"], downscale_factor=1,
                  depth_unit_scale_factor=DEPTH_UNIT_SCALE_FACTOR)
    kwargs.update(overrides)
    return NerfstudioDataParserConfig(**kwargs)
