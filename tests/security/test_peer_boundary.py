"""The peer boundary of real node processes, attacked over HTTP (issue #14 items 3, 4, 8).

``network up`` starts two institutions as separate processes; the test then
plays an outsider and a misbehaving member against hospital-1:

* garbage and unauthenticated requests to ``/peer/v1`` write nothing (the
  private chain's height stays put) and are throttled per client address;
* PHI-like text in a request's ``reader``/``holder`` never reaches any file of
  the holder, whether the request is unsigned, signed by an outsider, or
  signed by a real member (whose refusal *is* recorded, in derived values);
* a member's refusals are recorded at a bounded rate, then answered 429;
* repeated bad bearer tokens are answered 429 with ``Retry-After``, while a
  valid token keeps working, and ``X-Forwarded-For`` does not reset the budget.
"""

from __future__ import annotations

import os
import secrets
import ssl
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from medledger.api.auth import AUTH_FAILURES
from medledger.config import NodePaths
from medledger.core.encoding import canonical_bytes
from medledger.core.keys import SigningKey
from medledger.core.peer import PeerRequest
from medledger.services.sharing import PEER_REFUSALS
from medledger.storage.keystore import FileKeyStore
from network_support import PASSPHRASE, member_tls, run_cli, stop_network, tls

pytestmark = pytest.mark.timeout(300)

PHI = "Jane Roe 1961-04-12 NID 856-45-6789 metastatic carcinoma"


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("peer-boundary") / "net"
    try:
        up = run_cli("network", "up", "--dir", base, "--institutions", "2")
        assert up.code == 0, up
        nodes = {
            n["institution"]: n
            for n in run_cli("network", "up", "--dir", base, "--json").json()["nodes"]
        }
        yield {"base": base, "nodes": nodes}
    finally:
        stop_network(base)


def holder(network: dict[str, Any]) -> dict[str, Any]:
    node: dict[str, Any] = network["nodes"]["hospital-1"]
    return node


def private_height(node: dict[str, Any]) -> int:
    ready = httpx.get(f"{node['url']}/readyz", timeout=10, verify=tls(node)).json()
    return int(ready["private_height"])


def as_reader(network: dict[str, Any]) -> ssl.SSLContext:
    """hospital-2's connection to hospital-1: mutual TLS with hospital-2's certificate.

    Its signed requests are then authenticated; anything else sent on it is
    still refused by its signature.
    """
    return member_tls(holder(network), network["base"] / "hospital-2")


def member_key(network: dict[str, Any], inst: str) -> SigningKey:
    path = NodePaths(root=network["base"] / inst).keystore
    return FileKeyStore.open(path, PASSPHRASE.encode()).signing_key()


def signed(key: SigningKey, **fields: Any) -> bytes:
    request = {
        "op": "fetch",
        "reader": "hospital-2",
        "holder": "hospital-1",
        "consent": "00" * 32,
        "resource": "Observation/x",
        "nonce": secrets.token_hex(16),
        "time_ms": time.time_ns() // 1_000_000,
        **fields,
    }
    return canonical_bytes(PeerRequest(**request).sign(key).to_json())


def garbage(i: int, outsider: SigningKey) -> bytes:
    """Unauthenticated bodies of every kind: noise, junk JSON, unsigned and outsider-signed."""
    kinds = [
        lambda: os.urandom(64 + i % 200),
        lambda: b'{"request": {"reader": "' + PHI.encode() + b'"}, "signature": 1}',
        lambda: b"[" * 50,
        lambda: signed(outsider, reader=f"{PHI} #{i}"),
        lambda: signed(outsider, holder=f"{PHI} #{i}"),
    ]
    return kinds[i % len(kinds)]()


