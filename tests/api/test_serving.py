"""The served node's shutdown order, through ``NodeServer`` and a real HTTP connection.

A write whose body is still arriving when the node is told to stop is a request
in flight: readiness turns false at once, no new connection is accepted, and
the write still completes, is acknowledged and is on the chain — the stores
close only after it.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

from api_helpers import FHIR_JSON, start_server, stop_server

from medledger.core.models import Transaction
from medledger.node import open_chain

DEADLINE_S = 20.0


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def _read_response(sock: socket.socket) -> bytes:
    sock.settimeout(DEADLINE_S)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    return data


def test_stopping_turns_unready_first_and_lets_the_write_in_flight_commit(tmp_path: Path) -> None:
    live = start_server(tmp_path / "node")
    stopped = False
    try:
        runtime = live.node_server.runtime
        assert runtime is not None and runtime.not_ready() is None
        port = int(live.url.rsplit(":", 1)[1])
        body = json.dumps(
            {"resourceType": "Patient", "id": "in-flight", "name": [{"family": "Stopping"}]}
        ).encode()
        head = (
            "PUT /fhir/Patient/in-flight HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {live.clinician}\r\n"
            f"Content-Type: {FHIR_JSON}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as client:
            client.sendall(head + body[:10])
            # The request's task exists once its head was parsed: the write is in flight.
            _until(lambda: bool(live.server.server_state.tasks), "the request is in flight")

            live.loop.call_soon_threadsafe(live.node_server.stop)
            _until(lambda: runtime.not_ready() == "stopping", "readiness turns false")
            _until(lambda: _refused(port), "no new connection is accepted")
            # Still serving the one in flight: the node has not closed underneath it.
            assert live.thread.is_alive()

            client.sendall(body[10:])
            answer = _read_response(client)
        assert answer.startswith(b"HTTP/1.1 201 "), answer
        stopped = True
        stop_server(live)  # joins the server thread: everything is closed now
    finally:
        if not stopped:
            stop_server(live)

    _, store = open_chain(live.root)
    try:
        puts = [
            tx
            for block in store.iter_blocks(1)
            for tx in map(Transaction.decode, block.tx_data)
            if tx.type == "record.put"
        ]
    finally:
        store.close()
    assert len(puts) == 1, "the acknowledged write is on the chain after the shutdown"
