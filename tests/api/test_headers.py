"""``api.headers`` on a live node: the security headers on every kind of answer, HEAD, /docs."""

from __future__ import annotations

import httpx
from api_helpers import LiveServer, assert_outcome

from medledger.api.headers import SECURITY_HEADERS


def _has_security_headers(r: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS:
        assert r.headers.get(name.decode()) == value.decode(), (r.request.url, name)
    assert "server" not in r.headers


def test_every_kind_of_answer_carries_the_security_headers(live: LiveServer) -> None:
    with live.client(live.clinician) as client:
        answers = [
            client.get("/healthz"),
            client.get("/fhir/metadata"),
            client.get("/fhir/Patient"),
            client.get("/fhir/Patient/does-not-exist"),
            client.post("/fhir/Patient/abc", content=b"{}"),  # no POST on an instance
            client.get("/openapi.json"),
            client.get("/metrics"),
        ]
    with live.client() as anonymous:
        answers.append(anonymous.get("/fhir/Patient"))
    assert [r.status_code for r in answers] == [200, 200, 200, 404, 405, 200, 200, 401]
    for r in answers:
        _has_security_headers(r)


def test_head_is_get_without_the_body_and_405_allows_it(live: LiveServer) -> None:
    with live.client(live.clinician) as client:
        for path in ("/healthz", "/fhir/metadata", "/fhir/Patient", "/chain/private/head"):
            got, head = client.get(path), client.head(path)
            assert (head.status_code, head.content) == (got.status_code, b""), path
            assert head.headers["content-type"] == got.headers["content-type"]
            _has_security_headers(head)
        r = client.post("/fhir/Patient/abc", content=b"{}")
    assert_outcome(r, 405)
    assert "HEAD" in {m.strip() for m in r.headers["allow"].split(",")}


def test_docs_is_plain_html_without_scripts(live: LiveServer) -> None:
    with live.client() as client:
        docs = client.get("/docs")
        assert client.get("/redoc").status_code == 404
        assert client.get("/docs/oauth2-redirect").status_code == 404
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert "<script" not in docs.text.lower() and "//" not in docs.text.replace("<!doctype", "")
    assert "<code>POST</code></td><td><code>/fhir/{resource_type}</code>" in docs.text
