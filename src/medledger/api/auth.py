"""Bearer-token authentication and role checks for the API.

Roles: ``clinician`` (clinical data), ``auditor`` (chains and audit trail,
no clinical data), ``admin`` (everything), ``patient`` (only their own
records). Every request carries ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request

from medledger.api.errors import Forbidden, Unauthorized
from medledger.core.errors import InvalidInput
from medledger.ledger.clock import Clock
from medledger.storage.tokens import TokenInfo, TokenStore

__all__ = ["Principal", "require"]

Principal = TokenInfo


def require(*roles: str) -> Callable[[Request], Any]:
    """A FastAPI dependency admitting a valid token whose role is in ``roles`` (admin always)."""

    # Async on purpose: a sync dependency would hop to a worker thread on every
    # request; the token check is one indexed SQLite read, cheaper than the hop.
    async def dependency(request: Request) -> TokenInfo:
        tokens: TokenStore = request.app.state.tokens
        clock: Clock = request.app.state.clock
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("a bearer token is required")
        try:
            info = tokens.check(token.strip(), now_ms=clock.now_ms())
        except InvalidInput as exc:
            raise Unauthorized(str(exc)) from None
        if info.role != "admin" and info.role not in roles:
            raise Forbidden(f"role {info.role!r} may not do this")
        return info

    return dependency
