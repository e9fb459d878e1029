"""A teacher made from a generated scene's ground truth: exact masks, fixed class vectors, no model.

It stands in for Grounded-SAM2 + CLIP in tests and pipeline checks, and writes the same cache.

Masks: the instances visible in an image (walls, floor and ceiling included), their ids remapped to 0..M-1
in increasing instance-id order; -1 where the instance map is 0 (no surface).

Embeddings: normalise(class_embedding(class name) + noise * u), u a random unit direction seeded by
(image key, instance id). `noise` is thus the perturbation's norm relative to the unit class vector: two
masks of one class agree to cosine ~ 1 / (1 + noise^2) (0.9975 at 0.05), while different classes are
nearly orthogonal (cosine ~ N(0, 1/dim), std 0.044 at 512-D).

Two optional failure modes of a real detector + CLIP teacher (both off by default; the cache records them):
  label_noise  each furniture instance is, with this probability, named as another furniture class (uniform
               among the other ones) in every view where it is seen: a consistent misdetection, which
               averaging over views cannot undo. Walls, floor and ceiling keep their class.
  miss_rate    each (image, instance) mask is dropped with this probability (its pixels become -1): a
               missed detection in one view.
Both draws are seeded by (ground truth, instance) and (image, instance), so they repeat exactly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

import cv2
import numpy as np
import torch

from qrender_ns.data.datamanager import served_images
from qrender_ns.data.scene_generator import BACKGROUND_ID, FURNITURE_CLASSES
from qrender_ns.teachers.cache import FillStats, default_cache_root, image_sha256
from qrender_ns.teachers.filling import fill_teacher_cache, open_cache_for
from qrender_ns.teachers.vocabulary import normalize_text

NAME = "synthetic"
VERSION = 2  # 2: class names normalised (text.normalize_text). Bump when the masks or embeddings it computes change: the cache then redoes everything


def _token_bits(token: str) -> int:
    """64 bits fixed by sha256(token): the same in every process and on every machine."""
    return int.from_bytes(hashlib.sha256(token.encode("utf-8")).digest()[:8], "little")


def _seeded_unit_vector(token: str, dim: int) -> torch.Tensor:
    """Gaussian direction [dim] seeded by sha256(token). A CPU generator drawing float64 gives the same
    vector in every process and on every machine (for the pinned torch version)."""
    seed = _token_bits(token) >> 1  # 63-bit seed
    generator = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(dim, generator=generator, dtype=torch.float64, device="cpu")
    return (v / v.norm()).to(torch.float32)


def class_embedding(name: str, dim: int = 512) -> torch.Tensor:
    """The fixed random unit vector [dim] of a class name, after normalize_text ("Chair", " chair" and "chair"
    are one vector)."""
    return _seeded_unit_vector(normalize_text(name), dim)


def _noise_direction(image_key: str, instance_id: int, dim: int) -> torch.Tensor:
    # The "\0" separators keep these tokens apart from any class name.
    return _seeded_unit_vector(f"\0noise\0{image_key}\0{instance_id}", dim)


def _seeded_uniform(token: str) -> float:
    """A number in [0, 1) fixed by sha256(token) (its top 53 bits)."""
    return (_token_bits(token) >> 11) / float(1 << 53)


def check_probability(name: str, value: float) -> float:
    """float(value), or a ValueError naming `name` unless it is in [0, 1) (NaN included)."""
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"synthetic teacher: {name} must be a probability in [0, 1), got {value}")
    return value


def require_generated_scene(scene_dir: Union[str, Path]) -> Path:
    """Path of the scene's gt/scene.json; a clear error when the folder is not a generated scene."""
    meta = Path(scene_dir) / "gt" / "scene.json"
    if not meta.is_file():
        raise FileNotFoundError(
            f"{scene_dir} has no gt/scene.json: the synthetic teacher needs a scene made by `qsplat make-scene` "
            "(its ground-truth masks are the teacher). Real scenes need a real teacher: `qsplat extract-features "
            "--teacher auto` (grounded-sam2-clip with prompts, sam2-auto-clip without; docs/teachers.md).")
    return meta


