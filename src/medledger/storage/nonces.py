"""Seen peer-request nonces, so a captured request cannot be replayed.

A request is only accepted within the clock-skew window around its
timestamp, so a nonce needs remembering only that long; older entries are
pruned. The table survives restarts (a replay right after a restart is
still refused). SQLite, ``synchronous=FULL``: a nonce is recorded before the
request it arrived with is served.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from medledger.core.errors import InvalidInput, StorageError

__all__ = ["NonceStore"]


class NonceStore:
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
        self._lock = threading.Lock()
        self._pruned_ms = 0

    def remember(self, reader: str, nonce: str, time_ms: int, *, forget_before_ms: int) -> None:
        """Record a nonce; raise :class:`InvalidInput` if ``reader`` used it before."""
        with self._lock:
            try:
                if forget_before_ms - self._pruned_ms > 10_000:
                    self._db.execute("DELETE FROM nonces WHERE time_ms < ?", (forget_before_ms,))
                    self._pruned_ms = forget_before_ms
                self._db.execute(
                    "INSERT INTO nonces (reader, nonce, time_ms) VALUES (?, ?, ?)",
                    (reader, nonce, time_ms),
                )
            except sqlite3.IntegrityError:
                raise InvalidInput("the request nonce was already used (replay)") from None
            except sqlite3.Error as exc:
                raise StorageError(f"cannot record the request nonce: {exc}") from None

    def close(self) -> None:
        self._db.close()
