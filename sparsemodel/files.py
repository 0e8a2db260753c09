"""Writing files safely: atomic replacement, and one line when a write fails.

A write that fails (a full disk, an I/O error) stops a run with a `StorageError` naming the
file, the reason and the space left beside it, instead of a traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class StorageError(RuntimeError):
    """A file the run needs could not be written (full disk, I/O error): one line."""


def storage_error(path: Path | str, error: OSError) -> StorageError:
    """The one line for a failed write: which file, why, and the space left beside it."""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f"{shutil.disk_usage(where).free / 2**20:,.1f} MiB free on its filesystem"
    except OSError:
        free = "free space unknown"
    reason = error.strerror or errno.errorcode.get(error.errno or 0, type(error).__name__)
    return StorageError(f"cannot write {path}: {reason} ({free})")


def write_atomic(path: Path, text: str) -> None:
    """Writes text to path through a temporary file and a rename: readers never see half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise storage_error(path, e) from None


def free_name(path: Path) -> Path:
    """path, or path-2, path-3, ... : the first name not taken (setting aside twice works)."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate
