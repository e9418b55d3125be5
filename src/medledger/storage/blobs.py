"""Content-addressed blob store: ciphertexts named by their SHA-256.

The filesystem adapter writes each blob to a temporary file and renames it
into ``<root>/<hh>/<hash>``, so a blob is either absent or whole. Durability
is group-committed: :meth:`FileBlobStore.put_many` writes a batch, then
flushes the file system once (``syncfs``) — one flush instead of two fsyncs
per blob, which capped writes at a few thousand blobs per second.
Reads re-hash the bytes: a swapped or edited blob raises
:class:`IntegrityError`, never returns garbage.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from medledger.core.errors import IntegrityError, NotFound, StorageError
from medledger.core.hashing import sha256

__all__ = ["BlobStore", "FileBlobStore"]


class BlobStore(Protocol):
    """Immutable blobs keyed by SHA-256. ``put`` is durable when it returns."""

    def put(self, data: bytes) -> bytes:
        """Store ``data``; return its SHA-256. Idempotent."""
        ...

    def put_many(self, blobs: Sequence[bytes]) -> list[bytes]:
        """Store several blobs, durable together when this returns."""
        ...

    def get(self, blob_hash: bytes) -> bytes:
        """The blob's bytes; ``NotFound`` if absent, ``IntegrityError`` if altered."""
        ...

    def delete(self, blob_hash: bytes) -> None:
        """Remove the blob if present (crypto-shredding removes ciphertext too)."""
        ...

    def exists(self, blob_hash: bytes) -> bool: ...


class FileBlobStore:
    """Blobs as files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._root_text = str(root)
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create blob directory {root}: {exc.strerror}") from None

    def _path(self, blob_hash: bytes) -> Path:
        name = blob_hash.hex()
        return self.root / name[:2] / name

    def put(self, data: bytes) -> bytes:
        return self.put_many([data])[0]

    def put_many(self, blobs: Sequence[bytes]) -> list[bytes]:
        hashes = []
        try:
            for data in blobs:
                blob_hash = sha256(data)
                hashes.append(blob_hash)
                path = self._path(blob_hash)
                if path.exists():
                    continue
                path.parent.mkdir(mode=0o700, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                tmp.replace(path)
            _sync_filesystem(self.root)
        except OSError as exc:
            raise StorageError(f"cannot write blobs under {self.root}: {exc.strerror}") from None
        return hashes

    def get(self, blob_hash: bytes) -> bytes:
        name = blob_hash.hex()
        try:
            with open(f"{self._root_text}/{name[:2]}/{name}", "rb") as f:  # hot path: no pathlib
                data = f.read()
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


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _sync_filesystem(path: Path) -> None:
    """Flush every written file and directory entry of ``path``'s file system."""
    fd = os.open(path, os.O_RDONLY)
    try:
        syncfs = getattr(_libc, "syncfs", None)
        if syncfs is None:  # not Linux: flush everything
            os.sync()
        elif syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)
