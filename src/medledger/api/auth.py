"""Bearer-token authentication, role checks, and the failed-authentication throttle.

Roles: ``clinician`` (clinical data), ``auditor`` (chains and audit trail,
no clinical data), ``admin`` (everything), ``patient`` (only their own
records). Every request carries ``Authorization: Bearer <token>``.

A presented token that does not check (and a peer request that is not signed
by a member, ``api.peer``) is a failed authentication, charged to the client
address and, for a token, to its token id (:class:`AuthFailures`). Once either
budget is spent the failure is answered 429 with ``Retry-After`` instead of
401. A valid token is always checked and served: one client's failures never
throttle another client's successes. The address is the TCP peer's;
forwarding headers are not trusted.

The budgets are one per node, not one per process: an API worker
(``node start --workers N``) keeps none of its own but spends the parent's
over the sequencer link (:class:`SharedAuthFailures`), so N workers do not
give a client N times the guesses. If the parent cannot be asked, the
failure is answered 503 (the guess is not answered as 401 either way).

Two kinds of bearer token are accepted: the API tokens of ``medledger token
create`` (``mlt_…``, role only, unchanged for services) and the access
tokens of the SMART on FHIR authorization server (``mla_…``, ``api.oauth``).
An access token carries a role too, and its granted scopes narrow further
what it may do: the FHIR resource type and action of the request
(:func:`~medledger.services.oauth.scopes.request_access`) must be allowed by
one of them, else 403 before the handler runs.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import Request

from medledger.api.deps import services_of
from medledger.api.errors import Forbidden, Unauthorized
from medledger.core.errors import InvalidInput, RateLimited
from medledger.ledger.clock import Clock
from medledger.services.oauth.scopes import parse_scopes, request_access
from medledger.services.ratelimit import RateLimit, RateLimiter
from medledger.storage.ports import TokenInfo

__all__ = [
    "AUTH_FAILURES",
    "SIGN_IN_OPENS",
    "AuthFailures",
    "Principal",
    "SharedAuthFailures",
    "SignInOpens",
    "failure_keys",
    "require",
]

Principal = TokenInfo

#: Failed authentications one address (or token id) may cause back to back,
#: then one more every few seconds (20 a minute).
AUTH_FAILURES = RateLimit(burst=20, interval_ms=3_000)
_ACTIONS = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}
# Token ids: 12 hex digits (``storage.tokens``), 24 for access tokens (``services.oauth``);
# anything else is not tracked by id.
_TOKEN_ID = re.compile(r"(?:mlt_([0-9a-f]{12})|mla_([0-9a-f]{24}))_")


#: The longest budget key :meth:`AuthFailures.spend` accepts (an address or a token id).
MAX_FAILURE_KEY = 128


def failure_keys(request: Request, token: str = "") -> list[str]:
    """The budgets one failed authentication of ``request`` spends: its client address's,
    and the presented token's id if it names one."""
    client = request.client.host if request.client is not None else "unknown"
    keys = [f"address:{client}"]
    named = _TOKEN_ID.match(token)
    if named is not None:
        keys.append(f"token:{named.group(1) or named.group(2)}")
    return keys


def _refuse_over_budget(wait_ms: int) -> None:
    if wait_ms:
        raise RateLimited(
            "too many failed authentications from this client; retry later",
            retry_after_ms=wait_ms,
        )


