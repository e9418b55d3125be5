"""The ``solo`` orderer: one in-process total order, optionally persisted to SQLite.

The embedded default for a network on one machine where every member runs
in the same process (tests, ``medledger demo``). With a ``path`` the order
survives restarts (WAL, ``synchronous=FULL``: a returned publish is durable).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

from medledger.core.errors import OrderingError
from medledger.ledger.ordering.port import MAX_MESSAGE_BYTES, OrderedMessage

__all__ = ["SoloOrderer"]


class SoloOrderer:
    """A single-process :class:`~medledger.ledger.ordering.port.Orderer`."""

    def __init__(self, path: Path | None = None, *, dedup_window: int = 100_000) -> None:
        self._messages: list[bytes] = []
        self._times: list[int] = []
        self._ids: dict[str, int] = {}
        self._window = dedup_window
        self._changed = asyncio.Condition()
        self._closed = False
        self._db: sqlite3.Connection | None = None
        if path is not None:
            try:
                self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS messages (seq INTEGER PRIMARY KEY,"
                    " msg_id TEXT NOT NULL, payload BLOB NOT NULL, time_ms INTEGER NOT NULL)"
                )
                for seq, msg_id, payload, time_ms in self._db.execute(
                    "SELECT seq, msg_id, payload, time_ms FROM messages ORDER BY seq"
                ):
                    if seq != len(self._messages) + 1:
                        raise OrderingError(f"{path}: message {len(self._messages) + 1} is missing")
                    self._messages.append(bytes(payload))
                    self._times.append(int(time_ms))
                    self._ids[msg_id] = seq
            except sqlite3.Error as exc:
                raise OrderingError(f"cannot open solo order {path}: {exc}") from None

    async def publish(self, msg_id: str, payload: bytes) -> int:
        if self._closed:
            raise OrderingError("orderer is closed")
        if len(payload) > MAX_MESSAGE_BYTES:
            raise OrderingError(f"message of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
        seen = self._ids.get(msg_id)
        if seen is not None and seen > len(self._messages) - self._window:
            return seen
        seq = len(self._messages) + 1
        # Never before the previous message: the order's clock does not go back.
        now = max(time.time_ns() // 1_000_000, self._times[-1] if self._times else 0)
        if self._db is not None:
            try:
                self._db.execute(
                    "INSERT INTO messages(seq, msg_id, payload, time_ms) VALUES (?, ?, ?, ?)",
                    (seq, msg_id, payload, now),
                )
            except sqlite3.Error as exc:
                raise OrderingError(f"solo order write failed: {exc}") from None
        self._messages.append(payload)
        self._times.append(now)
        self._ids[msg_id] = seq
        async with self._changed:
            self._changed.notify_all()
        return seq

    async def read(self, start: int = 1) -> AsyncIterator[OrderedMessage]:
        seq = max(start, 1)
        while not self._closed:
            while seq <= len(self._messages):
                yield OrderedMessage(
                    seq=seq, payload=self._messages[seq - 1], time_ms=self._times[seq - 1]
                )
                seq += 1
            async with self._changed:
                await self._changed.wait_for(
                    lambda n=seq: self._closed or n <= len(self._messages)  # type: ignore[misc]
                )

    async def last_seq(self) -> int:
        return len(self._messages)

    async def close(self) -> None:
        self._closed = True
        async with self._changed:
            self._changed.notify_all()
        if self._db is not None:
            self._db.close()
            self._db = None
