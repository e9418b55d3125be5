"""The SQLite token store remembers verified tokens, and never past a change of the file.

A token that passed the full check is not read from the file again while the
file is unchanged. These tests prove what is still checked on every call:
revocation by this connection and by any other (``medledger token revoke``
runs in another process), expiry, and that a failure is never remembered.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from medledger.core.errors import InvalidInput
from medledger.storage.sqlite import tokens as tokens_module
from medledger.storage.sqlite.tokens import MAX_VERIFIED, SqliteTokenStore

T0 = 1_700_000_000_000


class CountingStore(SqliteTokenStore):
    """Counts the full checks (row reads) its ``check`` makes."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.row_reads = 0

    def _select(self, sql: str, args: tuple[object, ...] | list[object] = ()) -> list[object]:
        if "FROM tokens" in sql:
            self.row_reads += 1
        return super()._select(sql, args)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CountingStore]:
    opened = CountingStore(tmp_path / "tokens.db")
    try:
        yield opened
    finally:
        opened.close()


def test_a_verified_token_is_not_read_again_while_the_file_is_unchanged(
    store: CountingStore,
) -> None:
    text, info = store.create(role="clinician", now_ms=T0)
    assert [store.check(text, now_ms=T0 + i) for i in range(5)] == [info] * 5
    assert store.row_reads == 1


def test_revoked_by_another_connection_is_refused_on_the_next_check(
    store: CountingStore, tmp_path: Path
) -> None:
    text, info = store.create(role="clinician", now_ms=T0)
    store.check(text, now_ms=T0)
    other = SqliteTokenStore(tmp_path / "tokens.db")  # what ``medledger token revoke`` opens
    try:
        other.revoke(info.id)
    finally:
        other.close()
    with pytest.raises(InvalidInput, match="revoked"):
        store.check(text, now_ms=T0)


def test_revoked_by_a_plain_sqlite_writer_is_refused_on_the_next_check(
    store: CountingStore, tmp_path: Path
) -> None:
    """Any commit to the file by anyone else, not only through this class."""
    text, info = store.create(role="clinician", now_ms=T0)
    store.check(text, now_ms=T0)
    db = sqlite3.connect(tmp_path / "tokens.db", isolation_level=None)
    try:
        db.execute("UPDATE tokens SET revoked = 1 WHERE id = ?", (info.id,))
    finally:
        db.close()
    with pytest.raises(InvalidInput, match="revoked"):
        store.check(text, now_ms=T0)


def test_revoked_through_this_store_is_refused_on_the_next_check(store: CountingStore) -> None:
    text, info = store.create(role="auditor", now_ms=T0)
    store.check(text, now_ms=T0)
    store.revoke(info.id)
    with pytest.raises(InvalidInput, match="revoked"):
        store.check(text, now_ms=T0)


def test_a_remembered_token_still_expires(store: CountingStore) -> None:
    text, _ = store.create(role="clinician", now_ms=T0, ttl_ms=1_000)
    store.check(text, now_ms=T0)
    store.check(text, now_ms=T0 + 999)
    with pytest.raises(InvalidInput, match="expired"):
        store.check(text, now_ms=T0 + 1_000)
    assert store.row_reads == 1  # expiry came from the remembered check, not a new read


def test_failures_are_never_remembered(store: CountingStore) -> None:
    text, info = store.create(role="clinician", now_ms=T0)
    store.check(text, now_ms=T0)
    wrong = f"mlt_{info.id}_{'x' * 43}"
    for _ in range(3):
        with pytest.raises(InvalidInput, match="unknown token"):
            store.check(wrong, now_ms=T0)
    # Each failure was a full check (what the failed-authentication budget is charged for).
    assert store.row_reads == 1 + 3
    assert store.check(text, now_ms=T0) == info
    # Only the exact text is remembered: the same secret with other text around it is not.
    with pytest.raises(InvalidInput):
        store.check(text + "x", now_ms=T0)


def test_the_memory_is_bounded(store: CountingStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens_module, "MAX_VERIFIED", 3)
    texts = [store.create(role="clinician", now_ms=T0)[0] for _ in range(5)]
    for text in texts:
        store.check(text, now_ms=T0)
    assert 1 <= len(store._verified) <= 3
    assert MAX_VERIFIED >= 64


def test_a_check_overlapping_a_write_of_this_connection_is_not_remembered(
    store: CountingStore,
) -> None:
    """A check that read the row before a revocation on another thread committed must
    not leave that row remembered after it (the connection's own writes do not change
    ``data_version``)."""
    text, info = store.create(role="clinician", now_ms=T0)
    row_read, revoked = threading.Event(), threading.Event()
    select = CountingStore._select

    def slow_select(self: CountingStore, sql: str, args: object = ()) -> list[object]:
        rows = select(self, sql, args)  # type: ignore[arg-type]
        if "FROM tokens" in sql and threading.current_thread() is not revoker:
            row_read.set()
            assert revoked.wait(10)
        return rows

    def revoke() -> None:
        assert row_read.wait(10)
        store.revoke(info.id)
        revoked.set()

    revoker = threading.Thread(target=revoke)
    store._select = slow_select.__get__(store)  # type: ignore[method-assign]
    revoker.start()
    try:
        assert store.check(text, now_ms=T0) == info  # read before the revocation
    finally:
        revoker.join(10)
    del store._select
    with pytest.raises(InvalidInput, match="revoked"):
        store.check(text, now_ms=T0)
