"""Durable file writes: every byte written, and the directory entry that names the file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = ["fsync_dir", "write_all"]


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd``: ``os.write`` may write only part of it.

    A short write that went unnoticed would be fsynced and then renamed over
    the good file — a durable, truncated keystore or blob.
    """
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # pragma: no cover - a POSIX write of >0 bytes never returns 0
            raise OSError(errno.EIO, "write wrote nothing")
        view = view[written:]


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable: a file created or renamed into it
    is there after a crash only once its directory is synced too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
