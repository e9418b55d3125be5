"""Conformance suite for the :class:`~medledger.storage.ports.RecordIndex` port.

Every test runs on SQLite and on a real PostgreSQL server (``pg_server.py``):
both adapters share their statements and reads (``storage/record_sql.py``),
and this suite pins what they promise alike.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pg_server import unique

from medledger.core.errors import Conflict, NotFound, StorageError
from medledger.core.hashing import sha256
from medledger.storage.ports import (
    RECOVERY_MARK,
    REINDEX_CURSOR_KEY,
    TERMS_VERSION_KEY,
    RecordIndex,
    VersionRow,
)
from medledger.storage.postgres.migrations import drop_schema
from medledger.storage.postgres.records import PostgresRecordIndex
from medledger.storage.sqlite.records import SqliteRecordIndex

IndexFactory = Callable[[], Awaitable[RecordIndex]]


@pytest.fixture(params=["sqlite", "postgres"])
def open_index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[IndexFactory]:
    """Opens the same (initially empty) index as often as a test asks."""
    if request.param == "sqlite":
        path = tmp_path / "records.db"
        SqliteRecordIndex.initialize(path)

        async def sqlite() -> RecordIndex:
            return SqliteRecordIndex(path)

        yield sqlite
        return
    from pg_server import shared_dsn

    dsn, schema = shared_dsn(), unique("records")
    PostgresRecordIndex.initialize(dsn, schema=schema)

    async def postgres() -> RecordIndex:
        return PostgresRecordIndex(dsn, schema=schema)

    yield postgres
    drop_schema(dsn, schema)


@asynccontextmanager
async def opened(factory: IndexFactory) -> AsyncIterator[RecordIndex]:
    index = await factory()
    try:
        yield index
    finally:
        await index.close()


def row(rid: str, version: int, *, patient: str = "p1", kek: str = "k1", t: int = 0) -> VersionRow:
    return VersionRow(
        resource_type="Observation",
        id=rid,
        version=version,
        blob_hash=sha256(f"{rid}/{version}".encode()),
        wrapped_dek=f"dek {rid} {version}".encode(),
        kek_id=kek,
        patient=patient,
        updated_ms=1_700_000_000_000 + t,
        tx_hash=sha256(f"tx {rid}/{version}".encode()),
    )


def test_index_put_latest_history(open_index: IndexFactory) -> None:
    async def go() -> None:
        async with opened(open_index) as index:
            await asyncio.gather(
                *(index.put_version(row(f"o{i}", 1, t=i), {b"tok-a"}) for i in range(30))
            )
            await index.put_version(row("o1", 2, t=100), {b"tok-b"})
            await index.put_version(row("o1", 3, t=101), {b"tok-b", b"tok-c"})
            latest = index.latest("Observation", "o1")
            assert latest == row("o1", 3, t=101)
            assert index.get_version("Observation", "o1", 2) == row("o1", 2, t=100)
            assert index.get_version("Observation", "o1", 9) is None
            assert index.latest("Observation", "nope") is None
            assert index.latest("Patient", "o1") is None
            assert [r.version for r in index.history("Observation", "o1")] == [3, 2, 1]
            assert [r.updated_ms for r in index.type_history("Observation", 3)] == [
                1_700_000_000_101,
                1_700_000_000_100,
                1_700_000_000_029,
            ]
            assert sorted(index.records_of_patient("p1"))[:2] == [
                ("Observation", "o0"),
                ("Observation", "o1"),
            ]
            assert index.count_wrapped_by("k1") == 32
            assert index.versions_since(1_700_000_000_029) == [
                row("o1", 3, t=101),
                row("o1", 2, t=100),
                row("o29", 1, t=29),
            ]
            assert index.versions_since(1_700_000_001_000) == []
            # Every row once, in key order, across pages of 1000.
            await asyncio.gather(
                *(index.put_version(row(f"p{i:04d}", 1, t=i), set()) for i in range(1100))
            )
            listed = [(r.id, r.version) for r in index.iter_versions()]
            assert len(listed) == 1132 and listed == sorted(listed)
            assert listed[:3] == [("o0", 1), ("o1", 1), ("o1", 2)]
        # Durable across a reopen.
        async with opened(open_index) as index:
            assert index.latest("Observation", "o1") == row("o1", 3, t=101)

    asyncio.run(go())


def test_index_keeps_deletions_and_erasure_covers_them(open_index: IndexFactory) -> None:
    """A deletion is a version like any other, flagged: kept across a reopen, and erased too."""

    async def go() -> None:
        async with opened(open_index) as index:
            await index.put_version(row("d1", 1), {b"tok-a"})
            await index.put_version(replace(row("d1", 2), deleted=True), set())
            assert index.search("Observation", [{b"tok-a"}]) == []
        async with opened(open_index) as index:
            assert [r.deleted for r in index.history("Observation", "d1")] == [True, False]
            assert index.latest("Observation", "d1") == replace(row("d1", 2), deleted=True)
            assert len(await index.erase("Observation", "d1")) == 2
            assert all(r.erased for r in index.history("Observation", "d1"))

    asyncio.run(go())


def test_index_keeps_chain_bases_and_the_recovery_mark(open_index: IndexFactory) -> None:
    """Crash recovery finds unsettled versions by chain height, never by wall clock."""

    async def go() -> None:
        async with opened(open_index) as index:
            assert index.max_chain_base() is None and index.recovery_mark() == 0
            await index.put_version(row("legacy", 1), set())  # chain_base unknown
            for i, base in enumerate([4, 9, 7]):
                await index.put_version(replace(row(f"b{i}", 1), chain_base=base), set())
            assert index.max_chain_base() == 9
            assert [(r.id, r.chain_base) for r in index.unsettled(7)] == [("b2", 7), ("b1", 9)]
            assert [r.id for r in index.unsettled(0)] == ["b0", "b2", "b1"]  # never legacy
            await index.set_recovery_mark(8)
            await index.set_recovery_mark(9)
        async with opened(open_index) as index:  # durable across a reopen
            assert index.recovery_mark() == 9
            assert index.get_version("Observation", "b1", 1) == replace(row("b1", 1), chain_base=9)

    asyncio.run(go())


def test_index_keeps_its_own_values_durably(open_index: IndexFactory) -> None:
    """The search terms' version and a re-index cursor survive a reopen; None forgets."""

    async def go() -> None:
        async with opened(open_index) as index:
            assert index.meta(TERMS_VERSION_KEY) is None
            await index.set_meta(TERMS_VERSION_KEY, "2")
            await index.set_meta(REINDEX_CURSOR_KEY, "Patient/p9")
            await index.set_meta(REINDEX_CURSOR_KEY, "Patient/q1")
            with pytest.raises(StorageError):  # the recovery mark has its own, checked path
                await index.set_meta(RECOVERY_MARK, "0")
        async with opened(open_index) as index:
            assert index.meta(TERMS_VERSION_KEY) == "2"
            assert index.meta(REINDEX_CURSOR_KEY) == "Patient/q1"
            await index.set_meta(REINDEX_CURSOR_KEY, None)
        async with opened(open_index) as index:
            assert index.meta(REINDEX_CURSOR_KEY) is None and index.recovery_mark() == 0

    asyncio.run(go())


