"""On-disk cache of 2D teacher outputs: per training image, a mask-id map and one unit embedding per mask.

Layout, under `<scene>/qsplat_teacher/<teacher name>/` (see `default_cache_root`)::

    manifest.json
        {"format_version": 1,
         "teacher": {"name": "...", ...free-form model info: model names, checkpoint hashes, prompts...},
         "feature_dim": 512,
         "class_names": [...],                  # may be empty (open-vocabulary teachers)
         "entries": {"<image key>": {"file": "<name>.npz", "image_sha256": "<hex>",
                                     "height": H, "width": W, "num_masks": M}}}
    <name>.npz   mask_ids int32 [H, W] (-1 = pixel in no mask, else 0..M-1)
                 embeddings float16 [M, D] (L2-normalised before the cast)

The image key is the image path relative to the scene root, POSIX style ("color/0.jpg",
"images/frame_00001.png"); `image_key` maps a dataparser's image filename to it.

Crash safety: every file is written under a temporary name and renamed into place (`os.replace`). An
entry's npz gets a fresh name on every write and is in place before the manifest that lists it; the file
it replaces is deleted only after that manifest is. So a kill at any moment leaves a manifest whose entries
are all complete (a half-done entry is simply absent); at worst an unreferenced npz remains, which the next
`TeacherCache.create` deletes.

One writer at a time: `create` takes an exclusive lock on `<cache>/.lock` (flock, released when the writer
closes the cache or its process ends, also on kill -9) before it touches anything, so its clean-up can only
delete what a dead writer left; a second writer gets a TeacherCacheError saying the cache is busy. Readers
take no lock (they see whole manifests only). Files are created with the process umask (0644 typically),
not mkstemp's 0600.

Invalidation: `create` with teacher info, feature_dim or class_names that differ from the manifest's drops
every entry (the old teacher made them); `is_current` compares image hashes, so an edited image alone is
redone.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import hashlib
import json
import os
import re
import uuid
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch

from qrender_ns.data.keys import image_key  # noqa: F401  (re-exported: the cache keys images by it)
from qrender_ns.utils.fsio import atomic_write

FORMAT_VERSION = 1
CACHE_DIRNAME = "qsplat_teacher"
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".lock"
_HEADER_KEYS = ("format_version", "teacher", "feature_dim", "class_names")
_NORM_TOLERANCE = 1e-2  # float16 keeps unit vectors within ~1e-3 of norm 1; more means a broken file
_MAX_LISTED = 10  # missing images named in an error message

PathLike = Union[str, Path]
Array = Union[np.ndarray, torch.Tensor]


class TeacherCacheError(RuntimeError):
    """A teacher cache that is missing, incomplete, or does not match what reads it."""


class CorruptCacheError(TeacherCacheError):
    """A cache file that cannot be read or holds malformed arrays."""


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def default_cache_root(scene_dir: PathLike, teacher_name: str) -> Path:
    return Path(scene_dir) / CACHE_DIRNAME / teacher_name


def image_sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extract_command(scene_dir: PathLike, teacher_name: str) -> str:
    """The command that (re)fills a cache; error messages quote it."""
    return f"qsplat extract-features --data {scene_dir} --teacher {teacher_name}"


def _scene_dir_of(cache_root: Path) -> Union[Path, str]:
    """The scene folder a cache at the default location belongs to ("<scene>" when it is elsewhere)."""
    return cache_root.parent.parent if cache_root.parent.name == CACHE_DIRNAME else "<scene>"


def _check_key(key: str) -> None:
    parts = key.split("/")
    if not key or "\\" in key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"image key {key!r} must be a relative POSIX path inside the scene, e.g. 'color/0.jpg'")


def _entry_file_name(key: str) -> str:
    """A readable, unique file name: a fresh one per write keeps the previous file valid until the new
    manifest is in place."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key).lstrip(".")[-80:]
    return f"{safe}-{uuid.uuid4().hex[:12]}.npz"


def _atomic_write(path: Path, write: Callable) -> None:
    """utils.fsio.atomic_write (readers see old or new, never half); a read-only folder or full disk is a
    TeacherCacheError sentence."""
    try:
        atomic_write(path, write)
    except OSError as e:
        error = _write_error(path, e)
        if error is None:
            raise
        raise error from None


def _write_error(path: Path, err: OSError) -> Optional["TeacherCacheError"]:
    """A sentence instead of a traceback for the usual causes (read-only folder, disk full); None for others."""
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = f"the folder {path.parent} is not writable ({err.strerror}); make it writable or move the scene"
    elif err.errno in (errno.ENOSPC, errno.EDQUOT):
        why = f"the disk holding {path.parent} is full ({err.strerror}); free space and re-run (finished images are kept)"
    else:
        return None
    return TeacherCacheError(f"cannot write the teacher cache file {path}: {why}")


