"""``medledger migrate``, ``backup`` and ``restore``: operating a node's storage, either store.

A backup is one gzipped tar file::

    manifest.json                 format, store kinds, institution, chain head, schema versions
    node/<file>                   node.toml, keystore.json (sealed), genesis.json, evidence…
    sqlite/<name>.db              SQLite stores: consistent online copies (SQLite backup API)
    pg/<part>/<table>.copy        PostgreSQL stores: every table of the part's schema as
                                  binary COPY, all read in one REPEATABLE READ snapshot
    blobs/<hh>/<hash>             file blob store

``restore`` rebuilds a node in an empty directory (and, for PostgreSQL, in
schemas that must not exist yet), migrates a backup made at an older schema
version to the current one, then verifies the restored chain. The keystore
stays sealed throughout: no passphrase is needed to back up or restore.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sqlite3
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import click

from medledger.cli.common import dir_option
from medledger.config import NodeConfig, NodePaths, StorageConfig, load_config
from medledger.core.errors import Conflict, InvalidInput, NotFound, StorageError
from medledger.ledger.clock import SystemClock
from medledger.ledger.proofs import head_header
from medledger.ledger.verify import verify_chain
from medledger.storage import factory
from medledger.storage.ports import ChainStore
from medledger.storage.sqlite.connection import sqlite_uri
from medledger.storage.sqlite.schema import CHAIN_SCHEMA_VERSION, RECORDS_SCHEMA_VERSION

__all__ = ["backup", "migrate", "restore"]

FORMAT = "medledger-backup"
VERSION = 1
# Backed up in this order while the node may be writing: each copy is taken after the
# ones that refer to it (anchors and index rows name chain heights that were durable
# when they were written), so a restored node passes its start-up checks.
_SQLITE_FILES = {"consortium.db": "chain", "records.db": "records", "chain.db": "chain"}


@dataclass(frozen=True, slots=True)
class _Part:
    """One store of a node: ``name`` (chain, records, consortium, blobs) of ``kind``."""

    name: str
    kind: str
    schema: str


def _pg_parts(config: NodeConfig) -> list[_Part]:
    parts = []
    if config.storage.store == "postgres":
        parts += [
            _Part("chain", "chain", factory.node_schema(config.institution, "chain")),
            _Part("records", "records", factory.node_schema(config.institution, "records")),
            _Part("consortium", "chain", factory.node_schema(config.institution, "consortium")),
        ]
    if config.storage.blobs == "postgres":
        parts.append(_Part("blobs", "blobs", factory.node_schema(config.institution, "blobs")))
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


@click.command()
@dir_option
def migrate(root: Path) -> None:
    """Apply pending schema migrations to every store of the node; report their versions."""
    config = load_config(root)
    paths = NodePaths(root=root)
    if config.storage.store == "sqlite":
        latest = {"chain": CHAIN_SCHEMA_VERSION, "records": RECORDS_SCHEMA_VERSION}
        for name, kind in _SQLITE_FILES.items():
            path = paths.root / name
            if not path.exists():
                continue
            version = _sqlite_version(path)
            if version > latest[kind]:
                raise StorageError(
                    f"{path}: schema version {version} is newer than this medledger supports"
                    f" ({latest[kind]}); upgrade medledger"
                )
            if version < latest[kind]:
                raise StorageError(f"{path}: no migration from schema version {version}")
            click.echo(f"{name}: SQLite schema version {version} (current)")
    from medledger.storage.postgres.connection import connect, describe_dsn
    from medledger.storage.postgres.migrations import migrate as pg_migrate
    from medledger.storage.postgres.migrations import schema_version

    parts = _pg_parts(config)
    if parts:
        with connect(config.storage.dsn) as conn:
            for part in parts:
                if part.name == "consortium" and schema_version(conn, part.schema) is None:
                    continue
                before, after = pg_migrate(conn, part.schema, part.kind, create=False)
                change = f"{before} -> {after}" if before != after else f"{after} (current)"
                click.echo(
                    f"{part.name}: PostgreSQL {describe_dsn(config.storage.dsn)}"
                    f" schema {part.schema} version {change}"
                )
    click.echo("all stores are at the current schema version")


# -- backup ---------------------------------------------------------------------------


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = SystemClock().now_ms() // 1000
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


def _add_stream(tar: tarfile.TarFile, name: str, f: IO[bytes]) -> None:
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = SystemClock().now_ms() // 1000
    info.mode = 0o600
    tar.addfile(info, f)


def _node_files(root: Path) -> Iterator[Path]:
    """The node directory's own files: everything but stores, their journals and blobs."""
    for path in sorted(root.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if any(path.name.startswith(db) for db in _SQLITE_FILES):
            continue
        yield path


def _backup_sqlite(tar: tarfile.TarFile, root: Path) -> dict[str, int]:
    versions = {}
    for name in _SQLITE_FILES:
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


def _backup_postgres(tar: tarfile.TarFile, config: NodeConfig) -> dict[str, int]:
    import psycopg
    from psycopg import sql

    from medledger.storage.postgres.connection import connect, describe_dsn
    from medledger.storage.postgres.migrations import schema_version

    versions: dict[str, int] = {}
    dsn = config.storage.dsn
    with connect(dsn) as conn:
        try:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                for part in _pg_parts(config):
                    version = schema_version(conn, part.schema)
                    if version is None:
                        if part.name == "consortium":
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
                            _add_stream(tar, f"pg/{part.name}/{table}.copy", f)
        except psycopg.Error as exc:
            raise StorageError(f"backup of PostgreSQL {describe_dsn(dsn)} failed: {exc}") from None
    return versions


@click.command()
@dir_option
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Backup file to write (a .tar.gz); must not exist.",
)
def backup(root: Path, out: Path) -> None:
    """Write a consistent backup of the node (keys stay sealed) to OUT; the node may be running."""
    config = load_config(root)
    if out.exists():
        raise Conflict(f"{out} already exists")
    store = _chain_store(root, config)
    try:
        head = head_header(store)
    finally:
        store.close()
    tmp = out.with_name(f".{out.name}.partial")
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for path in _node_files(root):
                tar.add(path, arcname=f"node/{path.name}", recursive=False)
            versions = _backup_sqlite(tar, root) if config.storage.store == "sqlite" else {}
            if _pg_parts(config):
                versions.update(_backup_postgres(tar, config))
            if config.storage.blobs == "file":
                blobs = NodePaths(root=root).blobs
                if blobs.is_dir():
                    tar.add(blobs, arcname="blobs")
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "created_ms": SystemClock().now_ms(),
                "institution": config.institution,
                "chain": config.chain,
                "store": config.storage.store,
                "blobs": config.storage.blobs,
                "schema_versions": versions,
                "head": {
                    "height": head.height,
                    "log_size": head.log_size,
                    "log_root": head.log_root.hex(),
                },
            }
            _add_bytes(tar, "manifest.json", json.dumps(manifest, indent=2).encode())
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    click.echo(
        f"backed up {config.institution} ({config.storage.store}): chain height {head.height},"
        f" {head.log_size} transactions, log root {head.log_root.hex()[:16]}… -> {out}"
    )