class AuthFailures:
    """Failure budgets per client address and per token id (see module docstring)."""

    def __init__(self, limit: RateLimit, clock: Clock) -> None:
        self._limiter = RateLimiter(limit, clock)

    def spend(self, keys: Sequence[str]) -> int:
        """Spend one unit of each of ``keys`` (:func:`failure_keys`): 0 if every one had
        budget left, else the longest wait in milliseconds.

        Raises :class:`InvalidInput` for keys that :func:`failure_keys` does not make
        (what an API worker sends is checked too).
        """
        if not 1 <= len(keys) <= 2 or not all(
            isinstance(key, str)
            and len(key) <= MAX_FAILURE_KEY
            and key.startswith(("address:", "token:"))
            for key in keys
        ):
            raise InvalidInput("not the budget keys of a failed authentication")
        wait_ms = 0
        for key in keys:
            wait_ms = max(wait_ms, self._limiter.spend(key))
        return wait_ms

    async def charge(self, request: Request, token: str = "") -> None:
        """Count one failed authentication; raise :class:`RateLimited` once over budget."""
        _refuse_over_budget(self.spend(failure_keys(request, token)))


class SharedAuthFailures:
    """An API worker's failure budgets: the parent's :class:`AuthFailures`, spent over
    the sequencer link (``SequencerClient.spend_failures``), one budget per node."""

    def __init__(self, spend: Callable[[Sequence[str]], Awaitable[int]]) -> None:
        self._spend = spend

    async def charge(self, request: Request, token: str = "") -> None:
        """Count one failed authentication at the parent; :class:`RateLimited` once over
        budget, ``SequencerUnavailable`` (503) if the parent cannot be asked."""
        _refuse_over_budget(await self._spend(failure_keys(request, token)))


#: Sign-ins one address may open (each writes a short-lived row before anyone signed in):
#: 30 back to back, then one every 2 seconds.
SIGN_IN_OPENS = RateLimit(burst=30, interval_ms=2_000)


class SignInOpens:
    """The budget of sign-in steps each client address may open (``api.oauth``).

    Opening one is the only write the node makes for a client nobody has
    authenticated yet (a row of the OAuth store that expires in minutes, no
    chain); this bounds how many one address can keep open.
    """

    def __init__(self, limit: RateLimit, clock: Clock) -> None:
        self._limiter = RateLimiter(limit, clock)

    async def charge(self, request: Request, token: str = "") -> None:
        """Count one sign-in opened by ``request``'s client; ``RateLimited`` once over budget."""
        client = request.client.host if request.client is not None else "unknown"
        wait_ms = self._limiter.spend(f"address:{client}")
        if wait_ms:
            raise RateLimited(
                "too many sign-ins opened from this client; retry later", retry_after_ms=wait_ms
            )


def require(*roles: str, scoped: bool = True) -> Callable[..., Any]:
    """A FastAPI dependency admitting a valid token whose role is in ``roles`` (admin always).

    ``scoped=False``: an access token's scopes are not checked against the request
    path (the handler checks what they allow itself, e.g. a bulk export's status
    and files, which only the token that started the export may fetch).
    """

    # Async on purpose: a sync dependency would hop to a worker thread on every
    # request; the token check is one indexed SQLite read, cheaper than the hop.
    # It takes the request alone (not ``Services``): a nested dependency is one
    # more dependency list FastAPI solves on every request (decision 0035).
    async def dependency(request: Request) -> TokenInfo:
        services = services_of(request.app)
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            # Nothing was presented, so nothing was guessed: not charged.
            raise Unauthorized("a bearer token is required")
        token = token.strip()
        try:
            if token.startswith("mla_") and services.oauth is not None:
                info = await services.oauth.check_access(token, now_ms=services.clock.now_ms())
            else:
                info = services.tokens.check(token, now_ms=services.clock.now_ms())
        except InvalidInput as exc:
            await services.auth_failures.charge(request, token)
            raise Unauthorized(str(exc)) from None
        if info.role != "admin" and info.role not in roles:
            raise Forbidden(f"role {info.role!r} may not do this")
        if scoped and info.scopes is not None:
            resource_type, action = request_access(request.method, request.url.path)
            if not parse_scopes(" ".join(info.scopes)).allows(resource_type, action):
                what = resource_type or "this resource"
                raise Forbidden(f"the token's scopes do not allow {_ACTIONS[action]} of {what}")
        return info

    return dependency
