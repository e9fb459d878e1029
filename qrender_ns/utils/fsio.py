"""Crash-safe writes (one atomic writer: temporary, fsync, rename) and sentences for the usual write failures
(read-only folder, disk full) instead of OSError tracebacks."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Union

PathLike = Union[str, Path]
READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)
FULL = (errno.ENOSPC, errno.EDQUOT)


def write_error_sentence(path: PathLike, err: OSError, fix: str = "") -> Optional[str]:
    """'cannot write PATH: why; fix' for a read-only place or a full disk; None for other errors."""
    path = Path(path)
    if err.errno in READ_ONLY:
        why = f"{path.parent} is not writable ({err.strerror})"
    elif err.errno in FULL:
        why = f"the disk holding {path.parent} is full ({err.strerror}); free space and re-run"
    elif err.errno in (errno.ENOTDIR, errno.EEXIST) or isinstance(err, (NotADirectoryError, FileExistsError)):
        why = f"a file is in the way of the folder {path.parent}"
    else:
        return None
    return f"cannot write {path}: {why}" + (f"; {fix}" if fix else "")


@contextlib.contextmanager
def exit_on_write_error(path: PathLike, fix: str = ""):
    """Within: a read-only place or a full disk while writing `path` ends the command with one sentence
    (SystemExit, no traceback); any other OSError propagates."""
    try:
        yield
    except OSError as e:
        sentence = write_error_sentence(path, e, fix)
        if sentence is None:
            raise
        raise SystemExit(f"[q-splat] {sentence}") from None


def probe_writable(folder: Path) -> None:
    """Create `folder` (and parents), write, fsync and remove a probe file in it; OSError if any step fails."""
    probe = folder / f".qsplat-probe-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True, exist_ok=True)
    with open(probe, "wb") as f:
        f.write(b"0")
        f.flush()
        os.fsync(f.fileno())
    probe.unlink()


def check_writable_dir(folder: PathLike, fix: str = "") -> None:
    """Create `folder` (and parents) and write + remove a probe file in it; SystemExit with a sentence if not."""
    folder = Path(folder)
    with exit_on_write_error(folder / ".qsplat-probe", fix):
        probe_writable(folder)


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None], tmp_path: Optional[PathLike] = None,
                 fsync: bool = True) -> None:
    """Write `path` crash-safely: `write(f)` into a new temporary file (beside `path`, or `tmp_path`), flush,
    fsync, then rename it over `path`. A kill -9 leaves the old file or the new one, never a torn one; on any
    failure the temporary is removed and the error re-raised (callers turn OSError into their sentence). The
    file gets mode 0666 & ~umask like any other (mkstemp's would be 0600). `fsync=False` for bulk files whose
    loss in a power cut a resumable writer redoes anyway (the rename alone covers a killed process)."""
    path = Path(path)
    tmp = Path(tmp_path) if tmp_path is not None else path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: PathLike, payload, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(payload, indent=indent))
