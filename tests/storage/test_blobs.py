"""The filesystem blob store: its on-disk layout and its faults (short writes, a full disk, torn files).

What every blob store promises is in ``test_blob_store_contract.py``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from pathlib import Path

import pytest

from medledger.core.errors import IntegrityError, NotFound, StorageError, StorageFull
from medledger.storage.blobs import FileBlobStore


def files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> FileBlobStore:
    return FileBlobStore(tmp_path / "blobs")


def test_a_blob_is_one_file_under_its_hash_and_delete_removes_it(store: FileBlobStore) -> None:
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


def test_putting_the_same_bytes_again_writes_no_file(store: FileBlobStore) -> None:
    h1 = store.put(b"same bytes")
    before = files(store.root)
    h2 = store.put(b"same bytes")
    assert h1 == h2
    assert files(store.root) == before
    assert len(before) == 1
    assert store.get(h1) == b"same bytes"


def test_put_many_leaves_one_file_per_blob_and_no_temporaries(store: FileBlobStore) -> None:
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


def test_short_writes_still_store_every_byte(
    store: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``os.write`` may write part of a buffer (a filling disk does): the rest must follow."""
    real_write = os.write
    calls = 0

    def short_write(fd: int, data: bytes | memoryview) -> int:
        nonlocal calls
        calls += 1
        return real_write(fd, bytes(data)[:7])

    monkeypatch.setattr("medledger.storage.blobs.os.write", short_write)
    data = bytes(range(256)) * 3
    h = store.put(data)
    monkeypatch.undo()
    assert calls > 100  # the fault really was injected
    assert (store.root / h.hex()[:2] / h.hex()).read_bytes() == data
    assert store.get(h) == data


def _fail_after(monkeypatch: pytest.MonkeyPatch, budget: int, err: int) -> None:
    """Let ``budget`` bytes be written, then fail every write with ``err`` (a filling disk)."""
    real_write = os.write
    left = budget

    def write(fd: int, data: bytes | memoryview) -> int:
        nonlocal left
        if left <= 0:
            raise OSError(err, os.strerror(err))
        chunk = bytes(data)[:left]
        left -= len(chunk)
        return real_write(fd, chunk)

    monkeypatch.setattr("medledger.storage.blobs.os.write", write)


def test_disk_full_mid_blob_fails_and_leaves_nothing(
    store: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = store.put(b"stored before the disk filled")
    _fail_after(monkeypatch, 1500, errno.ENOSPC)
    batch = [b"a" * 1000, b"b" * 1000, b"c" * 1000]
    with pytest.raises(StorageFull) as exc:
        store.put_many(batch)
    assert "No space left" in str(exc.value)
    monkeypatch.undo()
    # Nothing of the batch: no truncated blob under its hash, no temporary file.
    assert files(store.root) == [store.root / kept.hex()[:2] / kept.hex()]
    for data in batch:
        assert not store.exists(hashlib.sha256(data).digest())
    # Space is back: the same batch is stored whole.
    assert [store.get(h) for h in store.put_many(batch)] == batch


def test_failed_flush_fails_and_leaves_nothing(
    store: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write-back error (EIO from the flush) after the rename: the renamed blobs are removed."""
    flushed: list[int] = []

    def failing_flush(self: object, fds: list[int]) -> None:
        flushed.append(len(fds))
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr("medledger.storage.blobs._Flush.__call__", failing_flush)
    with pytest.raises(StorageError) as exc:
        store.put_many([b"one", b"two"])
    assert not isinstance(exc.value, StorageFull)
    assert "Input/output error" in str(exc.value)
    assert flushed == [2]
    monkeypatch.undo()
    assert files(store.root) == []


def test_a_torn_file_under_the_hash_name_is_replaced(store: FileBlobStore) -> None:
    """What a crash between rename and flush can leave is never trusted as the blob."""
    data = b"ciphertext that was being written when the power failed"
    h = hashlib.sha256(data).digest()
    path = store.root / h.hex()[:2] / h.hex()
    path.parent.mkdir()
    path.write_bytes(data[:10])
    with pytest.raises(IntegrityError):
        store.get(h)
    assert store.put(data) == h
    assert store.get(h) == data
    assert files(store.root) == [path]


def test_stale_temporaries_are_removed_and_fresh_ones_kept(store: FileBlobStore) -> None:
    h = store.put(b"a blob")
    sub = store.root / h.hex()[:2]
    old = [sub / f".{h.hex()}.0badc0de", sub / f".{'ab' * 32}.12345678.tmp"]
    for p in old:
        p.write_bytes(b"")
        os.utime(p, (1_000_000, 1_000_000))
    fresh = sub / f".{'cd' * 32}.87654321.tmp"
    fresh.write_bytes(b"partial")
    cutoff = time.time() - 60
    assert store.remove_stale_temporaries(older_than=cutoff) == 2
    assert sorted(files(store.root)) == sorted([sub / h.hex(), fresh])
    assert store.get(h) == b"a blob"


def test_iter_hashes_lists_blobs_by_age(store: FileBlobStore) -> None:
    a, b = store.put(b"old blob"), store.put(b"new blob")
    os.utime(store.root / a.hex()[:2] / a.hex(), (1_000_000, 1_000_000))
    (store.root / "not-a-blob-dir").mkdir()
    assert sorted(store.iter_hashes()) == sorted([a, b])
    assert list(store.iter_hashes(older_than=2_000_000)) == [a]


@pytest.mark.parametrize("size", [1, 1000, 65_535, 65_536, 65_537, 3 * 65_536, 300_001])
def test_a_blob_reads_back_whole_at_every_size_even_in_short_reads(
    store: FileBlobStore, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Around the first read's size, and with the kernel answering a little at a time
    (a short read is not the end of the file: only an empty one is)."""
    data = os.urandom(size)
    h = store.put(data)
    assert store.get(h) == data
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: real_read(fd, min(n, 4093)))
    assert store.get(h) == data


def test_a_directory_under_a_blob_name_is_a_storage_error(store: FileBlobStore) -> None:
    h = hashlib.sha256(b"never stored").digest()
    (store.root / h.hex()[:2] / h.hex()).mkdir(parents=True)
    with pytest.raises(StorageError, match="cannot read blob"):
        store.get(h)