def test_sqlite_index_of_an_older_release_gains_the_chain_base_column(tmp_path: Path) -> None:
    path = tmp_path / "records.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('schema_version', '1');"
        "CREATE TABLE versions (rtype TEXT NOT NULL, rid TEXT NOT NULL, version INTEGER NOT NULL,"
        " blob_hash BLOB NOT NULL, wrapped_dek BLOB, kek_id TEXT, patient TEXT,"
        " updated_ms INTEGER NOT NULL, tx_hash BLOB NOT NULL, erased INTEGER NOT NULL DEFAULT 0,"
        " PRIMARY KEY (rtype, rid, version)) WITHOUT ROWID;"
        "CREATE TABLE tokens (token BLOB NOT NULL, rtype TEXT NOT NULL, rid TEXT NOT NULL);"
        "INSERT INTO versions VALUES ('Observation', 'old', 1, x'00', x'01', 'k1', 'p1', 5, x'02', 0);"
    )
    conn.close()

    async def go() -> None:
        index = SqliteRecordIndex(path)
        try:
            assert index.latest("Observation", "old") is not None
            assert index.latest("Observation", "old").chain_base is None  # type: ignore[union-attr]
            await index.put_version(replace(row("new", 1), chain_base=3), set())
            assert index.max_chain_base() == 3
        finally:
            await index.close()

    asyncio.run(go())


