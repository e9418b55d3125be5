"""A hung NATS server (accepts TCP, never speaks) must not cost a socket per reconnect.

nats-py reuses one transport across reconnection attempts and dialled the next
attempt over the previous one without closing it; the orderer's client closes
a failed attempt's socket first (``jetstream._Client``). The server here is a
real listening socket that speaks NATS to its first client only, then accepts
and says nothing, as a hung ``nats-server`` does; the test watches, from the
server's side, whether the client closed each connection it gave up on.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from medledger.ledger.ordering.jetstream import _Client

_DEADLINE_S = 10.0
_INFO = b'INFO {"server_id":"hung","version":"2.10.0","proto":1,"max_payload":1048576}\r\n'


class HungServer:
    """A NATS server that hangs after its first client: records each connection's close.

    The first connection gets the handshake (INFO, then PONG to the client's PING),
    so the client is connected; the test then drops it, as a server does when it
    hangs and restarts. Every later connection is accepted and never spoken to.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.url = f"nats://127.0.0.1:{self._listener.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self.closed_by_peer: set[int] = set()  # indexes into ``accepted``
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                watched = [self._listener] + [
                    c for i, c in enumerate(self.accepted) if i not in self.closed_by_peer
                ]
            readable, _, _ = select.select(watched, [], [], 0.05)
            for sock in readable:
                if sock is self._listener:
                    conn, _ = self._listener.accept()
                    with self._lock:
                        self.accepted.append(conn)
                    if len(self.accepted) == 1:
                        conn.sendall(_INFO)
                    continue
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if not data:  # EOF: the client closed it
                    with self._lock:
                        self.closed_by_peer.add(self.accepted.index(sock))
                elif b"PING" in data and sock is self.accepted[0]:
                    sock.sendall(b"PONG\r\n")

    def drop_first(self) -> None:
        """Close the first (handshaken) connection from the server's side."""
        with self._lock:
            self.closed_by_peer.add(0)
            self.accepted[0].shutdown(socket.SHUT_RDWR)

    def snapshot(self) -> tuple[int, set[int]]:
        with self._lock:
            return len(self.accepted), set(self.closed_by_peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in (*self.accepted, self._listener):
            sock.close()


@pytest.fixture
def hung() -> Iterator[HungServer]:
    server = HungServer()
    yield server
    server.close()


def test_a_reconnect_attempt_given_up_on_is_closed_before_the_next(hung: HungServer) -> None:
    async def main() -> tuple[int, set[int]]:
        nc = _Client()
        await nc.connect(
            servers=[hung.url],
            connect_timeout=0.3,
            reconnect_time_wait=0.05,
            max_reconnect_attempts=-1,
            allow_reconnect=True,
        )
        try:
            hung.drop_first()
            deadline = time.monotonic() + _DEADLINE_S
            # The client reconnects, and the hung server never answers: wait for 3 attempts...
            while hung.snapshot()[0] < 4:
                assert time.monotonic() < deadline, "the client did not retry the hung server"
                await asyncio.sleep(0.05)
            # ...of which the first two were given up on: the client must have closed them.
            while not {1, 2} <= hung.snapshot()[1] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return hung.snapshot()
        finally:
            await nc.close()

    accepted, closed = asyncio.run(main())
    assert accepted >= 4
    assert {1, 2} <= closed, f"attempts given up on but left open: {sorted({1, 2} - closed)}"
