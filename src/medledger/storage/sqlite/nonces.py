"""SQLite adapter of :class:`~medledger.storage.ports.NonceStore`: peer-request nonces seen.

A request is only accepted within the clock-skew window around its
timestamp, so a nonce needs remembering only that long; older entries are
pruned. The table survives restarts (a replay right after a restart is
still refused). SQLite, ``synchronous=FULL``, group-committed: the nonces of
requests arriving together are recorded in one transaction, and each is
durable before the request it arrived with is served.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from medledger.core.errors import StorageError
from medledger.storage.batching import GroupCommitter
from medledger.storage.nonces import PRUNE_EVERY_MS, NonceUse, replay
from medledger.storage.sqlite.connection import immediate

__all__ = ["SqliteNonceStore"]


class SqliteNonceStore:
    """``(reader, nonce)`` pairs seen, with the request time (see module docstring)."""

    def __init__(self, path: Path) -> None:
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS nonces (reader TEXT NOT NULL, nonce TEXT NOT NULL,"
                " time_ms INTEGER NOT NULL, PRIMARY KEY (reader, nonce)) WITHOUT ROWID"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS nonces_time ON nonces (time_ms)")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open nonce store {path}: {exc}") from None
        self._pruned_ms = 0
        self._writes: GroupCommitter[NonceUse] = GroupCommitter(
            self._apply, name="medledger-nonces"
        )

    async def remember(
        self, reader: str, nonce: str, time_ms: int, *, forget_before_ms: int
    ) -> None:
        """Record a nonce; raise :class:`InvalidInput` if ``reader`` used it before."""
        await self._writes.submit(NonceUse(reader, nonce, time_ms, forget_before_ms))

    def _apply(self, ops: Sequence[NonceUse]) -> list[BaseException | None]:
        """One transaction for every queued nonce (runs on the writer thread)."""
        results: list[BaseException | None] = []
        db = self._db
        try:
            with immediate(db):
                forget = max(op.forget_before_ms for op in ops)
                if forget - self._pruned_ms > PRUNE_EVERY_MS:
                    db.execute("DELETE FROM nonces WHERE time_ms < ?", (forget,))
                    self._pruned_ms = forget
                for op in ops:
                    inserted = db.execute(
                        "INSERT OR IGNORE INTO nonces (reader, nonce, time_ms) VALUES (?, ?, ?)",
                        (op.reader, op.nonce, op.time_ms),
                    ).rowcount
                    results.append(None if inserted == 1 else replay())
        except sqlite3.Error as exc:
            return [StorageError(f"cannot record the request nonce: {exc}")] * len(ops)
        return results

    async def close(self) -> None:
        await self._writes.close()
        self._db.close()
