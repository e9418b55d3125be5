"""An active sequencer host that is deposed while it serves stops (``api.failover``).

A real PostgreSQL and a node served in process on a PostgreSQL store: the node takes
the sequencer lease, and when the lease's epoch moves on under it (another host took
over, e.g. across a network partition) it stops serving within a bounded time and
``serve`` raises ``Deposed`` (``node start``: one ``error:`` line, exit 1), instead of
serving on as a writer it no longer is.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from medledger.api.serving import NodeServer
from medledger.config import StorageConfig
from medledger.core.errors import Deposed
from medledger.localnet.loopback import loopback_socket
from medledger.node import init_node
from medledger.storage.factory import NODE_SCHEMA_PARTS, node_schema
from medledger.storage.keystore import KdfParams

PASSPHRASE = b"deposed sequencer test passphrase"
DEADLINE_S = 30.0


def test_a_deposed_active_host_stops_serving_and_says_why(
    pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # node.toml keeps the DSN without its password; a node takes it from the environment.
    monkeypatch.setenv("MEDLEDGER_DSN", pg_dsn)
    config = init_node(
        tmp_path / "node",
        name=f"Deposed {time.monotonic_ns()}",
        passphrase=PASSPHRASE,
        kdf=KdfParams(n=2**12),
        storage=StorageConfig(store="postgres", dsn=pg_dsn, blobs="postgres"),
    )
    chain_schema = node_schema(config.institution, "chain")
    sock = loopback_socket()
    server = NodeServer(
        root=tmp_path / "node", passphrase=PASSPHRASE, sockets=[sock], plain_http=True
    )
    box: dict[str, Any] = {}

    def serve() -> None:
        try:
            asyncio.run(server.serve())
        except BaseException as exc:  # the test reads it below
            box["error"] = exc

    thread = threading.Thread(target=serve, name="deposed-node", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not (server.election is not None and server.election.role == "active"):
            assert thread.is_alive(), box
            assert time.monotonic() < deadline, "the node did not become the active host"
            time.sleep(0.02)
        epoch = server.election.epoch
        assert epoch is not None
        # Another host took the role: the lease row's epoch moved on.
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("UPDATE {} SET epoch = epoch + 1").format(
                    sql.Identifier(chain_schema, "sequencer")
                )
            )
        thread.join(DEADLINE_S)
        assert not thread.is_alive(), "the deposed host kept serving"
        assert isinstance(box.get("error"), Deposed), box
        assert server.election.role == "deposed"
    finally:
        if thread.is_alive():
            loop_stop(server, thread)
        sock.close()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for part in NODE_SCHEMA_PARTS:
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                        sql.Identifier(node_schema(config.institution, part))
                    )
                )


def loop_stop(server: NodeServer, thread: threading.Thread) -> None:
    """Stop a server that is still running (a failing test must not leave it behind):
    best effort from this thread, the test has already failed."""
    server.stop()
    thread.join(DEADLINE_S)