class CacheBusyError(TeacherCacheError):
    """Another process is writing this cache (`holder`: who, as its lock file says)."""

    def __init__(self, message: str, holder: str = "another process"):
        super().__init__(message)
        self.holder = holder


def _lock_writer(root: Path):
    """Exclusive, non-blocking flock on <root>/.lock; the open file is returned (closing it releases)."""
    path = root / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise _write_error(path, e) or e
    lock = os.fdopen(fd, "r+")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock.read().strip() or "another process"
        lock.close()
        raise CacheBusyError(
            f"Teacher cache {root} is being written by {holder}: one writer at a time. Wait for it to finish "
            "(or stop it), then re-run; images it has finished are kept.", holder=holder) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}\n")
    lock.flush()
    return lock


def wait_for_writer(root: PathLike, on_busy: Callable[[str], None]) -> None:
    """Returns once no process writes the cache at root: at once if none does; else calls on_busy(holder) and
    blocks on the writer lock until its holder closes the cache or exits (the kernel drops the lock even after
    kill -9). Ctrl+C interrupts the wait."""
    path = Path(root) / LOCK_NAME
    if not path.is_file():
        return
    with open(path, "r") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            on_busy(lock.read().strip() or "another process")
            fcntl.flock(lock.fileno(), fcntl.LOCK_SH)
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _as_numpy(x: Array) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _check_arrays(mask_ids: np.ndarray, embeddings: np.ndarray, feature_dim: int, where: str,
                  error: Type[Exception], expected_hw: Optional[Tuple[int, int]] = None,
                  expected_masks: Optional[int] = None) -> None:
    """Shapes, dtypes, id range and finiteness; shared by write (before saving) and read (after loading)."""
    if mask_ids.ndim != 2 or not np.issubdtype(mask_ids.dtype, np.integer):
        raise error(f"{where}: mask_ids must be a 2-D integer array, got {mask_ids.dtype} {tuple(mask_ids.shape)}")
    if embeddings.ndim != 2 or embeddings.shape[1] != feature_dim or not np.issubdtype(embeddings.dtype, np.floating):
        raise error(f"{where}: embeddings must be a float array [M, {feature_dim}], "
                    f"got {embeddings.dtype} {tuple(embeddings.shape)}")
    if expected_hw is not None and tuple(mask_ids.shape) != tuple(expected_hw):
        raise error(f"{where}: mask_ids is {tuple(mask_ids.shape)}, the manifest says {tuple(expected_hw)}")
    num_masks = embeddings.shape[0]
    if expected_masks is not None and num_masks != expected_masks:
        raise error(f"{where}: {num_masks} embeddings, the manifest says {expected_masks} masks")
    if mask_ids.size and (mask_ids.min() < -1 or mask_ids.max() >= num_masks):
        raise error(f"{where}: mask ids span [{mask_ids.min()}, {mask_ids.max()}] but there are {num_masks} "
                    f"embeddings (allowed: -1 for no mask, 0..{num_masks - 1})")
    if not np.isfinite(embeddings).all():
        raise error(f"{where}: embeddings contain NaN or Inf")


def _unit_rows(embeddings: np.ndarray, where: str) -> np.ndarray:
    emb = embeddings.astype(np.float32)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    if (norms < 1e-12).any():
        raise ValueError(f"{where}: an embedding has zero norm and cannot be L2-normalised")
    return emb / norms