def _chain_store(root: Path, config: NodeConfig) -> ChainStore:
    """The node's private chain store, opened with ``config`` as given (not re-read)."""
    if config.storage.store == "sqlite":
        return factory.open_chain_store("sqlite", NodePaths(root=root).chain_db, config.chain)
    return factory.open_chain_store(
        "postgres",
        config.storage.dsn,
        config.chain,
        schema=factory.node_schema(config.institution, "chain"),
    )


# -- restore --------------------------------------------------------------------------


def _members(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """Regular-file members by name; refuses names that could escape the target."""
    out = {}
    for info in tar.getmembers():
        if info.isdir():
            continue
        name = PurePosixPath(info.name)
        if not info.isfile() or name.is_absolute() or ".." in name.parts:
            raise InvalidInput(f"backup member {info.name!r} is not a plain relative file")
        out[str(name)] = info
    return out


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo) -> IO[bytes]:
    f = tar.extractfile(info)
    if f is None:
        raise InvalidInput(f"backup member {info.name!r} cannot be read")
    return f


def _write(target: Path, data: IO[bytes], mode: int = 0o600) -> None:
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        while chunk := data.read(1 << 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _restore_postgres(
    tar: tarfile.TarFile,
    members: dict[str, tarfile.TarInfo],
    config: NodeConfig,
    versions: dict[str, int],
) -> None:
    import psycopg
    from psycopg import sql

    from medledger.storage.postgres.connection import connect, describe_dsn
    from medledger.storage.postgres.migrations import migrate as pg_migrate
    from medledger.storage.postgres.migrations import schema_version

    dsn = config.storage.dsn
    parts = [p for p in _pg_parts(config) if p.name in versions]
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
            pg_migrate(
                conn, part.schema, part.kind, create=True, where=where, upto=versions[part.name]
            )
            prefix = f"pg/{part.name}/"
            try:
                with conn.transaction():
                    for table in ("meta", "schema_migrations"):
                        conn.execute(
                            sql.SQL("DELETE FROM {}").format(sql.Identifier(part.schema, table))
                        )
                    for name, info in sorted(members.items()):
                        if not name.startswith(prefix):
                            continue
                        table = name[len(prefix) :].removesuffix(".copy")
                        query = sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(
                            sql.Identifier(part.schema, table)
                        )
                        src = _read(tar, info)
                        with conn.cursor().copy(query) as copy:
                            while chunk := src.read(1 << 20):
                                copy.write(chunk)
            except psycopg.Error as exc:
                raise StorageError(f"{where}: restore failed: {exc}") from None
            # A backup made at an older schema version is brought up to date.
            pg_migrate(conn, part.schema, part.kind, create=False, where=where)


@click.command()
@dir_option
@click.option(
    "--from",
    "source",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Backup file written by 'medledger backup'.",
)
@click.option(
    "--dsn",
    default=None,
    help="PostgreSQL DSN to restore into (default: MEDLEDGER_DSN, else the backed-up node's).",
)
@click.option("--no-verify", is_flag=True, help="Skip verifying the restored chain.")
def restore(root: Path, source: Path, dsn: str | None, no_verify: bool) -> None:
    """Rebuild a node in DIR (absent or empty) from a backup, then verify its chain."""
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise Conflict(f"{root} exists and is not an empty directory")
    try:
        tar = tarfile.open(source, "r:gz")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError) as exc:
        raise InvalidInput(f"{source} is not a medledger backup ({exc})") from None
    created = not root.exists()
    with tar:
        members = _members(tar)
        try:
            manifest = json.load(_read(tar, members["manifest.json"]))
            if manifest.get("format") != FORMAT:
                raise InvalidInput(f"{source} is not a medledger backup")
            if manifest.get("version") != VERSION:
                raise InvalidInput(f"{source}: backup format version {manifest.get('version')}")
            versions = {str(k): int(v) for k, v in manifest["schema_versions"].items()}
        except (KeyError, ValueError, TypeError) as exc:
            raise InvalidInput(f"{source}: unreadable backup manifest ({exc})") from None
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for name, info in members.items():
                if name.startswith("node/"):
                    _write(root / name.removeprefix("node/"), _read(tar, info))
            config = load_config(root)
            env_dsn = dsn or os.environ.get("MEDLEDGER_DSN")
            if env_dsn and "postgres" in (config.storage.store, config.storage.blobs):
                storage = StorageConfig(
                    store=config.storage.store, dsn=env_dsn, blobs=config.storage.blobs
                )
                config = dataclasses.replace(config, storage=storage)
                config.save(NodePaths(root=root).config)
            for name, info in members.items():
                if name.startswith("sqlite/"):
                    _write(root / name.removeprefix("sqlite/"), _read(tar, info))
                elif name.startswith("blobs/"):
                    _write(root / name, _read(tar, info))
            if config.storage.blobs == "file":
                NodePaths(root=root).blobs.mkdir(mode=0o700, exist_ok=True)
            _restore_postgres(tar, members, config, versions)
        except BaseException:
            if created:
                import shutil

                shutil.rmtree(root, ignore_errors=True)
            raise
    click.echo(f"restored {config.institution} ({config.storage.store}) into {root}")
    if no_verify:
        return
    store = _chain_store(root, config)
    try:
        report = verify_chain(store, expected_key=config.signing_key)
    finally:
        store.close()
    expected = manifest.get("head", {})
    if report.log_size != expected.get("log_size") or report.log_root.hex() != expected.get(
        "log_root"
    ):
        raise StorageError(
            f"restored chain has {report.log_size} transactions (root {report.log_root.hex()}),"
            f" the backup recorded {expected.get('log_size')} ({expected.get('log_root')})"
        )
    click.echo(
        f"OK: {report.chain}: {report.blocks} blocks, {report.log_size} transactions,"
        f" log root {report.log_root.hex()} (as backed up)"
    )
