"""The FHIR read and create paths solve a flat dependency list on every request.

FastAPI solves each dependency's own dependencies per request; a provider
that depends on another provider (``Services`` under the token check and
under ``NodeDep``) added two dependency lists to every FHIR read (decision
0035). The providers on the hot path take the request alone.
"""

from __future__ import annotations

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.requests import Request

from medledger.api import fhir


def _route(path: str, method: str) -> APIRoute:
    for route in fhir.router.routes:
        if isinstance(route, APIRoute) and route.path == path and method in route.methods:
            return route
    raise AssertionError(f"no {method} {path} route")


def _nested(dependant: Dependant) -> list[str]:
    """Sub-dependencies of ``dependant``'s dependencies that FastAPI would solve per request."""
    out = []
    for dep in dependant.dependencies:
        for sub in dep.dependencies:
            if sub.call is not None and sub.call is not Request:
                out.append(f"{getattr(dep.call, '__name__', dep.call)} -> {sub.call}")
    return out


def test_read_and_create_have_no_nested_dependencies() -> None:
    for path, method in (
        ("/fhir/{resource_type}/{rid}", "GET"),
        ("/fhir/{resource_type}", "POST"),
        ("/fhir/{resource_type}/{rid}", "PUT"),
    ):
        route = _route(path, method)
        assert route.dependant.dependencies, f"{method} {path} lost its dependencies"
        assert _nested(route.dependant) == [], f"{method} {path}"
