"""Filling a teacher's cache from served images: one writer at a time (a lock), resumable, keyed by the sha256 of
the pixels as the datamanager serves them."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable, Sequence, Tuple

import numpy as np

from qrender_ns.teachers.cache import (CACHE_DIRNAME, MANIFEST_NAME, CacheBusyError, FillStats, TeacherCache,
                                       TeacherCacheError, _make_header, wait_for_writer)
from qrender_ns.teachers.settings import SYNTHETIC, TeacherSetupError
from qrender_ns.utils.progress import track


def served_image_sha256(image) -> str:
    """sha256 of an image as served (uint8 [H, W, C] pixels, shape included): the cache entry's key."""
    array = np.ascontiguousarray(np.asarray(image))
    digest = hashlib.sha256(f"{array.shape}|{array.dtype}|".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def open_cache_for(teacher, image_keys: Sequence[str], prefix: str = "--", replace_other_teacher: bool = False,
                   on_busy=None):
    """The teacher's cache, opened for writing. A cache at that folder made by another teacher or with other
    settings, or one made for other images, is never silently replaced: a clear error says what to do
    (synthetic caches, cheap to redo from ground truth, and replace_other_teacher=True are the exceptions).
    While another process writes it: CacheBusyError, or with `on_busy`, on_busy(holder) and a wait until it is
    done (a blocking wait on its lock); the checks are then made on what it wrote."""
    root = Path(teacher.cache_root)
    while True:
        if on_busy is not None:
            wait_for_writer(root, on_busy)
        _refuse_foreign_cache(teacher, root, image_keys, prefix, replace_other_teacher)
        try:
            return TeacherCache.create(root, teacher.teacher_info, teacher.dim, teacher.class_names)
        except CacheBusyError:
            if on_busy is None:
                raise  # else another writer took the lock since the wait: wait for that one too


def _refuse_foreign_cache(teacher, root: Path, image_keys: Sequence[str], prefix: str, replace_other_teacher: bool):
    if (root / MANIFEST_NAME).is_file() and not replace_other_teacher:
        try:
            old = TeacherCache.open(root)
        except TeacherCacheError:
            old = None  # unreadable: create() starts it over (nothing usable is lost)
        if old is not None and len(old):
            header = _make_header(teacher.teacher_info, teacher.dim, teacher.class_names)
            same = (old.teacher_info == header["teacher"] and old.feature_dim == header["feature_dim"]
                    and old.class_names == header["class_names"])
            if not same and old.teacher_name != SYNTHETIC:
                changed = sorted(k for k in set(old.teacher_info) | set(header["teacher"])
                                 if old.teacher_info.get(k) != header["teacher"].get(k))
                raise TeacherSetupError(
                    f"Teacher cache {root} ({len(old)} images) was made by teacher '{old.teacher_name}' with other "
                    f"settings (differ: {', '.join(changed) or 'feature_dim/class_names'}); it is kept as it is. "
                    f"To recompute it with these settings: qsplat extract-features --data {_scene_of(root)} "
                    f"--teacher {teacher.name} ... --overwrite; or keep both with {prefix}teacher-cache NEW_FOLDER.")
            if image_keys and not set(old.keys()) & set(image_keys):
                raise TeacherSetupError(
                    f"Teacher cache {root} holds {len(old)} images, none of which is an image of this scene "
                    f"(cache: {old.keys()[:3]}, scene: {list(image_keys)[:3]}): it was made for other images and is "
                    f"kept as it is. Use another {prefix}teacher-cache folder (or the default one).")


def _scene_of(cache_root: Path):
    return cache_root.parent.parent if cache_root.parent.name == CACHE_DIRNAME else "SCENE"


def fill_teacher_cache(cache, teacher, items: Sequence[Tuple[str, Callable]], overwrite: bool = False,
                       progress: bool = True):
    """Compute and write every (image key, served image) whose entry is not current (all with overwrite);
    current entries are skipped (resume). `items` yields (key, get_image) with get_image() -> uint8 [H, W, 3+]."""
    start, stats = time.perf_counter(), FillStats()
    todo = []
    for key, get_image in items:
        image = get_image()
        sha = served_image_sha256(image)
        if not overwrite and cache.is_current(key, sha):
            stats.skipped += 1
        else:
            todo.append((key, image, sha))
    for key, image, sha in track(todo, f"{teacher.name} teacher", progress and bool(todo), eta=True):
        mask_ids, embeddings = teacher.compute_served(key, image)
        cache.write(key, mask_ids, embeddings, sha)
        stats.written += 1
        stats.masks += int(embeddings.shape[0])
    stats.seconds = time.perf_counter() - start
    return stats


