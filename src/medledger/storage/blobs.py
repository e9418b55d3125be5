"""The filesystem adapter of :class:`~medledger.storage.ports.BlobStore`: ciphertexts named by their SHA-256.

The filesystem adapter writes each blob completely (a short write is
continued, never ignored) to a temporary file, names it
``<root>/<hh>/<hash>``, and makes the batch durable before
:meth:`FileBlobStore.put_many` returns — nothing is acknowledged before.
The temporary file is an unnamed one from the store's
:class:`~medledger.storage.tmpfile_pool.TmpfilePool`, created ahead of need
(creating an inode is most of a small write's cost), which is linked to its
name; when the pool has none ready, a named temporary file, renamed to it.
Durability is group-committed: one ``syncfs`` flushes the whole batch, file
data and directory entries, in one journal commit (an ``fsync`` per file and
directory costs a device flush each; fsync-before-rename a second commit per
batch). The ``syncfs`` descriptor is opened before the batch is written, so
it reports any write-back error since — including one that background
write-back met on a file of the batch before the flush.

A crash between naming a blob and the flush can leave a torn file under a
hash name, but never an acknowledged one: the write had not returned, so no
index row or chain transaction names it. Such a file is never trusted —
reads re-hash, a ``put`` of the same bytes re-hashes the existing file and
replaces it if it differs, and the orphan sweep removes it.

Any failure (``ENOSPC``, ``EIO``, a short write) raises and leaves nothing
of the batch behind: named temporary files are removed, unnamed ones vanish
with their descriptors, and blobs this call named are removed again.
:meth:`FileBlobStore.remove_stale_temporaries` clears the named temporary
files a crashed process left; an unnamed one needs no sweep.

Reads re-hash the bytes: a swapped or edited blob raises
:class:`IntegrityError`, never returns garbage.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from medledger.core.errors import IntegrityError, NotFound, StorageError, StorageFull
from medledger.core.hashing import sha256
from medledger.storage.durable_files import write_all
from medledger.storage.tmpfile_pool import TmpfilePool, link

__all__ = ["FileBlobStore", "PROCESS_STARTED", "storage_os_error"]

#: When this process started (module import): temporaries older than this belong to
#: a process that is gone.
PROCESS_STARTED = time.time()
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_HEX = frozenset("0123456789abcdef")


def storage_os_error(exc: OSError, what: str) -> StorageError:
    """The storage error for an ``OSError``: :class:`StorageFull` when the disk is full."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno in _FULL_ERRNOS:
        return StorageFull(f"{what}: {reason} (no space left; nothing was stored)")
    return StorageError(f"{what}: {reason}")


#: The first read of a blob asks for this much: every record version of ordinary size
#: arrives in one call.
_FIRST_READ = 64 * 1024


