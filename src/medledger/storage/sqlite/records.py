"""SQLite adapter of :class:`~medledger.storage.ports.RecordIndex`: versions, wrapped data keys, tokens.

Holds no plaintext: per version the blob hash, the data key wrapped by the
institution KEK (``NULL`` once crypto-shredded), the patient pseudonym, the
chain transaction hash, and the HMAC tokens search uses. Writes are group
committed (``synchronous=FULL``): a ``put_version`` that returned is durable.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from medledger.core.errors import Conflict, NotFound, StorageError
from medledger.storage.batching import GroupCommitter
from medledger.storage.ports import RECOVERY_MARK, VersionRow
from medledger.storage.sqlite.connection import immediate, sqlite_uri, storage_error
from medledger.storage.sqlite.schema import (
    RECORDS_CHAIN_BASE,
    RECORDS_SCHEMA,
    RECORDS_SCHEMA_VERSION,
)

__all__ = ["SqliteRecordIndex"]

_COLS = (
    "rtype, rid, version, blob_hash, wrapped_dek, kek_id, patient, updated_ms, tx_hash, erased,"
    " chain_base"
)


def _row(r: Sequence[Any]) -> VersionRow:
    return VersionRow(
        resource_type=r[0],
        id=r[1],
        version=r[2],
        blob_hash=bytes(r[3]),
        wrapped_dek=None if r[4] is None else bytes(r[4]),
        kek_id=r[5],
        patient=r[6],
        updated_ms=r[7],
        tx_hash=bytes(r[8]),
        erased=bool(r[9]),
        chain_base=None if r[10] is None else int(r[10]),
    )


class SqliteRecordIndex:
    """:class:`~medledger.storage.ports.RecordIndex` in one SQLite file (WAL, ``synchronous=FULL``)."""

    @classmethod
    def initialize(cls, path: Path) -> None:
        """Create an empty index at ``path`` (synchronously, for node creation)."""
        try:
            conn = sqlite3.connect(path, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript("BEGIN;" + RECORDS_SCHEMA + RECORDS_CHAIN_BASE + "COMMIT;")
                conn.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?)", (str(RECORDS_SCHEMA_VERSION),)
                )
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot create record index {path} ({exc})") from None

    def __init__(self, path: Path) -> None:
        self.path = path
        new = not path.exists()
        try:
            self._writer = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=30
            )
            self._writer.execute("PRAGMA journal_mode=WAL")
            self._writer.execute("PRAGMA synchronous=FULL")
            # Erased keys and tokens are overwritten, not left in free pages.
            self._writer.execute("PRAGMA secure_delete=ON")
            if new:
                self._writer.executescript(
                    "BEGIN;" + RECORDS_SCHEMA + RECORDS_CHAIN_BASE + "COMMIT;"
                )
                self._writer.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?)", (str(RECORDS_SCHEMA_VERSION),)
                )
            version = self._writer.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'"
            ).fetchone()
            if version is not None and version[0] == str(RECORDS_SCHEMA_VERSION):
                columns = {r[1] for r in self._writer.execute("PRAGMA table_info(versions)")}
                if "chain_base" not in columns:
                    self._writer.executescript("BEGIN;" + RECORDS_CHAIN_BASE + "COMMIT;")
        except sqlite3.Error as exc:
            raise StorageError(f"{path} is not a readable record index ({exc})") from None
        if version is None or version[0] != str(RECORDS_SCHEMA_VERSION):
            raise StorageError(f"{path}: unsupported record index schema")
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._writes: GroupCommitter[tuple[str, Any]] = GroupCommitter(
            self._apply, name="medledger-index"
        )

    # -- writes (one transaction per batch) ------------------------------------

    def _apply(self, ops: Sequence[tuple[str, Any]]) -> list[BaseException | None]:
        conn = self._writer
        results: list[BaseException | None] = []
        try:
            with immediate(conn):
                for kind, arg in ops:
                    try:
                        results.append(self._one(conn, kind, arg))
                    except sqlite3.IntegrityError:
                        results.append(
                            Conflict(
                                f"{arg[0].resource_type}/{arg[0].id} version "
                                f"{arg[0].version} already exists"
                            )
                        )
        except sqlite3.Error as exc:
            err = storage_error(self.path, exc)
            return [err] * len(ops)
        return results

    @staticmethod
    def _one(conn: sqlite3.Connection, kind: str, arg: Any) -> None:
        if kind == "put":
            row, tokens = arg
            conn.execute(
                f"INSERT INTO versions ({_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", row.values()
            )
            conn.execute(
                "DELETE FROM tokens WHERE rtype = ? AND rid = ?", (row.resource_type, row.id)
            )
            conn.executemany(
                "INSERT INTO tokens VALUES (?, ?, ?)",
                [(t, row.resource_type, row.id) for t in tokens],
            )
        elif kind == "remove":
            conn.execute("DELETE FROM versions WHERE rtype = ? AND rid = ? AND version = ?", arg)
        elif kind == "tokens":
            rtype, rid, tokens = arg
            conn.execute("DELETE FROM tokens WHERE rtype = ? AND rid = ?", (rtype, rid))
            conn.executemany(
                "INSERT INTO tokens VALUES (?, ?, ?)", [(t, rtype, rid) for t in tokens]
            )
        elif kind == "mark":
            conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (RECOVERY_MARK, str(arg))
            )
        else:
            raise StorageError(f"unknown index operation {kind}")

    async def put_version(self, row: VersionRow, tokens: set[bytes]) -> None:
        """Add a version and make ``tokens`` the resource's search tokens; ``Conflict`` if taken."""
        await self._writes.submit(("put", (row, tokens)))

    async def remove_version(self, resource_type: str, rid: str, version: int) -> None:
        """Undo a ``put_version`` whose chain commit failed."""
        await self._writes.submit(("remove", (resource_type, rid, version)))

    async def set_tokens(self, resource_type: str, rid: str, tokens: set[bytes]) -> None:
        """Make ``tokens`` the resource's search tokens (e.g. after undoing a failed write)."""
        await self._writes.submit(("tokens", (resource_type, rid, tokens)))

    async def set_recovery_mark(self, height: int) -> None:
        """Record that every version with ``chain_base < height`` is settled (durably)."""
        await self._writes.submit(("mark", height))

    async def erase(self, resource_type: str, rid: str) -> list[bytes]:
        """Destroy every wrapped data key and token of a resource; return its blob hashes."""

        def run() -> list[bytes]:
            conn = self._writer
            with immediate(conn):
                rows = conn.execute(
                    "SELECT blob_hash FROM versions WHERE rtype = ? AND rid = ?",
                    (resource_type, rid),
                ).fetchall()
                if not rows:
                    raise NotFound(f"{resource_type}/{rid} does not exist")
                conn.execute(
                    "UPDATE versions SET wrapped_dek = NULL, kek_id = NULL, erased = 1"
                    " WHERE rtype = ? AND rid = ?",
                    (resource_type, rid),
                )
                conn.execute("DELETE FROM tokens WHERE rtype = ? AND rid = ?", (resource_type, rid))
            # Overwritten pages of the old keys must not linger in the WAL or free pages.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return [bytes(r[0]) for r in rows]

        result: list[bytes] = await self._exclusive(run)
        return result

    async def rewrap(
        self, old_kek_id: str, new_kek_id: str, fn: Callable[[VersionRow], bytes]
    ) -> int:
        """Re-wrap every data key wrapped by ``old_kek_id`` (``fn`` gives the new wrapping)."""

        def run() -> int:
            conn = self._writer
            done = 0
            while True:
                rows = [
                    _row(r)
                    for r in conn.execute(
                        f"SELECT {_COLS} FROM versions WHERE kek_id = ? LIMIT 2000", (old_kek_id,)
                    )
                ]
                if not rows:
                    break
                updates = [(fn(r), new_kek_id, r.resource_type, r.id, r.version) for r in rows]
                with immediate(conn):
                    conn.executemany(
                        "UPDATE versions SET wrapped_dek = ?, kek_id = ? WHERE rtype = ?"
                        " AND rid = ? AND version = ? AND kek_id IS NOT NULL",
                        updates,
                    )
                done += len(rows)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return done

        count: int = await self._exclusive(run)
        return count

    async def _exclusive(self, fn: Callable[[], Any]) -> Any:
        try:
            return await self._writes.run_exclusive(fn)
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: {exc}") from None

    # -- reads -------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                sqlite_uri(self.path, "ro"),
                uri=True,
                isolation_level=None,
                check_same_thread=False,
                timeout=30,
            )
            self._local.conn = conn
            with self._lock:
                self._readers.append(conn)
        return conn

    def _rows(self, sql: str, args: Sequence[Any]) -> list[Any]:
        try:
            return self._reader().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: {exc}") from None

    def latest(self, resource_type: str, rid: str) -> VersionRow | None:
        rows = self._rows(
            f"SELECT {_COLS} FROM versions WHERE rtype = ? AND rid = ?"
            " ORDER BY version DESC LIMIT 1",
            (resource_type, rid),
        )
        return _row(rows[0]) if rows else None

    def get_version(self, resource_type: str, rid: str, version: int) -> VersionRow | None:
        rows = self._rows(
            f"SELECT {_COLS} FROM versions WHERE rtype = ? AND rid = ? AND version = ?",
            (resource_type, rid, version),
        )
        return _row(rows[0]) if rows else None

    def history(self, resource_type: str, rid: str) -> list[VersionRow]:
        return [
            _row(r)
            for r in self._rows(
                f"SELECT {_COLS} FROM versions WHERE rtype = ? AND rid = ? ORDER BY version DESC",
                (resource_type, rid),
            )
        ]

    def type_history(self, resource_type: str, limit: int) -> list[VersionRow]:
        return [
            _row(r)
            for r in self._rows(
                f"SELECT {_COLS} FROM versions WHERE rtype = ? ORDER BY updated_ms DESC LIMIT ?",
                (resource_type, limit),
            )
        ]

    def versions_since(self, updated_ms: int) -> list[VersionRow]:
        """Every version written at or after ``updated_ms``, newest first (crash recovery)."""
        return [
            _row(r)
            for r in self._rows(
                f"SELECT {_COLS} FROM versions WHERE updated_ms >= ? ORDER BY updated_ms DESC",
                (updated_ms,),
            )
        ]

    def unsettled(self, from_base: int) -> list[VersionRow]:
        """Versions indexed on chain height ``from_base`` or later, oldest first (crash recovery)."""
        return [
            _row(r)
            for r in self._rows(
                f"SELECT {_COLS} FROM versions WHERE chain_base >= ?"
                " ORDER BY chain_base, rtype, rid, version",
                (from_base,),
            )
        ]

    def max_chain_base(self) -> int | None:
        """The highest chain height any version was indexed on (the chain held it durably)."""
        value = self._rows("SELECT MAX(chain_base) FROM versions", ())[0][0]
        return None if value is None else int(value)

    def recovery_mark(self) -> int:
        """Chain height from which versions may still be unsettled (0 if never recorded)."""
        rows = self._rows("SELECT value FROM meta WHERE key = ?", (RECOVERY_MARK,))
        return int(rows[0][0]) if rows else 0

    def iter_versions(self) -> Iterator[VersionRow]:
        """Every version row in key order, read in pages (store checks and sweeps)."""
        after: tuple[str, str, int] = ("", "", -1)
        while True:
            rows = self._rows(
                f"SELECT {_COLS} FROM versions WHERE (rtype, rid, version) > (?, ?, ?)"
                " ORDER BY rtype, rid, version LIMIT 1000",
                after,
            )
            if not rows:
                return
            for r in rows:
                yield _row(r)
            after = (rows[-1][0], rows[-1][1], rows[-1][2])

    def search(self, resource_type: str, groups: list[set[bytes]]) -> list[str]:
        """Ids whose tokens match at least one token of every group.

        The most selective group is resolved first; the others only check its
        candidates, so a common code does not drag in every record it matches.
        """
        if not groups:
            return []
        counted = sorted(groups, key=lambda g: self._count(resource_type, g))
        found = self._ids(resource_type, counted[0], None)
        for group in counted[1:]:
            if not found:
                return []
            found &= self._ids(resource_type, group, found)
        return sorted(found)

    def _count(self, resource_type: str, group: set[bytes]) -> int:
        tokens = list(group)
        total = 0
        for start in range(0, len(tokens), 500):
            chunk = tokens[start : start + 500]
            marks = ",".join("?" * len(chunk))
            row = self._rows(
                f"SELECT COUNT(*) FROM tokens WHERE rtype = ? AND token IN ({marks})",
                (resource_type, *chunk),
            )[0]
            total += int(row[0])
        return total

    def _ids(self, resource_type: str, group: set[bytes], among: set[str] | None) -> set[str]:
        tokens = list(group)
        ids: set[str] = set()
        for start in range(0, len(tokens), 400):
            chunk = tokens[start : start + 400]
            marks = ",".join("?" * len(chunk))
            if among is None:
                rows = self._rows(
                    f"SELECT rid FROM tokens WHERE rtype = ? AND token IN ({marks})",
                    (resource_type, *chunk),
                )
                ids.update(r[0] for r in rows)
                continue
            candidates = sorted(among)
            for c in range(0, len(candidates), 400):
                cand = candidates[c : c + 400]
                rows = self._rows(
                    f"SELECT rid FROM tokens WHERE rtype = ? AND token IN ({marks})"
                    f" AND rid IN ({','.join('?' * len(cand))})",
                    (resource_type, *chunk, *cand),
                )
                ids.update(r[0] for r in rows)
        return ids

    def records_of_patient(self, pseudonym: str) -> list[tuple[str, str]]:
        return [
            (r[0], r[1])
            for r in self._rows(
                "SELECT DISTINCT rtype, rid FROM versions WHERE patient = ?", (pseudonym,)
            )
        ]

    def count_wrapped_by(self, kek_id: str) -> int:
        return int(self._rows("SELECT COUNT(*) FROM versions WHERE kek_id = ?", (kek_id,))[0][0])

    async def close(self) -> None:
        await self._writes.close()
        with self._lock:
            for conn in self._readers:
                conn.close()
        self._writer.close()
