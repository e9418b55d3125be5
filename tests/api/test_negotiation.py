"""Formats of the FHIR API over real HTTP: JSON only, and 406 / 415 when a client wants XML."""

from __future__ import annotations

import httpx
import pytest
from api_helpers import FHIR_JSON, LiveServer, assert_outcome

_PATIENT = b'{"resourceType":"Patient","gender":"male"}'
_XML_PATIENT = b'<Patient xmlns="http://hl7.org/fhir"><gender value="male"/></Patient>'


@pytest.mark.parametrize(
    "accept",
    [
        "application/fhir+xml",
        "application/xml",
        "text/xml, application/xml;q=0.9",
        "application/json;q=0",
    ],
)
def test_an_accept_without_json_is_406(clinician: httpx.Client, accept: str) -> None:
    assert_outcome(clinician.get("/fhir/Patient", headers={"Accept": accept}), 406, "not-supported")


@pytest.mark.parametrize("fmt", ["xml", "application/fhir+xml", "text/xml", "ttl"])
def test_format_other_than_json_is_406(clinician: httpx.Client, fmt: str) -> None:
    assert_outcome(clinician.get("/fhir/Patient", params={"_format": fmt}), 406)
    # _format wins over Accept (FHIR R4 §3.1.0.1.6), both ways.
    r = clinician.get("/fhir/Patient", params={"_format": "json"}, headers={"Accept": "text/xml"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "accept",
    [
        "application/fhir+json",
        "application/json",
        "*/*",
        "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        "application/fhir+xml;q=1, application/fhir+json;q=0.5",
    ],
)
def test_an_accept_admitting_json_is_served(clinician: httpx.Client, accept: str) -> None:
    r = clinician.get("/fhir/metadata", headers={"Accept": accept})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(FHIR_JSON)


@pytest.mark.parametrize(
    "content_type", ["application/fhir+xml", "application/xml", "text/xml", "text/plain"]
)
def test_a_non_json_body_is_415_and_writes_nothing(
    live: LiveServer, clinician: httpx.Client, content_type: str
) -> None:
    before = live.record_writes()
    for body in (_XML_PATIENT, _PATIENT):
        headers = {"Content-Type": content_type}
        assert_outcome(clinician.post("/fhir/Patient", content=body, headers=headers), 415)
        assert_outcome(clinician.put("/fhir/Patient/x1", content=body, headers=headers), 415)
        assert_outcome(clinician.post("/fhir", content=body, headers=headers), 415)
    assert live.record_writes() == before


def test_json_bodies_are_read(clinician: httpx.Client) -> None:
    for content_type in (
        FHIR_JSON,
        "application/json; charset=utf-8",
        "application/fhir+json;fhirVersion=4.0",
    ):
        r = clinician.post(
            "/fhir/Patient", content=_PATIENT, headers={"Content-Type": content_type}
        )
        assert r.status_code == 201, r.text
