"""Atomic file replacement: a reader (or a process after a crash) sees the old file or the new one, whole.

Every output of a run goes through :func:`write_atomic`: the bytes go to a temporary file beside the
target, are flushed and fsynced, and the temporary file is renamed over the target (``os.replace``,
atomic on POSIX and Windows); the folder is then fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Replace ``path`` by what ``write(f)`` writes into a binary file ``f``; nothing changes if it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` (:func:`write_atomic`)."""
    write_atomic(path, lambda f: f.write(data))


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform lets a folder be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its rename is durable once it returns
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
