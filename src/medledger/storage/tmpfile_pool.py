"""Unnamed files created ahead of need, so creating an inode is off a blob write's path.

Creating a file costs ~0.3 ms on ext4 (the inode); writing a few KB into it
and naming it cost a tenth of that. :class:`TmpfilePool` keeps up to ``size``
files open that a background thread created with ``O_TMPFILE`` in
``directory``: files with no name, on the directory's file system, which a
writer names with ``linkat`` once their bytes are written.

The contract:

- :meth:`TmpfilePool.take` never waits. It returns a descriptor (write-only,
  mode 0600, no name; the caller owns it and closes it) or ``None`` — the
  pool is empty, closed, not yet started, in a forked child (parent and child
  would both write the one inode), or ``O_TMPFILE`` is unsupported there.
- :meth:`TmpfilePool.refill` has the thread top the pool up. A writer calls
  it once the files it took are flushed, not when it takes them: files
  created while its ``syncfs`` runs are journalled in the commit that
  ``syncfs`` waits for, and refilling at each take made the flush longer by
  about what the write had saved (measured on ext4).
- ``O_TMPFILE`` being unsupported (``EOPNOTSUPP``, ``EISDIR`` from a kernel
  without it, ``EINVAL``) or ``/proc/self/fd`` missing (naming the file needs
  it) is remembered: the pool stops trying. Any other error creating a file
  (a full disk, no descriptors left) ends that refill; the next one retries.
- :func:`link` names a taken file (``linkat`` of ``/proc/self/fd/N`` with
  ``AT_SYMLINK_FOLLOW``, which needs no capability); ``FileExistsError`` if
  the name is taken.
- :meth:`TmpfilePool.close` stops the thread and closes every file not taken.
- A file no one named disappears when its descriptor is closed, also when
  the process dies; after a machine crash the kernel frees it when it mounts
  the file system (ext4's orphan list). Nothing is left to sweep.

The thread starts on the first take: a store that is only read starts none,
and a process forks its workers before any thread runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from collections import deque
from pathlib import Path

__all__ = ["TmpfilePool", "link"]

_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL})
_O_TMPFILE: int | None = getattr(os, "O_TMPFILE", None)
_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_linkat = getattr(_libc, "linkat", None)
if _linkat is not None:
    _linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    _linkat.restype = ctypes.c_int


def link(fd: int, path: str | os.PathLike[str]) -> None:
    """Give the unnamed file open as ``fd`` the name ``path``.

    Not ``os.link(..., follow_symlinks=True)``: before Python 3.14 it calls
    ``link()``, which on Linux links the ``/proc`` symlink itself and fails
    with ``EXDEV`` (CPython gh-81793).
    """
    assert _linkat is not None  # no pool hands out files otherwise
    source = f"/proc/self/fd/{fd}".encode()
    if _linkat(_AT_FDCWD, source, _AT_FDCWD, os.fsencode(path), _AT_SYMLINK_FOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fspath(path))


class TmpfilePool:
    """Up to ``size`` unnamed files in ``directory``, refilled on a background thread."""

    def __init__(self, directory: str, size: int = 8) -> None:
        self._directory = directory
        self._size = size
        self._ready: deque[int] = deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # orders start, close and the thread's appends
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closed = threading.Event()
        #: False once ``O_TMPFILE`` (or ``/proc/self/fd``) proved unavailable.
        self.supported = _O_TMPFILE is not None and _linkat is not None
        #: How many files :meth:`take` handed out (unlocked: for watching, not for logic).
        self.taken = 0

    def __len__(self) -> int:
        """Files ready to take."""
        return len(self._ready)

    def take(self) -> int | None:
        """An unnamed file's write-only descriptor, now; ``None`` if none is ready."""
        if self._closed.is_set() or not self.supported or os.getpid() != self._pid:
            return None
        if self._thread is None:
            self.start()
        try:
            fd = self._ready.popleft()  # atomic: each file goes to one taker
        except IndexError:
            return None
        self.taken += 1
        return fd

    def refill(self) -> None:
        """Have the thread fill the pool up again (it never waits for it)."""
        self._wake.set()

    def start(self) -> None:
        """Start the thread that fills the pool (:meth:`take` does, on first use)."""
        with self._lock:
            if self._thread is not None or self._closed.is_set() or not self.supported:
                return
            self._thread = threading.Thread(
                target=self._refill, name="blob-tmpfile-pool", daemon=True
            )
            self._thread.start()
        self._wake.set()

    def close(self) -> None:
        """Stop the thread and close the files not taken. Taken ones are their taker's."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        while self._ready:
            try:
                fd = self._ready.popleft()
            except IndexError:  # taken meanwhile
                break
            os.close(fd)

    def _refill(self) -> None:
        assert _O_TMPFILE is not None  # start() runs no thread otherwise
        if not Path("/proc/self/fd").is_dir():
            self.supported = False
            return
        flags = _O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC
        while True:
            self._wake.wait()
            self._wake.clear()  # before filling: a refill asked meanwhile sets it again
            if self._closed.is_set():
                return
            while len(self._ready) < self._size:
                try:
                    fd = os.open(self._directory, flags, 0o600)
                except OSError as exc:
                    if exc.errno in _UNSUPPORTED:
                        self.supported = False
                        return
                    break  # a writer falls back meanwhile and meets the error itself
                with self._lock:
                    if self._closed.is_set():
                        os.close(fd)
                        return
                    self._ready.append(fd)
