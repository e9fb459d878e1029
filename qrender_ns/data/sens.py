"""ScanNet `.sens` files -> the `color/ depth/ pose/ intrinsic/` layout q-splat's ScanNet reader takes.

The format, exactly as ScanNet's own readers parse it (repository ScanNet/ScanNet; all numbers little-endian):

- header (`SensReader/python/SensorData.py` lines 53-70, `SensorData.load`; C++ `SensReader/c++/src/sensorData.h`
  lines 1058-1074 `writeHeaderToFile` and 1250-1277 `loadFromFile`): uint32 version (must be 4,
  `M_SENSOR_DATA_VERSION`, sensorData.h line 839); uint64 name length + sensor name bytes; colour calibration
  (intrinsic 4x4 float32 then extrinsic 4x4 float32, row-major, `CalibrationData::saveToFile` lines 317-320);
  depth calibration (same); int32 colour compression (-1 unknown, 0 raw, 1 png, 2 jpeg) and int32 depth
  compression (-1 unknown, 0 raw_ushort, 1 zlib_ushort, 2 occi_ushort) (SensorData.py lines 9-10, sensorData.h
  lines 346-357); uint32 colour width, colour height, depth width, depth height; float32 depth shift (file units
  per metre, 1000); uint64 number of frames;
- per frame (SensorData.py lines 14-21 `RGBDFrame.load`; sensorData.h lines 733-741 `RGBDFrame::saveToFile`):
  camera-to-world 4x4 float32; uint64 colour timestamp; uint64 depth timestamp; uint64 colour byte count;
  uint64 depth byte count; the colour bytes (a JPEG file); the depth bytes (zlib stream of
  depth_height x depth_width uint16);
- then IMU frames (sensorData.h lines 1279-1287), which q-splat does not read (and does not require).

The export matches ScanNet's `SensorData.export_*` (SensorData.py lines 78-125): `color/<i>.jpg`,
`depth/<i>.png` (16-bit, file units = 1/depth_shift m), `pose/<i>.txt` (camera-to-world, 4 rows),
`intrinsic/{intrinsic,extrinsic}_{color,depth}.txt`, where `<i>` is the frame's index in the `.sens` (0, 20,
40, ... with a stride of 20), as nerfstudio's `scannet-data` parser sorts them (by `int(stem)`), with one
pose and one depth per colour image (what `qrender_ns.data.dataparser._check_scannet_counts` checks).
Differences from ScanNet's exporter, all lossless improvements: the colour JPEG is copied byte for byte
(no decode + re-encode) unless a resize is asked for; matrices are written with 9 significant digits
(float32 round-trips exactly; ScanNet writes `%f`); with a resize, `intrinsic_color.txt` is scaled to the
written size (ScanNet's exporter leaves it at the full size, so resized exports had wrong intrinsics).
Depth is never resized: the reader resizes it nearest-neighbour to the colour images (docs/evaluation.md).
Frames whose pose is not finite (ScanNet marks lost tracking with -inf) are written as ScanNet does;
nerfstudio's parser skips them; they are counted in the result.

Defaults, from the peers' preprocessing: frame stride 20 and the native colour size (1296x968 for ScanNet v2).
OpenGaussian (repository yanmin-wu/OpenGaussian, README "Prepare ScanNet Data") extracts colour and pose with
OpenScene's `scripts/preprocess/preprocess_2d_scannet.py` (repository pengsongyou/openscene; line 30:
`--frame_skip` default 20) and then writes its cameras with the full-resolution intrinsics `w 1296, h 968,
fl_x 1170.187988` (`scripts/scannet2blender.py`, `process_directory`), i.e. every 20th frame at the native
size. OpenScene's own default 320x240 resize (lines 33-34) is available as `image_size=(320, 240)`; with
OpenGaussian's full-size intrinsics it is what gave the blurred renderings of OpenGaussian issue #30.

Streaming: the header is read and every frame's 96-byte record is indexed by seeking (no image bytes read),
so a truncated, foreign or empty file is reported before anything is written; then only the selected frames'
bytes are read, one frame at a time. Resumable: a frame whose three files exist is skipped; every file is
written to `<out>/.sens_partial/` and renamed into place, so a killed run never leaves a half file under a
final name. The export settings are recorded in `<out>/.qsplat_sens.json`; resuming with other settings is
refused (pass `overwrite=True`).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from qrender_ns.data.keys import SCANNET_DIRS
from qrender_ns.utils.fsio import atomic_write

SENS_VERSION = 4
COLOR_COMPRESSION = {-1: "unknown", 0: "raw", 1: "png", 2: "jpeg"}
DEPTH_COMPRESSION = {-1: "unknown", 0: "raw_ushort", 1: "zlib_ushort", 2: "occi_ushort"}
DEFAULT_FRAME_STRIDE = 20  # OpenScene preprocess_2d_scannet.py --frame_skip, used by OpenGaussian
INTRINSIC_FILES = ("intrinsic_color.txt", "extrinsic_color.txt", "intrinsic_depth.txt", "extrinsic_depth.txt")
PLY_SUFFIXES = ("_vh_clean_2.ply", "_vh_clean_2.labels.ply")
PARTIAL_DIR = ".sens_partial"
MANIFEST = ".qsplat_sens.json"

_MAT = struct.Struct("<16f")
_FRAME_RECORD = struct.Struct("<16fQQQQ")  # camera_to_world, timestamp colour/depth, colour/depth byte counts
_MAX_NAME = 4096
_MAX_SIDE = 1 << 15
_MAX_FRAME_BYTES = 1 << 30


class SensError(ValueError):
    """The .sens file (or the export request) cannot be converted; the message is one sentence naming the file."""


@dataclass(frozen=True)
class SensHeader:
    path: Path
    version: int
    sensor_name: str
    intrinsic_color: np.ndarray
    extrinsic_color: np.ndarray
    intrinsic_depth: np.ndarray
    extrinsic_depth: np.ndarray
    color_compression: str
    depth_compression: str
    color_width: int
    color_height: int
    depth_width: int
    depth_height: int
    depth_shift: float
    num_frames: int
    frames_offset: int  # byte offset of frame 0
    file_size: int


@dataclass(frozen=True)
class FrameRecord:
    index: int
    camera_to_world: np.ndarray  # 4x4 float32
    timestamp_color: int
    timestamp_depth: int
    color_offset: int  # byte offset of the colour bytes; the depth bytes follow them
    color_size: int
    depth_size: int


def _read_exact(f, n: int, path: Path, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise SensError(f"{path} is truncated: it ends inside {what} (needed {n} bytes, got {len(data)}); "
                        f"download it again.")
    return data


def read_header(path: Path) -> SensHeader:
    """Parse and validate the header (version, compression types, sizes, frame count) without reading frames."""
    path = Path(path)
    if not path.is_file():
        raise SensError(f"{path} does not exist or is not a file; pass a ScanNet <scene>.sens file.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 4:
            raise SensError(f"{path} is not a ScanNet .sens file (only {size} bytes; a .sens header alone "
                            f"takes at least 304).")
        (version,) = struct.unpack("<I", head[:4])
        if version != SENS_VERSION:
            raise SensError(f"{path} is not a ScanNet .sens file of version {SENS_VERSION} (its first 4 bytes read "
                            f"as version {version}; ScanNet's SensReader reads version {SENS_VERSION} only).")
        if len(head) < 12:
            raise SensError(f"{path} is truncated: it ends inside the header (the sensor name length).")
        (name_len,) = struct.unpack("<Q", head[4:12])
        if name_len > _MAX_NAME:
            raise SensError(f"{path} is not a ScanNet .sens file (its sensor name length field reads {name_len} "
                            f"bytes; real files hold a short name such as 'StructureSensor').")
        name = _read_exact(f, name_len, path, "the header (sensor name)").decode("utf-8", "replace")
        mats = [np.array(_MAT.unpack(_read_exact(f, 64, path, "the header (calibration matrices)")),
                         dtype=np.float32).reshape(4, 4) for _ in range(4)]
        rest = _read_exact(f, 4 * 7 + 8, path, "the header (compression types, image sizes, frame count)")
        color_type, depth_type, cw, ch, dw, dh, shift, num_frames = struct.unpack("<iiIIIIfQ", rest)
        frames_offset = f.tell()
    if color_type not in COLOR_COMPRESSION or depth_type not in DEPTH_COMPRESSION:
        raise SensError(f"{path} is not a ScanNet .sens file (compression type fields read {color_type} and "
                        f"{depth_type}; known types are -1..2).")
    color_name, depth_name = COLOR_COMPRESSION[color_type], DEPTH_COMPRESSION[depth_type]
    if color_name != "jpeg" or depth_name != "zlib_ushort":
        raise SensError(f"{path} stores colour as '{color_name}' and depth as '{depth_name}'; prepare-scannet "
                        f"reads ScanNet's 'jpeg' colour and 'zlib_ushort' depth only.")
    if not all(0 < v <= _MAX_SIDE for v in (cw, ch, dw, dh)):
        raise SensError(f"{path} is not a valid ScanNet .sens file (image sizes read colour {cw}x{ch}, depth "
                        f"{dw}x{dh}).")
    if not (math.isfinite(shift) and shift > 0):
        raise SensError(f"{path} is not a valid ScanNet .sens file (depth shift reads {shift}; ScanNet uses 1000).")
    if num_frames == 0:
        raise SensError(f"{path} holds zero frames: there is nothing to export.")
    if num_frames > (size - frames_offset) // _FRAME_RECORD.size:
        raise SensError(f"{path} is truncated or not a .sens file: its header promises {num_frames} frames but "
                        f"only {size - frames_offset} bytes follow the header.")
    return SensHeader(path, version, name, *mats, color_name, depth_name, cw, ch, dw, dh, float(shift),
                      int(num_frames), frames_offset, size)


def index_frames(header: SensHeader) -> List[FrameRecord]:
    """Every frame's record (pose, timestamps, byte counts and offsets), reading 96 bytes per frame and seeking
    over the image bytes; a file that ends inside a frame is reported here, before anything is written."""
    path, size, n = header.path, header.file_size, header.num_frames
    records: List[FrameRecord] = []
    pos = header.frames_offset
    with open(path, "rb") as f:
        for i in range(n):
            f.seek(pos)
            raw = f.read(_FRAME_RECORD.size)
            if len(raw) != _FRAME_RECORD.size:
                raise SensError(f"{path} is truncated: it ends inside frame {i} of {n} (its record at byte {pos}); "
                                f"download it again.")
            values = _FRAME_RECORD.unpack(raw)
            pose = np.array(values[:16], dtype=np.float32).reshape(4, 4)
            ts_color, ts_depth, color_size, depth_size = values[16:]
            if color_size == 0 or depth_size == 0 or color_size > _MAX_FRAME_BYTES or depth_size > _MAX_FRAME_BYTES:
                raise SensError(f"{path} is corrupt: frame {i} of {n} declares {color_size} colour and {depth_size} "
                                f"depth bytes.")
            start = pos + _FRAME_RECORD.size
            end = start + color_size + depth_size
            if end > size:
                raise SensError(f"{path} is truncated: it ends inside frame {i} of {n} (byte {size} of the "
                                f"{end} that frame needs); download it again.")
            records.append(FrameRecord(i, pose, ts_color, ts_depth, start, color_size, depth_size))
            pos = end
    return records


def read_frame_bytes(f, record: FrameRecord) -> Tuple[bytes, bytes]:
    f.seek(record.color_offset)
    data = f.read(record.color_size + record.depth_size)
    return data[:record.color_size], data[record.color_size:]


def decode_depth(header: SensHeader, record: FrameRecord, depth_bytes: bytes) -> np.ndarray:
    """The frame's depth as uint16 [depth_height, depth_width] in file units (1/depth_shift metres)."""
    try:
        raw = zlib.decompress(depth_bytes)
    except zlib.error as e:
        raise SensError(f"{header.path} is corrupt: frame {record.index}'s depth is not a zlib stream ({e}).") from None
    expected = header.depth_width * header.depth_height * 2
    if len(raw) != expected:
        raise SensError(f"{header.path} is corrupt: frame {record.index}'s depth holds {len(raw)} bytes, not the "
                        f"{expected} of {header.depth_width}x{header.depth_height} uint16.")
    return np.frombuffer(raw, dtype="<u2").reshape(header.depth_height, header.depth_width)


