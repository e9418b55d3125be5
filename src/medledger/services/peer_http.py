"""The HTTP adapter of :class:`~medledger.services.sharing.PeerTransport` (aiohttp).

aiohttp rather than httpx here: a peer client keeps many requests in flight
to a few holders, and httpx's connection pool spends milliseconds of CPU per
request at that concurrency (decision 0013). The answer is read in chunks
and abandoned as soon as it passes :data:`MAX_ANSWER_BYTES`, so a hostile
holder cannot make the reader buffer an unbounded body.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from medledger.core.errors import OrderingError

__all__ = ["MAX_ANSWER_BYTES", "HttpPeerTransport"]

#: A holder's answer carries one ciphertext and proofs; anything far larger is refused.
MAX_ANSWER_BYTES = 16 * 1024 * 1024
_CHUNK = 64 * 1024


class HttpPeerTransport:
    """POSTs signed peer requests over one keep-alive connection pool."""

    def __init__(self, timeout: float = 10.0, max_answer_bytes: int = MAX_ANSWER_BYTES) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_answer = max_answer_bytes
        # Created on first use: a session belongs to the running event loop.
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def post(self, url: str, body: bytes) -> tuple[int, Any]:
        """POST ``body``; the status and the decoded JSON answer (None if not JSON)."""
        if self._closed:
            raise OrderingError("the peer transport is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        try:
            async with self._session.post(
                url,
                data=body,
                headers={"content-type": "application/json"},
                allow_redirects=False,
            ) as response:
                declared = response.content_length
                if declared is not None and declared > self._max_answer:
                    raise OrderingError(f"{url} answered with more than {self._max_answer} bytes")
                answer = bytearray()
                async for chunk in response.content.iter_chunked(_CHUNK):
                    answer += chunk
                    if len(answer) > self._max_answer:
                        raise OrderingError(
                            f"{url} answered with more than {self._max_answer} bytes"
                        )
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise OrderingError(f"cannot reach {url}: {type(exc).__name__}") from None
        try:
            return status, orjson.loads(answer)
        except orjson.JSONDecodeError:
            return status, None

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None
