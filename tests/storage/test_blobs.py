"""The filesystem blob store: content addressed, whole-or-absent, verified on read."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from medledger.core.errors import IntegrityError, NotFound
from medledger.storage.blobs import FileBlobStore


def files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> FileBlobStore:
    return FileBlobStore(tmp_path / "blobs")


def test_put_get_exists_delete(store: FileBlobStore) -> None:
    data = b"\x00ciphertext\xff" * 10
    h = store.put(data)
    assert h == hashlib.sha256(data).digest()
    assert store.exists(h)
    assert store.get(h) == data
    name = h.hex()
    assert (store.root / name[:2] / name).read_bytes() == data
    store.delete(h)
    assert not store.exists(h)
    with pytest.raises(NotFound):
        store.get(h)
    store.delete(h)  # deleting an absent blob is fine
    assert files(store.root) == []


def test_empty_blob(store: FileBlobStore) -> None:
    h = store.put(b"")
    assert h == hashlib.sha256(b"").digest()
    assert store.get(h) == b""


def test_put_is_idempotent(store: FileBlobStore) -> None:
    h1 = store.put(b"same bytes")
    before = files(store.root)
    h2 = store.put(b"same bytes")
    assert h1 == h2
    assert files(store.root) == before
    assert len(before) == 1
    assert store.get(h1) == b"same bytes"


def test_put_many_shape(store: FileBlobStore) -> None:
    blobs = [f"blob {i}".encode() * (i + 1) for i in range(50)] + [b"blob 0"]
    hashes = store.put_many(blobs)
    assert hashes == [hashlib.sha256(b).digest() for b in blobs]
    # Every blob is in place when put_many returns; no temporary files remain.
    on_disk = files(store.root)
    assert len(on_disk) == 50
    assert not [p for p in on_disk if p.name.startswith(".")]
    for p in on_disk:
        assert p.name == hashlib.sha256(p.read_bytes()).hexdigest()
        assert p.parent.name == p.name[:2]
    for data, h in zip(blobs, hashes, strict=True):
        assert store.get(h) == data
    assert store.put_many([]) == []


def test_missing_blob_is_not_found(store: FileBlobStore) -> None:
    with pytest.raises(NotFound):
        store.get(hashlib.sha256(b"never stored").digest())
    assert not store.exists(hashlib.sha256(b"never stored").digest())


def test_altered_blob_is_integrity_error(store: FileBlobStore) -> None:
    h = store.put(b"original ciphertext")
    path = store.root / h.hex()[:2] / h.hex()
    raw = bytearray(path.read_bytes())
    raw[3] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        store.get(h)


def test_truncated_and_swapped_blobs_are_integrity_errors(store: FileBlobStore) -> None:
    a, b = store.put(b"blob A contents"), store.put(b"blob B contents")
    pa, pb = (store.root / h.hex()[:2] / h.hex() for h in (a, b))
    da, db = pa.read_bytes(), pb.read_bytes()
    pa.write_bytes(db)
    pb.write_bytes(da)
    for h in (a, b):
        with pytest.raises(IntegrityError):
            store.get(h)
    pa.write_bytes(da[:-1])
    with pytest.raises(IntegrityError):
        store.get(a)


def test_store_reopens(tmp_path: Path) -> None:
    h = FileBlobStore(tmp_path / "b").put(b"durable")
    assert FileBlobStore(tmp_path / "b").get(h) == b"durable"
