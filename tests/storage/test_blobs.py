"""The filesystem blob store: its on-disk layout, its faults (short writes, a full disk, torn files), and its pool of unnamed files.

What every blob store promises is in ``test_blob_store_contract.py``.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from medledger.core.errors import IntegrityError, NotFound, StorageError, StorageFull
from medledger.storage import tmpfile_pool
from medledger.storage.blobs import FileBlobStore, _Flush
from medledger.storage.tmpfile_pool import TmpfilePool


def files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FileBlobStore]:
    opened = FileBlobStore(tmp_path / "blobs")
    yield opened
    opened.close()


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


# -- the pool of unnamed files ------------------------------------------------------


def _pool_full(store: FileBlobStore) -> TmpfilePool:
    """The store's pool, once it holds every file it keeps ready."""
    pool = store._tmpfiles
    pool.start()
    deadline = time.monotonic() + 10
    while len(pool) < 8:
        assert time.monotonic() < deadline, "the pool never filled"
        time.sleep(0.002)
    return pool


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_blob_written_through_the_pool_is_named_before_the_flush_and_private(
    store: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = _pool_full(store)
    data = os.urandom(3000)
    path = store.root / hashlib.sha256(data).hexdigest()[:2] / hashlib.sha256(data).hexdigest()
    at_flush: list[tuple[bool, int]] = []
    created: list[str] = []
    real_flush, real_open = _Flush.__call__, os.open

    def flush(self: _Flush, fds: list[int]) -> None:
        # Named before the syncfs, which covers its directory entry; the pool is
        # refilled only after it, so no file is being created while it runs.
        time.sleep(0.02)
        at_flush.append((path.exists(), len(pool)))
        real_flush(self, fds)

    def spy_open(file: str, flags: int, mode: int = 0o777, **kw: int) -> int:
        if flags & os.O_CREAT:
            created.append(str(file))
        return real_open(file, flags, mode, **kw)

    monkeypatch.setattr(_Flush, "__call__", flush)
    monkeypatch.setattr("medledger.storage.blobs.os.open", spy_open)
    h = store.put(data)
    monkeypatch.undo()
    assert pool.taken == 1
    assert created == []  # no named temporary file
    assert at_flush == [(True, 7)]
    deadline = time.monotonic() + 10
    while len(pool) < 8:
        assert time.monotonic() < deadline, "the pool was not refilled after the flush"
        time.sleep(0.002)
    info = path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_nlink == 1
    assert hashlib.sha256(path.read_bytes()).digest() == h
    assert store.get(h) == data
    assert files(store.root) == [path]


def test_a_batch_larger_than_the_pool_is_stored_whole(store: FileBlobStore) -> None:
    """Pooled files while there are any (the thread refills meanwhile), named ones after."""
    pool = _pool_full(store)
    batch = [os.urandom(3000) for _ in range(40)]
    hashes = store.put_many(batch)
    assert pool.taken >= 8
    assert [store.get(h) for h in hashes] == batch
    assert not [p for p in files(store.root) if p.name.startswith(".")]


def test_a_failure_after_linking_leaves_nothing_of_the_batch(
    store: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first blob is linked under its hash when naming the second fails: it is removed."""
    kept = store.put(b"stored before")
    pool = _pool_full(store)
    fds = _open_fds()
    real_link = tmpfile_pool.link
    linked: list[Path] = []

    def link(fd: int, path: Path) -> None:
        if linked:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_link(fd, path)
        linked.append(path)

    monkeypatch.setattr("medledger.storage.blobs.link", link)
    batch = [b"a" * 3000, b"b" * 3000, b"c" * 3000]
    taken = pool.taken
    with pytest.raises(StorageFull):
        store.put_many(batch)
    monkeypatch.undo()
    assert pool.taken == taken + 3
    assert linked == [store._path(hashlib.sha256(batch[0]).digest())]
    assert files(store.root) == [store._path(kept)]
    _pool_full(store)
    assert _open_fds() == fds  # every descriptor of the batch closed
    assert [store.get(h) for h in store.put_many(batch)] == batch


def test_a_failed_flush_after_linking_leaves_nothing(
    store: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = _pool_full(store)

    def failing_flush(self: object, fds: list[int]) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr("medledger.storage.blobs._Flush.__call__", failing_flush)
    with pytest.raises(StorageError, match="Input/output error"):
        store.put_many([b"one" * 1000, b"two" * 1000])
    monkeypatch.undo()
    assert pool.taken == 2
    assert files(store.root) == []


def test_a_torn_file_is_replaced_through_the_pool(store: FileBlobStore) -> None:
    pool = _pool_full(store)
    data = b"ciphertext that was being written when the power failed" * 50
    h = hashlib.sha256(data).digest()
    path = store._path(h)
    path.parent.mkdir()
    path.write_bytes(data[:10])
    assert store.put(data) == h
    assert pool.taken == 1
    assert store.get(h) == data
    assert files(store.root) == [path]


def test_without_o_tmpfile_blobs_go_through_named_temporary_files(
    store: FileBlobStore, no_o_tmpfile: list[int]
) -> None:
    store.put(b"first")
    pool = store._tmpfiles
    deadline = time.monotonic() + 10
    while pool.supported:
        assert time.monotonic() < deadline, "the pool never gave up"
        time.sleep(0.002)
    batch = [os.urandom(3000) for _ in range(5)]
    assert [store.get(h) for h in store.put_many(batch)] == batch
    assert pool.taken == 0 and no_o_tmpfile == [1]
    assert len(files(store.root)) == 6
    assert not [p for p in files(store.root) if p.name.startswith(".")]


def test_close_closes_the_pooled_files_and_writes_go_on(tmp_path: Path) -> None:
    before = _open_fds()
    store = FileBlobStore(tmp_path / "blobs")
    _pool_full(store)
    assert _open_fds() == before + 8
    store.close()
    assert _open_fds() == before
    h = store.put(b"written after close")
    assert store.get(h) == b"written after close"
    assert store._tmpfiles.taken == 0
    assert _open_fds() == before
    store.close()


def test_a_store_dropped_without_close_closes_its_pool(tmp_path: Path) -> None:
    before = _open_fds()
    store = FileBlobStore(tmp_path / "blobs")
    thread = _pool_full(store)._thread
    assert thread is not None and thread.is_alive()
    del store
    gc.collect()
    assert _open_fds() == before
    assert not thread.is_alive()
