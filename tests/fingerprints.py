"""Fingerprints of generated scenes that hold on any x86-64 CPU, and their comparison.

A byte hash of generated files fails across CPUs: numpy's float64 sin/cos differ in the last bit between
AVX2 and AVX-512 machines (SVML), which moves the last digit of written floats and the bits of float32 PLYs.
So a fingerprint keeps structure and integers exactly (file list, keys, class and instance lists, image
shapes, label pixel counts) and floats as values compared within a tolerance (poses within 1e-6, image and
point-cloud statistics within a fraction of a level) — far below what any real change of the generator moves.

    python tests/fingerprints.py            # rewrite tests/data/default_rooms.json from today's generator
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List

import numpy as np

REFERENCE = Path(__file__).parent / "data" / "default_rooms.json"
# The default rooms the reference covers (what test_default_rooms_are_unchanged regenerates).
LAYOUT_SEEDS = range(12)
CAMERAS_PER_SEED = 8
SCENE_ARGS = dict(seed=3, num_images=6, width=48, height=36, num_eval=2, num_points=3000)

FLOAT_TOL = 1e-6  # poses, room geometry, colours (all tolerances are absolute)
IMAGE_LEVEL_TOL = 0.25  # mean/std of an 8-bit channel, in levels (one flipped edge pixel of 1,728 moves 0.15)
DEPTH_MM_TOL = 1.0  # mean/std of a uint16 depth image in millimetres
LABEL_PIXELS_TOL = 2  # pixels per label value in an instance/class image
PLY_TOL = 1e-4  # statistics of float32 point coordinates (metres); PLY colours as IMAGE_LEVEL_TOL


def _image_summary(path: Path) -> dict:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise OSError(f"could not read {path}")
    pixels = image.reshape(image.shape[0] * image.shape[1], -1).astype(np.float64)
    summary = {"shape": list(image.shape), "dtype": str(image.dtype),
               "mean": pixels.mean(0).tolist(), "std": pixels.std(0).tolist()}
    if path.parent.name in ("instances", "classes"):  # label images: every value and its pixel count
        values, counts = np.unique(image, return_counts=True)
        summary["label_pixels"] = {str(int(v)): int(c) for v, c in zip(values, counts)}
    return summary


def _ply_summary(path: Path) -> dict:
    from plyfile import PlyData

    vertex = PlyData.read(str(path))["vertex"].data
    summary = {"count": len(vertex)}
    for name in vertex.dtype.names:
        column = np.asarray(vertex[name], dtype=np.float64)
        if np.issubdtype(vertex.dtype[name], np.integer) and name in ("label", "instance"):
            values, counts = np.unique(column.astype(np.int64), return_counts=True)
            summary[name] = {str(int(v)): int(c) for v, c in zip(values, counts)}
        else:
            summary[name] = {"mean": column.mean(), "std": column.std(), "min": column.min(), "max": column.max()}
    return summary


def _text_numbers(path: Path) -> List[float]:
    return [float(token) for token in path.read_text().split()]


def describe_files(root: Path) -> dict:
    """relative path -> a summary of that file that does not depend on the CPU's last bits."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        if path.suffix == ".json":
            out[rel] = json.loads(path.read_text())
        elif path.suffix == ".txt":
            out[rel] = _text_numbers(path)
        elif path.suffix in (".png", ".jpg"):
            out[rel] = _image_summary(path)
        elif path.suffix == ".ply":
            out[rel] = _ply_summary(path)
        else:
            out[rel] = {"bytes": path.stat().st_size}
    return out


def describe_layouts() -> dict:
    """build_scene and _make_cameras of the default rooms (seeds 0-11), as plain JSON values."""
    from qrender_ns.data import scene_generator as sg

    rooms = {}
    for seed in LAYOUT_SEEDS:
        scene = sg.build_scene(seed)
        rooms[str(seed)] = {"scene": scene.to_json(),
                            "cameras": [c.tolist() for c in sg._make_cameras(scene, seed, CAMERAS_PER_SEED)]}
    return rooms


