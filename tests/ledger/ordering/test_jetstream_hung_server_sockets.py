"""A hung NATS server must not cost a socket per reconnect; a closed client stays closed.

nats-py reuses one transport across reconnection attempts and dialled the next
attempt over the previous one without closing it; the orderer's client closes
a failed attempt's socket first (``jetstream._Client``). The server here is a
real listening socket that speaks NATS to its first client only, then accepts
and says nothing, as a hung ``nats-server`` does; the test watches, from the
server's side, whether the client closed each connection it gave up on.
A client closed while it reconnects must end that reconnection and close its
socket, even when the dial completes as the cancellation arrives.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from nats.aio.transport import TcpTransport

from medledger.ledger.ordering.jetstream import JetStreamOrderer, JetStreamTuning, _Client

_DEADLINE_S = 10.0
_INFO = b'INFO {"server_id":"hung","version":"2.10.0","proto":1,"max_payload":1048576}\r\n'


class HungServer:
    """A NATS server that hangs after its first client: records each connection's close.

    The first connection gets the handshake (INFO, then PONG to the client's PING),
    so the client is connected; the test then drops it, as a server does when it
    hangs and restarts. Every later connection is accepted and never spoken to,
    unless ``answers_all``: then every connection gets the handshake. A ``silent``
    server speaks to no connection at all.
    """

    def __init__(self, *, answers_all: bool = False, silent: bool = False) -> None:
        self._answers_all = answers_all
        self._silent = silent
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
                    if not self._silent and (len(self.accepted) == 1 or self._answers_all):
                        conn.sendall(_INFO)
                    continue
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if not data:  # EOF: the client closed it
                    with self._lock:
                        self.closed_by_peer.add(self.accepted.index(sock))
                elif b"PING" in data and (sock is self.accepted[0] or self._answers_all):
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


@pytest.fixture
def answering() -> Iterator[HungServer]:
    server = HungServer(answers_all=True)
    yield server
    server.close()


def test_close_ends_a_reconnection_whose_dial_completed_as_it_was_cancelled(
    answering: HungServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``close()`` while a reconnection's dial completes: no socket stays open, nothing revives.

    Python 3.11's ``asyncio.wait_for`` returns a result that completed as the
    cancellation arrived instead of raising it, so the cancelled reconnection
    carries on with a connected socket. The dial here reproduces exactly that:
    it connects, then swallows the cancellation that arrives while it finishes.
    """
    real_connect = TcpTransport.connect
    dialled = asyncio.Event()
    dials: list[int] = []
    swallowed: list[bool] = []

    async def dial_swallowing_cancellation(self: TcpTransport, *args: Any, **kwargs: Any) -> None:
        await real_connect(self, *args, **kwargs)
        dials.append(1)
        if len(dials) == 1:
            return  # the first connection: nothing to race with
        dialled.set()
        try:
            await asyncio.sleep(0.5)
        except asyncio.CancelledError:
            swallowed.append(True)  # wait_for on 3.11: the completed dial is returned

    monkeypatch.setattr(TcpTransport, "connect", dial_swallowing_cancellation)

    async def main() -> tuple[_Client, tuple[int, set[int]]]:
        nc = _Client()
        await nc.connect(servers=[answering.url], connect_timeout=1, max_reconnect_attempts=-1)
        answering.drop_first()
        await asyncio.wait_for(dialled.wait(), _DEADLINE_S)
        await nc.close()
        # Whatever the cancelled reconnection does next, it does within this wait.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            accepted, closed = answering.snapshot()
            if accepted > 1 and len(closed) == accepted:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # room for a revived client to dial again
        return nc, answering.snapshot()

    nc, (accepted, closed) = asyncio.run(main())
    assert swallowed, "close() did not cancel the reconnection during its dial"
    assert nc.is_closed
    assert nc._reconnection_task is not None and nc._reconnection_task.done()
    assert accepted == 2, f"the client dialled {accepted - 2} more connections after close()"
    assert closed == set(range(accepted)), f"left open: {sorted(set(range(accepted)) - closed)}"


def test_a_first_connection_passes_a_hung_server_for_the_next_one(answering: HungServer) -> None:
    """``connect()`` given up on at a hung server goes on to the next server listed.

    nats-py closes a failed first attempt with status DISCONNECTED before it tries
    the next server; that is not the client being closed, so the attempt after it
    must dial. The hung server here is a listening socket nobody accepts on: the
    kernel completes the TCP handshake and the client waits for an INFO that never
    comes, as with a stopped ``nats-server``.
    """
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent_url = f"nats://127.0.0.1:{silent.getsockname()[1]}"

        async def main() -> tuple[bool, str | None]:
            nc = _Client()
            try:
                await asyncio.wait_for(
                    nc.connect(
                        servers=[silent_url, answering.url],
                        connect_timeout=0.3,
                        dont_randomize=True,
                        max_reconnect_attempts=-1,
                    ),
                    _DEADLINE_S,
                )
                url = nc.connected_url
                return nc.is_connected, url.netloc if url is not None else None
            finally:
                await nc.close()

        connected, netloc = asyncio.run(main())
    assert connected
    assert netloc == answering.url.removeprefix("nats://")


@pytest.fixture
def silent() -> Iterator[HungServer]:
    server = HungServer(silent=True)
    yield server
    server.close()


def test_a_connect_cancelled_while_it_waits_for_the_server_closes_its_socket(
    silent: HungServer,
) -> None:
    """A member stopped while its orderer still connects leaves no socket open."""

    async def main() -> tuple[int, set[int]]:
        connecting = asyncio.create_task(
            JetStreamOrderer.connect(
                [silent.url],
                stream="S",
                subject="s",
                replicas=1,
                retry_for=60,
                tuning=JetStreamTuning(connect_timeout=30),
            )
        )
        deadline = time.monotonic() + _DEADLINE_S
        while silent.snapshot()[0] < 1:
            assert time.monotonic() < deadline, "the orderer did not dial the server"
            await asyncio.sleep(0.02)
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting
        while silent.snapshot()[1] != {0} and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return silent.snapshot()

    accepted, closed = asyncio.run(main())
    assert accepted == 1
    assert closed == {0}, "the cancelled connection attempt left its socket open"
