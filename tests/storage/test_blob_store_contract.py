"""Conformance suite for the :class:`~medledger.storage.ports.BlobStore` port.

Every test runs on the filesystem store and on a real PostgreSQL server
(``pg_server.py``): content addressed, idempotent, durable across a reopen,
and verified on read — altered bytes are an ``IntegrityError``, never data.
Faults only a filesystem has (short writes, a full disk, torn files) are in
``test_blobs.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from pg_server import shared_dsn, unique

from medledger.core.errors import IntegrityError, NotFound
from medledger.storage.blobs import FileBlobStore
from medledger.storage.ports import BlobStore
from medledger.storage.postgres.blobs import PostgresBlobStore
from medledger.storage.postgres.migrations import drop_schema


@dataclass
class BlobBackend:
    """Opens one (initially empty) blob store as often as a test asks; alters stored bytes."""

    name: str
    root: Path
    dsn: str = ""
    schema: str = ""

    def open(self) -> BlobStore:
        if self.name == "file":
            return FileBlobStore(self.root)
        return PostgresBlobStore(self.dsn, schema=self.schema)

    def tamper(self, blob_hash: bytes, data: bytes) -> None:
        """Replace the stored bytes of ``blob_hash`` behind the store's back."""
        if self.name == "file":
            (self.root / blob_hash.hex()[:2] / blob_hash.hex()).write_bytes(data)
            return
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                f'UPDATE "{self.schema}".blobs SET data = %s WHERE hash = %s'.encode(),
                (data, blob_hash),
            )


@pytest.fixture(params=["file", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobBackend]:
    if request.param == "file":
        yield BlobBackend("file", tmp_path / "blobs")
        return
    dsn, schema = shared_dsn(), unique("blobs")
    PostgresBlobStore.initialize(dsn, schema=schema)
    yield BlobBackend("postgres", tmp_path / "unused", dsn, schema)
    drop_schema(dsn, schema)


@pytest.fixture
def store(backend: BlobBackend) -> Iterator[BlobStore]:
    opened = backend.open()
    yield opened
    close = getattr(opened, "close", None)
    if close is not None:
        close()


def test_put_get_exists_delete(store: BlobStore) -> None:
    data = b"\x00ciphertext\xff" * 10
    h = store.put(data)
    assert h == hashlib.sha256(data).digest()
    assert store.exists(h) and store.get(h) == data
    store.delete(h)
    assert not store.exists(h)
    with pytest.raises(NotFound):
        store.get(h)
    store.delete(h)  # deleting an absent blob is fine
    assert list(store.iter_hashes()) == []


def test_empty_blob(store: BlobStore) -> None:
    h = store.put(b"")
    assert h == hashlib.sha256(b"").digest() and store.get(h) == b""


def test_put_is_idempotent_and_put_many_returns_every_hash_in_order(store: BlobStore) -> None:
    blobs = [f"blob {i}".encode() * (i + 1) for i in range(50)] + [b"blob 0"]
    hashes = store.put_many(blobs)
    assert hashes == [hashlib.sha256(b).digest() for b in blobs]
    assert store.put(blobs[3]) == hashes[3]
    for data, h in zip(blobs, hashes, strict=True):
        assert store.get(h) == data
    assert sorted(store.iter_hashes()) == sorted(set(hashes))
    assert store.put_many([]) == []


def test_missing_blob_is_not_found(store: BlobStore) -> None:
    absent = hashlib.sha256(b"never stored").digest()
    with pytest.raises(NotFound):
        store.get(absent)
    assert not store.exists(absent)


def test_altered_truncated_and_swapped_blobs_are_integrity_errors(
    store: BlobStore, backend: BlobBackend
) -> None:
    a, b = store.put(b"blob A contents"), store.put(b"blob B contents")
    backend.tamper(a, b"blob B contents")
    backend.tamper(b, b"blob A contents")
    for h in (a, b):
        with pytest.raises(IntegrityError):
            store.get(h)
    backend.tamper(a, b"blob A content")
    with pytest.raises(IntegrityError):
        store.get(a)
    backend.tamper(a, b"blob A contentS")
    with pytest.raises(IntegrityError):
        store.get(a)


def test_blobs_survive_reopening(backend: BlobBackend) -> None:
    first = backend.open()
    h = first.put(b"durable")
    getattr(first, "close", lambda: None)()
    again = backend.open()
    try:
        assert again.get(h) == b"durable"
    finally:
        getattr(again, "close", lambda: None)()


def test_a_postgres_blob_is_never_old_enough_for_an_orphan_sweep(pg_dsn: str) -> None:
    """Rows carry no write time: with ``older_than`` nothing is listed, so a sweep removes nothing."""
    schema = unique("blobs")
    PostgresBlobStore.initialize(pg_dsn, schema=schema)
    store = PostgresBlobStore(pg_dsn, schema=schema)
    try:
        h = store.put(b"cipher")
        assert list(store.iter_hashes()) == [h]
        assert list(store.iter_hashes(older_than=2e9)) == []
    finally:
        store.close()
        drop_schema(pg_dsn, schema)
