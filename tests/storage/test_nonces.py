"""Tests for :mod:`medledger.storage.nonces`: peer-request replay protection on SQLite."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from medledger.core.errors import InvalidInput, StorageError
from medledger.storage.nonces import NonceStore

T0 = 1_700_000_000_000
WINDOW = 60_000
N1, N2, N3 = "11" * 16, "22" * 16, "33" * 16


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "nonces.sqlite"


@pytest.fixture
def store(path: Path) -> Iterator[NonceStore]:
    opened = NonceStore(path)
    yield opened
    opened.close()


def _remember(store: NonceStore, reader: str, nonce: str, time_ms: int) -> None:
    store.remember(reader, nonce, time_ms, forget_before_ms=time_ms - WINDOW)


def _rows(path: Path) -> set[tuple[str, str, int]]:
    db = sqlite3.connect(path)
    try:
        return set(db.execute("SELECT reader, nonce, time_ms FROM nonces"))
    finally:
        db.close()


def test_replay_is_refused(store: NonceStore) -> None:
    _remember(store, "beta", N1, T0)
    with pytest.raises(InvalidInput, match="already used \\(replay\\)"):
        _remember(store, "beta", N1, T0)
    # A different timestamp does not make the same nonce fresh.
    with pytest.raises(InvalidInput, match="replay"):
        _remember(store, "beta", N1, T0 + 1_000)


def test_other_reader_may_use_the_same_nonce(store: NonceStore) -> None:
    _remember(store, "beta", N1, T0)
    _remember(store, "gamma", N1, T0)
    _remember(store, "beta", N2, T0)
    for reader, nonce in (("beta", N1), ("gamma", N1), ("beta", N2)):
        with pytest.raises(InvalidInput, match="replay"):
            _remember(store, reader, nonce, T0 + 1)


def test_a_refused_replay_changes_nothing(store: NonceStore, path: Path) -> None:
    _remember(store, "beta", N1, T0)
    with pytest.raises(InvalidInput):
        _remember(store, "beta", N1, T0 + 5)
    assert _rows(path) == {("beta", N1, T0)}


def test_nonces_survive_reopening(path: Path) -> None:
    first = NonceStore(path)
    _remember(first, "beta", N1, T0)
    first.close()
    again = NonceStore(path)
    try:
        with pytest.raises(InvalidInput, match="replay"):
            _remember(again, "beta", N1, T0 + 1)
        _remember(again, "beta", N2, T0 + 1)
    finally:
        again.close()
    assert _rows(path) == {("beta", N1, T0), ("beta", N2, T0 + 1)}


def test_entries_older_than_the_window_are_pruned(store: NonceStore, path: Path) -> None:
    _remember(store, "beta", N1, T0)
    _remember(store, "gamma", N2, T0 + 30_000)
    _remember(store, "beta", N3, T0 + 70_000)
    # Much later: everything before the window is forgotten, the recent entry is kept.
    later = T0 + 10 * WINDOW
    store.remember("delta", N1, later, forget_before_ms=T0 + 50_000)
    assert _rows(path) == {("beta", N3, T0 + 70_000), ("delta", N1, later)}
    # A pruned nonce is no longer remembered (its request is stale anyway)...
    store.remember("beta", N1, later, forget_before_ms=T0 + 50_000)
    # ...while the ones inside the window still are.
    with pytest.raises(InvalidInput, match="replay"):
        store.remember("beta", N3, later, forget_before_ms=T0 + 50_000)


def test_entries_inside_the_window_are_never_pruned(store: NonceStore, path: Path) -> None:
    times = [T0 + i * 7_000 for i in range(20)]
    for i, t in enumerate(times):
        store.remember("beta", f"{i:032x}", t, forget_before_ms=t - WINDOW)
    kept = {nonce for _, nonce, time_ms in _rows(path) if time_ms >= times[-1] - WINDOW}
    assert kept == {f"{i:032x}" for i, t in enumerate(times) if t >= times[-1] - WINDOW}
    # Pruning may be batched, but nothing a whole window older than needed is kept.
    assert all(time_ms >= times[-1] - 2 * WINDOW for _, _, time_ms in _rows(path))
    assert len(_rows(path)) < len(times)


def test_pruning_after_reopening(path: Path) -> None:
    first = NonceStore(path)
    _remember(first, "beta", N1, T0)
    first.close()
    again = NonceStore(path)
    try:
        again.remember("beta", N2, T0 + WINDOW * 5, forget_before_ms=T0 + WINDOW * 4)
    finally:
        again.close()
    assert _rows(path) == {("beta", N2, T0 + WINDOW * 5)}


def test_concurrent_uses_of_one_nonce_admit_exactly_one(store: NonceStore) -> None:
    outcomes: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def attempt() -> None:
        start.wait()
        try:
            _remember(store, "beta", N1, T0)
            result = "ok"
        except InvalidInput:
            result = "replay"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok"] + ["replay"] * 7


def test_unopenable_path_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot open nonce store"):
        NonceStore(tmp_path / "missing-dir" / "nonces.sqlite")


def test_closed_store_is_a_storage_error(path: Path) -> None:
    closed = NonceStore(path)
    closed.close()
    with pytest.raises(StorageError, match="cannot record the request nonce"):
        _remember(closed, "beta", N1, T0)