def test_index_conflict_fails_only_its_caller(open_index: IndexFactory) -> None:
    async def go() -> None:
        async with opened(open_index) as index:
            await index.put_version(row("dup", 1), {b"t"})
            results = await asyncio.gather(
                index.put_version(row("dup", 1), {b"x"}),
                index.put_version(row("ok", 1), {b"t"}),
                index.put_version(row("dup", 2), {b"t2"}),
                return_exceptions=True,
            )
            assert isinstance(results[0], Conflict)
            assert results[1:] == [None, None]
            assert index.latest("Observation", "dup") == row("dup", 2)
            await index.remove_version("Observation", "dup", 2)
            assert index.latest("Observation", "dup") == row("dup", 1)

    asyncio.run(go())


def test_index_search(open_index: IndexFactory) -> None:
    async def go() -> None:
        async with opened(open_index) as index:
            await index.put_version(row("a", 1), {b"name:ann", b"code:1"})
            await index.put_version(row("b", 1), {b"name:bob", b"code:1"})
            await index.put_version(row("c", 1), {b"name:ann", b"code:2"})
            s = index.search
            assert s("Observation", [{b"code:1"}]) == ["a", "b"]
            assert s("Observation", [{b"name:ann"}, {b"code:1"}]) == ["a"]
            assert s("Observation", [{b"name:ann", b"name:bob"}, {b"code:1"}]) == ["a", "b"]
            assert s("Observation", [{b"name:zed"}]) == []
            assert s("Patient", [{b"code:1"}]) == []
            many = {f"x{i}".encode() for i in range(1200)} | {b"code:2"}
            assert s("Observation", [many]) == ["c"]
            # A new version replaces the resource's tokens.
            await index.put_version(row("a", 2), {b"name:ann", b"code:2"})
            assert s("Observation", [{b"code:1"}]) == ["b"]
            assert s("Observation", [{b"code:2"}]) == ["a", "c"]

    asyncio.run(go())


def test_a_pending_version_keeps_the_old_tokens_until_it_settles(open_index: IndexFactory) -> None:
    """``put_version(row, None)``: the row is durable, the resource's tokens unchanged and
    the version listed as pending until ``settle_tokens`` (decision 0069)."""

    async def go() -> None:
        async with opened(open_index) as index:
            s = index.search
            await index.put_version(row("a", 1), {b"code:1"})
            await index.put_version(row("a", 2), None)
            await index.put_version(row("b", 1), None)
            assert index.latest("Observation", "a") == row("a", 2)
            assert index.pending_tokens() == [("Observation", "a", 2), ("Observation", "b", 1)]
            assert s("Observation", [{b"code:1"}]) == ["a"]  # version 1's, still
        async with opened(open_index) as index:  # pending is durable too
            s = index.search
            assert index.pending_tokens() == [("Observation", "a", 2), ("Observation", "b", 1)]
            await index.settle_tokens(row("a", 2), {b"code:2"})
            await index.settle_tokens(row("b", 1), {b"code:2"})
            assert index.pending_tokens() == []
            assert s("Observation", [{b"code:1"}]) == []
            assert s("Observation", [{b"code:2"}]) == ["a", "b"]

    asyncio.run(go())


