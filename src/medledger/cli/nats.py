"""``medledger nats``: an institution's NATS server configuration and the consortium stream.

An institution operates its nats-server like its PostgreSQL (decision 0032):
medledger does not start it, but writes its configuration from the
consortium's members (``nats config``), makes the operator's key
(``nats operator-key``) and creates the stream with it (``nats stream``).
docs/deploy.md step 4 and the compose example use exactly these commands.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from medledger.cli.common import dir_option
from medledger.core.errors import Conflict, InvalidInput

if TYPE_CHECKING:
    from medledger.core.consortium import MemberSet

__all__ = ["nats", "write_new_seed"]


@click.group()
def nats() -> None:
    """Configure this institution's NATS server; create the consortium stream."""


def write_new_seed(path: Path) -> str:
    """A new NKey user seed in ``path`` (0600, never replaced); returns its public key."""
    import nkeys  # type: ignore[import-untyped]  # (no type information shipped)

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise Conflict(f"{path} exists; remove it first to make a new NATS key") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(bytes(seed))
        handle.flush()
        os.fsync(handle.fileno())
    return str(nkeys.from_seed(bytearray(seed)).public_key.decode("ascii"))


@nats.command("operator-key")
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the operator's NKey seed (owner-only; keep it offline).",
)
def nats_operator_key(out: Path) -> None:
    """Make the operator's NATS credential: the one key that may create or change the stream.

    Prints its public key (``U…``) for every server's configuration
    (``nats config --operator-nkey``). Members' keys cannot create, update,
    delete or purge the stream; this one can, so keep it off the servers.
    """
    click.echo(write_new_seed(out))


def current_members(root: Path) -> MemberSet:
    """The node's view of the members: its final consortium state, else its genesis."""
    from medledger.config import NodePaths
    from medledger.core.consortium import MemberSet
    from medledger.stores import load_genesis

    paths = NodePaths(root=root)
    if paths.consortium_db.exists():
        from medledger.cli.consortium import verify_consortium_store

        _, policy = verify_consortium_store(root)
        return policy.state.members
    if not paths.genesis.exists():
        raise InvalidInput(f"{root} has no genesis.json: adopt the consortium's genesis first")
    return MemberSet(load_genesis(paths.genesis).members)


