"""The HTTP adapter of :class:`~medledger.services.sharing.PeerTransport` (aiohttp).

aiohttp rather than httpx here: a peer client keeps many requests in flight
to a few holders, and httpx's connection pool spends milliseconds of CPU per
request at that concurrency (decision 0013). The answer is read in chunks
and abandoned as soon as it passes :data:`MAX_ANSWER_BYTES`, so a hostile
holder cannot make the reader buffer an unbounded body.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from medledger.core.errors import InvalidInput, OrderingError
from medledger.core.tls import MemberCertificate
from medledger.services.tls import client_context, file_version

__all__ = ["MAX_ANSWER_BYTES", "HttpPeerTransport"]

#: A holder's answer carries one ciphertext and proofs; anything far larger is refused.
MAX_ANSWER_BYTES = 16 * 1024 * 1024
_CHUNK = 64 * 1024


class HttpPeerTransport:
    """POSTs signed peer requests over one keep-alive connection pool.

    Over ``https`` the holder is trusted only if it presents its pinned
    certificate (``server_cert``), and this node presents its own certificate
    (``client_cert``/``client_key``) for mutual TLS. A holder with a pinned
    certificate is never reached over plain ``http``: that would hand the
    request to whoever sits on the path.

    ``before_request`` runs before each request (the node: promote a renewed
    certificate once it is pinned); the client certificate file is re-read
    whenever it changed, so new connections present the current one.
    """

    def __init__(
        self,
        timeout: float = 10.0,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        *,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        before_request: Callable[[], object] | None = None,
    ) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_answer = max_answer_bytes
        self._client_cert = client_cert
        self._client_key = client_key
        self._before_request = before_request
        #: One context per holder certificate (by fingerprint) and version of this
        #: node's certificate file: it trusts that one holder alone.
        self._contexts: dict[tuple[str, object], ssl.SSLContext] = {}
        # Created on first use: a session belongs to the running event loop.
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _context(self, url: str, server_cert: MemberCertificate | None) -> ssl.SSLContext | bool:
        scheme = url.partition(":")[0].lower()
        if scheme == "http":
            if server_cert is not None:
                raise OrderingError(
                    f"{url}: the holder has a pinned TLS certificate; its peer URL must be https"
                )
            return False  # aiohttp: no TLS (a consortium formed without certificates)
        if scheme != "https" or server_cert is None:
            raise OrderingError(f"{url}: the holder has no pinned TLS certificate to trust")
        own: object = None
        if self._client_cert is not None:
            try:
                own = file_version(self._client_cert)
            except OSError:
                own = None  # client_context says why, below
        context = self._contexts.get((server_cert.fingerprint, own))
        if context is None:
            try:
                context = client_context(
                    [server_cert], cert_path=self._client_cert, key_path=self._client_key
                )
            except InvalidInput as exc:
                raise OrderingError(str(exc)) from None
            if len(self._contexts) > 1024:  # renewed many times: drop the old versions
                self._contexts.clear()
            self._contexts[(server_cert.fingerprint, own)] = context
        return context

    async def post(
        self, url: str, body: bytes, server_cert: MemberCertificate | None = None
    ) -> tuple[int, Any]:
        """POST ``body``; the status and the decoded JSON answer (None if not JSON)."""
        if self._closed:
            raise OrderingError("the peer transport is closed")
        if self._before_request is not None:
            self._before_request()
        tls = self._context(url, server_cert)
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
                ssl=tls,
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
