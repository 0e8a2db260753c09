"""A workdir's own files: the lock and metrics.jsonl of a training run, and new workdirs
(or other output directories) built under a temporary name and renamed when complete.

Every file a run writes is written atomically (files.write_atomic), or, for the append-only
metrics log, tolerated when a crash or a full disk left its last line partial.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from sparsemodel.config import ConfigError
from sparsemodel.files import free_name, storage_error, write_atomic

LOCK_FILE = ".train.lock"


# --------------------------------------------------------------------------- the lock


class WorkdirLock:
    """An exclusive lock on a workdir for the life of one `train` (flock on LOCK_FILE).

    The kernel drops a flock when its process dies, however it dies, so a lock left by a
    killed run is never stale. The file records the holder's host, pid and start time
    for the message a second `train` prints.
    """

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ConfigError(
                f"--workdir {self.path.parent}: another train is running in it ({holder}); "
                "wait for it, stop it, or use another --workdir"
            ) from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
        return f"pid {holder['pid']} on {holder['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


# ------------------------------------------------------------------- metrics.jsonl


def truncate_metrics(path: Path, last_step: int, log=print) -> None:
    """Keeps the metric lines up to the restored step, so a resumed run's log has one line
    per step (a killed run may have logged steps it never checkpointed).

    A partial or garbled line (a crash or a full disk mid-write) and everything after it
    are set aside in `<path>.damaged-<n>`, said in one line, instead of blocking resume.
    """
    if not path.exists():
        return
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        raise storage_error(path, e) from None
    kept = []
    for n, line in enumerate(lines):
        record = _parse(line)
        if record is None:
            aside = free_name(path.with_name(path.name + ".damaged"))
            write_atomic(aside, "".join(x + "\n" for x in lines[n:]))
            log(
                f"warning: {path} line {n + 1} is partial or garbled: kept the {n} lines "
                f"before it, set the other {len(lines) - n} aside in {aside.name}"
            )
            break
        if record["step"] <= last_step:
            kept.append(line)
    write_atomic(path, "".join(x + "\n" for x in kept))


def _parse(line: str) -> dict | None:
    with contextlib.suppress(ValueError):
        record = json.loads(line)
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            return record
    return None


class MetricsLog:
    """Appends one JSON line per step; a failed write is a StorageError naming the file."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = path.open("a")
        except OSError as e:
            raise storage_error(path, e) from None

    def write(self, record: dict) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:
            raise storage_error(self.path, e) from None

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a full disk already stopped the run
            self._file.close()


# ------------------------------------------------------- new directories, all or nothing


def refuse_existing(path: Path, what: str) -> None:
    """ConfigError unless path is absent or an empty directory: nothing is overwritten."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        held = "checkpoints" if (path / "checkpoints").exists() else "files"
        raise ConfigError(f"{what}: already holds {held} (use a new directory)")


@contextlib.contextmanager
def built_beside(dest: Path, what: str) -> Iterator[Path]:
    """A new directory under a temporary name beside dest, renamed to dest when the block
    succeeds and removed when it fails, so dest never holds a half-written result."""
    build = dest.absolute().parent / f".{dest.absolute().name}.partial-{os.getpid()}"
    try:
        build.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(build, ignore_errors=True)  # left by a killed run of this same pid
        build.mkdir()
    except OSError as e:
        raise ConfigError(f"{what}: not writable ({e.strerror})") from None
    try:
        yield build
        try:
            build.rename(dest)  # atomic; replaces an empty directory, never a non-empty one
        except OSError as e:
            raise ConfigError(f"{what}: cannot put the result in place ({e.strerror})") from None
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