def _load_npz(path: Path, command: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["mask_ids"], z["embeddings"]
    except FileNotFoundError:
        raise TeacherCacheError(f"{path}: listed in the manifest but missing. Re-run: {command}") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise CorruptCacheError(f"{path}: unreadable teacher cache file ({type(e).__name__}: {e}). "
                                f"Re-run: {command} --overwrite") from None


# ----------------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------------


def _make_header(teacher_info: dict, feature_dim: int, class_names: Sequence[str]) -> dict:
    """The manifest minus its entries, in JSON-normal form (tuples become lists) so it compares with a loaded one."""
    if not isinstance(teacher_info.get("name"), str) or not teacher_info["name"]:
        raise ValueError(f"teacher_info needs a non-empty 'name', got {teacher_info!r}")
    header = {"format_version": FORMAT_VERSION, "teacher": teacher_info, "feature_dim": int(feature_dim),
              "class_names": list(class_names)}
    try:
        return json.loads(json.dumps(header))
    except TypeError as e:
        raise ValueError(f"teacher_info must be JSON-serialisable: {e}") from None


def _write_manifest(root: Path, header: dict, entries: Dict[str, dict]) -> None:
    text = json.dumps({**header, "entries": dict(sorted(entries.items()))}, indent=1)
    _atomic_write(root / MANIFEST_NAME, lambda f: f.write(text.encode()))


def _load_manifest(root: Path) -> dict:
    path = root / MANIFEST_NAME
    command = extract_command(_scene_dir_of(root), root.name)
    if not path.is_file():
        raise TeacherCacheError(f"No teacher cache at {root} (no {MANIFEST_NAME}). Run: {command}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptCacheError(f"{path}: unreadable manifest ({e}). Re-run: {command} --overwrite") from None
    missing = [k for k in (*_HEADER_KEYS, "entries") if k not in manifest]
    if missing or "name" not in manifest["teacher"]:
        raise CorruptCacheError(f"{path}: manifest lacks {missing or ['teacher.name']}. Re-run: {command} --overwrite")
    if manifest["format_version"] != FORMAT_VERSION:
        raise TeacherCacheError(f"{path}: format version {manifest['format_version']}, this q-splat reads "
                                f"{FORMAT_VERSION}. Re-run: {command} --overwrite")
    return manifest


# ----------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------


class TeacherCache:
    """Reader/writer of one teacher's cache folder (see the module docstring for the format).

    `TeacherCache(root)` / `TeacherCache.open(root)` open an existing cache (readers);
    `TeacherCache.create(root, teacher_info, ...)` opens or starts one for a teacher about to write.
    `read` loads one image's npz on demand; `lru_size` > 0 keeps that many recent images in RAM
    (the returned tensors are shared with the LRU then: do not modify them in place)."""

    def __init__(self, root: PathLike, lru_size: int = 0):
        self.root = Path(root)
        manifest = _load_manifest(self.root)
        self._header = {k: manifest[k] for k in _HEADER_KEYS}
        self._entries: Dict[str, dict] = manifest["entries"]
        self._lru: "OrderedDict[str, Tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()
        self._lru_size = lru_size
        self._lock = None  # the writer's flock (create)

    def close(self) -> None:
        """Release the writer lock (create); a reader has none. The cache stays readable."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> "TeacherCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def open(cls, root: PathLike, lru_size: int = 0) -> "TeacherCache":
        return cls(root, lru_size=lru_size)

    @classmethod
    def create(cls, root: PathLike, teacher_info: dict, feature_dim: int = 512, class_names: Sequence[str] = (),
               lru_size: int = 0) -> "TeacherCache":
        """Open the cache at root for writing, keeping its entries only if they came from the same teacher
        (same teacher_info, feature_dim and class_names); also deletes files no entry references.
        Holds the writer lock until `close()` (or the end of the process); raises CacheBusyError when another
        writer holds it."""
        root = Path(root)
        header = _make_header(teacher_info, feature_dim, class_names)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _write_error(root, e) or e
        lock = _lock_writer(root)
        try:
            try:
                old = _load_manifest(root)
            except TeacherCacheError:  # none yet, unreadable or an old format: start over
                old = None
            same_teacher = old is not None and {k: old[k] for k in _HEADER_KEYS} == header
            _write_manifest(root, header, old["entries"] if same_teacher else {})
            cache = cls(root, lru_size=lru_size)
            cache._lock = lock
            cache._remove_unreferenced_files()  # safe: no other writer can be running
        except BaseException:
            lock.close()
            raise
        return cache

    # --- manifest views -------------------------------------------------------------------------------

    @property
    def teacher_info(self) -> dict:
        return copy.deepcopy(self._header["teacher"])

    @property
    def teacher_name(self) -> str:
        return self._header["teacher"]["name"]

    @property
    def feature_dim(self) -> int:
        return self._header["feature_dim"]

    @property
    def class_names(self) -> List[str]:
        return list(self._header["class_names"])

    @property
    def command(self) -> str:
        """The command that fills this cache."""
        return extract_command(_scene_dir_of(self.root), self.teacher_name)

    def keys(self) -> List[str]:
        return sorted(self._entries)

    def entry(self, key: str) -> dict:
        if key not in self._entries:
            raise TeacherCacheError(f"{self.root}: no features for image {key!r}. Run: {self.command}")
        return dict(self._entries[key])

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return self._has_file(key)

    def _has_file(self, key: str) -> bool:
        entry = self._entries.get(key)
        return entry is not None and (self.root / entry["file"]).is_file()

    def is_current(self, key: str, image_sha256: str) -> bool:
        """True when the cached entry was made from an image with this hash (so it need not be redone)."""
        return self._has_file(key) and self._entries[key]["image_sha256"] == image_sha256

    # --- write / read ---------------------------------------------------------------------------------

    def write(self, key: str, mask_ids: Array, embeddings: Array, image_sha256: str) -> None:
        """Store one image's masks [H, W] (-1 = none, else 0..M-1) and embeddings [M, D] (normalised here)."""
        _check_key(key)
        if self._lock is None:
            raise TeacherCacheError(f"{self.root}: open the cache with TeacherCache.create(...) to write "
                                    "(it takes the one-writer lock)")
        mask_ids, embeddings = _as_numpy(mask_ids), _as_numpy(embeddings)
        where = f"{self.root}: write({key!r})"
        _check_arrays(mask_ids, embeddings, self.feature_dim, where, ValueError)
        unit = _unit_rows(embeddings, where).astype(np.float16)
        ids = mask_ids.astype(np.int32)

        file = _entry_file_name(key)
        _atomic_write(self.root / file, lambda f: np.savez_compressed(f, mask_ids=ids, embeddings=unit))
        old = self._entries.get(key)
        entries = {**self._entries, key: {"file": file, "image_sha256": image_sha256, "height": int(ids.shape[0]),
                                          "width": int(ids.shape[1]), "num_masks": int(unit.shape[0])}}
        try:
            _write_manifest(self.root, self._header, entries)
        except BaseException:
            (self.root / file).unlink(missing_ok=True)
            raise
        self._entries = entries
        self._lru.pop(key, None)
        if old is not None and old["file"] != file:  # only now is nothing pointing at it
            (self.root / old["file"]).unlink(missing_ok=True)

    def read(self, key: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mask_ids LongTensor [H, W], embeddings FloatTensor [M, D]) of one image, checked on load.
        Embeddings are re-normalised in float32 (undoing the float16 rounding of their norm)."""
        if key in self._lru:
            self._lru.move_to_end(key)
            return self._lru[key]
        entry = self.entry(key)
        path = self.root / entry["file"]
        mask_ids, embeddings = _load_npz(path, self.command)
        _check_arrays(mask_ids, embeddings, self.feature_dim, str(path), CorruptCacheError,
                      expected_hw=(entry["height"], entry["width"]), expected_masks=entry["num_masks"])
        emb = torch.from_numpy(embeddings.astype(np.float32))
        norms = emb.norm(dim=1)
        if ((norms - 1).abs() > _NORM_TOLERANCE).any():
            raise CorruptCacheError(f"{path}: embeddings are not L2-normalised (norms {norms.min():.3f}.."
                                    f"{norms.max():.3f}). Re-run: {self.command} --overwrite")
        result = torch.from_numpy(mask_ids.astype(np.int64)), emb / norms.clamp_min(1e-12)[:, None]
        if self._lru_size > 0:
            self._lru[key] = result
            while len(self._lru) > self._lru_size:
                self._lru.popitem(last=False)
        return result

    # --- checks ---------------------------------------------------------------------------------------

    def validate(self, image_keys: Sequence[str], sizes: Optional[Sequence[Tuple[int, int]]] = None) -> None:
        """Raise TeacherCacheError unless every image has an entry (and, with sizes = [(H, W), ...] aligned with
        image_keys, one at that resolution). The message names the images and the command to run."""
        missing = [k for k in image_keys if not self._has_file(k)]
        problems = []
        if missing:
            problems.append(f"no features for {len(missing)} of {len(image_keys)} images: {_listing(missing)}")
        wrong_size = []
        for key, (height, width) in zip(image_keys, sizes or []):
            entry = self._entries.get(key)
            if key not in missing and (entry["height"], entry["width"]) != (height, width):
                wrong_size.append(f"{key} (cache {entry['height']}x{entry['width']}, image {height}x{width})")
        if wrong_size:
            problems.append(f"features of another resolution for {len(wrong_size)} images: {_listing(wrong_size)}")
        if problems:
            raise TeacherCacheError(f"Teacher cache {self.root} (teacher '{self.teacher_name}') does not match the "
                                    f"training images: {'; '.join(problems)}. Run: {self.command}")

    def _remove_unreferenced_files(self) -> None:
        """Delete npz files and temporaries a crashed or superseded write left behind."""
        referenced = {e["file"] for e in self._entries.values()}
        for path in self.root.iterdir():
            stray_npz = path.suffix == ".npz" and path.name not in referenced
            if path.is_file() and (stray_npz or path.name.endswith(".tmp")):
                path.unlink(missing_ok=True)


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


# ----------------------------------------------------------------------------------------------------
# Filling a cache: the counts of a fill (teachers/setup.py fill_teacher_cache, the loop every teacher shares)
# ----------------------------------------------------------------------------------------------------


@dataclass
class FillStats:
    written: int = 0
    skipped: int = 0  # already current (resume)
    masks: int = 0  # masks in the entries written
    seconds: float = 0.0
