"""Backup, restore and schema migration of a node's stores, on either backend.

A backup is one gzipped tar file::

    manifest.json                 format, store kinds, institution, chain head, schema versions
    node/<file>                   node.toml, keystore.json (sealed), genesis.json, evidence…
    sqlite/<name>.db              SQLite stores: consistent online copies (SQLite backup API)
    pg/<part>/<table>.copy        PostgreSQL stores: every table of the part's schema as
                                  binary COPY, all read in one REPEATABLE READ snapshot
    blobs/<hh>/<hash>             file blob store

Restoring rebuilds a node in an empty directory (and, for PostgreSQL, in
schemas that must not exist yet) and migrates a backup made at an older
schema version to the current one. The keystore stays sealed throughout.
A backup file is untrusted input: members must be plain relative files, and
the manifest is checked before anything is written.

This module knows stores, not nodes: the caller (``medledger backup`` /
``restore`` / ``migrate``) describes the node's stores as a
:class:`StoreLayout`, supplies the chain head for the manifest, and verifies
the restored chain.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import IO, Any, Final

from medledger.core.errors import Conflict, InvalidInput, NotFound, StorageError
from medledger.storage.factory import node_schema
from medledger.storage.sqlite.connection import sqlite_uri
from medledger.storage.sqlite.schema import CHAIN_SCHEMA_VERSION, RECORDS_SCHEMA_VERSION

__all__ = [
    "FORMAT",
    "SQLITE_STORES",
    "VERSION",
    "BackupArchive",
    "PgPart",
    "StoreLayout",
    "migrate_stores",
    "write_backup",
]

FORMAT: Final = "medledger-backup"
VERSION: Final = 1
#: A SQLite node's store files and their kinds. Backed up in this order while the node
#: may be writing: each copy is taken after the ones that refer to it (anchors and index
#: rows name chain heights that were durable when they were written), so a restored node
#: passes its start-up checks.
SQLITE_STORES: Final = {"consortium.db": "chain", "records.db": "records", "chain.db": "chain"}
#: PostgreSQL stores a node may not have yet: the consortium copy (before joining),
#: tokens and nonces (a node created before they moved to PostgreSQL: its first start
#: creates them), the sign-in (OAuth) store (created on the first start that serves it).
_OPTIONAL_PARTS: Final = frozenset({"consortium", "tokens", "nonces", "oauth"})
_SQLITE_LATEST: Final = {"chain": CHAIN_SCHEMA_VERSION, "records": RECORDS_SCHEMA_VERSION}


@dataclass(frozen=True, slots=True)
class PgPart:
    """One PostgreSQL store of a node: ``name`` (chain, records, consortium, blobs) of ``kind``."""

    name: str
    kind: str
    schema: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreLayout:
    """Where one node's stores live: its directory, the backends chosen, the DSN."""

    root: Path
    institution: str
    store: str
    blobs: str
    dsn: str = ""

    @property
    def blob_dir(self) -> Path:
        return self.root / "blobs"

    def pg_parts(self) -> list[PgPart]:
        """The node's PostgreSQL stores (none for a SQLite node with file blobs)."""
        parts = []
        if self.store == "postgres":
            parts += [
                PgPart("chain", "chain", node_schema(self.institution, "chain")),
                PgPart("records", "records", node_schema(self.institution, "records")),
                PgPart("consortium", "chain", node_schema(self.institution, "consortium")),
                PgPart("tokens", "tokens", node_schema(self.institution, "tokens")),
                PgPart("nonces", "nonces", node_schema(self.institution, "nonces")),
                PgPart("oauth", "oauth", node_schema(self.institution, "oauth")),
            ]
        if self.blobs == "postgres":
            parts.append(PgPart("blobs", "blobs", node_schema(self.institution, "blobs")))
        return parts


def _sqlite_version(path: Path) -> int:
    try:
        conn = sqlite3.connect(sqlite_uri(path, "ro"), uri=True)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        finally:
            conn.close()
        return int(row[0])
    except (sqlite3.Error, TypeError, ValueError) as exc:
        raise StorageError(f"{path} is not a readable medledger database ({exc})") from None


# -- migrate --------------------------------------------------------------------------


