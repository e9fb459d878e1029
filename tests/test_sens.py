"""`qsplat prepare-scannet` / qrender_ns.data.sens: raw ScanNet .sens -> color/ depth/ pose/ intrinsic/.

The .sens files here come from `write_sens`, a writer written from the format description (ScanNet's
SensReader README and sensorData.h: header, then per frame camera-to-world, two timestamps, two byte counts,
JPEG colour, zlib uint16 depth), sharing no code with the reader. Every value is read back: poses and
intrinsics exactly, depth exactly, colour within JPEG error.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qrender_ns.data import sens as sensmod
from qrender_ns.data.sens import SensError, export_scannet
from qrender_ns.workflows.options import PrepareScannet

REPO = Path(__file__).resolve().parents[1]
CW, CH, DW, DH = 64, 48, 32, 24


# ------------------------------------------------------------------------------------------------------------
# An independent .sens writer
# ------------------------------------------------------------------------------------------------------------


def scene_frames(n: int, cw: int = CW, ch: int = CH, dw: int = DW, dh: int = DH, seed: int = 0):
    """n frames of a smooth synthetic room: (camera_to_world float32 4x4, RGB uint8, depth uint16 mm)."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        angle = 2 * np.pi * i / max(n, 1)
        c, s = np.cos(angle), np.sin(angle)
        pose = np.eye(4, dtype=np.float32)
        pose[:3, :3] = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=np.float32)
        pose[:3, 3] = np.array([1.5 * s, 0.1 * i, 1.5 * c + 0.123456789], dtype=np.float32)
        y, x = np.mgrid[0:ch, 0:cw].astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, 3)
        rgb = np.stack([127 + 100 * np.sin(x / cw * 3 + phase[0]),
                        127 + 100 * np.cos(y / ch * 2 + phase[1]),
                        127 + 80 * np.sin((x + y) / (cw + ch) * 4 + phase[2])], -1)
        yd, xd = np.mgrid[0:dh, 0:dw]
        depth = (1000 + 700 * np.sin(xd / dw * 3 + i) + 5 * yd + i).astype(np.uint16)
        depth[0, :3] = 0  # holes, as real depth has
        depth[-1, -1] = 65535
        frames.append((pose, np.clip(rgb, 0, 255).astype(np.uint8), depth))
    return frames


