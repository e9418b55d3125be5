"""The node's HTTP surface against hostile clients, on a real ``medledger node start`` process.

Issue #14 items 6, 7, 9, 11 and 17: half-sent and idle connections are closed
after a bounded time (raw sockets, slowloris style); oversized request heads
are refused with 431; one expensive search cannot starve ``/healthz``; every
answer carries ``Cache-Control: no-store`` and ``nosniff`` and no ``Server``
banner; ``HEAD`` is answered; ``/docs`` loads nothing from elsewhere; a 5xx
answer is counted in ``/metrics``; and none of it puts an error line in the log.

The node runs with short limits (``--head-timeout 1 --body-timeout 1
--idle-timeout 1``) so each wait is short; every wait has a deadline. It runs
two API worker processes, so the counts read from ``/metrics`` are those of
the whole node, whichever worker answered.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cli_support import start_node_process
from medledger.localnet.natsserver import free_ports
from medledger.node import init_node
from medledger.storage.keystore import KdfParams
from medledger.storage.sqlite.tokens import SqliteTokenStore

PASSPHRASE = "http hardening passphrase"
FHIR_JSON = "application/fhir+json"
#: Generous bound for anything the server must do "after about a second".
DEADLINE_S = 15.0


@dataclass
class Node:
    url: str
    port: int
    token: str
    log: Path
    proc: subprocess.Popen[bytes]

    def client(self, **kwargs: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10, **kwargs)  # type: ignore[arg-type]

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE_S)
        return sock

    def log_lines(self) -> list[dict[str, object]]:
        lines = []
        for text in self.log.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(text))
            except ValueError:
                lines.append({"level": "unstructured", "message": text})
        return lines


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("hardening") / "node"
    init_node(
        root, name="Hardening Hospital", passphrase=PASSPHRASE.encode(), kdf=KdfParams(n=2**12)
    )
    tokens = SqliteTokenStore(root / "tokens.db")
    try:
        token, _ = tokens.create(role="clinician", now_ms=time.time_ns() // 1_000_000)
    finally:
        tokens.close()
    (port,) = free_ports(1)
    log = root.parent / "node.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDLEDGER_")}
    env["MEDLEDGER_PASSPHRASE"] = PASSPHRASE
    args = ["--head-timeout", "1", "--body-timeout", "1", "--idle-timeout", "1"]
    # Two API workers on any machine: every count in /metrics must be the whole node's.
    args += ["--workers", "2"]
    proc = start_node_process(root, port, log, env, "--plain-http", *args)
    running = Node(f"http://127.0.0.1:{port}", port, token, log, proc)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"node start exited with {proc.returncode}: {log.read_text()}")
            try:
                # /readyz, not /healthz: a worker answers /healthz as soon as it listens,
                # /readyz (the parent's) only once every worker and the parent serve.
                if httpx.get(f"{running.url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"node start was not ready within 60 s: {log.read_text()}")
            time.sleep(0.05)
        yield running
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def patient_id(node: Node) -> str:
    with node.client() as client:
        r = client.post(
            "/fhir/Patient",
            content=b'{"resourceType":"Patient","gender":"female"}',
            headers={"Content-Type": FHIR_JSON},
        )
        assert r.status_code == 201, r.text
        return str(r.json()["id"])


def _read_until_closed(sock: socket.socket, deadline_s: float = DEADLINE_S) -> bytes:
    """Everything the server sends until it closes the connection (fails at the deadline)."""
    received = b""
    end = time.monotonic() + deadline_s
    while True:
        remaining = end - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"the server kept the connection open past {deadline_s} s: {received!r}")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        except TimeoutError:
            continue
        if not chunk:
            return received
        received += chunk


# -- item 7: connections that do not finish their request ------------------------------------


def test_a_connection_that_sends_nothing_is_closed(node: Node) -> None:
    with node.connect() as sock:
        assert _read_until_closed(sock) == b""


def test_a_half_sent_head_is_answered_408_and_closed(node: Node) -> None:
    before = _refusals(node, "timeout")
    with node.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: node\r\nX-Slow: ")
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert _refusals(node, "timeout") == before + 1


def test_a_head_trickled_byte_by_byte_is_cut_off(node: Node) -> None:
    """Slowloris: each byte resets no timer; the head as a whole must arrive in time."""
    closed = threading.Event()
    with node.connect() as sock:

        def trickle() -> None:
            payload = b"GET /healthz HTTP/1.1\r\nHost: node\r\n" + b"X-Slow: " + b"a" * 1000
            for byte in payload:
                if closed.is_set():
                    return
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    return
                closed.wait(0.2)

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        try:
            answer = _read_until_closed(sock)
        finally:
            closed.set()
            sender.join(5)
    # Closed while the client was still sending: 1000 header bytes at 5/s take 200 s.
    assert answer.startswith(b"HTTP/1.1 408 ") or answer == b"", answer


def test_a_body_that_never_finishes_is_answered_408_and_closed(node: Node) -> None:
    with node.connect() as sock:
        sock.sendall(
            b"POST /fhir/Patient HTTP/1.1\r\nHost: node\r\n"
            + f"Authorization: Bearer {node.token}\r\n".encode()
            + b"Content-Type: application/fhir+json\r\nContent-Length: 100\r\n\r\n"
            + b'{"resourceType":'
        )
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer


def test_a_client_that_hangs_up_mid_body_costs_no_log_line(node: Node) -> None:
    """Issue #14 item 7: each disconnect logged two error lines (the route's and uvicorn's)."""
    before = len(node.log_lines())
    closed_before = _client_closed(node)
    for _ in range(3):
        with node.connect() as sock:
            sock.sendall(
                b"POST /fhir/Patient HTTP/1.1\r\nHost: node\r\n"
                + f"Authorization: Bearer {node.token}\r\n".encode()
                + b"Content-Type: application/fhir+json\r\nContent-Length: 100\r\n\r\n"
                + b'{"resourceType":'
            )
    # Each hang-up reaches its route as a disconnect, counted (not logged) as 499.
    deadline = time.monotonic() + DEADLINE_S
    while _client_closed(node) < closed_before + 3:
        assert time.monotonic() < deadline, "the hang-ups were not counted in /metrics"
        time.sleep(0.05)
    assert node.log_lines()[before:] == []