def migrate_stores(layout: StoreLayout) -> list[str]:
    """Apply pending schema migrations to every store; one report line per store.

    A store newer than this code knows raises :class:`StorageError` and changes nothing.
    """
    lines = []
    if layout.store == "sqlite":
        for name, kind in SQLITE_STORES.items():
            path = layout.root / name
            if not path.exists():
                continue
            version = _sqlite_version(path)
            latest = _SQLITE_LATEST[kind]
            if version > latest:
                raise StorageError(
                    f"{path}: schema version {version} is newer than this medledger supports"
                    f" ({latest}); upgrade medledger"
                )
            if version < latest:
                raise StorageError(f"{path}: no migration from schema version {version}")
            lines.append(f"{name}: SQLite schema version {version} (current)")
    parts = layout.pg_parts()
    if parts:
        from medledger.storage.postgres.connection import connect, describe_dsn
        from medledger.storage.postgres.migrations import migrate, schema_version

        with connect(layout.dsn) as conn:
            for part in parts:
                if part.name in _OPTIONAL_PARTS and schema_version(conn, part.schema) is None:
                    continue
                before, after = migrate(conn, part.schema, part.kind, create=False)
                change = f"{before} -> {after}" if before != after else f"{after} (current)"
                lines.append(
                    f"{part.name}: PostgreSQL {describe_dsn(layout.dsn)}"
                    f" schema {part.schema} version {change}"
                )
    return lines


# -- backup ---------------------------------------------------------------------------


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


def _add_stream(tar: tarfile.TarFile, name: str, f: IO[bytes], mtime: int) -> None:
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o600
    tar.addfile(info, f)


def _node_files(root: Path) -> Iterator[Path]:
    """The node directory's own files: everything but stores, their journals and blobs."""
    for path in sorted(root.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if any(path.name.startswith(db) for db in SQLITE_STORES):
            continue
        yield path


def _backup_sqlite(tar: tarfile.TarFile, root: Path) -> dict[str, int]:
    versions = {}
    for name in SQLITE_STORES:
        path = root / name
        if not path.exists():
            continue
        versions[name] = _sqlite_version(path)
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / name
            try:
                src = sqlite3.connect(sqlite_uri(path, "ro"), uri=True)
                dst = sqlite3.connect(copy)
                try:
                    src.backup(dst)
                finally:
                    dst.close()
                    src.close()
            except sqlite3.Error as exc:
                raise StorageError(f"cannot back up {path}: {exc}") from None
            tar.add(copy, arcname=f"sqlite/{name}", recursive=False)
    return versions


def _backup_postgres(tar: tarfile.TarFile, layout: StoreLayout, mtime: int) -> dict[str, int]:
    import psycopg
    from psycopg import sql

    from medledger.storage.postgres.connection import connect, describe_dsn
    from medledger.storage.postgres.migrations import schema_version

    versions: dict[str, int] = {}
    dsn = layout.dsn
    with connect(dsn) as conn:
        try:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                for part in layout.pg_parts():
                    version = schema_version(conn, part.schema)
                    if version is None:
                        if part.name in _OPTIONAL_PARTS:
                            continue
                        raise NotFound(
                            f"PostgreSQL {describe_dsn(dsn)} has no schema {part.schema}"
                        )
                    versions[part.name] = version
                    tables = conn.execute(
                        "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY tablename",
                        (part.schema,),
                    ).fetchall()
                    for (table,) in tables:
                        with tempfile.TemporaryFile() as f:
                            query = sql.SQL("COPY {} TO STDOUT (FORMAT BINARY)").format(
                                sql.Identifier(part.schema, table)
                            )
                            with conn.cursor().copy(query) as copy:
                                for chunk in copy:
                                    f.write(chunk)
                            _add_stream(tar, f"pg/{part.name}/{table}.copy", f, mtime)
        except psycopg.Error as exc:
            raise StorageError(f"backup of PostgreSQL {describe_dsn(dsn)} failed: {exc}") from None
    return versions


def write_backup(
    layout: StoreLayout, out: Path, *, created_ms: int, fields: dict[str, Any]
) -> dict[str, Any]:
    """Write a consistent backup of every store of ``layout`` to ``out``; return its manifest.

    ``out`` must not exist; it appears only once complete (written beside it,
    then renamed). ``fields`` (institution, chain head, …) go into the manifest.
    """
    if out.exists():
        raise Conflict(f"{out} already exists")
    mtime = created_ms // 1000
    tmp = out.with_name(f".{out.name}.partial")
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for path in _node_files(layout.root):
                tar.add(path, arcname=f"node/{path.name}", recursive=False)
            versions = _backup_sqlite(tar, layout.root) if layout.store == "sqlite" else {}
            if layout.pg_parts():
                versions.update(_backup_postgres(tar, layout, mtime))
            if layout.blobs == "file" and layout.blob_dir.is_dir():
                tar.add(layout.blob_dir, arcname="blobs")
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "created_ms": created_ms,
                **fields,
                "store": layout.store,
                "blobs": layout.blobs,
                "schema_versions": versions,
            }
            _add_bytes(tar, "manifest.json", json.dumps(manifest, indent=2).encode(), mtime)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return manifest


# -- restore --------------------------------------------------------------------------


