"""FHIR read and vread served without FastAPI's per-request machinery.

Issue 19 asks that a FHIR read cost at most twice the CPU of an empty
request. Once the path gates (``api.dispatch``) took route matching out of
the way, most of what separated a read from ``/healthz`` was FastAPI's work
around the handler: walking the FHIR router's routes with per-route scope
bookkeeping, and solving the route's dependency lists (the router's format
check, ``NodeDep``, the token check) through its generic machinery.

:func:`install_lean_reads` puts one route first in the application's route
list. It claims only ``GET /fhir/{resource_type}/{rid}`` and
``GET /fhir/{resource_type}/{rid}/_history/{vid}`` (``HEAD`` arrives here as
``GET``, ``api.headers``), and only when

* no route before the FastAPI route could have answered the path with ``GET``
  (the union of their path shapes, as the gates compute them, does not fit),
* the query string has no parameter but ``_format`` (anything else: FastAPI),
* for vread, the version is plain decimal digits from 0 to 2**53 (anything
  else: FastAPI, which answers the validation error).

What it then does is what the FastAPI route does, by calling the same
functions in the same order: ``api.negotiation.check_formats`` (406),
``fhir.clinical_reader`` (the bearer token, the failed-authentication budget,
role and SMART scopes: 401/403/429), and ``fhir.read_answer`` /
``fhir.vread_answer`` (patient gate, durable ``access`` entry, the response).
An error propagates to the application's exception handlers (its
``ExceptionMiddleware``), which answer it as they answer it from the route,
and the answer passes through the same middleware (metrics, security
headers, ``HEAD``, unexpected errors). The request's scope
names the FastAPI route and endpoint, so logs name the same route template.
The FastAPI routes stay registered: the OpenAPI description is unchanged, and
every request the lean route declines reaches them as before.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, get_args
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette._utils import get_route_path
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Receive, Scope, Send

from medledger.api import fhir
from medledger.api.clinical_reads import digits
from medledger.api.deps import NodeDep, services_of
from medledger.api.dispatch import route_shapes
from medledger.api.negotiation import check_formats

__all__ = ["LeanReadRoute", "install_lean_reads"]

#: The largest version vread's ``Path(ge=0, le=2**53)`` admits.
_MAX_VERSION = 2**53

Answer = Callable[[Request, dict[str, Any]], Awaitable[Response]]


async def _read(request: Request, params: dict[str, Any]) -> Response:
    who = await fhir.clinical_reader(request)
    node = services_of(request.app).node
    return await fhir.read_answer(node, who, params["resource_type"], params["rid"])


async def _vread(request: Request, params: dict[str, Any]) -> Response:
    who = await fhir.clinical_reader(request)
    node = services_of(request.app).node
    # ``matches`` took only a plain version number (``_plain_version``).
    vid = int(params["vid"])
    return await fhir.vread_answer(node, who, params["resource_type"], params["rid"], vid)


def _plain_version(text: str) -> bool:
    """Decimal digits FastAPI would read as the same int from 0 to 2**53 (no sign, no
    leading zero, no underscore or space: anything else is left to its validation)."""
    return digits(text) and (text == "0" or text[0] != "0") and int(text) <= _MAX_VERSION


@dataclass(frozen=True, slots=True)
class _Target:
    """One FastAPI route the lean route may answer for."""

    #: The FastAPI route object the scope names (``scope["route"]``), as the router would.
    route: Any
    endpoint: Callable[..., Any]
    #: The route's own path regex (with the router's prefix) and parameter names.
    path_regex: re.Pattern[str]
    #: Every path a route before this one could answer ``GET`` for (``None``: none).
    earlier: re.Pattern[str] | None
    answer: Answer
    #: The path parameter that must be a plain version number (vread), if any.
    version_param: str | None


def _leaves(routes: list[BaseRoute]) -> Iterator[Any]:
    """The application's routes in the order the router tries them, included routers
    flattened (FastAPI 0.165 keeps an included router as one route of candidates)."""
    for route in routes:
        candidates = getattr(route, "effective_candidates", None)
        if candidates is not None:
            yield from _leaves(list(candidates()))
        else:
            yield route


#: What FastAPI solves for the read and vread routes, in its order: the FHIR router's
#: format check, ``NodeDep``'s provider, the token check. A route whose dependencies
#: differ (one added later, say) is left to FastAPI rather than answered without them.
_DEPENDENCIES = (check_formats, get_args(NodeDep)[1].dependency, fhir.clinical_reader)


def _does_what_lean_does(leaf: Any) -> bool:
    """Whether ``leaf``'s FastAPI dependant asks exactly what the lean route does: the
    three dependencies above (none with its own), path parameters, nothing else."""
    dependant = getattr(leaf, "dependant", None)
    if dependant is None:
        return False
    own = tuple(d.call for d in dependant.dependencies)
    return (
        own == _DEPENDENCIES
        and not any(d.dependencies for d in dependant.dependencies)
        and not (dependant.query_params or dependant.header_params or dependant.cookie_params)
        and not dependant.body_params
    )


def _may_answer_get(leaf: Any) -> bool:
    methods = getattr(leaf, "methods", None)
    return methods is None or not methods or "GET" in methods


def _targets(app: FastAPI) -> list[_Target]:
    """The read and vread routes of ``app``, each with what may come before it; a route
    after one whose paths are unknown (a mount, say) is never taken over."""
    answers: dict[Any, tuple[Answer, str | None]] = {
        fhir.read: (_read, None),
        fhir.vread: (_vread, "vid"),
    }
    targets: list[_Target] = []
    earlier: list[str] = []
    for leaf in _leaves(list(app.router.routes)):
        if isinstance(leaf, LeanReadRoute):
            continue
        endpoint = getattr(leaf, "endpoint", None)
        found = answers.get(endpoint)
        regex = getattr(leaf, "path_regex", None)
        if (
            found is not None
            and isinstance(regex, re.Pattern)
            and _may_answer_get(leaf)
            and _does_what_lean_does(leaf)
        ):
            answer, version_param = found
            targets.append(
                _Target(
                    route=getattr(leaf, "original_route", leaf),
                    endpoint=endpoint,  # type: ignore[arg-type]
                    path_regex=regex,
                    earlier=re.compile("|".join(f"(?:{p})" for p in earlier), re.DOTALL)
                    if earlier
                    else None,
                    answer=answer,
                    version_param=version_param,
                )
            )
        if not _may_answer_get(leaf):
            continue
        shapes = route_shapes(leaf)
        if shapes is None:
            break  # from here on a path could reach anything: take over nothing after it
        earlier.extend(s.pattern() for s in shapes)
    return targets


def _only_format(query_string: bytes) -> bool:
    """Whether a query string holds no parameter but ``_format`` (parsed as Starlette does)."""
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    return all(name == "_format" for name, _ in pairs)


class LeanReadRoute(BaseRoute):
    """Answers FHIR read and vread as their FastAPI routes do (module docstring)."""

    def __init__(self, app: FastAPI, targets: list[_Target]) -> None:
        self._overrides = app.dependency_overrides
        self._targets = tuple(targets)

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or scope["method"] != "GET" or self._overrides:
            # Overridden dependencies (tests may override them) are FastAPI's to apply.
            return Match.NONE, {}
        path = get_route_path(scope)
        if not path.startswith("/fhir/"):
            return Match.NONE, {}
        query: bytes = scope.get("query_string", b"")
        if query and not _only_format(query):
            return Match.NONE, {}
        for target in self._targets:
            found = target.path_regex.match(path)
            if found is None:
                continue
            if target.earlier is not None and target.earlier.fullmatch(path):
                return Match.NONE, {}  # an earlier route may want it: FastAPI decides
            # Text, as the FastAPI route's ``str`` convertors leave them in the scope.
            params: dict[str, Any] = found.groupdict()
            if target.version_param is not None and not _plain_version(
                params[target.version_param]
            ):
                return Match.NONE, {}
            path_params = dict(scope.get("path_params", {}))
            path_params.update(params)
            return Match.FULL, {
                "endpoint": target.endpoint,
                "path_params": path_params,
                "route": target.route,
                "medledger.lean_read": target,
            }
        return Match.NONE, {}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        target: _Target = scope["medledger.lean_read"]
        request = Request(scope, receive, send)

        # The FHIR router's dependency first, then the route's (FastAPI's order). An error
        # propagates to the app's ExceptionMiddleware, whose handlers answer it exactly as
        # they answer the same error from the FastAPI route (an OperationOutcome).
        await check_formats(request)
        response = await target.answer(request, scope["path_params"])
        await response(scope, receive, send)

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        raise NoMatchFound(name, path_params)  # the FastAPI routes name these paths


def install_lean_reads(app: FastAPI) -> None:
    """Put a :class:`LeanReadRoute` first in ``app``'s routes (call once every route is in).

    Does nothing if ``app`` has neither route (or already has a lean route).
    """
    if any(isinstance(r, LeanReadRoute) for r in app.router.routes):
        return
    targets = _targets(app)
    if targets:
        app.router.routes.insert(0, LeanReadRoute(app, targets))
