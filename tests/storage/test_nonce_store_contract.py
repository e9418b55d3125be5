"""Conformance suite for the :class:`~medledger.storage.ports.NonceStore` port: replay protection.

Every test runs on SQLite and on a real PostgreSQL server (``pg_server.py``).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pg_server import shared_dsn, unique

from medledger.core.errors import InvalidInput, StorageError
from medledger.storage import factory
from medledger.storage.ports import NonceStore
from medledger.storage.postgres.migrations import drop_schema
from medledger.storage.postgres.nonces import PostgresNonceStore
from medledger.storage.sqlite.nonces import SqliteNonceStore

T0 = 1_700_000_000_000
WINDOW = 60_000
N1, N2, N3 = "11" * 16, "22" * 16, "33" * 16


@dataclass
class NonceBackend:
    """Opens one (initially empty) nonce store as often as a test asks, and reads its rows."""

    name: str
    path: Path
    dsn: str = ""
    schema: str = ""

    def open(self) -> NonceStore:
        if self.name == "sqlite":
            return SqliteNonceStore(self.path)
        return PostgresNonceStore(self.dsn, schema=self.schema)

    def rows(self) -> set[tuple[str, str, int]]:
        if self.name == "sqlite":
            db = sqlite3.connect(self.path)
            try:
                return set(db.execute("SELECT reader, nonce, time_ms FROM nonces"))
            finally:
                db.close()
        with psycopg.connect(self.dsn) as conn:
            query = f'SELECT reader, nonce, time_ms FROM "{self.schema}".nonces'
            return {(str(r), str(n), int(t)) for r, n, t in conn.execute(query.encode())}


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NonceBackend]:
    if request.param == "sqlite":
        yield NonceBackend("sqlite", tmp_path / "nonces.sqlite")
        return
    dsn, schema = shared_dsn(), unique("nonces")
    PostgresNonceStore.initialize(dsn, schema=schema)
    yield NonceBackend("postgres", tmp_path / "unused", dsn, schema)
    drop_schema(dsn, schema)


#: One event loop per test: a store's group committer belongs to the loop it first ran in.
_LOOP: asyncio.AbstractEventLoop | None = None


@pytest.fixture(autouse=True)
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    global _LOOP
    _LOOP = asyncio.new_event_loop()
    try:
        yield _LOOP
    finally:
        _LOOP.close()
        _LOOP = None


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    assert _LOOP is not None
    return _LOOP.run_until_complete(coro)


def close(store: NonceStore) -> None:
    run(store.close())


@pytest.fixture
def store(backend: NonceBackend) -> Iterator[NonceStore]:
    opened = backend.open()
    yield opened
    close(opened)


def remember(store: NonceStore, reader: str, nonce: str, time_ms: int, forget: int) -> None:
    run(store.remember(reader, nonce, time_ms, forget_before_ms=forget))


def _remember(store: NonceStore, reader: str, nonce: str, time_ms: int) -> None:
    remember(store, reader, nonce, time_ms, time_ms - WINDOW)


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


def test_a_refused_replay_changes_nothing(store: NonceStore, backend: NonceBackend) -> None:
    _remember(store, "beta", N1, T0)
    with pytest.raises(InvalidInput):
        _remember(store, "beta", N1, T0 + 5)
    assert backend.rows() == {("beta", N1, T0)}


def test_nonces_survive_reopening(backend: NonceBackend) -> None:
    first = backend.open()
    _remember(first, "beta", N1, T0)
    close(first)
    again = backend.open()
    try:
        with pytest.raises(InvalidInput, match="replay"):
            _remember(again, "beta", N1, T0 + 1)
        _remember(again, "beta", N2, T0 + 1)
    finally:
        close(again)
    assert backend.rows() == {("beta", N1, T0), ("beta", N2, T0 + 1)}


def test_entries_older_than_the_window_are_pruned(store: NonceStore, backend: NonceBackend) -> None:
    _remember(store, "beta", N1, T0)
    _remember(store, "gamma", N2, T0 + 30_000)
    _remember(store, "beta", N3, T0 + 70_000)
    # Much later: everything before the window is forgotten, the recent entry is kept.
    later = T0 + 10 * WINDOW
    remember(store, "delta", N1, later, T0 + 50_000)
    assert backend.rows() == {("beta", N3, T0 + 70_000), ("delta", N1, later)}
    # A pruned nonce is no longer remembered (its request is stale anyway)...
    remember(store, "beta", N1, later, T0 + 50_000)
    # ...while the ones inside the window still are.
    with pytest.raises(InvalidInput, match="replay"):
        remember(store, "beta", N3, later, T0 + 50_000)


def test_entries_inside_the_window_are_never_pruned(
    store: NonceStore, backend: NonceBackend
) -> None:
    times = [T0 + i * 7_000 for i in range(20)]
    for i, t in enumerate(times):
        remember(store, "beta", f"{i:032x}", t, t - WINDOW)
    kept = {nonce for _, nonce, time_ms in backend.rows() if time_ms >= times[-1] - WINDOW}
    assert kept == {f"{i:032x}" for i, t in enumerate(times) if t >= times[-1] - WINDOW}
    # Pruning may be batched, but nothing a whole window older than needed is kept.
    assert all(time_ms >= times[-1] - 2 * WINDOW for _, _, time_ms in backend.rows())
    assert len(backend.rows()) < len(times)


def test_pruning_after_reopening(backend: NonceBackend) -> None:
    first = backend.open()
    _remember(first, "beta", N1, T0)
    close(first)
    again = backend.open()
    try:
        remember(again, "beta", N2, T0 + WINDOW * 5, T0 + WINDOW * 4)
    finally:
        close(again)
    assert backend.rows() == {("beta", N2, T0 + WINDOW * 5)}


def test_concurrent_uses_of_one_nonce_admit_exactly_one(store: NonceStore) -> None:
    async def attempts() -> list[BaseException | None]:
        return await asyncio.gather(
            *(store.remember("beta", N1, T0, forget_before_ms=T0 - WINDOW) for _ in range(8)),
            return_exceptions=True,
        )

    outcomes = run(attempts())
    assert sum(o is None for o in outcomes) == 1
    assert all(isinstance(o, InvalidInput) and "replay" in str(o) for o in outcomes if o)


def test_unopenable_sqlite_path_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot open nonce store"):
        SqliteNonceStore(tmp_path / "missing-dir" / "nonces.sqlite")


def test_closed_store_is_a_storage_error(backend: NonceBackend) -> None:
    closed = backend.open()
    close(closed)
    with pytest.raises(StorageError, match="closed"):
        _remember(closed, "beta", N1, T0)


def test_a_postgres_node_imports_the_nonces_of_its_former_sqlite_file(tmp_path: Path) -> None:
    """A request seen just before a node moved its nonces to PostgreSQL cannot be replayed after."""
    legacy = tmp_path / "peer_nonces.db"
    before = SqliteNonceStore(legacy)
    _remember(before, "beta", N1, T0)
    close(before)
    dsn, schema = shared_dsn(), unique("nonces")
    try:
        for _ in range(2):  # the second open finds the file renamed: nothing imported twice
            store = factory.open_nonce_store("postgres", dsn, schema=schema, legacy=legacy)
            try:
                with pytest.raises(InvalidInput, match="replay"):
                    _remember(store, "beta", N1, T0 + 1)
            finally:
                close(store)
            assert not legacy.exists()
            assert legacy.with_name("peer_nonces.db.imported").exists()
    finally:
        drop_schema(dsn, schema)
