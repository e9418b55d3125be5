"""WAL checkpoints of the SQLite stores run beside the commits, never inside one.

With SQLite's automatic checkpoint, the commit that pushed the WAL past 1,000
pages also copied them all into the database file and synced it (every ~14th
record-index write). Now a background thread does that: a commit returns
while a checkpoint cannot run, and the checkpoint catches up once it can.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from medledger.storage.ports import VersionRow
from medledger.storage.sqlite.chain import SqliteChainStore
from medledger.storage.sqlite.checkpoint import BACKLOG_PAGES, WalIndexHeader
from medledger.storage.sqlite.records import SqliteRecordIndex

#: Longest wait for the background checkpoint (a failure, never a pass).
DEADLINE_S = 10.0


def wal_backlog(path: Path) -> int | None:
    """The backlog as the store's checkpointer reads it (one read, then its descriptor closed:
    fine in a test that has no other process on the database)."""
    header = WalIndexHeader(path)
    try:
        return header.backlog()
    finally:
        header.close()


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


#: The byte of a ``-shm`` file whose read lock says "in use" (SQLite's unix VFS:
#: ``UNIX_SHM_DMS``, after the 120-byte header area and the 8 lock bytes).
_SHM_DMS_BYTE = 128

_HOLDER = """
import sqlite3, sys
from pathlib import Path
from medledger.storage.sqlite.checkpoint import WalIndexHeader

db = Path(sys.argv[1])
header = WalIndexHeader(db)
conn = sqlite3.connect(db, isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("CREATE TABLE t (x INTEGER)")
conn.execute("INSERT INTO t VALUES (1)")
for _ in range(3):
    header.backlog()  # as the writer does after every commit
print("ready", flush=True)
sys.stdin.readline()  # another process opened the database meanwhile
for n in range(50):
    conn.execute("INSERT INTO t VALUES (?)", (n,))
    conn.execute("SELECT count(*) FROM t").fetchall()
print("alive", flush=True)
"""


def test_reading_the_backlog_keeps_sqlites_locks_for_other_processes_to_see(
    tmp_path: Path,
) -> None:
    """Another process opening the database must find the shared memory in use.

    Closing a descriptor of the ``-shm`` file drops every POSIX lock the
    process holds on it, SQLite's among them; the next process to open the
    database then took the file for unused and truncated it, and the first
    process, which maps it, died of SIGBUS at its next access (a node, when
    ``medledger audit`` read its chain).
    """
    import subprocess
    import sys

    db = tmp_path / "shared.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "ready", holder.stderr
        # SQLite's unix VFS marks a -shm file in use with a read lock on byte 128 (its
        # "DMS" byte); a process that can write-lock it truncates the file as unused.
        shm = os.open(f"{db}-shm", os.O_RDWR)
        try:
            with pytest.raises(OSError):
                fcntl.lockf(shm, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _SHM_DMS_BYTE)
        finally:
            os.close(shm)  # this process's own locks only
        other = sqlite3.connect(db)  # another process opens and reads, as `audit` does
        try:
            assert other.execute("SELECT count(*) FROM t").fetchone() == (1,)
        finally:
            other.close()
        holder.stdin.write("go\n")
        holder.stdin.flush()
        out, err = holder.communicate(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
    assert holder.returncode == 0, f"the holder died ({holder.returncode}): {err}"
    assert out.strip() == "alive"
    check = sqlite3.connect(db)
    try:
        assert check.execute("SELECT count(*) FROM t").fetchone() == (51,)
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        check.close()
