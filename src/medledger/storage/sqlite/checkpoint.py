"""WAL checkpoints off the commit path: a thread and a connection of their own.

SQLite's automatic checkpoint runs inside the commit that pushes the WAL past
1,000 pages: that commit also syncs the WAL, copies every page into the
database file and syncs it. Measured on the record index (a row and ~75
search tokens, each in a random leaf, about 70 pages a write) that was every
14th write, at ~24 ms instead of ~8 ms; on the private chain every ~170th
block. Both are a write's acknowledgement waiting for work that protects
nothing of it.

:class:`WalCheckpointer` runs the same ``PASSIVE`` checkpoint on a thread of
its own, started after a commit once the WAL holds :data:`BACKLOG_PAGES`
frames not yet copied. A ``PASSIVE`` checkpoint never blocks the writer or
readers (WAL mode lets the writer append while older frames are copied), and
with ``synchronous=FULL`` it syncs the WAL before and the database after
copying, as the automatic one does: durability is what it was. The writer's
automatic checkpoint stays on at :data:`FALLBACK_PAGES`, so the WAL stays
bounded should this thread fall behind or fail.

How many frames wait is read from the WAL-index header in the ``-shm`` file
(https://www.sqlite.org/walformat.html: ``mxFrame`` and ``nBackfill``), a
hint only: a header that cannot be read starts no checkpoint, and the
fallback bound still holds. The file is read through a descriptor that stays
open for the life of the store, closed only after the store's last SQLite
connection (:class:`WalIndexHeader`): POSIX record locks belong to a process and
a file, and closing *any* descriptor of the file drops *all* the process's
locks on it — among them the lock by which SQLite tells other processes that
the shared memory is in use. Closing a descriptor after each read did exactly
that: the next process to open the database (``medledger audit``,
``verify``, an API worker) found the file unused, truncated it, and this
process's SQLite, which maps it, died of SIGBUS
(https://www.sqlite.org/howtocorrupt.html, section 2.2).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

__all__ = ["BACKLOG_PAGES", "FALLBACK_PAGES", "WalCheckpointer", "WalIndexHeader"]

log = logging.getLogger(__name__)

#: Frames not yet copied into the database that start a background checkpoint
#: (SQLite's own automatic threshold).
BACKLOG_PAGES = 1000
#: The writer's automatic checkpoint: only a bound on the WAL (~64 MiB of 4 KiB pages).
FALLBACK_PAGES = 16_000
#: ``iVersion`` of the WAL-index header since SQLite 3.7.0.
_WAL_INDEX_VERSION = 3007000
#: Byte offsets in the ``-shm`` file: the first header copy's ``mxFrame``, and
#: ``nBackfill`` of the checkpoint information after the two 48-byte header copies.
_MX_FRAME_AT, _BACKFILL_AT, _HEADER_BYTES = 16, 96, 100


class WalIndexHeader:
    """A WAL database's backlog, read from its ``-shm`` file through one descriptor.

    The descriptor stays open between reads (see the module doc): the owner
    closes it only after the last SQLite connection it has to the database,
    since closing it drops every POSIX lock this process holds on the file.
    It is replaced when the file was (SQLite unlinks ``-shm`` only as the
    database's last user anywhere, so no connection of this process maps the
    old one and dropping locks on it harms nobody).
    """

    def __init__(self, db_path: Path) -> None:
        self._path = Path(f"{db_path}-shm")
        self._fd: int | None = None
        self._file: tuple[int, int] | None = None  # (device, inode) the descriptor names

    def _descriptor(self) -> int | None:
        try:
            now = self._path.stat()
        except OSError:
            return None
        if self._fd is not None and self._file == (now.st_dev, now.st_ino):
            return self._fd
        self.close()  # a replaced file (or none open yet)
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        opened = os.fstat(fd)
        self._fd, self._file = fd, (opened.st_dev, opened.st_ino)
        return fd

    def backlog(self) -> int | None:
        """Frames in the WAL not yet copied into the database, or ``None`` when the
        WAL-index header cannot be read (no ``-shm`` file, an unknown version)."""
        fd = self._descriptor()
        if fd is None:
            return None
        try:
            head = os.pread(fd, _HEADER_BYTES, 0)
        except OSError:
            return None
        return _frames_waiting(head)

    def close(self) -> None:
        """Close the descriptor: only after this process's last connection to the database."""
        if self._fd is not None:
            fd, self._fd, self._file = self._fd, None, None
            os.close(fd)


def _frames_waiting(head: bytes) -> int | None:
    if len(head) < _HEADER_BYTES:
        return None
    # Native byte order: the file is a shared-memory image, never moved between machines.
    (version,) = struct.unpack_from("=I", head, 0)
    if version != _WAL_INDEX_VERSION:
        return None
    max_frame = int(struct.unpack_from("=I", head, _MX_FRAME_AT)[0])
    backfilled = int(struct.unpack_from("=I", head, _BACKFILL_AT)[0])
    return max(max_frame - backfilled, 0)


class WalCheckpointer:
    """Background ``PASSIVE`` checkpoints of one WAL database (see the module doc).

    The writer calls :meth:`committed` after each commit (cheap: one read of the
    ``-shm`` header). ``lock`` is held during each checkpoint: a caller that
    runs a checkpoint of its own which must not be skipped (``TRUNCATE`` after an
    erasure: SQLite answers *busy* without waiting while another checkpoint runs)
    takes it too.
    """

    def __init__(
        self, path: Path, *, lock: threading.Lock | None = None, backlog_pages: int = BACKLOG_PAGES
    ) -> None:
        self.path = path
        self.lock = lock or threading.Lock()
        self._backlog_pages = backlog_pages
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._running: Future[None] | None = None
        self._closed = False
        self._state = threading.Lock()
        self._header = WalIndexHeader(path)

    @staticmethod
    def configure_writer(conn: sqlite3.Connection) -> None:
        """Raise the writer connection's automatic checkpoint to the fallback bound."""
        conn.execute(f"PRAGMA wal_autocheckpoint={FALLBACK_PAGES}")

    def committed(self) -> None:
        """After a commit: start a checkpoint if enough frames wait and none is running."""
        with self._state:
            if self._closed or (self._running is not None and not self._running.done()):
                return
            backlog = self._header.backlog()
            if backlog is None or backlog < self._backlog_pages:
                return
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="medledger-checkpoint"
                )
            self._running = self._executor.submit(self._checkpoint)

    def _checkpoint(self) -> None:
        with self.lock:
            try:
                if self._conn is None:
                    conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                    # Per connection: the checkpoint syncs the WAL and the database.
                    conn.execute("PRAGMA synchronous=FULL")
                    self._conn = conn
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:
                # Nothing is lost: the frames stay in the WAL, the next commit tries
                # again, and the writer's automatic checkpoint bounds the WAL.
                log.warning("background checkpoint of %s failed: %s", self.path.name, exc)

    def close(self) -> None:
        """Wait for a checkpoint in progress, then close the thread and the connection."""
        with self._state:
            self._closed = True
            executor = self._executor
        if executor is not None:
            executor.shutdown(wait=True)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def release(self) -> None:
        """Close the ``-shm`` descriptor; call after the store's last connection is closed
        (closing it drops this process's locks on the file, see the module doc)."""
        with self._state:
            self._header.close()
