"""Path gates (``api.dispatch``) skip routes without changing what any path reaches.

The same node is served by two apps: ``create_app`` as shipped (gated) and one
built without the gates. Both must publish the same OpenAPI document, and every
probed request — each OpenAPI path and route template filled in with plain
values and with every literal another route has at that position, with and
without a trailing slash, one segment longer, under three methods
— must reach the same endpoint with the same path parameters and status.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_helpers import FAST_KDF, PASSPHRASE
from asgi_support import http_scope
from fastapi import FastAPI
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route, compile_path

import medledger.api.app as app_module
from medledger.api.app import create_app
from medledger.api.dispatch import PathShape, route_shapes
from medledger.node import init_node, open_node
from medledger.storage.sqlite.tokens import SqliteTokenStore

#: A method most routes answer, and two that many only answer partially (405).
_METHODS = ("GET", "POST", "DELETE")
_PARAM = re.compile(r"\{[^}]*\}")


def _templates(app: FastAPI) -> list[str]:
    """Every path template ``app`` routes (included routers' routes with their prefix)."""
    out: list[str] = []

    def walk(route: Any) -> None:
        candidates = getattr(route, "effective_candidates", None)
        if candidates is not None:
            for candidate in candidates():
                walk(candidate)
        elif isinstance(getattr(route, "path", None), str):
            out.append(route.path)

    for route in app.router.routes:
        walk(route)
    return sorted(set(out))


def _probe_paths(templates: list[str]) -> list[str]:
    """Concrete paths near every template: parameters filled with a plain value and with
    each literal that some template has at that position; then slash and length variants."""
    literals: dict[int, set[str]] = {}
    for t in templates:
        for i, seg in enumerate(t[1:].split("/")):
            if "{" not in seg:
                literals.setdefault(i, set()).add(seg)
    paths: set[str] = {"/", "/nope", "/fhir/", "//"}
    for t in templates:
        segs = t[1:].split("/")
        choices = [
            [seg] if "{" not in seg else ["p1", *_some(literals.get(i, set()) - {""}, seed=t)]
            for i, seg in enumerate(segs)
        ]
        for combo in itertools.islice(itertools.product(*choices), 6):
            base = "/" + "/".join(combo)
            paths.update({base, base + "/", base + "/extra"})
    return sorted(paths)


def _some(words: set[str], *, seed: str) -> list[str]:
    """Up to four of ``words``, a different few for each template (reproducibly)."""
    return random.Random(seed).sample(sorted(words), min(4, len(words)))


async def _reached(app: FastAPI, method: str, path: str) -> tuple[Any, ...]:
    """What ``method path`` (no token, no body) reaches in ``app``: the endpoint, its path
    parameters and the answer's status."""
    scope = http_scope(method, path)
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    endpoint = scope.get("endpoint")
    return (
        getattr(endpoint, "__module__", None),
        getattr(endpoint, "__qualname__", None),
        scope.get("path_params"),
        status[:1],
    )


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FastAPI, FastAPI]]:
    root: Path = tmp_path_factory.mktemp("dispatch") / "node"
    init_node(root, name="Dispatch Test Hospital", passphrase=PASSPHRASE, kdf=FAST_KDF)
    tokens = SqliteTokenStore(root / "tokens.db")
    loop = asyncio.new_event_loop()
    node = loop.run_until_complete(_open(root))
    try:
        gated = create_app(node, tokens)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(app_module, "install_path_gates", lambda app: None)
            plain = create_app(node, tokens)
        app_module.install_path_gates(gated)  # a second call changes nothing
        yield gated, plain
        loop.run_until_complete(node.close())
    finally:
        loop.close()
        tokens.close()


async def _open(root: Path) -> Any:
    return open_node(root, PASSPHRASE)


def test_the_gates_are_installed_on_the_shipped_app(apps: tuple[FastAPI, FastAPI]) -> None:
    gated, plain = apps
    assert any(hasattr(r.matches, "__wrapped__") for r in gated.router.routes)
    assert not any(hasattr(r.matches, "__wrapped__") for r in plain.router.routes)


def test_openapi_description_is_unchanged(apps: tuple[FastAPI, FastAPI]) -> None:
    gated, plain = apps
    assert gated.openapi() == plain.openapi()
    assert len(gated.openapi()["paths"]) > 30


def test_every_probed_request_reaches_the_same_endpoint(apps: tuple[FastAPI, FastAPI]) -> None:
    gated, plain = apps
    openapi_paths = list(gated.openapi()["paths"])
    templates = sorted(set(_templates(gated)) | set(openapi_paths))
    assert set(openapi_paths) <= set(templates)
    paths = _probe_paths(templates)
    assert len(paths) > 150

    async def compare() -> list[str]:
        differences = []
        for path, method in itertools.product(paths, _METHODS):
            before = await _reached(plain, method, path)
            after = await _reached(gated, method, path)
            if before != after:
                differences.append(f"{method} {path}: {before} -> {after}")
        return differences

    differences = asyncio.run(compare())
    assert differences == []


def test_the_read_path_reaches_the_fhir_read(apps: tuple[FastAPI, FastAPI]) -> None:
    gated, _ = apps
    reached = asyncio.run(_reached(gated, "GET", "/fhir/Patient/p1"))
    assert reached[:3] == (
        "medledger.api.fhir",
        "read",
        {"resource_type": "Patient", "rid": "p1"},
    )
    assert reached[3] == [401]  # no token: the gate changes no security check


@pytest.mark.parametrize(
    ("template", "path"),
    [
        ("/fhir/{resource_type}/{rid}", "/fhir/Patient/1"),
        ("/fhir/{resource_type}/{rid}", "/fhir/Patient/1/"),
        ("/fhir/{resource_type}/{rid}", "/fhir/Patient"),
        ("/fhir/Consent/{cid}", "/fhir/Patient/1"),
        ("/portal/{name:path}", "/portal/"),
        ("/portal/{name:path}", "/portal/a/b/c"),
        ("/portal/{name:path}", "/portal"),
        ("/chain/{which}/blocks/{height}", "/chain/private/blocks/7"),
        ("/healthz", "/healthz/"),
        ("/", "/"),
        ("/{a}-{b}.json", "/x-y.json"),
        ("/{a}-{b}.json", "/x/y.json"),
    ],
)
def test_a_shape_admits_every_path_the_route_regex_matches(template: str, path: str) -> None:
    shape = PathShape.of(template)
    assert shape is not None
    regex, _, _ = compile_path(template)
    admitted = shape.admits(path)
    if regex.match(path):
        assert admitted, f"{template} matches {path} but the gate would skip it"
    if "{" not in template:
        assert admitted == (path == template)


def test_every_route_template_admits_its_own_filled_paths(apps: tuple[FastAPI, FastAPI]) -> None:
    gated, _ = apps
    for template in _templates(gated):
        shape = PathShape.of(template)
        assert shape is not None, template
        regex, _, _ = compile_path(template)
        for fill in ("p1", "a/b", ""):
            path = _PARAM.sub(fill, template)
            if regex.match(path):
                assert shape.admits(path), (template, path)


def test_a_route_of_unknown_shape_is_always_asked() -> None:
    assert route_shapes(Mount("/static", app=PlainTextResponse("static"))) is None
    assert route_shapes(Route("/ok", PlainTextResponse("ok"))) == [PathShape(("ok",), False)]
