"""A standby host's app (``api.failover.StandbyApp``): it serves what an API worker serves
and its own ``/readyz``; anything that needs the active host's state is a 503
OperationOutcome naming the active host, and never reaches the node."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from medledger.api.failover import Election, StandbyApp
from medledger.storage.postgres.lease import SequencerLease


class _Node:
    """The node's app as far as this test needs: it answers 200 and counts what reached it."""

    def __init__(self) -> None:
        self.state = object()
        self.reached: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.reached.append(f"{scope['method']} {scope['path']}")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def test_a_standby_serves_worker_paths_and_refuses_the_rest_naming_the_active_host() -> None:
    node = _Node()
    election = Election(lease=SequencerLease("host=127.0.0.1 dbname=unused", "ml_unused"))
    election.active = "10.0.0.7:8701"
    app = StandbyApp(node, election)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://standby") as client:
            for method, path in (
                ("GET", "/fhir/Patient/p1"),
                ("POST", "/fhir/Patient"),
                ("PUT", "/fhir/Patient/p1"),
                ("GET", "/readyz"),
                ("GET", "/chain/private/blocks/0"),
            ):
                answer = await client.request(method, path, content=b"{}")
                assert answer.status_code == 200, (method, path)
            for method, path in (
                ("POST", "/fhir"),  # a Bundle
                ("POST", "/fhir/Consent"),
                ("GET", "/fhir/AuditEvent"),
                ("POST", "/peer/v1/fetch"),
                ("POST", "/admin/kek/rotate"),
            ):
                answer = await client.request(method, path, content=b"{}")
                assert answer.status_code == 503, (method, path)
                outcome = answer.json()
                assert outcome["resourceType"] == "OperationOutcome"
                assert "standby" in outcome["issue"][0]["diagnostics"]
                assert "10.0.0.7:8701" in outcome["issue"][0]["diagnostics"]
                assert answer.headers["x-content-type-options"] == "nosniff"
        conditional = await _request(app, "POST", "/fhir/Patient", [(b"if-none-exist", b"x=1")])
        assert conditional == 503

    asyncio.run(main())
    assert node.reached == [
        "GET /fhir/Patient/p1",
        "POST /fhir/Patient",
        "PUT /fhir/Patient/p1",
        "GET /readyz",
        "GET /chain/private/blocks/0",
    ]


async def _request(
    app: StandbyApp, method: str, path: str, headers: list[tuple[bytes, bytes]]
) -> int:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://standby") as client:
        answer = await client.request(
            method, path, content=b"{}", headers=[(k.decode(), v.decode()) for k, v in headers]
        )
    return answer.status_code
