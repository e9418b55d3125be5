"""``api.server.GracefulServer``: a connection that opens while the server stops is closed.

uvicorn's shutdown tells the connections it knows to close; a TLS connection
is known only once its handshake is done, so one accepted just before the
shutdown used to escape it and be served keep-alive for as long as its client
kept writing (the node then missed its stop bound under writes, issue 19). The
late connection is made here with ``connect_accepted_socket``, as the end of a
handshake would make it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from medledger.api.server import DrainingServerState, GracefulServer, HttpLimits, server_config

_DEADLINE_S = 30.0


class _App:
    """``/slow`` answers once ``release`` is set (it keeps the shutdown waiting); else 200."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.slow_started = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        if scope["path"] == "/slow":
            self.slow_started.set()
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def _late_connection_while_stopping() -> tuple[bytes, bytes]:
    loop = asyncio.get_running_loop()
    app = _App()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = server_config(app, limits=HttpLimits())
    server = GracefulServer(config, on_exit=lambda: None)
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    async with asyncio.timeout(_DEADLINE_S):
        while not server.started:
            await asyncio.sleep(0.01)
        # A request in flight keeps the shutdown waiting for connections.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: node\r\n\r\n")
        await app.slow_started.wait()
        server.should_exit = True
        state = server.server_state
        assert isinstance(state, DrainingServerState)
        while not state.draining:
            await asyncio.sleep(0.01)
        # Now a connection completes its "handshake" and sends a request.
        ours, theirs = socket.socketpair()
        await loop.connect_accepted_socket(
            lambda: config.http_protocol_class(
                config=config, server_state=state, app_state={}, _loop=loop
            ),
            ours,
        )
        theirs.setblocking(False)
        late_answer = b""
        with contextlib.suppress(ConnectionError):  # closed before the request was sent
            await loop.sock_sendall(theirs, b"GET /fast HTTP/1.1\r\nHost: node\r\n\r\n")
            # Read until the server closes the connection (or until the deadline).
            while chunk := await loop.sock_recv(theirs, 65536):
                late_answer += chunk
        theirs.close()
        app.release.set()
        slow_answer = await reader.read()
        writer.close()
        await serving
    return late_answer, slow_answer


def test_a_connection_made_while_the_server_stops_is_closed_unanswered() -> None:
    late_answer, slow_answer = asyncio.run(_late_connection_while_stopping())
    # Before the fix the late connection got "200 OK" and stayed open (keep-alive).
    assert late_answer == b""
    # The request in flight at the shutdown is still answered, then its connection closes.
    assert slow_answer.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in slow_answer.lower()
