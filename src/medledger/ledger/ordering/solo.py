"""The ``solo`` orderer: one total order on this machine, in memory or in a SQLite file.

The embedded default for a network on one machine. Without a ``path`` the
order lives in this process only (tests). With a ``path`` it is a SQLite
file (WAL, ``synchronous=FULL``: a returned publish is durable) that any
number of processes may open at once — ``medledger network up`` runs one
node process per institution over one ``order.db``:

* ``publish`` joins a group commit: every publish queued while the previous
  commit ran goes into one ``BEGIN IMMEDIATE`` transaction (SQLite's write
  lock serializes publishers of every process) with one fsync — look each
  ``msg_id`` up in the de-duplication window, else insert at ``last seq + 1``
  with a time no earlier than the last message's. Writes run on one thread
  per orderer, so a waiting lock or an fsync never stalls the event loop.
* ``read`` queries rows after the last one it yielded; when there are none
  it sleeps until a publish of this orderer wakes it, or ``poll_interval``
  seconds (a few ms) pass — the way it sees other processes' publishes.
  Every row must be exactly the next sequence, else :class:`OrderingError`.
* ``broadcast`` reaches the ``broadcasts()`` listeners of this orderer only
  (this process): other processes sharing the file get the ordered copy of
  whatever was broadcast, which is all a broadcast may be relied on for.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from medledger.core.errors import OrderingError, StorageError
from medledger.ledger.clock import Clock, SystemClock
from medledger.ledger.ordering.listeners import Listeners
from medledger.ledger.ordering.port import MAX_MESSAGE_BYTES, OrderedMessage
from medledger.storage.batching import GroupCommitter
from medledger.storage.sqlite.connection import immediate

__all__ = ["SoloOrderer"]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS messages (seq INTEGER PRIMARY KEY,"
    " msg_id TEXT NOT NULL, payload BLOB NOT NULL, time_ms INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS messages_msg_id ON messages(msg_id, seq)",
)
# Rows fetched per reader query.
_BATCH = 512
# How long a publisher waits for another process's write lock.
_BUSY_TIMEOUT_MS = 30_000


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


@dataclass(slots=True)
class _Publish:
    msg_id: str
    payload: bytes
    seq: int = 0  # assigned by the commit


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Wakeup:
    """Wakes this orderer's sleeping readers when it publishes (another process: by polling)."""

    def __init__(self) -> None:
        self.generation = 0
        self._waiters: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        self.generation += 1
        for fut in self._waiters:
            _wake(fut)
        self._waiters.clear()

    async def wait(self, generation: int, timeout: float | None) -> None:
        """Sleep until :meth:`notify` (unless it happened since ``generation``) or ``timeout``."""
        if generation != self.generation:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.add(fut)
        handle = None if timeout is None else loop.call_later(timeout, _wake, fut)
        try:
            await fut
        finally:
            if handle is not None:
                handle.cancel()
            self._waiters.discard(fut)