def test_a_settling_version_that_is_no_longer_current_changes_no_tokens(
    open_index: IndexFactory,
) -> None:
    """A newer version, an erasure or a take-back that came first wins over a late settle."""

    async def go() -> None:
        async with opened(open_index) as index:
            s = index.search
            # Newer version first: the late settle of version 1 leaves version 2's tokens.
            await index.put_version(row("new", 1), None)
            await index.put_version(row("new", 2), None)
            await index.settle_tokens(row("new", 2), {b"v2"})
            await index.settle_tokens(row("new", 1), {b"v1"})
            assert s("Observation", [{b"v2"}]) == ["new"]
            assert s("Observation", [{b"v1"}]) == []
            # Erased while pending: no tokens come back, nothing stays pending.
            await index.put_version(row("gone", 1), None)
            await index.erase("Observation", "gone")
            assert index.pending_tokens() == []
            await index.settle_tokens(row("gone", 1), {b"gone"})
            assert s("Observation", [{b"gone"}]) == []
            # Taken back while pending: the entry goes with the row.
            await index.put_version(row("back", 1), {b"kept"})
            await index.put_version(row("back", 2), None)
            await index.remove_version("Observation", "back", 2)
            assert index.pending_tokens() == []
            await index.settle_tokens(row("back", 2), {b"lost"})
            assert s("Observation", [{b"kept"}]) == ["back"]
            assert s("Observation", [{b"lost"}]) == []

    asyncio.run(go())


def test_index_erase_and_rewrap(open_index: IndexFactory) -> None:
    async def go() -> None:
        async with opened(open_index) as index:
            for i in range(5):
                await index.put_version(row("r", i + 1), {b"tok"})
            await index.put_version(row("keep", 1), {b"tok"})
            blobs = await index.erase("Observation", "r")
            assert sorted(blobs) == sorted(row("r", i + 1).blob_hash for i in range(5))
            for r in index.history("Observation", "r"):
                assert r.erased and r.wrapped_dek is None and r.kek_id is None
            assert index.search("Observation", [{b"tok"}]) == ["keep"]
            with pytest.raises(NotFound):
                await index.erase("Observation", "never")
            assert index.count_wrapped_by("k1") == 1
            # More rows than one re-wrap batch (2000).
            await asyncio.gather(*(index.put_version(row(f"w{i}", 1), set()) for i in range(2100)))
            count = await index.rewrap("k1", "k2", lambda r: b"new " + (r.wrapped_dek or b""))
            assert count == 2101
            assert index.count_wrapped_by("k1") == 0
            assert index.count_wrapped_by("k2") == 2101
            keep = index.latest("Observation", "keep")
            assert keep is not None and keep.wrapped_dek == b"new dek keep 1"
            assert index.latest("Observation", "r") == index.history("Observation", "r")[0]

    asyncio.run(go())


def test_versions_no_backend_can_store_are_absent(open_index: IndexFactory) -> None:
    """A version number outside int4 (e.g. from a URL) is simply absent, on every backend.

    SQLite once passed it to the driver, which raised ``OverflowError`` past
    2**63 (an internal error instead of "no such version").
    """

    async def go() -> None:
        async with opened(open_index) as index:
            await index.put_version(row("v", 1), set())
            await index.put_version(row("v", 2**31 - 1), set())
            assert index.get_version("Observation", "v", 2**31 - 1) == row("v", 2**31 - 1)
            for version in (2**31, -(2**31) - 1, 2**63, -(2**63) - 1, 2**70):
                assert index.get_version("Observation", "v", version) is None, version
            assert index.get_version("Observation", "v", 1) == row("v", 1)

    asyncio.run(go())


