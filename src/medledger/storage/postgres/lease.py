"""The sequencer lease of a private chain in PostgreSQL: who may append, and where it is.

Several hosts of one institution share its PostgreSQL; exactly one of them is
the **active sequencer** (the one writer of the private chain and the record
index), the others are standbys (decision 0050). The role is held through:

* a session-level advisory lock (``pg_try_advisory_lock``) on a connection
  of its own: PostgreSQL releases it when that session ends (the process
  died, its host or network went away), so a standby can take over;
* the ``sequencer`` row of the chain's schema: an **epoch**, incremented in
  the takeover's transaction, and the active sequencer's link **address**
  (published once it listens, read by the standbys).

The lock elects; the epoch fences. A chain store fenced with the epoch
(``PostgresChainStore.fence``) checks it in every block's own transaction, so
a deposed sequencer that still runs (its session was ended under it, a split
brain) cannot append, whatever it believes.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import psycopg

from medledger.core.errors import Deposed, RetryableStorageError, StorageError
from medledger.storage.postgres.connection import (
    Conn,
    connect,
    reason,
    schema_where,
    set_session,
    storage_error,
)

__all__ = ["ActiveSequencer", "SequencerLease"]


@dataclass(frozen=True, slots=True)
class ActiveSequencer:
    """The lease row as stored: the current epoch and the address its holder published."""

    epoch: int
    #: ``host:port`` of the active sequencer's link; None until it listens.
    address: str | None


class SequencerLease:
    """One process's claim to the sequencer role of the chain in ``schema``.

    Blocking (psycopg): call it off the event loop. :meth:`close` ends the
    session, which releases the role if it was held.
    """

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self.where = schema_where(dsn, schema)
        #: The epoch this process holds, once :meth:`try_acquire` succeeded.
        self.epoch: int | None = None
        self._conn: Conn | None = None
        self._lock = threading.Lock()
        self._closed = False
        #: The advisory lock's name (its key: ``hashtext`` of it).
        self._key = "medledger:sequencer:" + schema

    def _session(self) -> Conn:
        if self._conn is None or self._conn.closed:
            if self.epoch is not None:
                # The session that held the lock is gone, and the lock with it.
                raise Deposed(f"{self.where}: the sequencer lease's session ended")
            conn = connect(self.dsn)
            try:
                set_session(conn, self.schema)
            except psycopg.Error as exc:
                conn.close()
                raise storage_error(exc, self.where) from None
            self._conn = conn
        return self._conn

    def try_acquire(self) -> int | None:
        """Take the role if no live session holds it: the new epoch, else None."""
        with self._lock:
            if self.epoch is not None:
                return self.epoch
            conn = self._session()
            try:
                row = conn.execute(
                    "SELECT pg_try_advisory_lock(hashtext(%s))", (self._key,)
                ).fetchone()
                if row is None or row[0] is not True:
                    return None
                with conn.transaction():
                    conn.execute(
                        "INSERT INTO sequencer (id, epoch) VALUES (1, 0) ON CONFLICT DO NOTHING"
                    )
                    # Waits for a fenced append of the previous holder in progress (it
                    # share-locks this row), and refuses every one after it.
                    # since_ms: the database's clock, for operators (nothing compares it).
                    got = conn.execute(
                        "UPDATE sequencer SET epoch = epoch + 1, address = NULL, since_ms ="
                        " (extract(epoch FROM clock_timestamp()) * 1000)::bigint"
                        " WHERE id = 1 RETURNING epoch"
                    ).fetchone()
            except psycopg.Error as exc:
                self._drop()
                raise storage_error(exc, self.where) from None
            assert got is not None
            self.epoch = int(got[0])
            return self.epoch

    def publish(self, address: str) -> None:
        """Publish where this holder's link listens; :class:`Deposed` if it is no longer the holder."""
        with self._lock:
            if self.epoch is None:
                raise Deposed(f"{self.where}: this process does not hold the sequencer lease")
            conn = self._session()
            try:
                done = conn.execute(
                    "UPDATE sequencer SET address = %s WHERE id = 1 AND epoch = %s",
                    (address, self.epoch),
                ).rowcount
            except psycopg.Error as exc:
                self._drop()
                raise storage_error(exc, self.where) from None
            if done != 1:
                raise Deposed(f"{self.where}: the sequencer lease was taken over")

    def check(self) -> None:
        """Raise :class:`Deposed` unless this process still holds the lease.

        If the lease's session ended (PostgreSQL restarted, the connection broke),
        the lock is taken again on a new session — but kept only if the epoch is
        still this process's: every takeover increments it, so an unchanged epoch
        proves nobody else held the role meanwhile. PostgreSQL unreachable:
        :class:`RetryableStorageError` (ask again later).
        """
        with self._lock:
            if self.epoch is None or self._closed:
                raise Deposed(f"{self.where}: this process does not hold the sequencer lease")
            try:
                if self._conn is None or self._conn.closed:
                    self._relock()
                assert self._conn is not None
                row = self._conn.execute("SELECT epoch FROM sequencer WHERE id = 1").fetchone()
            except psycopg.Error as exc:
                self._drop()
                raise RetryableStorageError(
                    f"{self.where}: cannot check the sequencer lease ({reason(exc)})"
                ) from None
            if row is None or int(row[0]) != self.epoch:
                self._drop()  # releases a lock taken again by _relock
                raise Deposed(f"{self.where}: the sequencer lease was taken over")

    def _relock(self) -> None:
        try:
            conn = connect(self.dsn)
        except StorageError as exc:
            raise RetryableStorageError(str(exc)) from None
        try:
            set_session(conn, self.schema)
            row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (self._key,)).fetchone()
        except BaseException:
            conn.close()
            raise
        if row is None or row[0] is not True:
            conn.close()
            raise Deposed(f"{self.where}: another process holds the sequencer lease")
        self._conn = conn

    def active(self) -> ActiveSequencer | None:
        """The lease row now (None before any process took the role)."""
        with self._lock:
            conn = self._session()
            try:
                row = conn.execute("SELECT epoch, address FROM sequencer WHERE id = 1").fetchone()
            except psycopg.Error as exc:
                self._drop()
                raise storage_error(exc, self.where) from None
        if row is None:
            return None
        return ActiveSequencer(epoch=int(row[0]), address=None if row[1] is None else str(row[1]))

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):  # closing a broken connection
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        """End the session: the role, if held, is free for a standby at once (for good:
        :meth:`check` does not take it again)."""
        with self._lock:
            self._closed = True
            self._drop()
