"""The delaying relay: bytes arrive intact and in order, no earlier than the link's delay.

Delays are only checked as lower bounds ("at least"): how much later a
loaded machine delivers is not the relay's contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
import time

import pytest

from medledger.core.errors import InvalidInput
from medledger.localnet.relay import RTO_MIN_S, LinkDelay, RelayGroup

_DEADLINE_S = 30.0


async def _echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()  # the client's EOF came through: answer with ours

    return await asyncio.start_server(echo, "127.0.0.1", 0)


def _port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


async def _round_trip(port: int, payload: bytes, pieces: int) -> tuple[bytes, float, bool]:
    """Send ``payload`` in ``pieces`` writes, half-close; what came back, the first echo's delay, EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    step = max(1, len(payload) // pieces)
    sent = time.perf_counter()
    first_back: float | None = None
    received = bytearray()

    async def read_all() -> None:
        nonlocal first_back
        while data := await reader.read(65536):
            if first_back is None:
                first_back = time.perf_counter()
            received.extend(data)

    reading = asyncio.ensure_future(read_all())
    for k in range(0, len(payload), step):
        writer.write(payload[k : k + step])
        await writer.drain()
        await asyncio.sleep(0)
    writer.write_eof()
    await asyncio.wait_for(reading, _DEADLINE_S)  # EOF came back: the half-close was relayed
    writer.close()
    assert first_back is not None
    return bytes(received), first_back - sent, reader.at_eof()


def test_bytes_come_back_in_order_and_no_earlier_than_the_round_trip() -> None:
    payload = b"".join(f"{k:08d}|".encode() for k in range(50_000))  # 450 kB, numbered

    async def scenario(relays: RelayGroup) -> tuple[bytes, float, bool]:
        server = await _echo_server()
        try:
            port = relays.add("127.0.0.1", _port(server), LinkDelay.from_rtt(60, jitter_ms=20))
            return await _round_trip(port, payload, pieces=400)
        finally:
            server.close()

    with RelayGroup(seed=1) as relays:
        received, first_s, eof = asyncio.run(scenario(relays))
    assert received == payload  # jitter never reorders bytes
    assert eof
    # Through the relay once each way: at least one full round trip (60 ms).
    assert first_s >= 0.060


def test_two_relayed_hops_add_up() -> None:
    async def scenario(relays: RelayGroup) -> float:
        server = await _echo_server()
        try:
            inner = relays.add("127.0.0.1", _port(server), LinkDelay.from_rtt(40))
            outer = relays.add("127.0.0.1", inner, LinkDelay.from_rtt(40))
            _, first_s, _ = await _round_trip(outer, b"ping", pieces=1)
            return first_s
        finally:
            server.close()

    with RelayGroup() as relays:
        assert asyncio.run(scenario(relays)) >= 0.080


def test_a_lost_chunk_waits_one_retransmission_timeout() -> None:
    delay = LinkDelay.from_rtt(10, jitter_ms=2, loss_pct=30)
    rng = random.Random(5)
    holds = [delay.hold_s(rng) for _ in range(2000)]
    assert min(holds) >= delay.one_way_s
    late = [h for h in holds if h >= delay.one_way_s + RTO_MIN_S]
    on_time = [h for h in holds if h <= delay.one_way_s + delay.jitter_s]
    assert len(late) + len(on_time) == len(holds)  # a chunk is lost or not, nothing between
    assert 0.2 < len(late) / len(holds) < 0.4  # 30 % of 2,000 draws, with a wide margin
    assert LinkDelay.from_rtt(400).rto_s == pytest.approx(0.4)  # RTO follows a long round trip


def test_a_lossy_link_still_delivers_every_byte_in_order() -> None:
    payload = bytes(range(256)) * 400

    async def scenario(relays: RelayGroup) -> bytes:
        server = await _echo_server()
        try:
            port = relays.add("127.0.0.1", _port(server), LinkDelay.from_rtt(2, loss_pct=20))
            received, _, _ = await _round_trip(port, payload, pieces=50)
            return received
        finally:
            server.close()

    with RelayGroup(seed=3) as relays:
        assert asyncio.run(scenario(relays)) == payload


def test_an_unreachable_target_closes_the_client_connection() -> None:
    async def scenario(relays: RelayGroup) -> bytes:
        server = await _echo_server()
        port = _port(server)
        server.close()
        await server.wait_closed()  # nothing listens there any more
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", relays.add("127.0.0.1", port, LinkDelay(one_way_s=0))
        )
        data = await asyncio.wait_for(reader.read(), _DEADLINE_S)
        writer.close()
        return data

    with RelayGroup() as relays:
        assert asyncio.run(scenario(relays)) == b""


def test_close_stops_the_thread_and_the_listeners() -> None:
    relays = RelayGroup()

    async def listening() -> int:
        server = await _echo_server()
        port = relays.add("127.0.0.1", _port(server), LinkDelay(one_way_s=0.001))
        server.close()
        return port

    port = asyncio.run(listening())
    threads = {t.name for t in threading.enumerate()}
    assert "delay-relay" in threads
    relays.close()
    relays.close()  # twice is fine
    assert "delay-relay" not in {t.name for t in threading.enumerate()}

    async def connect() -> None:
        await asyncio.open_connection("127.0.0.1", port)

    with pytest.raises(OSError):
        asyncio.run(connect())


def _connecting_to(port: int) -> int:
    """How many of this machine's TCP sockets are still connecting (SYN_SENT) to ``port``."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            next(lines)  # the header
            for line in lines:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "02":
                    count += 1
    return count


def test_close_ends_a_connection_still_reaching_its_target() -> None:
    """A closed group leaves no task behind: not even the handler of a connection whose
    relay is still connecting to the target (it is cancelled and its socket closed)."""
    queued: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0), backlog=0) as full:  # never accepts
        target = full.getsockname()[1]
        try:
            # Fill its accept queue: the kernel then drops new connection attempts (SYNs),
            # so the relay's connect to it waits.
            while not _connecting_to(target):
                attempt = socket.socket()
                attempt.setblocking(False)
                queued.append(attempt)
                attempt.connect_ex(("127.0.0.1", target))
                assert len(queued) < 64, "the accept queue never filled"
                time.sleep(0.01)
            waiting = _connecting_to(target)
            relays = RelayGroup()
            try:
                with socket.create_connection(
                    ("127.0.0.1", relays.add("127.0.0.1", target, LinkDelay(one_way_s=0))),
                    timeout=_DEADLINE_S,
                ):
                    deadline = time.monotonic() + _DEADLINE_S
                    while _connecting_to(target) == waiting:  # the relay's own attempt
                        assert time.monotonic() < deadline, "the relay never connected on"
                        time.sleep(0.01)
                    relays.close()
                    assert not asyncio.all_tasks(relays._loop)
                    assert _connecting_to(target) == waiting, "the relay's connect was left open"
            finally:
                relays.close()
        finally:
            for attempt in queued:
                attempt.close()


@pytest.mark.parametrize(
    ("rtt", "jitter", "loss"), [(-1, 0, 0), (10, -1, 0), (10, 0, 100), (30_000, 0, 0)]
)
def test_impossible_links_are_refused(rtt: float, jitter: float, loss: float) -> None:
    with pytest.raises(InvalidInput):
        LinkDelay.from_rtt(rtt, jitter_ms=jitter, loss_pct=loss)