def test_garbage_peer_requests_write_nothing_and_are_throttled(network: dict[str, Any]) -> None:
    node = holder(network)
    outsider = SigningKey.generate()
    before = private_height(node)
    statuses: list[int] = []
    retry_after: set[str] = set()
    with httpx.Client(base_url=node["url"], timeout=30, verify=as_reader(network)) as client:
        for i in range(300):
            r = client.post("/peer/v1/fetch", content=garbage(i, outsider))
            statuses.append(r.status_code)
            assert r.json()["resourceType"] == "OperationOutcome"
            if r.status_code == 429:
                retry_after.add(r.headers["retry-after"])
    assert set(statuses) <= {400, 403, 413, 429}, sorted(set(statuses))
    assert statuses.count(429) > 200, "past its failure budget an address is answered 429"
    assert all(int(s) >= 1 for s in retry_after)
    assert private_height(node) == before, "an unauthenticated request wrote a block"


def test_phi_in_reader_or_holder_never_reaches_a_file(network: dict[str, Any]) -> None:
    node = holder(network)
    member, outsider = member_key(network, "hospital-2"), SigningKey.generate()
    before = private_height(node)
    bodies = [
        signed(outsider, reader=PHI),
        signed(outsider, holder=PHI),
        signed(member, reader=PHI),  # a member's key, but a reader that is no member
        signed(member, holder=PHI),  # authenticated: a refusal that is recorded
        signed(member, holder=PHI, op="list", resource=""),
    ]
    with httpx.Client(base_url=node["url"], timeout=30, verify=as_reader(network)) as client:
        answers = [client.post("/peer/v1/fetch", content=b).status_code for b in bodies]
    assert all(400 <= s < 500 for s in answers), answers
    # The member's two authenticated refusals are on the chain (a bounded, derived record).
    deadline = time.monotonic() + 30
    while private_height(node) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert private_height(node) == before + 2
    root = network["base"] / "hospital-1"
    needles = [PHI.encode(), b"856-45-6789", b"carcinoma"]
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(n in data for n in needles), path


def test_a_members_refusals_are_recorded_at_a_bounded_rate(network: dict[str, Any]) -> None:
    node = holder(network)
    member = member_key(network, "hospital-2")
    stale = time.time_ns() // 1_000_000 - 3_600_000
    before, started = private_height(node), time.monotonic()
    statuses: list[int] = []
    with httpx.Client(base_url=node["url"], timeout=30, verify=as_reader(network)) as client:
        for _ in range(PEER_REFUSALS.burst + 30):
            r = client.post("/peer/v1/fetch", content=signed(member, time_ms=stale))
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
    elapsed_s = time.monotonic() - started
    refused, throttled = statuses.count(400), statuses.count(429)
    assert refused + throttled == len(statuses)
    assert throttled > 0
    # Each recorded refusal is one entry; the budget bounds them (earlier tests spent some).
    budget = PEER_REFUSALS.burst + int(elapsed_s * 1000 / PEER_REFUSALS.interval_ms) + 1
    assert refused <= budget
    assert private_height(node) - before <= refused


def test_repeated_bad_tokens_get_429_with_retry_after(network: dict[str, Any]) -> None:
    node = holder(network)
    bad = {"Authorization": f"Bearer mlt_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"}
    good = {"Authorization": f"Bearer {node['tokens']['clinician']}"}
    with httpx.Client(base_url=node["url"], timeout=30, verify=as_reader(network)) as client:
        answers = [client.get("/fhir/Patient", headers=bad) for _ in range(40)]
        statuses = [r.status_code for r in answers]
        assert set(statuses) <= {401, 429} and 429 in statuses, statuses
        throttled = answers[statuses.index(429)]
        assert int(throttled.headers["retry-after"]) >= 1
        outcome = throttled.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["code"] == "throttled"
        # The legitimate client on the same machine is still served.
        assert client.get("/fhir/Patient", headers=good).status_code == 200
        # A forwarding header does not buy a fresh address (nor does a fresh token id):
        # past the budget only its refill (one per interval) gets a 401 through.
        started, spoofed = time.monotonic(), []
        for i in range(10):
            headers = {
                "Authorization": f"Bearer mlt_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}",
                "X-Forwarded-For": f"198.51.100.{i + 1}",
            }
            spoofed.append(client.get("/fhir/Patient", headers=headers).status_code)
        refilled = 1 + int((time.monotonic() - started) * 1000 / AUTH_FAILURES.interval_ms)
        assert set(spoofed) <= {401, 429} and spoofed.count(401) <= refilled, spoofed
