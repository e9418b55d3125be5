"""The HTTP adapter of :class:`~medledger.services.sharing.PeerTransport` (httpx)."""

from __future__ import annotations

from typing import Any

import httpx

from medledger.core.errors import OrderingError

__all__ = ["HttpPeerTransport"]

#: A holder's answer carries one ciphertext and proofs; anything far larger is refused.
MAX_ANSWER_BYTES = 16 * 1024 * 1024


class HttpPeerTransport:
    """POSTs signed peer requests over one keep-alive connection pool."""

    def __init__(self, timeout: float = 10.0) -> None:
        self._client = httpx.AsyncClient(timeout=timeout, follow_redirects=False)

    async def post(self, url: str, body: bytes) -> tuple[int, Any]:
        try:
            response = await self._client.post(
                url, content=body, headers={"content-type": "application/json"}
            )
        except httpx.HTTPError as exc:
            raise OrderingError(f"cannot reach {url}: {type(exc).__name__}") from None
        if len(response.content) > MAX_ANSWER_BYTES:
            raise OrderingError(f"{url} answered with more than {MAX_ANSWER_BYTES} bytes")
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, None

    async def close(self) -> None:
        await self._client.aclose()
