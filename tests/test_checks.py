"""Start-up checks of scenes and teacher caches (qrender_ns.data.checks): each bad input gets a sentence
naming the file / frame / option."""

import numpy as np
import pytest
import torch
from PIL import Image

from qrender_ns.data.checks import (SceneCheckError, check_feature_dim, check_frames_have_poses, check_image_count,
                                    check_images_readable, check_poses, check_seed_points, check_teacher_masks)
from qrender_ns.teachers.cache import TeacherCache


def test_seed_points():
    check_seed_points(np.zeros((5, 3)), "room.ply")
    with pytest.raises(SceneCheckError, match="room.ply has no points .*random points"):
        check_seed_points(np.zeros((0, 3)), "room.ply")
    with pytest.raises(SceneCheckError, match="has no points"):
        check_seed_points(None, None)
    pts = torch.zeros(4, 3)
    pts[2, 1] = float("nan")
    with pytest.raises(SceneCheckError, match="1 of 4 points have NaN/Inf .*vertex 2"):
        check_seed_points(pts, "room.ply")


def test_poses_name_the_frame():
    names = [f"images/frame_{i:05d}.png" for i in range(4)]
    poses = np.tile(np.eye(4)[:3], (4, 1, 1))
    check_poses(poses, names)
    poses[2, 0, 3] = np.nan
    with pytest.raises(SceneCheckError, match=r"1 camera poses contain NaN/Inf: images/frame_00002.png \(frame 2\)"):
        check_poses(torch.from_numpy(poses), names)
    poses[2, 0, 3] = 0
    poses[1, :3, :3] = 0
    with pytest.raises(SceneCheckError, match="singular rotation: images/frame_00001.png"):
        check_poses(poses, names)
    with pytest.raises(SceneCheckError, match="3 poses for 4 images"):
        check_poses(poses[:3], names)


def test_frames_without_transform_matrix_and_zero_images(tmp_path):
    frames = [{"file_path": "images/a.png", "transform_matrix": np.eye(4).tolist()}, {"file_path": "images/b.png"}]
    with pytest.raises(SceneCheckError, match=r"1 of 2 frames have no 'transform_matrix'.*frame 1 \(images/b.png\)"):
        check_frames_have_poses(frames, tmp_path / "transforms.json")
    check_frames_have_poses(frames[:1], "transforms.json")
    with pytest.raises(SceneCheckError, match="has no frames"):
        check_frames_have_poses([], "transforms.json")
    with pytest.raises(SceneCheckError, match="'train' split has no images"):
        check_image_count([], "train", tmp_path)


def test_truncated_png_is_named(tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(good)
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    check_images_readable([good])
    with pytest.raises(SceneCheckError, match=r"1 images cannot be read: .*bad.png"):
        check_images_readable([good, bad])
    with pytest.raises(SceneCheckError, match=r"gone.png \(missing\)"):
        check_images_readable([tmp_path / "gone.png"])


def test_no_teacher_masks_and_feature_dim(tmp_path):
    with TeacherCache.create(tmp_path / "scene" / "qsplat_teacher" / "t", {"name": "t"}, feature_dim=4) as cache:
        cache.write("images/a.png", np.full((2, 2), -1), np.zeros((0, 4), np.float32), "x")
        cache.write("images/b.png", np.full((2, 2), -1), np.zeros((0, 4), np.float32), "y")
        with pytest.raises(SceneCheckError, match="no mask in any of the 2 training images.*--overwrite"):
            check_teacher_masks(cache, ["images/a.png", "images/b.png"])
        cache.write("images/b.png", np.zeros((2, 2), np.int32), np.ones((1, 4), np.float32), "y")
        check_teacher_masks(cache, ["images/a.png", "images/b.png"])
    check_feature_dim(512, 512)
    with pytest.raises(SceneCheckError, match="feature-dim is 256 but .* holds 512-D embeddings"):
        check_feature_dim(256, 512, tmp_path)