class SyntheticTeacher:
    """Masks and embeddings of a generated scene's images from its ground truth (see the module docstring)."""

    name = NAME

    def __init__(self, scene_dir: Union[str, Path], noise: float = 0.05, dim: int = 512,
                 cache_root: Optional[Union[str, Path]] = None, label_noise: float = 0.0, miss_rate: float = 0.0):
        self.scene_dir = Path(scene_dir)
        meta_path = require_generated_scene(self.scene_dir)
        meta = json.loads(meta_path.read_text())
        self.noise, self.dim = float(noise), int(dim)
        self.label_noise = check_probability("label_noise", label_noise)
        self.miss_rate = check_probability("miss_rate", miss_rate)
        self.class_names: List[str] = [c["name"] for c in sorted(meta["classes"], key=lambda c: c["id"])]
        self.true_instance_class: Dict[int, str] = {int(i["id"]): i["class_name"] for i in meta["instances"]}
        self._ground_truth_sha256 = image_sha256(meta_path)
        # The class the teacher names each instance by (its true class unless label_noise renamed it)
        self.instance_class: Dict[int, str] = {i: self._named_class(i, c) for i, c in self.true_instance_class.items()}
        self._instance_maps: Dict[str, Path] = {c["image"]: self.scene_dir / c["instance_map"]
                                                for c in meta["cameras"]}
        self.image_keys: List[str] = list(self._instance_maps)  # camera order
        self.cache_root = Path(cache_root) if cache_root is not None else default_cache_root(self.scene_dir, NAME)

    def _named_class(self, instance_id: int, true_class: str) -> str:
        if self.label_noise == 0.0 or true_class not in FURNITURE_CLASSES:
            return true_class
        token = f"\0label\0{self._ground_truth_sha256}\0{instance_id}"
        if _seeded_uniform(token) >= self.label_noise:
            return true_class
        others = [c for c in FURNITURE_CLASSES if c != true_class]
        return others[min(int(_seeded_uniform(token + "\0class") * len(others)), len(others) - 1)]

    def _missed(self, image_key: str, instance_id: int) -> bool:
        return self.miss_rate > 0.0 and _seeded_uniform(f"\0miss\0{image_key}\0{instance_id}") < self.miss_rate

    @property
    def teacher_info(self) -> dict:
        """What the cache records; any change invalidates all entries (a regenerated scene included)."""
        info = {"name": NAME, "version": VERSION, "noise": self.noise,
                "embedding": "normalise(class_embedding(class) + noise * unit gaussian seeded by (image, instance))",
                "ground_truth_sha256": self._ground_truth_sha256}
        # Recorded only when on, so caches written before these options existed stay valid
        if self.label_noise:
            info["label_noise"] = self.label_noise
        if self.miss_rate:
            info["miss_rate"] = self.miss_rate
        return info

    def masks(self, image_key: str) -> Tuple[np.ndarray, np.ndarray]:
        """(mask_ids int32 [H, W] with -1 = no surface, instance id of each mask [M] in increasing order)."""
        path = self._instance_map_path(image_key)
        instance_map = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if instance_map is None or instance_map.ndim != 2:
            raise FileNotFoundError(f"{path}: missing or not a single-channel instance map")
        instance_ids = np.unique(instance_map)
        instance_ids = instance_ids[instance_ids != BACKGROUND_ID]
        if self.miss_rate:
            instance_ids = np.array([i for i in instance_ids if not self._missed(image_key, int(i))],
                                    dtype=instance_ids.dtype)
        remap = np.full(int(instance_map.max()) + 1, -1, dtype=np.int32)  # missed ones stay -1
        remap[instance_ids] = np.arange(len(instance_ids), dtype=np.int32)
        return remap[instance_map], instance_ids.astype(np.int64)

    def embeddings(self, image_key: str, instance_ids: Iterable[int]) -> torch.Tensor:
        """Unit embeddings [M, dim], one per instance id."""
        rows = [class_embedding(self._class_of(i), self.dim)
                + self.noise * _noise_direction(image_key, int(i), self.dim) for i in instance_ids]
        if not rows:
            return torch.zeros(0, self.dim, device="cpu")  # host side, as the teachers' outputs
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)

    def compute(self, image_key: str) -> Tuple[np.ndarray, torch.Tensor]:
        mask_ids, instance_ids = self.masks(image_key)
        return mask_ids, self.embeddings(image_key, instance_ids)

    def compute_served(self, image_key: str, image: np.ndarray) -> Tuple[np.ndarray, torch.Tensor]:
        """compute() for the image as the datamanager serves it: masks resized (nearest) to its size when
        it was loaded downscaled."""
        mask_ids, embeddings = self.compute(image_key)
        height, width = image.shape[:2]
        if mask_ids.shape != (height, width):
            mask_ids = cv2.resize(mask_ids, (width, height), interpolation=cv2.INTER_NEAREST)
            kept = np.unique(mask_ids[mask_ids >= 0])  # a mask may vanish when shrunk: renumber 0..M'-1
            remap = np.full(embeddings.shape[0], -1, np.int32)
            remap[kept] = np.arange(len(kept), dtype=np.int32)
            mask_ids = np.where(mask_ids >= 0, remap[np.maximum(mask_ids, 0)], -1).astype(np.int32)
            embeddings = embeddings[torch.from_numpy(kept.astype(np.int64))]
        return mask_ids, embeddings

    def run(self, image_keys: Optional[Iterable[str]] = None, overwrite: bool = False,
            progress: bool = True) -> FillStats:
        """Fill the cache for image_keys (default: all the scene's images, as the datamanager serves them),
        skipping current entries."""
        keys = self.image_keys if image_keys is None else list(image_keys)
        unknown = [k for k in keys if k not in self._instance_maps]
        if unknown:
            raise ValueError(f"not images of {self.scene_dir}: {unknown} (known: {self.image_keys})")
        items = [item for item in served_images(self.scene_dir, ("train", "val")) if item[0] in keys]
        with open_cache_for(self, keys, replace_other_teacher=overwrite) as cache:  # the writer lock is released on leaving
            return fill_teacher_cache(cache, self, items, overwrite=overwrite, progress=progress)

    def _instance_map_path(self, image_key: str) -> Path:
        if image_key not in self._instance_maps:
            raise KeyError(f"{image_key!r} is not an image of {self.scene_dir}")
        return self._instance_maps[image_key]

    def _class_of(self, instance_id: int) -> str:
        """The class the teacher names the instance by (see label_noise)."""
        if int(instance_id) not in self.instance_class:
            raise KeyError(f"instance {instance_id} is not listed in {self.scene_dir}/gt/scene.json")
        return self.instance_class[int(instance_id)]


class SyntheticTextEncoder:
    """The text side of SyntheticTeacher: encode(texts)[i] = class_embedding(texts[i]).

    A class name maps to exactly the vector the teacher's embeddings of that class scatter around; texts are
    matched after normalize_text (case and whitespace do not matter). Any other text still gets its own
    deterministic random unit vector, nearly orthogonal to every class: callers that must not show such a
    meaningless map (viewer, `qsplat query`) refuse it first with text.vocabulary_error."""

    name = NAME

    def __init__(self, dim: int = 512):
        self.dim = int(dim)

    def encode(self, texts: List[str]) -> torch.Tensor:
        """L2-normalised embeddings [T, dim]."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, not a single string")
        if not texts:
            return torch.zeros(0, self.dim, device="cpu")  # host side, as the teachers' outputs
        return torch.stack([class_embedding(t, self.dim) for t in texts])