def _refusals(node: Node, reason: str) -> float:
    text = httpx.get(f"{node.url}/metrics", timeout=10).text
    prefix = f'medledger_refusals_total{{reason="{reason}"}} '
    (line,) = [x for x in text.splitlines() if x.startswith(prefix)]
    return float(line.removeprefix(prefix))


def _client_closed(node: Node) -> float:
    return _refusals(node, "client_closed")


def test_an_idle_keep_alive_connection_is_closed(node: Node) -> None:
    with node.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: node\r\n\r\n")
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer


@pytest.mark.parametrize("size", [64 * 1024, 8 * 1024 * 1024])
def test_an_oversized_head_is_refused_with_431(node: Node, size: int) -> None:
    before = _refusals(node, "headers_too_large")
    with node.connect() as sock:
        head = b"GET /healthz HTTP/1.1\r\nHost: node\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
        # The server may close the connection while we are still sending.
        with contextlib.suppress(OSError):
            sock.sendall(head)
        answer = _read_until_closed(sock)
    if size <= 64 * 1024:
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    else:  # the refusal may be lost to a reset when the rest of 8 MB is in flight
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert httpx.get(f"{node.url}/healthz", timeout=10).status_code == 200
    assert _refusals(node, "headers_too_large") == before + 1


def test_a_head_within_the_limit_is_served(node: Node) -> None:
    r = httpx.get(f"{node.url}/healthz", headers={"X-Padding": "a" * 8000}, timeout=10)
    assert r.status_code == 200


# -- item 6: one expensive search cannot starve the node ------------------------------------