class SoloOrderer:
    """A :class:`~medledger.ledger.ordering.port.Orderer` on this machine (see module docstring).

    ``dedup_window``: a ``msg_id`` is de-duplicated against the last that many
    messages. ``poll_interval``: how often a caught-up reader of a file-backed
    order looks for other processes' messages, in seconds. ``clock`` stamps
    this orderer's publishes: each process sharing a file stamps with its own
    clock, so a reader must not take one publisher's stamp as the time.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        dedup_window: int = 100_000,
        poll_interval: float = 0.005,
        clock: Clock | None = None,
    ) -> None:
        self._clock: Clock = clock or SystemClock()
        self._window = dedup_window
        self._poll = poll_interval
        self._closed = False
        self._wakeup = _Wakeup()
        self._listeners = Listeners()
        # In memory (no path):
        self._messages: list[bytes] = []
        self._times: list[int] = []
        self._ids: dict[str, int] = {}
        # In a file: a writer connection used only on the writer thread, a reader
        # connection used only on the event loop's thread.
        self._path = path
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._publishes: GroupCommitter[_Publish] | None = None
        if path is not None:
            try:
                self._writer = _connect(path)
                for statement in _SCHEMA:
                    self._writer.execute(statement)
                self._reader = _connect(path)
            except sqlite3.Error as exc:
                self._close_connections()
                raise OrderingError(f"cannot open solo order {path}: {exc}") from None
            self._publishes = GroupCommitter(self._publish_file, name="solo-order")

    # -- the port ---------------------------------------------------------------------------

    async def publish(self, msg_id: str, payload: bytes) -> int:
        if self._closed:
            raise OrderingError("orderer is closed")
        if len(payload) > MAX_MESSAGE_BYTES:
            raise OrderingError(f"message of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
        if self._publishes is None:
            seq = self._publish_memory(msg_id, payload)
        else:
            op = _Publish(msg_id, payload)
            try:
                await self._publishes.submit(op)
            except StorageError as exc:  # closed while queued
                raise OrderingError(str(exc)) from None
            seq = op.seq
        self._wakeup.notify()
        return seq

    async def read(self, start: int = 1) -> AsyncIterator[OrderedMessage]:
        seq = max(start, 1)
        while not self._closed:
            generation = self._wakeup.generation
            batch = self._fetch(seq)
            for message in batch:
                if message.seq != seq:
                    raise OrderingError(f"{self._path}: message {seq} is missing")
                yield message
                seq += 1
            if not batch:
                await self._wakeup.wait(generation, None if self._path is None else self._poll)

    async def broadcast(self, payload: bytes) -> None:
        if self._closed:
            raise OrderingError("orderer is closed")
        if len(payload) > MAX_MESSAGE_BYTES:
            raise OrderingError(f"message of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
        self._listeners.deliver(payload)

    def broadcasts(self) -> AsyncIterator[bytes]:
        return self._listeners.listen()

    async def last_seq(self) -> int:
        if self._path is None:
            return len(self._messages)
        if self._reader is None:
            raise OrderingError("orderer is closed")
        try:
            row = self._reader.execute("SELECT max(seq) FROM messages").fetchone()
        except sqlite3.Error as exc:
            raise OrderingError(f"solo order read failed: {exc}") from None
        return int(row[0] or 0)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wakeup.notify()
        self._listeners.close()
        if self._publishes is not None:
            # Let the publishes queued or in flight commit before the connection closes.
            await self._publishes.close()
            self._publishes = None
        self._close_connections()

    # -- in memory --------------------------------------------------------------------------

    def _publish_memory(self, msg_id: str, payload: bytes) -> int:
        seen = self._ids.get(msg_id)
        if seen is not None and seen > len(self._messages) - self._window:
            return seen
        # Never before the previous message: the order's clock does not go back.
        now = max(self._clock.now_ms(), self._times[-1] if self._times else 0)
        self._messages.append(payload)
        self._times.append(now)
        self._ids[msg_id] = len(self._messages)
        return len(self._messages)

    # -- in a file ----------------------------------------------------------------------------

    def _publish_file(self, ops: Sequence[_Publish]) -> list[BaseException | None]:
        """One immediate transaction for every queued publish (runs on the writer thread)."""
        db = self._writer
        if db is None:
            return [OrderingError("orderer is closed")] * len(ops)
        try:
            with immediate(db):
                last = db.execute(
                    "SELECT seq, time_ms FROM messages ORDER BY seq DESC LIMIT 1"
                ).fetchone()
                last_seq, last_time = (int(last[0]), int(last[1])) if last else (0, 0)
                # Never before the previous message: the order's clock does not go back.
                now = max(self._clock.now_ms(), last_time)
                in_batch: dict[str, int] = {}
                rows = []
                for op in ops:
                    seen = in_batch.get(op.msg_id)
                    if seen is None:
                        row = db.execute(
                            "SELECT seq FROM messages WHERE msg_id = ? AND seq > ?"
                            " ORDER BY seq DESC LIMIT 1",
                            (op.msg_id, last_seq - self._window),
                        ).fetchone()
                        seen = None if row is None else int(row[0])
                    if seen is not None:
                        op.seq = seen
                        continue
                    last_seq += 1
                    op.seq = in_batch[op.msg_id] = last_seq
                    rows.append((last_seq, op.msg_id, op.payload, now))
                db.executemany(
                    "INSERT INTO messages(seq, msg_id, payload, time_ms) VALUES (?, ?, ?, ?)",
                    rows,
                )
        except sqlite3.Error as exc:
            return [OrderingError(f"solo order write failed: {exc}")] * len(ops)
        return [None] * len(ops)

    def _fetch(self, seq: int) -> list[OrderedMessage]:
        """Messages from ``seq`` on that are in the order now (at most one batch)."""
        if self._path is None:
            end = min(len(self._messages), seq - 1 + _BATCH)
            return [
                OrderedMessage(seq=s, payload=self._messages[s - 1], time_ms=self._times[s - 1])
                for s in range(seq, end + 1)
            ]
        reader = self._reader
        if reader is None:  # closed
            return []
        try:
            rows = reader.execute(
                "SELECT seq, payload, time_ms FROM messages WHERE seq >= ? ORDER BY seq LIMIT ?",
                (seq, _BATCH),
            ).fetchall()
        except sqlite3.Error as exc:
            raise OrderingError(f"solo order read failed: {exc}") from None
        return [OrderedMessage(seq=int(s), payload=bytes(p), time_ms=int(t)) for s, p, t in rows]

    def _close_connections(self) -> None:
        for db in (self._writer, self._reader):
            if db is not None:
                db.close()
        self._writer = self._reader = None
