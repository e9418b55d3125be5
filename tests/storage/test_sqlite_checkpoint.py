"""WAL checkpoints of the SQLite stores run beside the commits, never inside one.

With SQLite's automatic checkpoint, the commit that pushed the WAL past 1,000
pages also copied them all into the database file and synced it (every ~14th
record-index write). Now a background thread does that: a commit returns
while a checkpoint cannot run, and the checkpoint catches up once it can.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from medledger.storage.ports import VersionRow
from medledger.storage.sqlite.chain import SqliteChainStore
from medledger.storage.sqlite.checkpoint import BACKLOG_PAGES, wal_backlog
from medledger.storage.sqlite.records import SqliteRecordIndex

#: Longest wait for the background checkpoint (a failure, never a pass).
DEADLINE_S = 10.0


def _poll(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


def _row(n: int) -> VersionRow:
    return VersionRow(
        resource_type="Observation",
        id=f"obs-{n}",
        version=1,
        blob_hash=os.urandom(32),
        wrapped_dek=os.urandom(60),
        kek_id="kek-1",
        patient="p",
        updated_ms=n,
        tx_hash=os.urandom(32),
        chain_base=0,
    )


def test_wal_backlog_reads_the_frames_not_yet_checkpointed(tmp_path: Path) -> None:
    path = tmp_path / "plain.db"
    assert wal_backlog(path) is None  # no database, no WAL index
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("CREATE TABLE t (k BLOB)")
        for _ in range(20):
            conn.execute("INSERT INTO t VALUES (?)", (os.urandom(3000),))
        backlog = wal_backlog(path)
        busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert (busy, copied) == (0, frames)
        assert backlog == frames > 20
        assert wal_backlog(path) == 0
    finally:
        conn.close()


def test_index_commits_do_not_wait_for_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "records.db"

    async def go() -> None:
        index = SqliteRecordIndex(path)
        written = 0
        try:
            # Hold the checkpoint lock: no checkpoint can run, and commits must not care.
            with index._checkpoints.lock:
                while (wal_backlog(path) or 0) < 2 * BACKLOG_PAGES and written < 400:
                    tokens = {os.urandom(32) for _ in range(200)}  # ~a page each, as in use
                    await index.put_version(_row(written), tokens)
                    written += 1
                # SQLite's own checkpoint would have emptied the WAL at 1,000 pages.
                assert (wal_backlog(path) or 0) >= 2 * BACKLOG_PAGES
            await asyncio.to_thread(
                _poll,
                lambda: (wal_backlog(path) or 0) < BACKLOG_PAGES,
                "the background checkpoint caught up",
            )
        finally:
            await index.close()
        reopened = SqliteRecordIndex(path)
        try:
            assert all(reopened.latest("Observation", f"obs-{n}") for n in range(written))
        finally:
            await reopened.close()

    asyncio.run(go())


def test_chain_appends_leave_checkpoints_to_the_background(tmp_path: Path) -> None:
    """The chain store's writer runs no checkpoint at SQLite's default 1,000 pages."""
    store = SqliteChainStore.create(tmp_path / "chain.db", "c")
    try:
        pages = store._writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        assert pages > 10 * BACKLOG_PAGES
    finally:
        store.close()
