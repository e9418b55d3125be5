"""Writing every byte: the one loop each durable file write goes through."""

from __future__ import annotations

import errno
import os

__all__ = ["write_all"]


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
