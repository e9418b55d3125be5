"""The portal as served by a real node: its files, headers and the JSON endpoints it adds.

Static files come only from the package's list (no path from the request is
joined); every page carries the API's security headers and a CSP without
inline code, and the pages themselves hold no inline script or style and load
nothing from elsewhere. ``/portal/api/session`` needs a token; ``POST
/chain/verify`` is an auditor's, reports a clean chain, then reports the
block an edit of the stored chain touched (and answers 200 with the report).
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from html.parser import HTMLParser

import httpx
import pytest
from api_helpers import LiveServer

from medledger.api import portal
from medledger.api import verify as verify_api
from medledger.api.portal import PORTAL_CSP
from medledger.core.encoding import canonical_bytes

PAGES = ("index.html", "patient.html", "clinician.html", "auditor.html")


class _Inline(HTMLParser):
    """Collects what a strict CSP would block: inline scripts, styles, handlers, remote URLs."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self.refs: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        if tag == "script":
            self._in_script = True
            if not names.get("src"):
                self.problems.append("inline <script>")
        if tag == "style":
            self.problems.append("<style> element")
        for name, value in attrs:
            if name == "style" or name.startswith("on"):
                self.problems.append(f"inline attribute {name}")
            if name in ("src", "href") and value:
                self.refs.append(value)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.problems.append("script text")


def test_every_page_is_framed_with_its_own_title_module_and_heading() -> None:
    """The shared frame (``page.tmpl``) around each page's own part: one document, titled
    by the page's heading, loading the page's own module, with one status line."""
    for name in PAGES:
        page = portal._FILES[name].body.decode()
        heading = re.search(r"<h1>(.+)</h1>", page)
        assert heading is not None, name
        assert page.startswith("<!doctype html>\n") and page.endswith("</html>\n"), name
        assert page.count("<html") == page.count("<title>") == page.count("<h1>") == 1, name
        assert f"<title>{heading[1]} — medledger</title>" in page, name
        module = name.removesuffix(".html")
        assert f'<script type="module" src="/portal/js/{module}.js"></script>' in page, name
        assert page.count('id="status"') == 1 and "$" not in page, name
        assert page.index("<h1>") < page.index('id="status"') < page.index("</main>"), name


def test_pages_are_served_with_the_portal_policy(live: LiveServer) -> None:
    with live.client() as anonymous:
        for page in PAGES:
            r = anonymous.get(f"/portal/{page}")
            assert r.status_code == 200, page
            assert r.headers["content-type"].startswith("text/html")
            assert r.headers["content-security-policy"] == PORTAL_CSP
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["x-frame-options"] == "DENY"
            assert r.headers["referrer-policy"] == "no-referrer"
            parsed = _Inline()
            parsed.feed(r.text)
            assert parsed.problems == [], (page, parsed.problems)
            # Every reference is this origin's own portal file, and it is served.
            for ref in parsed.refs:
                assert ref.startswith(("/portal/", "#")), (page, ref)
                if ref.startswith("/portal/"):
                    assert anonymous.get(ref).status_code == 200, ref
        root = anonymous.get("/portal/")
        assert root.status_code == 200 and root.text == anonymous.get("/portal/index.html").text
        assert anonymous.get("/portal", follow_redirects=False).headers["location"] == "/portal/"
        script = anonymous.get("/portal/js/patient.js")
        assert script.headers["content-type"].startswith("text/javascript")
    assert "'unsafe-inline'" not in PORTAL_CSP and "frame-ancestors 'none'" in PORTAL_CSP
    assert re.search(r"(^|; )default-src 'self'(;|$)", PORTAL_CSP)


def test_scripts_load_nothing_from_elsewhere(live: LiveServer) -> None:
    with live.client() as anonymous:
        for name in ("session", "ui", "wallet", "canonical", "patient", "clinician", "auditor"):
            text = anonymous.get(f"/portal/js/{name}.js").text
            assert not re.search(r"https?://(?!hl7\.org|terminology\.hl7\.org|loinc\.org)", text), (
                name
            )
            assert "innerHTML" not in text and "eval(" not in text, name
            # The token is never put in a URL or a cookie.
            assert "document.cookie" not in text and "localStorage" not in text, name


@pytest.mark.parametrize(
    "path",
    [
        "/portal/../pyproject.toml",
        "/portal/%2e%2e/%2e%2e/api/portal.py",
        "/portal/js/../../portal.py",
        "/portal/nothing.html",
        "/portal/js/",
        "/portal/portal.py",
    ],
)
def test_only_packaged_files_are_served(live: LiveServer, path: str) -> None:
    with live.client() as anonymous:
        r = anonymous.get(path)
    assert r.status_code == 404, (path, r.text[:200])
    assert "import" not in r.text


