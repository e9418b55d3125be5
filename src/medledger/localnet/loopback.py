"""Nodes served inside the caller's event loop, each on its own loopback socket.

For a network of nodes in one process (tests, benchmarks): every node gets a
uvicorn server on a pre-bound ``127.0.0.1`` socket, so requests between them
travel through httpx, HTTP and FastAPI exactly as between machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import uvicorn

from medledger.api.app import create_app
from medledger.api.server import HttpLimits, server_config
from medledger.node import Node
from medledger.storage.ports import TokenStore
from medledger.storage.sqlite.tokens import SqliteTokenStore

__all__ = ["loopback_socket", "serve_nodes", "url_of"]


def loopback_socket() -> socket.socket:
    """A TCP socket bound to a free port of 127.0.0.1 (not yet listening)."""
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says
    # TCP, and without it every keep-alive request waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def url_of(sock: socket.socket, *, tls: bool = True) -> str:
    """The URL a node served on ``sock`` by :func:`serve_nodes` answers at."""
    return f"{'https' if tls else 'http'}://127.0.0.1:{sock.getsockname()[1]}"


@contextlib.asynccontextmanager
async def serve_nodes(
    nodes: Mapping[str, Node],
    sockets: Mapping[str, socket.socket],
    token_dir: Path,
    *,
    tls: bool = True,
) -> AsyncIterator[dict[str, TokenStore]]:
    """Serve ``nodes[i]`` on ``sockets[i]`` until the block ends; yields each node's tokens.

    Over HTTPS with each node's own certificate, member clients verified
    (``Node.server_tls_context``), as ``node start`` serves; ``tls=False``
    (plain HTTP) only for a consortium whose genesis pins no certificates.
    Token stores live in ``token_dir`` (``<institution>-tokens.db``). The
    servers stop (and the sockets close) on exit; the nodes stay open.
    """
    servers: list[tuple[uvicorn.Server, asyncio.Task[Any]]] = []
    tokens: dict[str, TokenStore] = {}
    try:
        for inst, sock in sockets.items():
            tokens[inst] = SqliteTokenStore(token_dir / f"{inst}-tokens.db")
            config = server_config(
                create_app(nodes[inst], tokens[inst]),
                limits=HttpLimits(idle_timeout_s=30),
                ssl_context=nodes[inst].server_tls_context() if tls else None,
            )
            server = uvicorn.Server(config)
            servers.append((server, asyncio.create_task(server.serve(sockets=[sock]))))
        while not all(s.started for s, _ in servers):
            if any(t.done() for _, t in servers):
                raise RuntimeError("a node's HTTP server did not start")
            await asyncio.sleep(0.01)
        yield tokens
    finally:
        for server, _ in servers:
            server.should_exit = True
        for _, task in servers:
            with contextlib.suppress(Exception):
                await task
        for store in tokens.values():
            store.close()
        for sock in sockets.values():
            sock.close()
