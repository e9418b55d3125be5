"""The lean read path (``api.lean_reads``) answers exactly as the FastAPI routes do.

One node is served by two apps: ``create_app`` as shipped (lean) and one built
without the lean route (plain). Every request of a matrix — records that
exist, are missing, deleted or of another type; bad ids and versions; no,
malformed, unknown, expired, wrong-role and wrong-scope tokens; a patient's
token on its own and on another patient's records; ``_format``, ``Accept``,
other query parameters; ``GET`` and ``HEAD`` — is sent to the plain app and
then to the lean app, and the two must give byte-identical status, headers
and body, and append the same ``access`` entries to the private chain.
Both apps spend failed-authentication budgets of the same small size, so the
throttled answer (429 with ``Retry-After``) is compared too, and so are their
``/metrics`` counts at the end.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from api_helpers import FAST_KDF, PASSPHRASE
from asgi_support import http_scope
from fastapi import APIRouter, Depends, FastAPI

import medledger.api.app as app_module
from medledger.api import fhir
from medledger.api.app import create_app
from medledger.api.deps import services_of
from medledger.api.lean_reads import LeanReadRoute, install_lean_reads
from medledger.api.negotiation import check_formats
from medledger.core.models import Transaction
from medledger.node import Node, init_node, open_node
from medledger.services.oauth.server import AuthorizationServer
from medledger.services.ratelimit import RateLimit
from medledger.storage.ports import OAuthGrant
from medledger.storage.sqlite.oauth import SqliteOAuthStore
from medledger.storage.sqlite.tokens import SqliteTokenStore

#: The time both apps read token expiry and failure budgets from: fixed, so a
#: ``Retry-After`` cannot differ between the two answers by a second boundary.
NOW_MS = 1_800_000_000_000
#: Small enough that the matrix spends it; refilled only after an hour.
BUDGET = RateLimit(burst=4, interval_ms=3_600_000)


@dataclass
class FixedClock:
    now: int = NOW_MS

    def now_ms(self) -> int:
        return self.now


@dataclass
class Served:
    loop: asyncio.AbstractEventLoop
    node: Node
    lean: FastAPI
    plain: FastAPI
    tokens: dict[str, str]
    paths: dict[str, str]


@dataclass(frozen=True)
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    access: list[dict[str, Any]]
    lean: bool


async def _call(
    app: FastAPI, node: Node, method: str, path: str, query: str, headers: dict[str, str]
) -> Answer:
    scope = http_scope(method, path, query, [(k.encode(), v.encode()) for k, v in headers.items()])
    height = node.chain.head.height
    started: dict[str, Any] = {}
    body = bytearray()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            started.update(message)
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    await app(scope, receive, send)
    access = [
        tx.body
        for block in node.store.iter_blocks(height + 1)
        for data in block.tx_data
        if (tx := Transaction.decode(data)).type == "access"
    ]
    return Answer(
        status=started["status"],
        headers=list(started.get("headers", [])),
        body=bytes(body),
        access=access,
        lean="medledger.lean_read" in scope,
    )


def _post(served: Served, path: str, resource: dict[str, Any]) -> dict[str, Any]:
    scope = http_scope(
        "POST",
        path,
        "",
        [
            (b"authorization", f"Bearer {served.tokens['clinician']}".encode()),
            (b"content-type", b"application/fhir+json"),
        ],
    )
    out: dict[str, Any] = {"body": b""}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": json.dumps(resource).encode(), "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    served.loop.run_until_complete(served.plain(scope, receive, send))
    assert out["status"] == 201, out
    created: dict[str, Any] = json.loads(out["body"])
    return created


def _delete(served: Served, path: str) -> None:
    answer = served.loop.run_until_complete(
        _call(
            served.plain,
            served.node,
            "DELETE",
            path,
            "",
            {"authorization": f"Bearer {served.tokens['clinician']}"},
        )
    )
    assert answer.status == 204, answer


def _access_token(oauth: AuthorizationServer, scope: str, grant_id: str) -> str:
    """A SMART access token of a staff grant with ``scope`` (written as the server would)."""
    grant = OAuthGrant(
        id=grant_id,
        client_id="differential-test",
        role="clinician",
        patient=None,
        scope=scope,
        label="client:differential-test",
        created_ms=NOW_MS,
    )
    oauth.store.add_grant(grant)
    token: str = oauth._issue(grant, with_refresh=False)["access_token"]
    return token


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root: Path = tmp_path_factory.mktemp("lean") / "node"
    init_node(root, name="Lean Read Test Hospital", passphrase=PASSPHRASE, kdf=FAST_KDF)
    tokens = SqliteTokenStore(root / "tokens.db")
    oauth_store = SqliteOAuthStore(root / "oauth.db")
    loop = asyncio.new_event_loop()
    node = loop.run_until_complete(_open(root))
    try:
        clock = FixedClock()
        options: dict[str, Any] = {
            "clock": clock,
            "auth_failures": BUDGET,
            "oauth_store": oauth_store,
            "public_url": "https://lean.test",
        }
        lean = create_app(node, tokens, **options)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(app_module, "install_lean_reads", lambda app: None)
            plain = create_app(node, tokens, **options)
        oauth = services_of(lean).oauth
        assert oauth is not None

        def token(role: str, **kw: Any) -> str:
            text, _ = tokens.create(role=role, now_ms=kw.pop("now_ms", NOW_MS), **kw)
            return text

        served = Served(loop, node, lean, plain, {"clinician": token("clinician")}, {})
        alice = _post(served, "/fhir/Patient", {"resourceType": "Patient", "gender": "female"})
        bob = _post(served, "/fhir/Patient", {"resourceType": "Patient", "gender": "male"})
        gone = _post(served, "/fhir/Patient", {"resourceType": "Patient", "gender": "other"})
        _delete(served, f"/fhir/Patient/{gone['id']}")
        observation = {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "heart rate"},
            "subject": {"reference": f"Patient/{alice['id']}"},
            "valueQuantity": {"value": 61.50, "unit": "/min"},
        }
        alice_obs = _post(served, "/fhir/Observation", observation)
        bob_obs = _post(
            served,
            "/fhir/Observation",
            {**observation, "subject": {"reference": f"Patient/{bob['id']}"}},
        )
        served.tokens.update(
            {
                "auditor": token("auditor"),
                "admin": token("admin"),
                "alice": token("patient", patient=alice["id"]),
                "expired": token("clinician", now_ms=NOW_MS - 60_000, ttl_ms=1_000),
                "patient scope": _access_token(oauth, "user/Patient.read", "g1"),
                "observation scope": _access_token(oauth, "user/Observation.read", "g2"),
            }
        )
        served.paths.update(
            {
                "alice": f"/fhir/Patient/{alice['id']}",
                "bob": f"/fhir/Patient/{bob['id']}",
                "deleted": f"/fhir/Patient/{gone['id']}",
                "alice obs": f"/fhir/Observation/{alice_obs['id']}",
                "bob obs": f"/fhir/Observation/{bob_obs['id']}",
                "wrong type": f"/fhir/Observation/{alice['id']}",
                "missing": "/fhir/Patient/no-such-record",
                "unknown type": f"/fhir/Nonsense/{alice['id']}",
                "lower type": f"/fhir/patient/{alice['id']}",
                "bad id": "/fhir/Patient/bad$id!",
                "long id": "/fhir/Patient/" + "a" * 80,
                "vread": f"/fhir/Patient/{alice['id']}/_history/1",
                "vread obs": f"/fhir/Observation/{alice_obs['id']}/_history/1",
                "vread other's": f"/fhir/Observation/{bob_obs['id']}/_history/1",
                "vread deleted": f"/fhir/Patient/{gone['id']}/_history/2",
                "vread old of deleted": f"/fhir/Patient/{gone['id']}/_history/1",
                "vread missing version": f"/fhir/Patient/{alice['id']}/_history/7",
                "vread zero": f"/fhir/Patient/{alice['id']}/_history/0",
                "vread leading zero": f"/fhir/Patient/{alice['id']}/_history/01",
                "vread negative": f"/fhir/Patient/{alice['id']}/_history/-1",
                "vread too large": f"/fhir/Patient/{alice['id']}/_history/9007199254740993",
                "vread word": f"/fhir/Patient/{alice['id']}/_history/one",
                "type history": "/fhir/Patient/_history",
                "consent": "/fhir/Consent/c1",
                "metadata child": "/fhir/metadata/x",
                "export": "/fhir/Patient/$export",
            }
        )
        yield served
        loop.run_until_complete(node.close())
    finally:
        loop.close()
        tokens.close()
        oauth_store.close()


async def _open(root: Path) -> Node:
    return open_node(root, PASSPHRASE)


def _auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_the_shipped_app_has_the_lean_route_first(served: Served) -> None:
    assert isinstance(served.lean.router.routes[0], LeanReadRoute)
    assert not any(isinstance(r, LeanReadRoute) for r in served.plain.router.routes)
    assert served.lean.openapi() == served.plain.openapi()


def test_every_path_and_token_gets_the_same_answer(served: Served) -> None:
    statuses: set[int] = set()
    lean_answers = 0
    credentials: dict[str, dict[str, str]] = {
        "none": {},
        "empty bearer": {"authorization": "Bearer "},
        "basic": {"authorization": "Basic dXNlcjpwYXNz"},
        **{name: _auth(token) for name, token in served.tokens.items()},
    }
    for (_, path), (_, headers) in itertools.product(served.paths.items(), credentials.items()):
        plain = served.loop.run_until_complete(
            _call(served.plain, served.node, "GET", path, "", headers)
        )
        statuses.add(plain.status)
        lean_answers += _lean_agrees(served, "GET", path, "", headers, plain)
    # What the matrix must have exercised for the comparison to mean anything.
    assert {200, 400, 401, 403, 404, 410} <= statuses, statuses
    assert lean_answers > 100


def _lean_agrees(
    served: Served, method: str, path: str, query: str, headers: dict[str, str], plain: Answer
) -> bool:
    lean = served.loop.run_until_complete(
        _call(served.lean, served.node, method, path, query, headers)
    )
    call = (method, path, query, headers)
    assert (lean.status, lean.headers, lean.body) == (plain.status, plain.headers, plain.body), call
    assert lean.access == plain.access, call
    return lean.lean


_QUERIES = (
    "",
    "_format=json",
    "_format=application/fhir%2Bjson",
    "_format=xml",
    "_format=json&_format=xml",
    "_format=",
    "_pretty=true",
    "_summary=true",
    "_elements=id",
    "foo=bar",
)
_ACCEPTS = (
    None,
    "application/fhir+json",
    "application/json;q=0.1, text/html",
    "application/fhir+xml",
    "*/*",
    "",
)


def test_formats_queries_and_head_get_the_same_answer(served: Served) -> None:
    statuses: set[int] = set()
    taken = 0
    cases = itertools.product(
        ("alice", "vread", "missing"),
        ("clinician", "none", "alice"),
        _QUERIES,
        _ACCEPTS,
        ("GET", "HEAD"),
    )
    for path_name, who, query, accept, method in cases:
        if (path_name, who) == ("missing", "alice") or (method == "HEAD" and query):
            continue  # kept to a few hundred requests: every query is also sent with GET
        headers = _auth(served.tokens[who]) if who != "none" else {}
        if accept is not None:
            headers["accept"] = accept
        path = served.paths[path_name]
        plain = served.loop.run_until_complete(
            _call(served.plain, served.node, method, path, query, headers)
        )
        statuses.add(plain.status)
        taken += _lean_agrees(served, method, path, query, headers, plain)
    assert {200, 401, 404, 406} <= statuses, statuses
    assert taken > 100


def test_a_spent_failure_budget_is_answered_alike(served: Served) -> None:
    """Unknown tokens spend the address's budget in each app alike: 401 until it is
    spent, then 429 with the same Retry-After (the clock is fixed)."""
    statuses = []
    for n in range(BUDGET.burst + 3):
        headers = _auth(f"mlt_{n:012x}_not-a-secret")
        statuses.append(_compare_status(served, served.paths["alice"], headers))
    assert 429 in statuses and statuses[0] in (401, 429), statuses


def _compare_status(served: Served, path: str, headers: dict[str, str]) -> int:
    plain = served.loop.run_until_complete(
        _call(served.plain, served.node, "GET", path, "", headers)
    )
    _lean_agrees(served, "GET", path, "", headers, plain)
    return plain.status


def test_both_apps_count_the_same_answers(served: Served) -> None:
    before = (served.plain.state.metrics.counts(), served.lean.state.metrics.counts())
    for path in ("alice", "missing", "bad id", "vread", "consent"):
        for headers in ({}, _auth(served.tokens["clinician"]), _auth(served.tokens["auditor"])):
            _compare_status(served, served.paths[path], headers)
    after = (served.plain.state.metrics.counts(), served.lean.state.metrics.counts())
    counted = [
        [now - then for now, then in zip(a.values, b.values, strict=True)]
        for a, b in zip(after, before, strict=True)
    ]
    assert counted[0] == counted[1]
    assert sum(counted[0]) >= 15


def _app_with_read(*router_dependencies: Any) -> FastAPI:
    app = FastAPI()
    router = APIRouter(prefix="/fhir", dependencies=[Depends(d) for d in router_dependencies])
    router.add_api_route("/{resource_type}/{rid}", fhir.read, methods=["GET"])
    app.include_router(router)
    install_lean_reads(app)
    return app


async def _audit_everything() -> None:
    """A dependency the lean route does not know of."""


def test_a_read_route_with_other_dependencies_is_left_to_fastapi() -> None:
    assert isinstance(_app_with_read(check_formats).router.routes[0], LeanReadRoute)
    for extra in ((check_formats, _audit_everything), (_audit_everything,), ()):
        app = _app_with_read(*extra)
        assert not any(isinstance(r, LeanReadRoute) for r in app.router.routes), extra


def test_overridden_dependencies_are_left_to_fastapi(served: Served) -> None:
    headers = _auth(served.tokens["clinician"])
    path = served.paths["alice"]
    assert served.loop.run_until_complete(
        _call(served.lean, served.node, "GET", path, "", headers)
    ).lean
    served.lean.dependency_overrides[check_formats] = _audit_everything
    try:
        answer = served.loop.run_until_complete(
            _call(served.lean, served.node, "GET", path, "", {**headers, "accept": "text/xml"})
        )
    finally:
        served.lean.dependency_overrides.clear()
    assert not answer.lean
    assert answer.status == 200  # the override (no format check) was applied
