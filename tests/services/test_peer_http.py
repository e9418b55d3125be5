"""The peer HTTP transport against a real loopback HTTP server (raw asyncio)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from medledger.core.errors import OrderingError
from medledger.services.peer_http import HttpPeerTransport

Answer = Callable[[asyncio.StreamWriter], Awaitable[None]]


async def _serve(answer: Answer) -> tuple[asyncio.Server, str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        await answer(writer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/peer/v1/fetch"


def _fixed(status: int, body: bytes, length: int | None = None) -> Answer:
    async def answer(writer: asyncio.StreamWriter) -> None:
        declared = len(body) if length is None else length
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
            f"content-length: {declared}\r\n\r\n".encode()
            + body
        )

    return answer


def _chunked(chunks: int, size: int) -> Answer:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(chunks):
            writer.write(f"{size:x}\r\n".encode() + b"a" * size + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    return answer


async def _post(answer: Answer, limit: int = 10_000) -> tuple[int, object]:
    server, url = await _serve(answer)
    transport = HttpPeerTransport(timeout=5, max_answer_bytes=limit)
    try:
        return await transport.post(url, b'{"op":"fetch"}')
    finally:
        await transport.close()
        server.close()
        await server.wait_closed()


def test_a_json_answer_comes_back_decoded() -> None:
    assert asyncio.run(_post(_fixed(200, b'{"resource":"Patient/p1"}'))) == (
        200,
        {"resource": "Patient/p1"},
    )


def test_a_refusal_keeps_its_status_and_body() -> None:
    status, body = asyncio.run(_post(_fixed(403, b'{"resourceType":"OperationOutcome"}')))
    assert status == 403
    assert body == {"resourceType": "OperationOutcome"}


def test_an_answer_that_is_not_json_is_none() -> None:
    assert asyncio.run(_post(_fixed(502, b"<html>bad gateway</html>"))) == (502, None)


def test_an_answer_declared_larger_than_the_limit_is_refused_before_reading() -> None:
    with pytest.raises(OrderingError, match="more than 10000 bytes"):
        asyncio.run(_post(_fixed(200, b"{}", length=50_000_000)))


def test_a_chunked_answer_is_abandoned_once_it_passes_the_limit() -> None:
    with pytest.raises(OrderingError, match="more than 10000 bytes"):
        asyncio.run(_post(_chunked(chunks=1000, size=4096)))


def test_an_unreachable_holder_is_an_ordering_error() -> None:
    async def go() -> None:
        server, url = await _serve(_fixed(200, b"{}"))
        server.close()
        await server.wait_closed()
        transport = HttpPeerTransport(timeout=2)
        try:
            await transport.post(url, b"{}")
        finally:
            await transport.close()

    with pytest.raises(OrderingError, match="cannot reach"):
        asyncio.run(go())


def test_a_closed_transport_sends_nothing() -> None:
    async def go() -> None:
        transport = HttpPeerTransport()
        await transport.close()
        await transport.post("http://127.0.0.1:9/peer/v1/fetch", b"{}")

    with pytest.raises(OrderingError, match="closed"):
        asyncio.run(go())