def _pairs(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        member_id, sep, key = value.partition("=")
        if not sep or not member_id or not key:
            raise InvalidInput(f"--nkey takes MEMBER_ID=UKEY, not {value!r}")
        if member_id in out:
            raise InvalidInput(f"--nkey names {member_id!r} twice")
        out[member_id] = key
    return out


@nats.command("config")
@dir_option
@click.option("--server-name", required=True, help="This server's name (e.g. the member id).")
@click.option("--listen", required=True, help="HOST:PORT for NATS clients (TLS only).")
@click.option(
    "--cluster-listen", default=None, help="HOST:PORT for routes (mutual TLS; with --route)."
)
@click.option(
    "--route", "routes", multiple=True, help="HOST:PORT of another member's routes (repeat)."
)
@click.option(
    "--nkey",
    "nkeys_",
    multiple=True,
    help="MEMBER_ID=UKEY: a member's NATS public key ('node nats-key'); one per member.",
)
@click.option("--operator-nkey", required=True, help="The operator's public key (U…).")
@click.option("--store-dir", required=True, help="JetStream's directory (absolute path).")
@click.option(
    "--monitor-port",
    type=click.IntRange(0, 65535),
    default=8222,
    show_default=True,
    help="Monitoring port, on 127.0.0.1 only (0: no monitoring endpoint).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The configuration file to write.",
)
@click.option(
    "--ca-out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The members' certificates file to write (the server's ca_file).",
)
@click.option(
    "--cert-file", default=None, help="tls.crt as the server sees it (default: DIR/tls.crt)."
)
@click.option(
    "--key-file", default=None, help="tls.key as the server sees it (default: DIR/tls.key)."
)
@click.option(
    "--ca-file", default=None, help="The --ca-out file as the server sees it (default: it)."
)
def nats_config(
    root: Path,
    server_name: str,
    listen: str,
    cluster_listen: str | None,
    routes: tuple[str, ...],
    nkeys_: tuple[str, ...],
    operator_nkey: str,
    store_dir: str,
    monitor_port: int,
    out: Path,
    ca_out: Path,
    cert_file: str | None,
    key_file: str | None,
    ca_file: str | None,
) -> None:
    """Write this institution's nats-server configuration from the consortium's members.

    TLS with the node's pinned certificate for clients, mutual TLS on routes
    against the current members' certificates (written to ``--ca-out``), an
    NKey user per member (publish to the consortium subject and read the
    stream, nothing else), the operator, no anonymous access, monitoring on
    127.0.0.1 only, fsync before acknowledging. Every current member needs an
    ``--nkey``; a key for anyone else is refused. Run it again after every
    membership change and reload the server (``nats-server --signal reload``).
    """
    from medledger.config import NodePaths, load_config
    from medledger.ledger.ordering.natsconfig import (
        NatsServerConfig,
        members_pem,
        parse_host_port,
    )
    from medledger.storage.keystore import atomic_write

    config = load_config(root)
    members = current_members(root)
    keys = _pairs(nkeys_)
    ids = {m.id for m in members.members}
    if unknown := sorted(set(keys) - ids):
        raise InvalidInput(f"--nkey for {', '.join(unknown)}: not a current member")
    if missing := sorted(ids - set(keys)):
        raise InvalidInput(f"no --nkey for member {', '.join(missing)}")
    paths = NodePaths(root=root)
    settings = config.consortium
    server = NatsServerConfig(
        server_name=server_name,
        listen=parse_host_port(listen, "--listen"),
        cluster_listen=(
            parse_host_port(cluster_listen, "--cluster-listen") if cluster_listen else None
        ),
        routes=tuple(parse_host_port(r, "--route") for r in routes),
        cert_file=cert_file or str(paths.tls_cert.resolve()),
        key_file=key_file or str(paths.tls_key.resolve()),
        ca_file=ca_file or str(ca_out.resolve()),
        store_dir=store_dir,
        member_nkeys=keys,
        operator_nkey=operator_nkey,
        stream=settings.stream if settings is not None else "CONSORTIUM",
        subject=settings.subject if settings is not None else "consortium.order",
        monitor_port=monitor_port or None,
    )
    pem = members_pem(members.tls_certificates())
    atomic_write(ca_out, pem.encode("ascii"), mode=0o644)
    atomic_write(out, server.text().encode("utf-8"), mode=0o644)
    click.echo(
        f"wrote {out} ({len(keys)} members, operator) and {ca_out}"
        f" ({len(members.tls_certificates())} certificates)"
    )


@nats.command("stream")
@dir_option
@click.option(
    "--operator-seed",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The operator's NKey seed ('nats operator-key').",
)
@click.option(
    "--url",
    "urls",
    multiple=True,
    help="A NATS server, tls://HOST:PORT (repeat; default: DIR's [consortium] nats_urls).",
)
@click.option(
    "--replicas",
    type=click.IntRange(1, 5),
    default=None,
    help="Stream replicas (default: DIR's [consortium] replicas).",
)
def nats_stream(
    root: Path, operator_seed: Path, urls: tuple[str, ...], replicas: int | None
) -> None:
    """Create the consortium stream (as the operator) with the orderer's own settings.

    Trusts the NATS servers by the members' pinned certificates (the node's
    view of the consortium). An existing stream is checked, not replaced.
    """
    from medledger.config import load_config
    from medledger.ledger.ordering.jetstream import JetStreamOrderer
    from medledger.services.tls import client_context

    settings = load_config(root).consortium
    servers = list(urls) or (list(settings.nats_urls) if settings is not None else [])
    if not servers:
        raise InvalidInput("name the NATS servers with --url (or [consortium] nats_urls)")
    tls = client_context(current_members(root).tls_certificates())
    stream = settings.stream if settings is not None else "CONSORTIUM"
    subject = settings.subject if settings is not None else "consortium.order"
    count = replicas or (settings.replicas if settings is not None else 3)

    async def create() -> int:
        orderer = await JetStreamOrderer.connect(
            servers,
            stream=stream,
            subject=subject,
            replicas=count,
            name="medledger-operator",
            tls=tls,
            nkeys_seed=operator_seed,
        )
        try:
            return await orderer.last_seq()
        finally:
            await orderer.close()

    last = asyncio.run(create())
    click.echo(f"stream {stream} ({subject}, {count} replicas) ready; last sequence {last}")
