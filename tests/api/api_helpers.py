"""Helpers shared by the HTTP API tests: a real uvicorn server in a thread, and response checks.

The node's asyncio objects (group committers, sequencer, locks) must live on the
loop that serves requests, so the whole of ``node start``'s lifecycle
(``api.serving.NodeServer``: open, serve, close in order) runs in the server
thread's own event loop, on a socket bound to a free port of 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvicorn
from fastapi import FastAPI

from medledger.api.app import create_app
from medledger.api.auth import AUTH_FAILURES
from medledger.api.server import HttpLimits
from medledger.api.serving import NodeServer
from medledger.core.encoding import canonical_bytes
from medledger.core.models import Transaction
from medledger.ledger.proofs import head_header
from medledger.ledger.verify import VerifyReport, verify_chain
from medledger.lifecycle import RunSettings
from medledger.localnet.loopback import loopback_socket
from medledger.node import Node, init_node, open_chain, open_node
from medledger.services.ratelimit import RateLimit
from medledger.storage.keystore import KdfParams
from medledger.storage.ports import TokenStore
from medledger.storage.sqlite.oauth import SqliteOAuthStore
from medledger.storage.sqlite.tokens import SqliteTokenStore
from medledger.synthetic import PatientBundle, generate_patients

T = TypeVar("T")

PASSPHRASE = b"api test passphrase"
FAST_KDF = KdfParams(n=2**12)
FHIR_JSON = "application/fhir+json"
#: Markers of a Python traceback or object repr leaking into a response.
LEAK_PATTERNS = (
    "Traceback",
    'File "',
    " object at 0x",
    "<class '",
    "<function ",
    "site-packages",
    "medledger/",
)


def cli_command() -> list[str]:
    """How to run ``medledger`` in a subprocess: the venv's script, or the entry point."""
    script = Path(sys.executable).parent / "medledger"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from medledger.cli import main; main()"]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class LiveServer:
    """A node served over real HTTP; ``run`` executes a coroutine on the server's loop."""

    root: Path
    url: str
    tokens: TokenStore
    app: FastAPI
    node: Node
    loop: asyncio.AbstractEventLoop
    server: uvicorn.Server
    node_server: NodeServer
    thread: threading.Thread
    clinician: str
    auditor: str
    admin: str
    errors: list[BaseException] = field(default_factory=list)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def token(
        self, role: str, *, patient: str | None = None, ttl_ms: int | None = None, label: str = ""
    ) -> str:
        text, _ = self.tokens.create(
            role=role, patient=patient, now_ms=now_ms(), ttl_ms=ttl_ms, label=label
        )
        return text

    def log_size(self) -> int:
        """The private chain's log size, read through a separate read-only store."""
        _, store = open_chain(self.root)
        try:
            return head_header(store).log_size
        finally:
            store.close()

    def record_writes(self) -> int:
        """Private-chain txs other than ``access`` entries: what reads must never add to."""
        _, store = open_chain(self.root)
        try:
            return sum(
                Transaction.decode(data).type != "access"
                for block in store.iter_blocks(1)
                for data in block.tx_data
            )
        finally:
            store.close()

    def access_entries(self) -> list[dict[str, Any]]:
        """The bodies of every ``access`` tx on the private chain, oldest first."""
        _, store = open_chain(self.root)
        try:
            return [
                tx.body
                for block in store.iter_blocks(1)
                for data in block.tx_data
                if (tx := Transaction.decode(data)).type == "access"
            ]
        finally:
            store.close()

    def verify(self) -> VerifyReport:
        config, store = open_chain(self.root)
        try:
            return verify_chain(store, expected_key=config.signing_key)
        finally:
            store.close()


#: ``client(address=..., host=...)`` of :func:`serve_in_process`.
InProcessClient = Callable[..., httpx.AsyncClient]


def serve_in_process(
    root: Path,
    story: Callable[[InProcessClient, SqliteTokenStore], Awaitable[None]],
    *,
    name: str = "In-Process Test Hospital",
    advertise: str = "",
    oauth: bool = False,
    **app_options: Any,
) -> None:
    """Create a node in ``root`` and serve it in-process (``create_app`` over httpx's ASGI
    transport, no socket) for ``story(client, tokens)``, then close everything.

    ``client(address="198.51.100.4", host="node")``: an ``AsyncClient`` whose requests
    come from ``address`` and carry ``Host: host``, both as a test (or an attacker)
    chooses. ``oauth``: with the authorization server's store (``root/oauth.db``).
    ``app_options`` go to ``create_app``.
    """
    init_node(root, name=name, passphrase=PASSPHRASE, kdf=FAST_KDF, advertise=advertise)
    tokens = SqliteTokenStore(root / "tokens.db")
    oauth_store = SqliteOAuthStore(root / "oauth.db") if oauth else None

    async def main() -> None:
        node = open_node(root, PASSPHRASE)
        try:
            app = create_app(node, tokens, oauth_store=oauth_store, **app_options)

            def client(address: str = "198.51.100.4", host: str = "node") -> httpx.AsyncClient:
                transport = httpx.ASGITransport(app=app, client=(address, 40_000))
                return httpx.AsyncClient(transport=transport, base_url=f"http://{host}")

            await story(client, tokens)
        finally:
            await node.close()

    try:
        asyncio.run(main())
    finally:
        tokens.close()
        if oauth_store is not None:
            oauth_store.close()


