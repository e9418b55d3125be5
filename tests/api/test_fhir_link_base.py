"""The links a node writes (Bundle ``self``/``next``/``previous``, ``fullUrl``, the Bulk
export's ``Content-Location``, manifest ``request`` and output URLs) start at its
configured public URL, never at the request's ``Host`` (decision 0049, 0052).

A real node over HTTP on a loopback socket: its public URL is that address
(``config.public_base_url``). Every request here claims another Host, and the
forwarding headers a proxy would add, as an attacker may; none of it may appear
in an answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import (
    InProcessClient,
    LiveServer,
    put_json,
    serve_in_process,
    start_server,
    stop_server,
)

from medledger.storage.sqlite.tokens import SqliteTokenStore

FORGED_HOST = "evil.example"
FORGED = {
    "Host": FORGED_HOST,
    "X-Forwarded-Host": FORGED_HOST,
    "X-Forwarded-Proto": "gopher",
    "Forwarded": f"host={FORGED_HOST};proto=gopher",
}
PATIENT = "link-pat"
OBSERVATIONS = 5


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(tmp_path_factory.mktemp("links") / "node")
    try:
        with server.client(server.clinician) as client:
            patient = {"resourceType": "Patient", "id": PATIENT, "gender": "female"}
            for resource in [
                patient,
                patient,  # a second version, so the history has two entries
                *(
                    {
                        "resourceType": "Observation",
                        "id": f"link-obs-{n}",
                        "status": "final",
                        "code": {"text": "pulse"},
                        "subject": {"reference": f"Patient/{PATIENT}"},
                    }
                    for n in range(OBSERVATIONS)
                ),
            ]:
                response = put_json(
                    client, f"/fhir/{resource['resourceType']}/{resource['id']}", resource
                )
                assert response.status_code in (200, 201), response.text
        yield server
    finally:
        stop_server(server)


def _forged_get(client: httpx.Client, url: str, **kwargs: Any) -> httpx.Response:
    response = client.get(url, headers={**FORGED, **kwargs.pop("headers", {})}, **kwargs)
    assert FORGED_HOST not in response.text, response.text
    assert "gopher" not in response.text, response.text
    for name, value in response.headers.items():
        assert FORGED_HOST not in value and "gopher" not in value, (name, value)
    return response


def _urls(bundle: dict[str, Any]) -> list[str]:
    links = [link["url"] for link in bundle.get("link", [])]
    return links + [entry["fullUrl"] for entry in bundle.get("entry", [])]


def _walk(client: httpx.Client, base: str, first: str) -> int:
    """Follow ``next`` from ``first`` with the forged Host; every URL on every page must
    start at the node's FHIR base. The number of pages."""
    url: str | None = first
    pages = 0
    while url is not None:
        pages += 1
        assert pages <= 20, "the next links do not end"
        bundle = _forged_get(client, url).json()
        assert bundle["resourceType"] == "Bundle", bundle
        urls = _urls(bundle)
        assert urls and all(u.startswith(f"{base}/") for u in urls), urls
        url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
    return pages


def test_search_history_and_everything_links_use_the_configured_url(live: LiveServer) -> None:
    base = f"{live.url}/fhir"
    with live.client(live.clinician) as client:
        assert _walk(client, base, f"/fhir/Observation?subject=Patient/{PATIENT}&_count=2") == 3
        assert _walk(client, base, f"/fhir/Patient/{PATIENT}/_history?_count=1") == 2
        assert _walk(client, base, "/fhir/Observation/_history?_count=2") == 3
        assert _walk(client, base, f"/fhir/Patient/{PATIENT}/$everything?_count=4") == 2


def test_bulk_export_urls_use_the_configured_url(live: LiveServer) -> None:
    base = f"{live.url}/fhir"
    with live.client(live.admin) as client:
        kick_off = _forged_get(
            client,
            "/fhir/Patient/$export",
            params={"_type": "Patient,Observation"},
            headers={"Prefer": "respond-async", "Accept": "application/fhir+json"},
        )
        assert kick_off.status_code == 202, kick_off.text
        status_url = kick_off.headers["Content-Location"]
        assert status_url.startswith(f"{base}/$export-status/"), status_url
        deadline = time.monotonic() + 60
        while (status := _forged_get(client, status_url)).status_code == 202:
            assert time.monotonic() < deadline, "the export did not finish within 60 s"
            time.sleep(0.05)
        assert status.status_code == 200, status.text
        manifest = status.json()
        assert manifest["request"] == f"{base}/Patient/$export?_type=Patient%2CObservation"
        outputs = [o["url"] for o in manifest["output"]]
        assert outputs and all(u.startswith(f"{base}/$export-file/") for u in outputs), outputs
        lines = _forged_get(client, outputs[0], headers={"Accept": "application/fhir+ndjson"})
        assert lines.status_code == 200 and json.loads(lines.text.splitlines()[0])


def test_a_node_without_a_public_url_writes_absolute_paths(tmp_path: Path) -> None:
    """No ``advertise`` and no named listening address (``create_app`` alone): links are
    absolute paths, which a client resolves against the origin it used (RFC 3986 §5)."""

    async def story(client: InProcessClient, tokens: SqliteTokenStore) -> None:
        staff, _ = tokens.create(role="clinician", now_ms=0, label="dr")
        headers = {"Authorization": f"Bearer {staff}", **FORGED}
        async with client(host=FORGED_HOST) as web:
            patient = {"resourceType": "Patient", "id": "p1"}
            put = await web.put(
                "/fhir/Patient/p1",
                content=json.dumps(patient),
                headers={"Content-Type": "application/fhir+json", **headers},
            )
            assert put.status_code in (200, 201), put.text
            for url in ("/fhir/Patient?_count=1", "/fhir/Patient/p1/_history"):
                response = await web.get(url, headers=headers)
                assert FORGED_HOST not in response.text, response.text
                urls = _urls(response.json())
                assert urls and all(u.startswith("/fhir/Patient") for u in urls), urls

    serve_in_process(tmp_path / "node", story, name="No URL Hospital")
