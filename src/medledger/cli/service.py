"""``medledger node start`` (the HTTP node service) and ``medledger token`` (API tokens)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import click

from medledger.cli.common import dir_option, emit, read_passphrase
from medledger.storage.tokens import ROLES, TokenStore

__all__ = ["start", "token"]


def _tokens(root: Path) -> TokenStore:
    from medledger.config import load_config

    load_config(root)  # a clear error if ROOT is not a node
    return TokenStore(root / "tokens.db")


def _graceful_server_class() -> type:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn, minus re-raising SIGTERM/SIGINT after shutdown.

        uvicorn restores the default handlers and re-sends the signal once it
        has stopped serving, which would kill the process before the node's
        queued writes commit and its storage closes. Here a signal only asks
        the server to exit; ``node start`` then closes the node and exits 0.
        """

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = {
                sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)
            }
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return GracefulServer


@click.command("start")
@dir_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8700, show_default=True)
def start(root: Path, host: str, port: int) -> None:
    """Serve the node's FHIR API (/fhir), chain API (/chain) and OpenAPI (/docs)."""
    import uvicorn

    from medledger.api.app import create_app

    _GracefulServer = _graceful_server_class()
    from medledger.node import open_node

    passphrase = read_passphrase(confirm=False)
    # Request paths and queries can carry identifiers: uvicorn's access log stays off.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    async def serve() -> None:
        node = open_node(root, passphrase)
        tokens = TokenStore(root / "tokens.db")
        try:
            app = create_app(node, tokens)
            config = uvicorn.Config(
                app, host=host, port=port, access_log=False, log_level="warning", lifespan="off"
            )
            server = _GracefulServer(config)
            click.echo(
                f"medledger node {node.config.institution} serving on http://{host}:{port}"
                " (OpenAPI at /docs)",
                err=True,
            )
            await server.serve()
        finally:
            # Graceful: queued writes commit before storage closes.
            await node.close()
            tokens.close()

    asyncio.run(serve())


@click.group()
def token() -> None:
    """Create, list and revoke API bearer tokens."""


@token.command("create")
@dir_option
@click.option("--role", type=click.Choice(ROLES), required=True)
@click.option("--patient", default=None, help="The patient id a patient token is bound to.")
@click.option("--label", default="", help="Who or what the token is for.")
@click.option(
    "--ttl-hours",
    type=click.FloatRange(min=0.001),
    default=None,
    help="Expire after this many hours (default: never).",
)
def token_create(
    root: Path, role: str, patient: str | None, label: str, ttl_hours: float | None
) -> None:
    """Issue a token; it is printed once and stored only as a hash."""
    store = _tokens(root)
    try:
        text, info = store.create(
            role=role,
            patient=patient,
            label=label,
            now_ms=time.time_ns() // 1_000_000,
            ttl_ms=None if ttl_hours is None else int(ttl_hours * 3.6e6),
        )
    finally:
        store.close()
    emit(
        {
            "token": text,
            "id": info.id,
            "role": info.role,
            "patient": info.patient,
            "expires_ms": info.expires_ms,
        }
    )


@token.command("list")
@dir_option
def token_list(root: Path) -> None:
    """List tokens (ids and roles, never the secrets)."""
    store = _tokens(root)
    try:
        emit(
            [
                {
                    "id": t.id,
                    "role": t.role,
                    "patient": t.patient,
                    "label": t.label,
                    "expires_ms": t.expires_ms,
                    "revoked": t.revoked,
                }
                for t in store.list()
            ]
        )
    finally:
        store.close()


@token.command("revoke")
@dir_option
@click.argument("token_id")
def token_revoke(root: Path, token_id: str) -> None:
    """Revoke a token by its id; requests with it are refused from now on."""
    store = _tokens(root)
    try:
        store.revoke(token_id)
    finally:
        store.close()
    emit({"revoked": token_id})