def intrinsics(cw: int = CW, ch: int = CH, dw: int = DW, dh: int = DH):
    k_color = np.array([[58.5, 0, cw / 2 - 0.25, 0], [0, 58.25, ch / 2 + 0.125, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
                       np.float32)
    k_depth = np.array([[29.1, 0, dw / 2 - 0.5, 0], [0, 29.3, dh / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)
    e_depth = np.eye(4, dtype=np.float32)
    e_depth[:3, 3] = [0.025, -0.001, 0.0003]
    return k_color, np.eye(4, dtype=np.float32), k_depth, e_depth


def jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_sens(path: Path, frames, version: int = 4, color_type: int = 2, depth_type: int = 1,
               sizes=(CW, CH, DW, DH), num_frames=None, sensor: bytes = b"StructureSensor",
               imu: bool = True) -> dict:
    """Write a .sens file; returns the byte offsets of each field (for truncation tests)."""
    k_color, e_color, k_depth, e_depth = intrinsics(*sizes)
    marks = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<I", version))
        marks["name_len"] = f.tell()
        f.write(struct.pack("<Q", len(sensor)))
        f.write(sensor)
        marks["calibration"] = f.tell()
        for mat in (k_color, e_color, k_depth, e_depth):
            f.write(np.ascontiguousarray(mat, dtype="<f4").tobytes())  # row-major
        marks["compression"] = f.tell()
        f.write(struct.pack("<ii", color_type, depth_type))
        f.write(struct.pack("<IIII", *sizes))
        f.write(struct.pack("<f", 1000.0))
        marks["num_frames"] = f.tell()
        f.write(struct.pack("<Q", len(frames) if num_frames is None else num_frames))
        marks["frames"] = []
        for i, (pose, rgb, depth) in enumerate(frames):
            color_bytes = jpeg(rgb)
            depth_bytes = zlib.compress(np.ascontiguousarray(depth, dtype="<u2").tobytes())
            start = f.tell()
            f.write(np.ascontiguousarray(pose, dtype="<f4").tobytes())
            f.write(struct.pack("<QQ", 1000 * i, 1000 * i + 7))
            f.write(struct.pack("<QQ", len(color_bytes), len(depth_bytes)))
            color_at = f.tell()
            f.write(color_bytes)
            depth_at = f.tell()
            f.write(depth_bytes)
            marks["frames"].append({"start": start, "color": color_at, "depth": depth_at, "end": f.tell()})
        if imu:
            f.write(struct.pack("<Q", 0))  # no IMU frames
    return marks


def write_ply(path: Path, n: int = 50, labels: bool = False) -> None:
    """A tiny binary PLY point cloud (x y z + colour, + label for the labels PLY)."""
    rng = np.random.default_rng(1)
    props = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    if labels:
        props.append(("label", "<u2"))
    data = np.zeros(n, dtype=props)
    for axis in "xyz":
        data[axis] = rng.uniform(-1, 1, n)
    for c in ("red", "green", "blue"):
        data[c] = rng.integers(0, 256, n)
    types = {"<f4": "float", "u1": "uchar", "<u2": "ushort"}
    header = "ply\nformat binary_little_endian 1.0\n" + f"element vertex {n}\n" + "".join(
        f"property {types[t]} {name}\n" for name, t in props) + "end_header\n"
    path.write_bytes(header.encode() + data.tobytes())


@pytest.fixture()
def scene(tmp_path):
    folder = tmp_path / "scans" / "scene0007_00"
    folder.mkdir(parents=True)
    frames = scene_frames(7)
    marks = write_sens(folder / "scene0007_00.sens", frames)
    write_ply(folder / "scene0007_00_vh_clean_2.ply")
    write_ply(folder / "scene0007_00_vh_clean_2.labels.ply", labels=True)
    return folder / "scene0007_00.sens", frames, marks


def read_matrix(path: Path) -> np.ndarray:
    return np.loadtxt(path, dtype=np.float64).reshape(4, 4)


def stems(folder: Path):
    return sorted(int(p.stem) for p in folder.iterdir())


# ------------------------------------------------------------------------------------------------------------
# Round trip
# ------------------------------------------------------------------------------------------------------------


def test_every_value_reads_back(scene, tmp_path):
    sens, frames, _ = scene
    out = tmp_path / "out"
    result = export_scannet(sens, out, frame_stride=1)
    assert (result.written, result.skipped, result.selected, result.frames_in_file) == (7, 0, 7, 7)
    assert result.color_size == (CW, CH) and result.invalid_poses == 0
    for sub in ("color", "depth", "pose"):
        assert stems(out / sub) == list(range(7))
    for name, mat in zip(("intrinsic_color", "extrinsic_color", "intrinsic_depth", "extrinsic_depth"), intrinsics()):
        assert np.array_equal(read_matrix(out / "intrinsic" / f"{name}.txt").astype(np.float32), mat), name
    for i, (pose, rgb, depth) in enumerate(frames):
        assert np.array_equal(read_matrix(out / "pose" / f"{i}.txt").astype(np.float32), pose)  # exact
        png = Image.open(out / "depth" / f"{i}.png")
        got = np.array(png)
        assert got.dtype == np.uint16 and got.shape == (DH, DW) and png.mode.startswith("I")
        assert np.array_equal(got, depth)  # exact, holes (0) and 65535 included
        color = np.array(Image.open(out / "color" / f"{i}.jpg").convert("RGB"))
        assert color.shape == (CH, CW, 3)
        assert np.abs(color.astype(int) - rgb.astype(int)).mean() < 3
    assert sorted(p.name for p in result.plys) == ["scene0007_00_vh_clean_2.labels.ply", "scene0007_00_vh_clean_2.ply"]
    ply = "scene0007_00_vh_clean_2.ply"
    assert (out / ply).read_bytes() == (sens.parent / ply).read_bytes()
    assert not (out / sensmod.PARTIAL_DIR).exists()
    assert json.loads((out / sensmod.MANIFEST).read_text())["frame_stride"] == 1


def test_colour_is_scannets_jpeg_unchanged(scene, tmp_path):
    sens, frames, marks = scene
    export_scannet(sens, tmp_path / "out", frame_stride=1)
    raw = sens.read_bytes()
    f2 = marks["frames"][2]
    assert (tmp_path / "out" / "color" / "2.jpg").read_bytes() == raw[f2["color"]:f2["depth"]]


def test_stride_and_max_frames(scene, tmp_path):
    sens, frames, _ = scene
    result = export_scannet(sens, tmp_path / "a", frame_stride=3)
    assert result.selected == 3 and stems(tmp_path / "a" / "color") == [0, 3, 6]
    assert np.array_equal(read_matrix(tmp_path / "a" / "pose" / "6.txt").astype(np.float32), frames[6][0])
    assert np.array_equal(np.array(Image.open(tmp_path / "a" / "depth" / "3.png")), frames[3][2])
    result = export_scannet(sens, tmp_path / "b", frame_stride=2, max_frames=2)
    assert result.written == 2 and stems(tmp_path / "b" / "pose") == [0, 2]
    assert sensmod.DEFAULT_FRAME_STRIDE == 20
    result = export_scannet(sens, tmp_path / "c")  # default stride 20: frame 0 only of 7
    assert stems(tmp_path / "c" / "color") == [0]


def test_resize_scales_colour_intrinsics_only(scene, tmp_path):
    sens, frames, _ = scene
    out = tmp_path / "out"
    result = export_scannet(sens, out, frame_stride=1, image_size=(32, 24))
    assert result.color_size == (32, 24)
    assert Image.open(out / "color" / "4.jpg").size == (32, 24)
    k = read_matrix(out / "intrinsic" / "intrinsic_color.txt")
    k0 = intrinsics()[0].astype(np.float64)
    assert np.allclose(k[:2, :3], k0[:2, :3] * 0.5, rtol=1e-7) and np.array_equal(k[2:], k0[2:])
    assert np.array_equal(read_matrix(out / "intrinsic" / "intrinsic_depth.txt").astype(np.float32), intrinsics()[2])
    assert np.array_equal(np.array(Image.open(out / "depth" / "4.png")), frames[4][2])  # depth never resized
    small = np.array(Image.fromarray(frames[4][1]).resize((32, 24), Image.BOX))
    assert np.abs(np.array(Image.open(out / "color" / "4.jpg").convert("RGB")).astype(int) - small).mean() < 4


def test_invalid_poses_are_written_and_counted(tmp_path):
    frames = scene_frames(3)
    frames[1][0][:] = -np.inf  # ScanNet's lost-tracking marker
    write_sens(tmp_path / "s.sens", frames)
    result = export_scannet(tmp_path / "s.sens", tmp_path / "out", frame_stride=1)
    assert result.invalid_poses == 1 and result.written == 3
    assert np.isneginf(read_matrix(tmp_path / "out" / "pose" / "1.txt")).all()


# ------------------------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------------------------


def test_resume_skips_complete_frames_and_redoes_only_missing_ones(scene, tmp_path):
    sens, frames, _ = scene
    out = tmp_path / "out"
    export_scannet(sens, out, frame_stride=1)
    again = export_scannet(sens, out, frame_stride=1)
    assert (again.written, again.skipped) == (0, 7)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.*")}
    (out / "depth" / "3.png").unlink()
    again = export_scannet(sens, out, frame_stride=1)
    assert (again.written, again.skipped) == (1, 6)
    assert np.array_equal(np.array(Image.open(out / "depth" / "3.png")), frames[3][2])
    rewritten = {p for p, t in before.items() if p.exists() and p.stat().st_mtime_ns != t and p.parent.name in
                 ("color", "depth", "pose")}
    assert rewritten <= {out / "color" / "3.jpg", out / "pose" / "3.txt", out / "depth" / "3.png"}


def test_interrupted_run_leaves_no_half_file_and_resumes(scene, tmp_path, monkeypatch):
    sens, frames, _ = scene
    out = tmp_path / "out"
    real_replace, calls = os.replace, []

    def dying_replace(src, dst):  # killed after 2 frames + a pose: the 3rd frame's depth never lands
        calls.append(dst)
        if len(calls) > 5 + 3 * 2 + 1:  # manifest + 4 intrinsic files, 2 frames x 3 files, 1 pose
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(sensmod.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        export_scannet(sens, out, frame_stride=1)
    monkeypatch.setattr(sensmod.os, "replace", real_replace)
    assert stems(out / "color") == [0, 1] and stems(out / "pose") == [0, 1, 2] and stems(out / "depth") == [0, 1]
    result = export_scannet(sens, out, frame_stride=1)
    assert (result.written, result.skipped) == (5, 2)
    for i in range(7):
        assert np.array_equal(np.array(Image.open(out / "depth" / f"{i}.png")), frames[i][2])
    assert not (out / sensmod.PARTIAL_DIR).exists()


def test_other_settings_or_foreign_export_are_refused_unless_overwrite(scene, tmp_path):
    sens, _, _ = scene
    out = tmp_path / "out"
    export_scannet(sens, out, frame_stride=2)
    with pytest.raises(SensError, match="other settings.*frame_stride"):
        export_scannet(sens, out, frame_stride=1)
    result = export_scannet(sens, out, frame_stride=1, overwrite=True)
    assert result.written == 7 and stems(out / "color") == list(range(7))
    foreign = tmp_path / "foreign"
    (foreign / "color").mkdir(parents=True)
    (foreign / "color" / "0.jpg").write_bytes(b"x")
    with pytest.raises(SensError, match="not written by prepare-scannet"):
        export_scannet(sens, foreign)


# ------------------------------------------------------------------------------------------------------------
# The layout our reader takes
# ------------------------------------------------------------------------------------------------------------


def test_output_is_read_as_a_scannet_scene(scene, tmp_path):
    from qrender_ns.data.dataparser import _check_scannet_counts, _find_scannet_ply, detect_layout

    sens, frames, _ = scene
    out = tmp_path / "out"
    export_scannet(sens, out, frame_stride=2)
    assert detect_layout(out) == "scannet"
    _check_scannet_counts(out)
    assert _find_scannet_ply(out) == out / "scene0007_00_vh_clean_2.ply"
    pytest.importorskip("open3d")
    from qrender_ns.data.dataparser import QSplatDataParserConfig

    outputs = QSplatDataParserConfig(data=out).setup().get_dataparser_outputs("train")
    assert [Path(p).name for p in outputs.image_filenames] == ["0.jpg", "2.jpg", "4.jpg", "6.jpg"]  # 90% train
    assert (int(outputs.cameras.width[0]), int(outputs.cameras.height[0])) == (CW, CH)
    assert float(outputs.cameras.fx[0]) == pytest.approx(58.5)
    assert outputs.metadata["points3D_xyz"].shape == (50, 3)


# ------------------------------------------------------------------------------------------------------------
# Bad input: one sentence naming the file, before any output
# ------------------------------------------------------------------------------------------------------------


def _assert_refused(sens: Path, out: Path, match: str) -> str:
    with pytest.raises(SensError, match=match) as info:
        export_scannet(sens, out, frame_stride=1)
    message = str(info.value)
    assert str(sens) in message and "\n" not in message and message.endswith(".")
    assert not out.exists(), "an error must come before any output is written"
    return message


def test_truncated_files_are_reported_before_any_output(scene, tmp_path):
    sens, _, marks = scene
    raw = sens.read_bytes()
    last = marks["frames"][-1]
    cuts = {"version": 2, "name length": marks["name_len"] + 3, "name": marks["name_len"] + 10,
            "calibration": marks["calibration"] + 100, "compression": marks["compression"] + 6,
            "frame count": marks["num_frames"] + 4, "first frame record": marks["frames"][0]["start"] + 40,
            "colour bytes": marks["frames"][2]["color"] + 10, "depth bytes": marks["frames"][4]["depth"] + 5,
            "last byte": last["end"] - 1}
    for what, cut in cuts.items():
        bad = tmp_path / f"cut_{cut}.sens"
        bad.write_bytes(raw[:cut])
        match = "is not a ScanNet .sens file" if what == "version" else "truncated"
        message = _assert_refused(bad, tmp_path / f"out_{cut}", match)
        if what in ("colour bytes", "depth bytes", "last byte", "first frame record"):
            assert "frame" in message
    # the IMU section after the frames is not needed
    (tmp_path / "no_imu.sens").write_bytes(raw[:last["end"]])
    assert export_scannet(tmp_path / "no_imu.sens", tmp_path / "ok", frame_stride=3).written == 3


def test_wrong_version_zero_frames_foreign_and_other_compressions(tmp_path):
    frames = scene_frames(2)
    write_sens(tmp_path / "v3.sens", frames, version=3)
    assert "version 3" in _assert_refused(tmp_path / "v3.sens", tmp_path / "o1", "version")
    write_sens(tmp_path / "empty.sens", [])
    _assert_refused(tmp_path / "empty.sens", tmp_path / "o2", "zero frames")
    (tmp_path / "photo.sens").write_bytes(jpeg(frames[0][1]))
    _assert_refused(tmp_path / "photo.sens", tmp_path / "o3", "not a ScanNet .sens file")
    (tmp_path / "notes.sens").write_text("hello, this is not sensor data at all\n" * 20)
    _assert_refused(tmp_path / "notes.sens", tmp_path / "o4", "not a ScanNet .sens file")
    (tmp_path / "tiny.sens").write_bytes(b"\x04")
    _assert_refused(tmp_path / "tiny.sens", tmp_path / "o5", "not a ScanNet .sens file")
    write_sens(tmp_path / "png.sens", frames, color_type=1)
    assert "'png'" in _assert_refused(tmp_path / "png.sens", tmp_path / "o6", "jpeg")
    write_sens(tmp_path / "raw.sens", frames, depth_type=0)
    assert "'raw_ushort'" in _assert_refused(tmp_path / "raw.sens", tmp_path / "o7", "zlib_ushort")
    write_sens(tmp_path / "lying.sens", frames, num_frames=1000)
    _assert_refused(tmp_path / "lying.sens", tmp_path / "o8", "truncated")
    _assert_refused(tmp_path / "missing.sens", tmp_path / "o9", "does not exist")


def test_bad_options(scene, tmp_path):
    sens, _, _ = scene
    for kwargs, match in (({"frame_stride": 0}, "stride"), ({"max_frames": 0}, "max frames"),
                          ({"image_size": (0, 10)}, "image size")):
        with pytest.raises(SensError, match=match):
            export_scannet(sens, tmp_path / "o", **{"frame_stride": 1, **kwargs})
        assert not (tmp_path / "o").exists()


def test_corrupt_frame_data_names_the_frame(tmp_path):
    frames = scene_frames(3)
    marks = write_sens(tmp_path / "s.sens", frames)
    raw = bytearray((tmp_path / "s.sens").read_bytes())
    d = marks["frames"][1]["depth"]
    raw[d:d + 4] = b"\x00\x00\x00\x00"  # not a zlib stream any more
    (tmp_path / "s.sens").write_bytes(bytes(raw))
    with pytest.raises(SensError, match=r"frame 1's depth"):
        export_scannet(tmp_path / "s.sens", tmp_path / "out", frame_stride=1)
    assert stems(tmp_path / "out" / "color") == [0]  # frame 0 is kept for a resume


# ------------------------------------------------------------------------------------------------------------
# The verb
# ------------------------------------------------------------------------------------------------------------


def test_verb_reports_counts_and_speed(scene, tmp_path, capsys):
    sens, _, _ = scene
    PrepareScannet(sens, out=tmp_path / "out", frame_stride=2, progress=False).main()
    text = capsys.readouterr().out
    assert "4 frames written, 0 already there (skipped)" in text and "frames/s" in text
    assert "scene0007_00_vh_clean_2.ply" in text
    PrepareScannet(sens, out=tmp_path / "out", frame_stride=2, progress=False).main()
    assert "0 frames written, 4 already there (skipped)" in capsys.readouterr().out


def test_verb_default_out_is_the_scene_folder(scene):
    sens, _, _ = scene
    PrepareScannet(sens, frame_stride=3, progress=False).main()
    assert stems(sens.parent / "color") == [0, 3, 6]


def test_verb_bad_file_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "scene0000_00.sens"
    write_sens(bad, scene_frames(2), version=5)
    with pytest.raises(SystemExit) as info:
        PrepareScannet(bad, out=tmp_path / "out", progress=False).main()
    assert str(info.value).startswith("[q-splat] ") and str(bad) in str(info.value)
    assert not (tmp_path / "out").exists()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run([sys.executable, "-m", "qrender_ns.cli", "prepare-scannet", str(bad), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().startswith("[q-splat] ") and str(bad) in run.stderr and "version 5" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