def _jpeg_size(header: SensHeader, record: FrameRecord, color_bytes: bytes) -> Tuple[int, int]:
    from PIL import Image

    if color_bytes[:2] != b"\xff\xd8":
        raise SensError(f"{header.path} is corrupt: frame {record.index}'s colour is not a JPEG.")
    try:
        with Image.open(io.BytesIO(color_bytes)) as im:
            return im.size
    except Exception as e:  # PIL raises several types for bad data
        raise SensError(f"{header.path} is corrupt: frame {record.index}'s colour JPEG cannot be read ({e}).") from None


def decode_color(header: SensHeader, record: FrameRecord, color_bytes: bytes) -> np.ndarray:
    """The frame's colour as uint8 RGB [height, width, 3]."""
    import cv2

    _jpeg_size(header, record, color_bytes)
    bgr = cv2.imdecode(np.frombuffer(color_bytes, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SensError(f"{header.path} is corrupt: frame {record.index}'s colour JPEG cannot be decoded.")
    return bgr[:, :, ::-1]


def matrix_text(matrix: np.ndarray) -> str:
    """4 rows of 4 numbers; float32 values round-trip exactly, -inf stays -inf (ScanNet's invalid poses)."""
    return "".join(" ".join(f"{float(v):.9g}" for v in row) + "\n" for row in np.asarray(matrix, dtype=np.float64))


@dataclass
class ExportResult:
    out: Path
    frames_in_file: int
    selected: int  # frames the stride (and max_frames) pick
    written: int
    skipped: int  # already complete from an earlier run
    invalid_poses: int  # selected frames whose pose is not finite (nerfstudio's parser drops them)
    seconds: float
    color_size: Tuple[int, int]  # (width, height) written
    plys: List[Path] = field(default_factory=list)

    @property
    def frames_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else float("inf")


class _Writer:
    """Atomic writes (utils.fsio.atomic_write): a temp file under <out>/.sens_partial renamed onto the final name;
    no fsync per frame (thousands of files; a resumed run redoes what a power cut lost)."""

    def __init__(self, out: Path):
        self.partial = out / PARTIAL_DIR
        self.partial.mkdir(parents=True, exist_ok=True)
        self.counter = 0

    def write(self, dest: Path, data: bytes) -> None:
        self.counter += 1
        tmp = self.partial / f"{os.getpid()}-{self.counter}{dest.suffix}"
        atomic_write(dest, lambda f: f.write(data), tmp_path=tmp, fsync=False)

    def copy(self, src: Path, dest: Path) -> None:
        self.counter += 1
        tmp = self.partial / f"{os.getpid()}-{self.counter}{dest.suffix}"
        with open(src, "rb") as source:
            atomic_write(dest, lambda f: shutil.copyfileobj(source, f), tmp_path=tmp, fsync=False)

    def close(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)


def frame_paths(out: Path, index: int) -> Tuple[Path, Path, Path]:
    return out / "color" / f"{index}.jpg", out / "depth" / f"{index}.png", out / "pose" / f"{index}.txt"


def _check_options(path: Path, header: SensHeader, frame_stride: int, image_size: Optional[Tuple[int, int]],
                   max_frames: Optional[int]) -> Optional[Tuple[int, int]]:
    if not isinstance(frame_stride, int) or frame_stride < 1:
        raise SensError(f"frame stride {frame_stride!r} for {path}: give a whole number >= 1 (1 keeps every frame).")
    if max_frames is not None and max_frames < 1:
        raise SensError(f"max frames {max_frames!r} for {path}: give a whole number >= 1, or none for all frames.")
    if image_size is None:
        return None
    size = tuple(int(v) for v in image_size)
    if len(size) != 2 or not all(0 < v <= _MAX_SIDE for v in size):
        raise SensError(f"image size {image_size!r} for {path}: give WIDTH HEIGHT in pixels, e.g. 640 480.")
    if size == (header.color_width, header.color_height):
        return None
    return size  # type: ignore[return-value]


def _clear_export(out: Path) -> None:
    """Remove what an export writes (integer-named frames, the intrinsic files, the manifest), nothing else."""
    for sub, suffix in (("color", ".jpg"), ("depth", ".png"), ("pose", ".txt")):
        folder = out / sub
        if folder.is_dir():
            for p in folder.iterdir():
                if p.is_file() and p.suffix == suffix and p.stem.isdigit():
                    p.unlink()
    for name in INTRINSIC_FILES:
        (out / "intrinsic" / name).unlink(missing_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)


def _settings(header: SensHeader, frame_stride: int, size: Tuple[int, int], max_frames: Optional[int]) -> Dict:
    return {"sens": str(header.path.resolve()), "sens_bytes": header.file_size, "frames_in_file": header.num_frames,
            "frame_stride": frame_stride, "color_size": list(size), "max_frames": max_frames}


def export_scannet(sens: Path, out: Path, frame_stride: int = DEFAULT_FRAME_STRIDE,
                   image_size: Optional[Tuple[int, int]] = None, max_frames: Optional[int] = None,
                   overwrite: bool = False, progress: Optional[Callable[[int, int], None]] = None,
                   copy_plys: bool = True) -> ExportResult:
    """Convert `sens` into the ScanNet layout under `out` (see the module docstring).

    frame_stride: keep frames 0, stride, 2*stride, ... (file names keep the .sens frame index);
    image_size: (width, height) of the written colour images, None for the native size (JPEG copied as is);
    max_frames: stop after this many selected frames; overwrite: remove an earlier export's frames first;
    progress: called as progress(done, total) after each selected frame (skipped ones included).
    """
    start = time.perf_counter()
    sens, out = Path(sens), Path(out)
    header = read_header(sens)
    resize = _check_options(sens, header, frame_stride, image_size, max_frames)
    records = index_frames(header)  # truncation is found here, before any output
    selected = records[::frame_stride][:max_frames] if max_frames else records[::frame_stride]
    size = resize or (header.color_width, header.color_height)

    if out.exists() and not out.is_dir():
        raise SensError(f"--out {out} exists and is not a folder; choose a folder for the ScanNet layout of {sens}.")
    manifest = out / MANIFEST
    settings = _settings(header, frame_stride, size, max_frames)
    if manifest.is_file() and not overwrite:
        try:
            previous = json.loads(manifest.read_text())
        except (OSError, ValueError):
            previous = None
        changed = [k for k in ("sens", "sens_bytes", "frame_stride", "color_size")
                   if not isinstance(previous, dict) or previous.get(k) != settings[k]]
        if changed:
            raise SensError(f"{out} holds an export made with other settings ({', '.join(changed)} differ) than "
                            f"this one of {sens}; pass overwrite (--overwrite) or another output folder.")
    elif not overwrite and (out / "color").is_dir() and any((out / "color").iterdir()):
        raise SensError(f"{out}/color already holds images not written by prepare-scannet; pass overwrite "
                        f"(--overwrite) to replace them or choose another output folder for {sens}.")
    if overwrite:
        _clear_export(out)

    for sub in SCANNET_DIRS:
        (out / sub).mkdir(parents=True, exist_ok=True)
    writer = _Writer(out)
    writer.write(manifest, (json.dumps(settings, indent=1) + "\n").encode())
    intrinsic_color = header.intrinsic_color.astype(np.float64)
    if resize:
        intrinsic_color[0, :3] *= size[0] / header.color_width  # fx, (skew), cx: pixel-edge convention
        intrinsic_color[1, :3] *= size[1] / header.color_height  # (nerfstudio's rescale_output_resolution)
    mats = (intrinsic_color, header.extrinsic_color, header.intrinsic_depth, header.extrinsic_depth)
    for name, mat in zip(INTRINSIC_FILES, mats):
        writer.write(out / "intrinsic" / name, matrix_text(mat).encode())

    written = skipped = invalid = 0
    total = len(selected)
    try:
        with open(sens, "rb") as f:
            for done, rec in enumerate(selected, 1):
                if not np.isfinite(rec.camera_to_world).all():
                    invalid += 1
                color_path, depth_path, pose_path = frame_paths(out, rec.index)
                if color_path.is_file() and depth_path.is_file() and pose_path.is_file():
                    skipped += 1
                else:
                    color_bytes, depth_bytes = read_frame_bytes(f, rec)
                    _write_frame(writer, header, rec, color_bytes, depth_bytes, resize, color_path, depth_path,
                                 pose_path)
                    written += 1
                if progress is not None:
                    progress(done, total)
        plys = _copy_plys(writer, sens, out) if copy_plys else []
    finally:
        writer.close()
    return ExportResult(out, header.num_frames, total, written, skipped, invalid, time.perf_counter() - start,
                        size, plys)


def _write_frame(writer: _Writer, header: SensHeader, rec: FrameRecord, color_bytes: bytes, depth_bytes: bytes,
                 resize: Optional[Tuple[int, int]], color_path: Path, depth_path: Path, pose_path: Path) -> None:
    import cv2

    depth = decode_depth(header, rec, depth_bytes)
    if resize is None:
        w, h = _jpeg_size(header, rec, color_bytes)
        if (w, h) != (header.color_width, header.color_height):
            raise SensError(f"{header.path} is corrupt: frame {rec.index}'s colour JPEG is {w}x{h}, the header "
                            f"says {header.color_width}x{header.color_height}.")
        jpeg = color_bytes  # ScanNet's own JPEG, copied without re-encoding
    else:
        rgb = decode_color(header, rec, color_bytes)
        smaller = resize[0] * resize[1] < rgb.shape[0] * rgb.shape[1]
        bgr = cv2.resize(np.ascontiguousarray(rgb[:, :, ::-1]), resize,
                         interpolation=cv2.INTER_AREA if smaller else cv2.INTER_LINEAR)
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise SensError(f"could not encode frame {rec.index} of {header.path} as JPEG.")
        jpeg = buf.tobytes()
    ok, png = cv2.imencode(".png", depth)  # uint16 single channel -> 16-bit greyscale PNG
    if not ok:
        raise SensError(f"could not encode frame {rec.index}'s depth of {header.path} as PNG.")
    # pose and depth first: the colour image is what marks a frame as present for a reader
    writer.write(pose_path, matrix_text(rec.camera_to_world).encode())
    writer.write(depth_path, png.tobytes())
    writer.write(color_path, jpeg)


def _copy_plys(writer: _Writer, sens: Path, out: Path) -> List[Path]:
    scene = sens.name[:-len(".sens")] if sens.name.endswith(".sens") else sens.stem
    copied = []
    for suffix in PLY_SUFFIXES:
        src = sens.parent / f"{scene}{suffix}"
        dest = out / src.name
        if not src.is_file():
            continue
        if dest.exists() and (dest.resolve() == src.resolve() or dest.stat().st_size == src.stat().st_size):
            copied.append(dest)
            continue
        writer.copy(src, dest)
        copied.append(dest)
    return copied