def test_session_needs_a_token_and_says_who(live: LiveServer) -> None:
    with live.client() as anonymous:
        r = anonymous.get("/portal/api/session")
        assert r.status_code == 401
        assert r.json()["resourceType"] == "OperationOutcome"
    with live.client(live.token("patient", patient="p-1")) as patient:
        me = patient.get("/portal/api/session").json()
    assert me["role"] == "patient" and me["patient"] == "p-1"
    assert me["institution"] == live.node.config.institution
    with live.client(live.clinician) as clinician:
        assert clinician.get("/portal/api/session").json()["patient"] is None


def test_provenance_needs_a_clinician_and_a_consortium(live: LiveServer) -> None:
    with live.client(live.auditor) as auditor:
        assert auditor.get("/fhir/Patient/x/$provenance").status_code == 403
    with live.client(live.clinician) as clinician:
        r = clinician.get("/fhir/Nothing/x/$provenance")
        assert r.status_code == 400
        # This node is alone: no consortium, so nothing is anchored anywhere.
        r = clinician.get("/fhir/Patient/x/$provenance")
        assert r.status_code == 404 and "consortium" in r.text


def _verify(client: httpx.Client) -> httpx.Response:
    """POST /chain/verify, waiting out the duty-cycle bound (bounded by a deadline)."""
    deadline = time.monotonic() + 60
    while True:
        r = client.post("/chain/verify")
        if r.status_code != 429 or time.monotonic() > deadline:
            return r
        time.sleep(float(r.headers["retry-after"]))


def test_verify_now_waits_as_long_as_the_last_run_took(live: LiveServer) -> None:
    """After a run that took a minute, the next may start a minute after it ended: 429."""
    saved = list(verify_api._LAST)
    verify_api._LAST[:] = [time.monotonic(), 60.0]
    try:
        with live.client(live.auditor) as auditor:
            r = auditor.post("/chain/verify")
    finally:
        verify_api._LAST[:] = saved
    assert r.status_code == 429, r.text
    assert 50 <= int(r.headers["retry-after"]) <= 61
    assert r.json()["resourceType"] == "OperationOutcome"


def test_verify_now_reports_a_clean_chain_then_the_edited_block(live: LiveServer) -> None:
    with live.client(live.clinician) as clinician:
        for n in range(3):
            patient = {"resourceType": "Patient", "id": f"v-{n}", "gender": "other"}
            assert clinician.put(f"/fhir/Patient/v-{n}", json=patient).status_code == 201
    with live.client(live.token("patient", patient="v-0")) as patient_api:
        assert patient_api.post("/chain/verify").status_code == 403
    with live.client(live.auditor) as auditor:
        clean = _verify(auditor)
        assert clean.status_code == 200, clean.text
        report = clean.json()
        assert report["ok"] is True
        [private] = report["chains"]
        assert private["chain"] == live.node.config.chain and private["blocks"] >= 2

        # An insider edits a stored block's time (and keeps the JSON canonical).
        db = live.root / "chain.db"
        with sqlite3.connect(db) as conn:
            header = conn.execute("SELECT header FROM blocks WHERE height = 1").fetchone()[0]
            edited = json.loads(header)
            edited["time_ms"] += 1
            conn.execute(
                "UPDATE blocks SET header = ? WHERE height = 1", (canonical_bytes(edited),)
            )
        tampered = _verify(auditor)
    assert tampered.status_code == 200, tampered.text
    found = tampered.json()
    assert found["ok"] is False
    [chain] = found["chains"]
    assert chain["ok"] is False and "block 1" in chain["problem"]
    assert chain["step"] == "block-hash"


def test_verify_now_is_not_open_to_anonymous_callers(live: LiveServer) -> None:
    r = httpx.post(live.url + "/chain/verify", timeout=10)
    assert r.status_code == 401


@pytest.mark.parametrize(("query", "body"), [("?full=1", b""), ("", b'{"chain":"x"}')])
def test_verify_now_takes_no_parameters(live: LiveServer, query: str, body: bytes) -> None:
    with live.client(live.auditor) as auditor:
        r = auditor.post(f"/chain/verify{query}", content=body)
    assert r.status_code == 400, r.text
    assert "takes no parameters" in r.json()["issue"][0]["diagnostics"]