def start_server(
    root: Path,
    *,
    name: str = "Api Test Hospital",
    auth_failures: RateLimit = AUTH_FAILURES,
    settings: RunSettings | None = None,
    tls: bool = False,
) -> LiveServer:
    """Create a node in ``root`` and serve it on a free port until ``stop_server``.

    ``tls``: serve HTTPS with the node's own certificate (``root/tls.crt``, made
    by ``init_node`` for 127.0.0.1), as ``node start`` does; else plain HTTP.

    The node runs under the same lifecycle as ``node start`` (``api.serving``):
    opened, served and closed in its order, with the scrub off unless ``settings``
    turn it on.
    """
    init_node(root, name=name, passphrase=PASSPHRASE, kdf=FAST_KDF)
    # The test's own handle on the token file, as ``medledger token create`` would be.
    tokens = SqliteTokenStore(root / "tokens.db")
    sock = loopback_socket()
    node_server = NodeServer(
        root=root,
        passphrase=PASSPHRASE,
        settings=settings or RunSettings(),
        sockets=[sock],
        limits=HttpLimits(idle_timeout_s=30),
        # API semantics on a loopback socket; TLS itself: tests/test_cli_service.py.
        plain_http=not tls,
        auth_failures=auth_failures,
    )
    started = threading.Event()
    box: dict[str, Any] = {"errors": []}

    async def main() -> None:
        box["loop"] = asyncio.get_running_loop()
        serving = asyncio.create_task(node_server.serve())
        while not node_server.started and not serving.done():
            await asyncio.sleep(0.005)
        started.set()
        await serving

    def thread_main() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by stop_server
            box["errors"].append(exc)
        finally:
            started.set()
            sock.close()

    thread = threading.Thread(target=thread_main, name="uvicorn-test-server", daemon=True)
    thread.start()
    if not started.wait(30) or box["errors"] or not node_server.started:
        thread.join(30)
        tokens.close()
        raise RuntimeError(f"the test server did not start: {box['errors']!r}")
    assert node_server.runtime is not None and node_server.app is not None
    assert node_server.http_server is not None
    created = now_ms()
    live = LiveServer(
        root=root,
        url=f"{'https' if tls else 'http'}://127.0.0.1:{sock.getsockname()[1]}",
        tokens=tokens,
        app=node_server.app,
        node=node_server.runtime.node,
        loop=box["loop"],
        server=node_server.http_server,
        node_server=node_server,
        thread=thread,
        clinician=tokens.create(role="clinician", now_ms=created, label="clinician")[0],
        auditor=tokens.create(role="auditor", now_ms=created, label="auditor")[0],
        admin=tokens.create(role="admin", now_ms=created, label="admin")[0],
        errors=box["errors"],
    )
    return live


def stop_server(live: LiveServer) -> None:
    """Stop serving and close the node in the lifecycle's order; surface any thread error."""
    live.loop.call_soon_threadsafe(live.node_server.stop)
    live.thread.join(30)
    live.tokens.close()
    assert not live.thread.is_alive(), "the test server did not stop within 30 s"
    assert not live.errors, f"the server thread failed: {live.errors!r}"


@contextmanager
def serving(root: Path) -> Iterator[LiveServer]:
    live = start_server(root)
    try:
        yield live
    finally:
        stop_server(live)


# -- data ----------------------------------------------------------------------------------


def fhir_bytes(resource: Any) -> bytes:
    return json.dumps(resource, separators=(",", ":")).encode()


def post_json(client: httpx.Client, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    headers = {"Content-Type": FHIR_JSON, **kwargs.pop("headers", {})}
    return client.post(path, content=fhir_bytes(body), headers=headers, **kwargs)


def put_json(client: httpx.Client, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    headers = {"Content-Type": FHIR_JSON, **kwargs.pop("headers", {})}
    return client.put(path, content=fhir_bytes(body), headers=headers, **kwargs)


def transaction_of(bundle: PatientBundle) -> dict[str, Any]:
    """A transaction Bundle that PUTs a synthetic patient and its resources under their ids."""
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"{r['resourceType']}/{r['id']}",
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
            for r in bundle.all_resources()
        ],
    }


def seed_patients(
    live: LiveServer, count: int, *, start_index: int = 0, per_patient: int = 20
) -> list[PatientBundle]:
    """Load synthetic patients through ``POST /fhir`` transactions, one per patient."""
    patients = generate_patients(
        count, seed=7, start_index=start_index, resources_per_patient=per_patient
    )
    with live.client(live.clinician) as client:
        for p in patients:
            r = post_json(client, "/fhir", transaction_of(p))
            assert r.status_code == 200, r.text
    return patients


# -- checks --------------------------------------------------------------------------------


def assert_no_leak(text: str) -> None:
    for marker in LEAK_PATTERNS:
        assert marker not in text, f"response leaks {marker!r}: {text[:500]}"


def assert_outcome(
    response: httpx.Response, status: int | tuple[int, ...], code: str | None = None
) -> dict[str, Any]:
    """``response`` is an OperationOutcome error with ``status`` (and issue ``code``)."""
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (
        f"{response.request.method} {response.request.url}: expected {statuses}, "
        f"got {response.status_code}: {response.text[:500]}"
    )
    assert response.headers["content-type"].startswith(FHIR_JSON), response.headers
    assert_no_leak(response.text)
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    issues = body["issue"]
    assert isinstance(issues, list) and issues, body
    for issue in issues:
        assert issue["severity"] in ("fatal", "error", "warning", "information"), issue
        assert isinstance(issue["code"], str) and issue["code"], issue
        assert isinstance(issue.get("diagnostics", ""), str), issue
    if code is not None:
        assert any(i["code"] == code for i in issues), body
    return dict(body)


def canonical_sha256(value: Any) -> bytes:
    return hashlib.sha256(canonical_bytes(value)).digest()


def independent_leaf_hash(data: bytes) -> bytes:
    """RFC 6962 leaf hash, computed with hashlib alone."""
    return hashlib.sha256(b"\x00" + data).digest()


UUID_SHAPE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
