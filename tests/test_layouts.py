"""`qsplat-data`: every layout users have, delegated to nerfstudio's parsers, and bad captures rejected with a
sentence before any training step. COLMAP cases use the real capture's model (../shared/data/sceaux_castle)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qrender_ns.data.dataparser import QSplatDataParserConfig, SceneLayoutError, auto_downscale, detect_layout
from qrender_ns.data.scene_generator import generate_scene

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "sceaux_castle"


@pytest.fixture()
def castle(tmp_path) -> Path:
    if not (SOURCE / "colmap" / "sparse" / "0").is_dir():
        pytest.skip(f"the real capture is not at {SOURCE}")
    dest = tmp_path / "castle"
    shutil.copytree(SOURCE, dest)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)
    return dest


def outputs(root: Path, split: str = "train", **options):
    return QSplatDataParserConfig(data=root, **options).setup().get_dataparser_outputs(split)


def test_colmap_layouts_colmap_sparse_and_raw_sparse(castle):
    assert detect_layout(castle) == "colmap"
    train, val = outputs(castle), outputs(castle, "val")
    assert (len(train.image_filenames), len(val.image_filenames)) == (9, 2)  # every 8th image held out
    assert train.metadata["points3D_xyz"].shape == (8658, 3)  # seed points from COLMAP
    assert float(train.cameras.distortion_params.abs().sum()) > 0.1  # OPENCV k1 k2 p1 p2 kept
    assert train.metadata["qsplat_downscale"] == 2.0  # 2832 px -> <= 1600 px automatically
    assert outputs(castle, downscale_factor=4).metadata["qsplat_downscale"] == 4.0
    # raw COLMAP / LeRF-OVS as LangSplat ships it: images/ + sparse/0/
    shutil.move(castle / "colmap" / "sparse", castle / "sparse")
    assert detect_layout(castle) == "colmap" and len(outputs(castle).image_filenames) == 9


def test_colmap_missing_images_are_counted_and_skipped(castle, capsys):
    names = [Path(f).name for f in outputs(castle).image_filenames]
    for name in names[1:3]:  # two training images
        (castle / "images" / name).unlink()
    train = outputs(castle)
    assert len(train.image_filenames) == 7 and all(Path(f).is_file() for f in train.image_filenames)
    assert len(train.cameras) == 7 and [Path(f).name for f in train.image_filenames] == names[:1] + names[3:]
    assert "2 frames of the 'train' split have no image file and are skipped" in capsys.readouterr().out.replace("\n", " ")
    for image in (castle / "images").iterdir():
        image.unlink()
    with pytest.raises(SceneLayoutError, match="none of the 9 images of the 'train' split exists"):
        outputs(castle)
    shutil.rmtree(castle / "images")
    with pytest.raises(SceneLayoutError, match="no images/ folder"):
        outputs(castle)


def _text_model(castle: Path, model: str = None, keep_images: bool = True) -> Path:
    from nerfstudio.data.utils import colmap_parsing_utils as cpu

    src = castle / "colmap" / "sparse" / "0"
    cameras, images, points = cpu.read_model(str(src))
    if model is not None:
        cameras = {k: c._replace(model=model) for k, c in cameras.items()}
    shutil.rmtree(src)
    src.mkdir()
    cpu.write_model(cameras, images if keep_images else {}, points, str(src), ext=".txt")
    return src


def test_unsupported_camera_model_and_zero_registered_images(castle):
    _text_model(castle, model="FOV")
    with pytest.raises(SceneLayoutError, match="camera model FOV is not supported by nerfstudio"):
        outputs(castle)
    _text_model(castle, keep_images=False)
    with pytest.raises(SceneLayoutError, match="zero registered images"):
        outputs(castle)


def _nerfstudio_scene(root: Path) -> Path:
    generate_scene(root, layout="nerfstudio", seed=1, num_images=6, width=32, height=24, num_eval=1, num_points=500)
    return root


def test_instant_ngp_transforms_with_missing_frames(tmp_path, capsys):
    root = tmp_path / "ngp"
    generate_scene(root, layout="nerfstudio", seed=1, num_images=10, width=32, height=24, num_eval=2, num_points=500)
    meta = json.loads((root / "transforms.json").read_text())
    (root / "gt").rename(root / "gt_hidden")  # a plain user scene, not a generated one
    ngp = {"camera_angle_x": 2 * float(np.arctan(meta["w"] / (2 * meta["fl_x"]))), "w": meta["w"], "h": meta["h"],
           "frames": [{"file_path": f["file_path"], "transform_matrix": f["transform_matrix"]} for f in meta["frames"]]}
    ngp["frames"] += [{"file_path": "images/gone_1.png", "transform_matrix": meta["frames"][0]["transform_matrix"]},
                      {"file_path": "images/gone_2.png", "transform_matrix": meta["frames"][1]["transform_matrix"]}]
    (root / "transforms.json").write_text(json.dumps(ngp))
    assert detect_layout(root) == "instant-ngp"
    train, val = outputs(root), outputs(root, "val")
    assert len(train.image_filenames) + len(val.image_filenames) == 10 and len(val.image_filenames) == 2
    assert "Skipping 2 files" in capsys.readouterr().out  # nerfstudio's instant-ngp parser counts them itself
    assert abs(float(train.cameras.fx[0]) - meta["fl_x"]) < 1e-3


def test_transforms_json_errors(tmp_path):
    root = _nerfstudio_scene(tmp_path / "ns")
    path = root / "transforms.json"
    meta = json.loads(path.read_text())
    del meta["frames"][2]["transform_matrix"]
    path.write_text(json.dumps(meta))
    with pytest.raises(SceneLayoutError, match="1 of 6 frames lack 'transform_matrix'"):
        detect_layout(root)
    path.write_text(json.dumps({**meta, "frames": []}))
    with pytest.raises(SceneLayoutError, match="zero images"):
        detect_layout(root)
    path.write_text("{not json")
    with pytest.raises(SceneLayoutError, match="not readable as JSON"):
        detect_layout(root)


def test_auto_downscale_rule():
    assert auto_downscale(1600, 1200, 1600) == 1 and auto_downscale(1601, 900, 1600) == 2
    assert auto_downscale(4032, 3024, 1600) == 4 and auto_downscale(1920, 1080, 1600) == 2


def test_dataparser_subcommands_after_q_splat():
    """nerfstudio's dataparsers by name after the method, as with splatfacto (`... colmap --downscale-factor 4`)."""
    import tyro
    from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig

    from qrender_ns.method.config import qsplat_trainer_config

    default = qsplat_trainer_config()
    config = tyro.cli(type(default), default=default, args=["qsplat-data", "--downscale-factor", "4"])
    assert isinstance(config.pipeline.datamanager.dataparser, QSplatDataParserConfig)
    assert config.pipeline.datamanager.dataparser.downscale_factor == 4
    config = tyro.cli(type(default), default=default, args=["colmap", "--downscale-factor", "2"])
    assert isinstance(config.pipeline.datamanager.dataparser, ColmapDataParserConfig)
    config = tyro.cli(type(default), default=default, args=["--pipeline.datamanager.teacher", "none"])
    assert config.pipeline.datamanager.teacher == "none"
