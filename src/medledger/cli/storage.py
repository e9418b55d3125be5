"""``medledger migrate``, ``backup`` and ``restore``: operating a node's storage, either store.

Argument parsing and printing only: what a backup holds and how stores are
copied, restored and migrated is :mod:`medledger.storage.backup`. Here the
node's configuration becomes a :class:`~medledger.storage.backup.StoreLayout`,
the chain head goes into the manifest, and a restored chain is verified
against it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import click

from medledger.cli.common import dir_option
from medledger.config import NodeConfig, NodePaths, StorageConfig, load_config
from medledger.core.errors import Conflict, StorageError
from medledger.ledger.clock import SystemClock
from medledger.ledger.proofs import head_header
from medledger.ledger.verify import verify_chain
from medledger.storage import factory
from medledger.storage.backup import BackupArchive, StoreLayout, migrate_stores, write_backup
from medledger.storage.ports import ChainStore

__all__ = ["backup", "migrate", "restore"]


def _layout(root: Path, config: NodeConfig) -> StoreLayout:
    return StoreLayout(
        root=root,
        institution=config.institution,
        store=config.storage.store,
        blobs=config.storage.blobs,
        dsn=config.storage.dsn,
    )


@click.command()
@dir_option
def migrate(root: Path) -> None:
    """Apply pending schema migrations to every store of the node; report their versions."""
    config = load_config(root)
    for line in migrate_stores(_layout(root, config)):
        click.echo(line)
    click.echo("all stores are at the current schema version")


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
    write_backup(
        _layout(root, config),
        out,
        created_ms=SystemClock().now_ms(),
        fields={
            "institution": config.institution,
            "chain": config.chain,
            "head": {
                "height": head.height,
                "log_size": head.log_size,
                "log_root": head.log_root.hex(),
            },
        },
    )
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
    created = not root.exists()
    with BackupArchive(source) as archive:
        manifest = archive.manifest
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            archive.extract_node_files(root)
            config = load_config(root)
            env_dsn = dsn or os.environ.get("MEDLEDGER_DSN")
            if env_dsn and "postgres" in (config.storage.store, config.storage.blobs):
                storage = StorageConfig(
                    store=config.storage.store, dsn=env_dsn, blobs=config.storage.blobs
                )
                config = dataclasses.replace(config, storage=storage)
                config.save(NodePaths(root=root).config)
            archive.restore_stores(_layout(root, config))
        except BaseException:
            if created:
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