def _write(target: Path, data: IO[bytes], mode: int = 0o600) -> None:
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        while chunk := data.read(1 << 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


class BackupArchive:
    """A backup file opened for restoring; its members and manifest checked on open."""

    def __init__(self, source: Path) -> None:
        self.source = source
        try:
            self._tar = tarfile.open(source, "r:gz")  # noqa: SIM115 - closed by close()
        except (tarfile.TarError, OSError) as exc:
            raise InvalidInput(f"{source} is not a medledger backup ({exc})") from None
        try:
            self._members = self._checked_members()
            self.manifest = self._checked_manifest()
        except BaseException:
            self._tar.close()
            raise

    def __enter__(self) -> BackupArchive:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._tar.close()

    def _checked_members(self) -> dict[str, tarfile.TarInfo]:
        """Regular-file members by name; refuses names that could escape the target."""
        out = {}
        try:
            members = self._tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise InvalidInput(f"{self.source} is not a readable backup ({exc})") from None
        for info in members:
            if info.isdir():
                continue
            name = PurePosixPath(info.name)
            if not info.isfile() or name.is_absolute() or ".." in name.parts:
                raise InvalidInput(f"backup member {info.name!r} is not a plain relative file")
            out[str(name)] = info
        return out

    def _checked_manifest(self) -> dict[str, Any]:
        try:
            manifest = json.load(self._read(self._members["manifest.json"]))
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                raise InvalidInput(f"{self.source} is not a medledger backup")
            if manifest.get("version") != VERSION:
                raise InvalidInput(
                    f"{self.source}: backup format version {manifest.get('version')}"
                )
            manifest["schema_versions"] = {
                str(k): int(v) for k, v in manifest["schema_versions"].items()
            }
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise InvalidInput(f"{self.source}: unreadable backup manifest ({exc})") from None
        return manifest

    @property
    def schema_versions(self) -> dict[str, int]:
        versions: dict[str, int] = self.manifest["schema_versions"]
        return versions

    def _read(self, info: tarfile.TarInfo) -> IO[bytes]:
        f = self._tar.extractfile(info)
        if f is None:
            raise InvalidInput(f"backup member {info.name!r} cannot be read")
        return f

    def extract_node_files(self, root: Path) -> None:
        """Write the node's own files (config, sealed keystore, genesis…) into ``root``."""
        for name, info in self._members.items():
            if name.startswith("node/"):
                _write(root / name.removeprefix("node/"), self._read(info))

    def restore_stores(self, layout: StoreLayout) -> None:
        """Rebuild every store of ``layout`` from the backup (SQLite files, blobs, PostgreSQL)."""
        for name, info in self._members.items():
            if name.startswith("sqlite/"):
                _write(layout.root / name.removeprefix("sqlite/"), self._read(info))
            elif name.startswith("blobs/"):
                _write(layout.root / name, self._read(info))
        if layout.blobs == "file":
            layout.blob_dir.mkdir(mode=0o700, exist_ok=True)
        self._restore_postgres(layout)

    def _restore_postgres(self, layout: StoreLayout) -> None:
        import psycopg
        from psycopg import sql

        from medledger.storage.postgres.connection import connect, describe_dsn
        from medledger.storage.postgres.migrations import migrate, schema_version

        versions = self.schema_versions
        dsn = layout.dsn
        parts = [p for p in layout.pg_parts() if p.name in versions]
        if not parts:
            return
        with connect(dsn) as conn:
            taken = [p.schema for p in parts if schema_version(conn, p.schema) is not None]
            if taken:
                raise Conflict(
                    f"PostgreSQL {describe_dsn(dsn)} already holds schema(s) {', '.join(taken)};"
                    " restore into another database or drop them first"
                )
            for part in parts:
                where = f"PostgreSQL {describe_dsn(dsn)} schema {part.schema}"
                migrate(
                    conn, part.schema, part.kind, create=True, where=where, upto=versions[part.name]
                )
                prefix = f"pg/{part.name}/"
                try:
                    with conn.transaction():
                        for table in ("meta", "schema_migrations"):
                            conn.execute(
                                sql.SQL("DELETE FROM {}").format(sql.Identifier(part.schema, table))
                            )
                        for name, info in sorted(self._members.items()):
                            if not name.startswith(prefix):
                                continue
                            table = name[len(prefix) :].removesuffix(".copy")
                            query = sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(
                                sql.Identifier(part.schema, table)
                            )
                            src = self._read(info)
                            with conn.cursor().copy(query) as copy:
                                while chunk := src.read(1 << 20):
                                    copy.write(chunk)
                except psycopg.Error as exc:
                    raise StorageError(f"{where}: restore failed: {exc}") from None
                # A backup made at an older schema version is brought up to date.
                migrate(conn, part.schema, part.kind, create=False, where=where)