def describe_default_rooms(workdir: Path) -> dict:
    from qrender_ns.data import scene_generator as sg

    files = {}  # (through JSON, so that numpy scalars and tuples compare as the stored reference)
    for layout in ("scannet", "nerfstudio"):
        root = workdir / layout / "room"
        sg.generate_scene(root, layout=layout, **SCENE_ARGS)
        files[layout] = describe_files(root)
    return json.loads(json.dumps({"layouts": describe_layouts(), "files": files}))


def _float_tolerance(rel_path: str) -> float:
    """The tolerance of the floats in one generated file's summary (see the module docstring)."""
    path = Path(rel_path)
    if path.suffix in (".png", ".jpg"):
        return DEPTH_MM_TOL if path.parent.name in ("depth", "depths") else IMAGE_LEVEL_TOL
    return PLY_TOL if path.suffix == ".ply" else FLOAT_TOL


PLY_COLOUR_KEYS = ("red", "green", "blue")
COUNT_KEYS = ("label_pixels", "label", "instance", "count")  # pixel / point counts of a summary


def compare_fingerprints(actual: dict, expected: dict) -> List[str]:
    """Every difference between two fingerprints of describe_default_rooms beyond its tolerance."""
    diffs = compare(actual.get("layouts"), expected["layouts"], "layouts", FLOAT_TOL)
    for layout, files in expected["files"].items():
        got = actual.get("files", {}).get(layout, {})
        diffs += [f"files/{layout}/{f}: missing" for f in files if f not in got]
        diffs += [f"files/{layout}/{f}: unexpected" for f in got if f not in files]
        for rel, summary in files.items():
            if rel in got:
                diffs += compare(got[rel], summary, f"files/{layout}/{rel}", _float_tolerance(rel))
    return diffs


def compare(actual: Any, expected: Any, path: str, float_tol: float, count_tol: int = 0) -> List[str]:
    """Differences between two JSON values: structure, strings and integers exactly (integers under a
    COUNT_KEYS key within LABEL_PIXELS_TOL), floats within float_tol absolute plus as much relative."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: {type(actual).__name__} != dict"]
        diffs = [f"{path}/{k}: missing" for k in expected if k not in actual]
        diffs += [f"{path}/{k}: unexpected" for k in actual if k not in expected]
        for k in expected:
            if k in actual:
                tol = LABEL_PIXELS_TOL if k in COUNT_KEYS else count_tol
                ftol = IMAGE_LEVEL_TOL if k in PLY_COLOUR_KEYS and ".ply" in path else float_tol
                diffs += compare(actual[k], expected[k], f"{path}/{k}", ftol, tol)
        return diffs
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            size = len(actual) if isinstance(actual, list) else type(actual).__name__
            return [f"{path}: length {size} != {len(expected)}"]
        return [d for i, (a, e) in enumerate(zip(actual, expected))
                for d in compare(a, e, f"{path}/{i}", float_tol, count_tol)]
    if type(actual) is not type(expected):
        return [f"{path}: {actual!r} != {expected!r}"]
    if isinstance(expected, float):
        ok = abs(actual - expected) <= float_tol or actual == expected
        return [] if ok else [f"{path}: {actual!r} != {expected!r} (tolerance {float_tol:g})"]
    if isinstance(expected, int) and not isinstance(expected, bool):
        ok = abs(actual - expected) <= count_tol
        return [] if ok else [f"{path}: {actual} != {expected}" + (f" (tolerance {count_tol})" if count_tol else "")]
    return [] if actual == expected else [f"{path}: {actual!r} != {expected!r}"]


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory() as tmp:
        fingerprint = describe_default_rooms(Path(tmp))
    REFERENCE.parent.mkdir(exist_ok=True)
    tmp_path = REFERENCE.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(fingerprint, sort_keys=True) + "\n")
    tmp_path.replace(REFERENCE)
    print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size // 1024} KiB)")