def _read_file(path: str) -> bytes:
    """The whole file at ``path``, read until end of file.

    Every read of a record reads its blob, so this is the one hot file read:
    ``open(..).read()`` costs eight system calls (an ``fstat`` for the buffer
    size, an ``ioctl`` for ``isatty``, another ``fstat`` and an ``lseek`` to
    size the read); this costs four (open, read, the empty read at end of file,
    close). Reading until a read returns nothing, rather than trusting one read
    or the size ``fstat`` reported, keeps a short read from ever passing for the
    whole blob (the caller re-hashes it anyway).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, _FIRST_READ)
        if not data:
            return data
        more = os.read(fd, _FIRST_READ)
        if not more:
            return data
        parts = [data, more]
        while chunk := os.read(fd, _FIRST_READ):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


@dataclass(slots=True)
class _Staged:
    """A blob of a batch being written: its descriptor and what names it."""

    final: Path
    fd: int
    tmp: Path | None  # its named temporary file; None while an unnamed file is not linked
    named: bool = False  # it is under ``final``: a failure must remove it there


def _temporary(final: Path) -> Path:
    return final.parent / f".{final.name}.{secrets.token_hex(4)}.tmp"


class FileBlobStore:
    """Blobs as files under ``root``. :meth:`close` closes the pool of unnamed files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._root_text = str(root)
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create blob directory {root}: {exc.strerror}") from None
        self._tmpfiles = TmpfilePool(self._root_text)
        # A store dropped without close() stops its pool's thread all the same.
        self._closer = weakref.finalize(self, self._tmpfiles.close)

    def close(self) -> None:
        """Stop refilling the pool and close its files; later writes use named files."""
        self._closer()

    def _path(self, blob_hash: bytes) -> Path:
        name = blob_hash.hex()
        return self.root / name[:2] / name

    def put(self, data: bytes) -> bytes:
        return self.put_many([data])[0]

    def put_many(self, blobs: Sequence[bytes]) -> list[bytes]:
        hashes = [sha256(data) for data in blobs]
        staged: list[_Staged] = []
        targets: set[Path] = set()
        try:
            flush = _Flush(self.root)
        except OSError as exc:
            raise storage_os_error(exc, f"cannot open blob directory {self.root}") from None
        try:
            try:
                for data, blob_hash in zip(blobs, hashes, strict=True):
                    final = self._path(blob_hash)
                    if final in targets or self._whole(final, blob_hash):
                        continue
                    targets.add(final)
                    final.parent.mkdir(mode=0o700, exist_ok=True)
                    # An empty blob is never written, so a pooled file would keep its
                    # creation time as the blob's time, which the orphan sweep trusts.
                    fd = self._tmpfiles.take() if data else None
                    if fd is not None:
                        staged.append(_Staged(final, fd, None))
                    else:
                        tmp = _temporary(final)
                        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                        staged.append(_Staged(final, fd, tmp))
                    write_all(fd, data)
                if not staged:
                    return hashes
                for blob in staged:
                    _name(blob)
                flush([blob.fd for blob in staged])
            finally:
                for blob in staged:
                    os.close(blob.fd)
                flush.close()
                self._tmpfiles.refill()  # after the flush: see TmpfilePool.refill
        except OSError as exc:
            self._discard(staged)
            raise storage_os_error(exc, f"cannot write blobs under {self.root}") from None
        return hashes

    @staticmethod
    def _whole(path: Path, blob_hash: bytes) -> bool:
        """Whether ``path`` holds exactly the blob (a torn file from a crash does not)."""
        try:
            return sha256(path.read_bytes()) == blob_hash
        except FileNotFoundError:
            return False

    @staticmethod
    def _discard(staged: list[_Staged]) -> None:
        """Remove what a failed ``put_many`` left: nothing of it was acknowledged."""
        for blob in staged:
            path = blob.final if blob.named else blob.tmp
            if path is not None:  # else unnamed: gone with its descriptor
                # Already gone, or unremovable: the start-up sweep retries.
                with contextlib.suppress(OSError):
                    path.unlink()

    def get(self, blob_hash: bytes) -> bytes:
        name = blob_hash.hex()
        try:
            data = _read_file(f"{self._root_text}/{name[:2]}/{name}")  # hot path: no pathlib
        except FileNotFoundError:
            raise NotFound(f"blob {blob_hash.hex()[:16]}… is not stored") from None
        except OSError as exc:
            raise StorageError(
                f"cannot read blob {blob_hash.hex()[:16]}…: {exc.strerror}"
            ) from None
        if sha256(data) != blob_hash:
            raise IntegrityError(f"blob {blob_hash.hex()[:16]}… does not match its hash")
        return data

    def delete(self, blob_hash: bytes) -> None:
        try:
            self._path(blob_hash).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot delete blob {blob_hash.hex()[:16]}…: {exc.strerror}"
            ) from None

    def exists(self, blob_hash: bytes) -> bool:
        return self._path(blob_hash).exists()

    def iter_hashes(self, *, older_than: float | None = None) -> Iterator[bytes]:
        for name, entry in self._entries():
            if len(name) != 64 or not set(name) <= _HEX:
                continue
            if older_than is not None and _mtime(entry) >= older_than:
                continue
            yield bytes.fromhex(name)

    def remove_stale_temporaries(self, *, older_than: float = PROCESS_STARTED) -> int:
        """Remove named temporary files last written before ``older_than``; returns how many.

        A temporary file is never acknowledged (a blob is only acknowledged
        once it has its hash name), so one a finished process left is safe to
        remove. Unnamed ones have no name to find: they vanish by themselves.
        """
        removed = 0
        for name, entry in self._entries():
            if name.startswith(".") and _mtime(entry) < older_than:
                try:
                    entry.unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise storage_os_error(exc, f"cannot remove temporary blob {entry}") from None
        return removed

    def _entries(self) -> Iterator[tuple[str, Path]]:
        """``(name, path)`` of every file in the two-hex-digit directories."""
        try:
            subdirs = sorted(self.root.iterdir())
        except OSError as exc:
            raise storage_os_error(exc, f"cannot list blobs under {self.root}") from None
        for parent in subdirs:
            if len(parent.name) != 2 or not set(parent.name) <= _HEX:
                continue
            try:
                entries = sorted(parent.iterdir())
            except NotADirectoryError:
                continue
            except OSError as exc:
                raise storage_os_error(exc, f"cannot list blobs under {parent}") from None
            for entry in entries:
                yield entry.name, entry


def _name(blob: _Staged) -> None:
    """Give a written blob its final name: link an unnamed file, rename a named one."""
    if blob.tmp is None:
        try:
            link(blob.fd, blob.final)
            blob.named = True
            return
        except FileExistsError:
            # A torn file from a crash, or another put of the same bytes: replace it
            # as a rename does, never leave it.
            blob.tmp = _temporary(blob.final)
            link(blob.fd, blob.tmp)
    blob.tmp.replace(blob.final)
    blob.named = True


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")  # gone meanwhile: never "old"


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


class _Flush:
    """Makes a batch's files durable, reporting every write-back error since it began.

    Opened before the batch is written: ``syncfs`` on a descriptor reports any
    write-back error of the file system since that descriptor was opened
    (Linux 5.8+), so an error background write-back met on one of the batch's
    files before the flush is reported too. One ``syncfs`` writes the data,
    renames and new directories back in one journal commit. Without
    ``syncfs`` (not Linux), every file is ``fsync``-ed and then ``os.sync``.
    """

    def __init__(self, root: Path) -> None:
        self._syncfs = getattr(_libc, "syncfs", None)
        self._fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)

    def __call__(self, fds: Sequence[int]) -> None:
        if self._syncfs is None:
            for fd in fds:
                os.fsync(fd)
            os.sync()
        elif self._syncfs(self._fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def close(self) -> None:
        os.close(self._fd)