def test_search_resolves_the_rarest_group_first(open_index: IndexFactory) -> None:
    """Search starts from the group matching the fewest stored tokens, on every backend.

    The common code's group is the smaller one (one token), the rare group the
    larger (three tokens, one of them stored once): ordering by group size (as
    the PostgreSQL index once did) fetched every record holding the common code
    before narrowing down to one.
    """

    async def go() -> None:
        async with opened(open_index) as index:
            await asyncio.gather(
                *(index.put_version(row(f"c{i:03d}", 1), {b"code:common"}) for i in range(300))
            )
            await index.put_version(row("hit", 1), {b"code:common", b"name:rare"})
            fetched: list[int] = []
            select = index._select  # type: ignore[attr-defined]

            def counting(sql: str, args: Sequence[Any] = ()) -> list[Any]:
                rows: list[Any] = select(sql, args)
                if "SELECT rid FROM tokens" in sql:
                    fetched.append(len(rows))
                return rows

            index._select = counting  # type: ignore[attr-defined]
            groups = [{b"code:common"}, {b"name:rare", b"name:absent-1", b"name:absent-2"}]
            assert index.search("Observation", groups) == ["hit"]
            assert sum(fetched) <= 2, fetched  # one id per group, never the 301 common ones

    asyncio.run(go())


def test_sqlite_search_work_does_not_grow_with_the_store(tmp_path: Path) -> None:
    """A search's SQLite work depends on what it matches, not on how much else is stored.

    Counted in virtual-machine steps (a progress handler every 100), not in
    time. One patient's three records are searched for among 50 other
    Observations and then among 1,000; every record has the same common
    tokens besides its own. A ``SELECT DISTINCT rid`` lookup once walked every
    token of the type in id order: twenty times the records, twenty times the
    steps.
    """
    path = tmp_path / "records.db"
    SqliteRecordIndex.initialize(path)
    common = {f"status:final-{i}".encode() for i in range(20)}

    async def add(index: SqliteRecordIndex, start: int, stop: int) -> None:
        await asyncio.gather(
            *(
                index.put_version(row(f"other{i:05d}", 1), {f"patient:{i}".encode(), *common})
                for i in range(start, stop)
            )
        )

    def steps(index: SqliteRecordIndex) -> int:
        counted = [0]

        def tick() -> int:
            counted[0] += 1
            return 0  # 0: carry on

        conn = index._reader()
        conn.set_progress_handler(tick, 100)
        try:
            found = index.search(
                "Observation", [{b"patient:mine"}, {b"status:final-3", b"status:final-7"}]
            )
        finally:
            conn.set_progress_handler(None, 0)
        assert found == ["mine0", "mine1", "mine2"]
        return counted[0]

    async def go() -> None:
        index = SqliteRecordIndex(path)
        try:
            for i in range(3):
                await index.put_version(row(f"mine{i}", 1), {b"patient:mine", *common})
            await add(index, 0, 50)
            small = steps(index)
            await add(index, 50, 1000)
            large = steps(index)
            assert large <= small * 1.5 + 5, (small, large)
        finally:
            await index.close()

    asyncio.run(go())


def test_latest_of_reads_many_resources_in_few_statements(open_index: IndexFactory) -> None:
    """``latest_of`` gives each existing id's newest version, one statement per 400 ids.

    A search reads the rows of everything it matches: one ``latest`` per id
    was one statement per match.
    """

    async def go() -> None:
        async with opened(open_index) as index:
            await asyncio.gather(
                *(index.put_version(row(f"r{i:04d}", 1), set()) for i in range(900))
            )
            await index.put_version(row("r0001", 2, t=5), set())
            await index.put_version(row("r0001", 3, t=6), set())
            statements: list[str] = []
            select = index._select  # type: ignore[attr-defined]

            def counting(sql: str, args: Sequence[Any] = ()) -> list[Any]:
                statements.append(sql)
                rows: list[Any] = select(sql, args)
                return rows

            index._select = counting  # type: ignore[attr-defined]
            wanted = [f"r{i:04d}" for i in range(900)] + ["absent", "r0001"]
            found = index.latest_of("Observation", wanted)
            assert len(statements) == 3  # 901 distinct ids: 400 + 400 + 101
            assert sorted(found) == [f"r{i:04d}" for i in range(900)]
            assert found["r0001"] == row("r0001", 3, t=6)
            assert found["r0899"] == row("r0899", 1)
            assert index.latest_of("Patient", wanted) == {}
            assert index.latest_of("Observation", []) == {}

    asyncio.run(go())