def test_healthz_answers_while_an_expensive_search_is_sent(node: Node) -> None:
    """The query of issue #14 (600 date alternatives, 4.5 KB) kept the loop busy for 9.4 s."""
    alternatives = ",".join(
        f"ge{1801 + i % 300}-{1 + i % 12:02}-{1 + i % 28:02}" for i in range(600)
    )
    results: dict[str, int] = {}

    def search() -> None:
        with node.client() as client:
            results["search"] = client.get(
                "/fhir/Observation", params={"date": alternatives}
            ).status_code

    searcher = threading.Thread(target=search, daemon=True)
    searcher.start()
    with httpx.Client(base_url=node.url, timeout=2) as probe:
        while searcher.is_alive():
            assert probe.get("/healthz").status_code == 200
            time.sleep(0.02)
    searcher.join(DEADLINE_S)
    assert results["search"] == 400


# -- item 17: what every answer carries ------------------------------------------------------


def test_answers_carry_no_store_and_nosniff_and_no_server_banner(
    node: Node, patient_id: str
) -> None:
    with node.client() as client:
        answers = [
            client.get(f"/fhir/Patient/{patient_id}"),
            client.get("/fhir/Patient", params={"gender": "female"}),
            client.get("/fhir/Patient/no-such-id"),
            client.get("/fhir/metadata"),
            httpx.get(f"{node.url}/fhir/Patient/{patient_id}"),  # 401
        ]
    assert [r.status_code for r in answers] == [200, 200, 404, 200, 401]
    for r in answers:
        assert r.headers["cache-control"] == "no-store", r.request.url
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "server" not in r.headers


def test_head_is_answered_like_get_without_a_body(node: Node, patient_id: str) -> None:
    with node.client() as client:
        got = client.get(f"/fhir/Patient/{patient_id}")
        head = client.head(f"/fhir/Patient/{patient_id}")
        missing = client.head("/fhir/Patient/no-such-id")
        health = client.head("/healthz")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["etag"] == got.headers["etag"]
    assert head.headers["content-length"] == str(len(got.content))
    assert missing.status_code == 404 and missing.content == b""
    assert health.status_code == 200


def test_docs_load_nothing_from_elsewhere(node: Node) -> None:
    r = httpx.get(f"{node.url}/docs", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    page = r.text.lower()
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "/fhir/{resource_type}/{rid}" in r.text and "/openapi.json" in r.text
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert httpx.get(f"{node.url}/redoc", timeout=10).status_code == 404


# -- item 11: 5xx answers are counted --------------------------------------------------------


def _five_xx(node: Node) -> float:
    text = httpx.get(f"{node.url}/metrics", timeout=10).text
    (line,) = [
        x for x in text.splitlines() if x.startswith('medledger_requests_total{class="5xx"}')
    ]
    return float(line.rsplit(" ", 1)[1])


def test_a_500_from_a_damaged_blob_is_counted(node: Node, tmp_path: Path) -> None:
    with node.client() as client:
        r = client.post(
            "/fhir/Patient",
            content=b'{"resourceType":"Patient","gender":"other"}',
            headers={"Content-Type": FHIR_JSON},
        )
        assert r.status_code == 201
        rid = r.json()["id"]
        root = node.log.parent / "node"
        blobs = [p for p in (root / "blobs").rglob("*") if p.is_file()]
        newest = max(blobs, key=lambda p: p.stat().st_mtime_ns)
        data = bytearray(newest.read_bytes())
        data[-1] ^= 1
        newest.write_bytes(bytes(data))
        before = _five_xx(node)
        damaged = client.get(f"/fhir/Patient/{rid}")
    assert damaged.status_code == 500
    assert damaged.json()["resourceType"] == "OperationOutcome"
    assert _five_xx(node) == before + 1


# -- and the log stays quiet -----------------------------------------------------------------


def test_hostile_connections_leave_no_error_lines_in_the_log(node: Node) -> None:
    """Runs last in this module: everything above (timeouts, resets, 431s) is behind it.

    The damaged blob is the one thing the log should report: its read, and the store
    scrub and health checks finding the same damage, as they must. Nothing else."""
    noisy = [
        line
        for line in node.log_lines()
        if line.get("level") in ("error", "critical", "warning", "unstructured")
    ]
    about_other_things = [line for line in noisy if "damage" not in str(line.get("message"))]
    assert about_other_things == [], about_other_things
    assert any(line.get("logger") == "medledger.store" for line in noisy), noisy
