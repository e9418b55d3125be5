"""Route matching that skips, by a path's shape alone, the routes a path cannot match.

FastAPI tries an application's routes in order, and an included router's
``matches`` walks each of its routes with per-route bookkeeping: tens of
microseconds per route tried, and a FHIR read used to try about forty
routes (eleven routers are included before the FHIR router; ``/healthz``
comes after all of them). :func:`install_path_gates` puts a cheap check in
front of each of the application's top-level routes: the *shape* of every
path template the route serves (its ``/``-separated segments, literal or
parameter) is computed once, and a request path that fits none of them is
answered ``no match`` without asking the route.

The check is a necessary condition of FastAPI's own match (a Starlette path
regex: a literal segment must be equal, a parameter takes exactly one
segment unless it is a ``:path`` parameter, which takes the rest), so no
path can match a different route than before: the order of the routes, the
routes themselves, ``405`` partial matches, slash redirects and the OpenAPI
description are untouched. A route whose paths are not all known templates
is never skipped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from starlette._utils import get_route_path
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Scope

__all__ = ["PathShape", "install_path_gates", "route_shapes"]


@dataclass(frozen=True, slots=True)
class PathShape:
    """What a path template demands of a request path's segments.

    ``segments``: one entry per ``/``-separated segment after the leading
    ``/``: the literal text, or ``None`` for a parameter (any one segment).
    ``open_tail``: the template's last segment holds a ``:path`` parameter,
    which also spans any further segments.
    """

    segments: tuple[str | None, ...]
    open_tail: bool

    @classmethod
    def of(cls, template: str) -> PathShape | None:
        """The shape of a route path template (``/fhir/{resource_type}/{rid}``);
        ``None`` for a template that is not a path (a host pattern, an empty mount)."""
        if not template.startswith("/"):
            return None
        segments: list[str | None] = []
        for part in template[1:].split("/"):
            if ":path}" in part:
                # The regex of a ``:path`` parameter is ``.*``: from here on, anything.
                segments.append(None)
                return cls(tuple(segments), open_tail=True)
            segments.append(None if "{" in part else part)
        return cls(tuple(segments), open_tail=False)

    def pattern(self) -> str:
        """A regular expression (``re.DOTALL``, matched whole) for the paths of this shape."""
        parts = ["[^/]*" if s is None else re.escape(s) for s in self.segments]
        if self.open_tail:
            return "/" + "".join(f"{p}/" for p in parts[:-1]) + ".*"
        return "/" + "/".join(parts)

    def admits(self, path: str) -> bool:
        """Whether a request path (``get_route_path``) of this shape may match."""
        return re.fullmatch(self.pattern(), path, re.DOTALL) is not None


def route_shapes(route: Any) -> list[PathShape] | None:
    """The shapes of every path ``route`` can match (an included router: all of its
    routes'), or ``None`` when one of them is unknown and the route must always be asked."""
    candidates = getattr(route, "effective_candidates", None)
    if candidates is not None:  # a router included with ``include_router``
        shapes: list[PathShape] = []
        for candidate in candidates():
            inner = route_shapes(candidate)
            if inner is None:
                return None
            shapes.extend(inner)
        return shapes
    # A route or an included route's effective form: a plain path template, compiled by
    # Starlette's ``compile_path`` into the regex the route matches with. Mounts, hosts,
    # frontend groups and anything else: unknown.
    target = getattr(route, "starlette_route", None) or getattr(route, "original_route", route)
    if not isinstance(target, Route):
        return None
    shape = PathShape.of(str(getattr(route, "path", "")))
    return None if shape is None else [shape]


def _gated(
    matches: Callable[[Scope], tuple[Match, Scope]], shapes: Iterable[PathShape]
) -> Callable[[Scope], tuple[Match, Scope]]:
    # Every shape in one expression: one match in C per route asked, not a Python loop.
    admitted = re.compile("|".join(f"(?:{s.pattern()})" for s in shapes), re.DOTALL).fullmatch

    def gated_matches(scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] in ("http", "websocket") and admitted(get_route_path(scope)) is None:
            return Match.NONE, {}
        return matches(scope)

    gated_matches.__wrapped__ = matches  # type: ignore[attr-defined]
    return gated_matches


def install_path_gates(app: FastAPI) -> None:
    """Gate each of ``app``'s top-level routes by the shapes of its paths (module docstring).

    Call it once the app has all its routes: a route added later is not gated (it is
    simply always asked), and the routes of a router included earlier are read now.
    Only ``app``'s own route objects are changed (``include_router`` makes them per app).
    """
    route: BaseRoute
    for route in app.router.routes:
        if hasattr(route.matches, "__wrapped__"):
            continue  # already gated
        shapes = route_shapes(route)
        if shapes is not None:
            route.matches = _gated(route.matches, shapes)  # type: ignore[method-assign,assignment]
