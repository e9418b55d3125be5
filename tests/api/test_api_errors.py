"""Every error of the HTTP API is an OperationOutcome with the right status, and nothing leaks.

Invalid JSON, wrong types, unknown or mismatched resource types, bad ids, oversized
and deeply nested bodies, unknown routes and methods, missing resources and
unsupported search parameters; none of them writes anything to the chain.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_helpers import LiveServer, assert_outcome, fhir_bytes, post_json, put_json

from medledger.services.fhir import MAX_BODY_BYTES

Resource = dict[str, Any]


@pytest.fixture(scope="module")
def patient_id(live: LiveServer) -> str:
    with live.client(live.clinician) as client:
        r = post_json(client, "/fhir/Patient", {"resourceType": "Patient", "gender": "female"})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])


@pytest.fixture
def unchanged_chain(live: LiveServer) -> Iterator[None]:
    """The test must not add anything to the private chain."""
    before = live.log_size()
    yield
    assert live.log_size() == before, "a refused request wrote to the chain"


@pytest.fixture
def fresh(live: LiveServer) -> Iterator[httpx.Client]:
    """A clinician client without keep-alive, so one failing request cannot poison the next."""
    with live.client(live.clinician, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        yield client


pytestmark = pytest.mark.usefixtures("unchanged_chain")


# -- bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b'{"resourceType": "Patient",',
        b"not json at all",
        b"",
        b'{"resourceType": "Patient"} trailing',
        b'{"resourceType": "Patient", "gender": NaN}',
        b"\xff\xfe\x00garbage",
        b'{"resourceType": "Patient", "gender": "\xed\xa0\x80"}',
    ],
    ids=["truncated", "text", "empty", "trailing", "nan", "binary", "bad-utf8"],
)
def test_invalid_json_is_400(clinician: httpx.Client, content: bytes) -> None:
    r = clinician.post(
        "/fhir/Patient", content=content, headers={"Content-Type": "application/fhir+json"}
    )
    assert_outcome(r, 400)


@pytest.mark.parametrize(
    ("resource", "expression"),
    [
        ({"resourceType": "Patient", "birthDate": 19680617}, "Patient.birthDate"),
        ({"resourceType": "Patient", "active": {"yes": True}}, "Patient.active"),
        ({"resourceType": "Patient", "name": "Smith"}, "Patient.name"),
        ({"resourceType": "Patient", "gender": ["female"]}, "Patient.gender"),
        ({"resourceType": "Observation", "status": "final"}, "Observation.code"),
        (
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "x"},
                "valueQuantity": {"value": "seventy"},
            },
            "Observation.valueQuantity",
        ),
    ],
    ids=[
        "birthDate-int",
        "active-object",
        "name-string",
        "gender-list",
        "missing-code",
        "value-text",
    ],
)
def test_wrong_types_are_400_with_expression(
    clinician: httpx.Client, resource: Resource, expression: str
) -> None:
    body = assert_outcome(post_json(clinician, f"/fhir/{resource['resourceType']}", resource), 400)
    expressions = [e for i in body["issue"] for e in i.get("expression", [])]
    assert any(e.startswith(expression) for e in expressions), body


def test_unknown_resource_type_is_400(clinician: httpx.Client) -> None:
    assert_outcome(post_json(clinician, "/fhir/Spaceship", {"resourceType": "Spaceship"}), 400)
    assert_outcome(put_json(clinician, "/fhir/Spaceship/x1", {"resourceType": "Spaceship"}), 400)
    assert_outcome(clinician.get("/fhir/Spaceship"), 400)
    assert_outcome(clinician.get("/fhir/spaceship"), 400)
    assert_outcome(post_json(clinician, "/fhir/Resource", {"resourceType": "Resource"}), 400)


def test_body_type_must_match_url_type(clinician: httpx.Client, patient_id: str) -> None:
    patient = {"resourceType": "Patient", "gender": "male"}
    assert_outcome(post_json(clinician, "/fhir/Observation", patient), 400)
    assert_outcome(put_json(clinician, "/fhir/Observation/abc", patient), 400)
    assert_outcome(post_json(clinician, "/fhir/Patient", {"gender": "male"}), 400)
    assert_outcome(post_json(clinician, "/fhir/Patient", [patient]), 400)
    # The id in the body must be the id in the URL.
    assert_outcome(
        put_json(clinician, f"/fhir/Patient/{patient_id}", {**patient, "id": "other-id"}), 400
    )


@pytest.mark.parametrize(
    "rid", ["bad$id", "a_b", "x" * 65, "semi;colon", "sp ace", "ünï"], ids=lambda s: s[:8]
)
def test_invalid_id_characters_are_400(clinician: httpx.Client, rid: str) -> None:
    assert_outcome(clinician.get(f"/fhir/Patient/{rid}"), 400)
    assert_outcome(clinician.get(f"/fhir/Patient/{rid}/_history"), 400)
    assert_outcome(clinician.get(f"/fhir/Patient/{rid}/_history/1"), 400)
    assert_outcome(put_json(clinician, f"/fhir/Patient/{rid}", {"resourceType": "Patient"}), 400)
    assert_outcome(clinician.delete(f"/fhir/Patient/{rid}"), 400)


def _raw_http(live: LiveServer, head: bytes, body: bytes, *, wait: float = 10) -> bytes:
    """Send ``head`` and ``body`` on a raw socket; return what the server answers."""
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(head + body)
        data = b""
        deadline = time.monotonic() + wait
        while b"\r\n\r\n" not in data or len(data) < data.find(b"\r\n\r\n") + 60:
            if time.monotonic() > deadline:
                break
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
        return data


def test_50_mb_body_is_refused_with_413_without_reading_it(live: LiveServer) -> None:
    size = 50 * 1024 * 1024
    assert size > MAX_BODY_BYTES
    head = (
        f"POST /fhir/Patient HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {live.clinician}\r\n"
        f"Content-Type: application/fhir+json\r\nContent-Length: {size}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    # Only the first 64 KiB are ever sent: the answer must come without the other 49.9 MB.
    answer = _raw_http(live, head, b'{"resourceType":"Patient","x":"' + b"a" * 65536)
    assert time.monotonic() - started < 5
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), answer[:300]
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"application/fhir+json" in headers.lower()
    assert b'"resourceType":"OperationOutcome"' in body
    assert b"Traceback" not in body
    # The server is still healthy afterwards.
    with live.client(live.clinician) as client:
        assert client.get("/healthz").status_code == 200


def test_oversized_chunked_body_is_413(live: LiveServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"resourceType":"Patient","text":"'
        for _ in range(MAX_BODY_BYTES // 65536 + 8):
            yield b"a" * 65536

    with live.client(live.clinician) as client:
        try:
            r = client.post(
                "/fhir/Patient", content=chunks(), headers={"Content-Type": "application/fhir+json"}
            )
        except httpx.TransportError:
            pytest.fail("the server reset the connection instead of answering 413")
        assert_outcome(r, 413)


@pytest.mark.parametrize("depth", [50, 1_000, 200_000])
def test_deeply_nested_json_is_400(clinician: httpx.Client, depth: int) -> None:
    nested = b'{"resourceType":"Patient","extension":' + b"[" * depth + b"]" * depth + b"}"
    r = clinician.post(
        "/fhir/Patient", content=nested, headers={"Content-Type": "application/fhir+json"}
    )
    assert_outcome(r, 400)
    objects = b'{"a":' * depth + b"1" + b"}" * depth
    assert_outcome(clinician.post("/fhir", content=objects), 400)


# -- routes and methods --------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/nope", "/fhir/Patient/a/b/c/d", "/chain", "/fhir/Patient/a/_history/1/x", "/peer/v2"]
)
def test_unknown_route_is_404(clinician: httpx.Client, path: str) -> None:
    assert_outcome(clinician.get(path), 404)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PATCH", "/fhir/Patient"),
        # DELETE /fhir/Patient is a conditional delete (400 without criteria: test_fhir_writes).
        ("DELETE", "/fhir/Patient/abc/_history"),
        # PUT /fhir/Patient is a conditional update (400 without criteria: test_fhir_writes).
        ("POST", "/fhir/Patient/abc"),
        ("POST", "/fhir/Patient/abc/_history"),
        ("POST", "/chain/private/head"),
        ("DELETE", "/fhir/metadata"),
    ],
)
def test_wrong_method_is_405(clinician: httpx.Client, method: str, path: str) -> None:
    assert_outcome(clinician.request(method, path, content=b"{}"), 405, code="not-supported")


def test_405_carries_allow_header(clinician: httpx.Client) -> None:
    """RFC 9110 §15.5.6: a 405 response MUST list the supported methods in ``Allow``."""
    r = clinician.post("/fhir/Patient/abc", content=b"{}")
    assert_outcome(r, 405)
    assert "allow" in r.headers, f"405 without an Allow header: {dict(r.headers)}"
    allowed = {m.strip() for m in r.headers["allow"].split(",")}
    assert {"GET", "PUT", "DELETE", "PATCH"} <= allowed
    assert "POST" not in allowed


def test_missing_resources_are_404(clinician: httpx.Client, patient_id: str) -> None:
    missing = str(uuid.uuid4())
    assert_outcome(clinician.get(f"/fhir/Patient/{missing}"), 404, code="not-found")
    assert_outcome(clinician.get(f"/fhir/Patient/{missing}/_history"), 404)
    assert_outcome(clinician.get(f"/fhir/Patient/{missing}/_history/1"), 404)
    assert_outcome(clinician.get(f"/fhir/Patient/{patient_id}/_history/2"), 404)
    assert_outcome(clinician.get(f"/fhir/Patient/{patient_id}/_history/0"), 404)
    assert_outcome(clinician.delete(f"/fhir/Observation/{missing}"), 404)
    assert_outcome(clinician.get(f"/fhir/Observation/{patient_id}"), 404)


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/fhir/Patient", {"shoe-size": "42"}),
        ("/fhir/Patient", {"code": "8867-4"}),
        ("/fhir/Observation", {"name": "Smith"}),
        ("/fhir/Observation", {"date": "2020-13-45"}),
        ("/fhir/Observation", {"date": "yesterday"}),
        ("/fhir/Patient", {"gender:contains": "ma"}),
        ("/fhir/Observation", {"value-quantity": "gt5|mg"}),
        ("/fhir/Patient", {"gender:in": "http://example.org/ValueSet/none"}),
        ("/fhir/Patient", {"family": ""}),
        ("/fhir/Patient", {"_count": "501"}),
        ("/fhir/Patient", {"_count": "many"}),
        ("/fhir/Patient", {"_count": "-1"}),
        ("/fhir/Patient", {"_offset": "-5"}),
        ("/fhir/Patient", {"_sort": "shoe-size"}),
        ("/fhir/Consent", {"patient": "x"}),
        # Issue #14 item 9: these three were 500s (OverflowError).
        ("/fhir/Observation", {"date": "gt9999-12-31"}),
        ("/fhir/Observation", {"date": "lt0001-01-01"}),
        ("/fhir/Patient", {"birthdate": "9999-12-31"}),
        # Issue #14 item 6: bounded work per query.
        ("/fhir/Observation", {"code": ",".join(f"c{i}" for i in range(65))}),
        ("/fhir/Observation", {"date": ",".join(f"ge1800-01-{d:02}" for d in range(2, 29))}),
    ],
)
def test_unsupported_search_is_400(
    clinician: httpx.Client, path: str, params: dict[str, str]
) -> None:
    assert_outcome(clinician.get(path, params=params), 400)


def test_bad_if_match_is_400(clinician: httpx.Client, patient_id: str) -> None:
    r = put_json(
        clinician,
        f"/fhir/Patient/{patient_id}",
        {"resourceType": "Patient", "id": patient_id},
        headers={"If-Match": "*"},
    )
    assert_outcome(r, 400)


# -- never a 5xx ---------------------------------------------------------------------------

HUGE = "99999999999999999999"


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/fhir/Patient/{pid}/_history/" + HUGE, {}),
        ("GET", "/fhir/Patient/{pid}/_history/-" + HUGE, {}),
        ("GET", "/chain/private/blocks/" + HUGE, {}),
        ("GET", "/fhir/Patient/_history?_count=-" + HUGE, {}),
        ("GET", "/fhir/Patient?_count=%C2%B2", {}),
        ("GET", "/fhir/Patient?_offset=%C2%B9", {}),
        ("PUT", "/fhir/Patient/{pid}", {"If-Match": 'W/"\xb2"'.encode("latin-1")}),
        ("GET", "/chain/private/proof/inclusion?index=0&size=" + HUGE, {}),
        ("GET", "/chain/private/proof/consistency?old=" + HUGE, {}),
    ],
    ids=[
        "vread-huge-version",
        "vread-huge-negative",
        "block-huge-height",
        "type-history-huge-count",
        "search-count-superscript",
        "search-offset-superscript",
        "if-match-superscript",
        "inclusion-huge-size",
        "consistency-huge-old",
    ],
)
def test_odd_numbers_are_client_errors_not_500(
    fresh: httpx.Client, patient_id: str, method: str, path: str, headers: dict[str, Any]
) -> None:
    r = fresh.request(
        method,
        path.format(pid=patient_id),
        content=fhir_bytes({"resourceType": "Patient", "id": patient_id}),
        headers={"Content-Type": "application/fhir+json", **headers},
    )
    assert_outcome(r, (400, 404, 412, 422))
