"""The sign-in page's own script in a real browser (Playwright driving Debian's chromium).

A patient imports the browser key file (``patient export-key --for-browser``)
on the sign-in page; ``signin.js`` keeps it as a non-extractable WebCrypto key
in IndexedDB and signs the challenge (P1363), the node verifies it, and after
approval the browser lands on the app's redirect URI with a code. A second
sign-in uses the key already in the browser, with no file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from api_helpers import LiveServer, put_json, start_server, stop_server
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import Browser, Page, Route, sync_playwright

from medledger.services.oauth import pkce
from medledger.services.oauth.server import register_client
from medledger.services.patients import PatientWallet
from medledger.storage import factory

CHROMIUM = Path("/usr/bin/chromium")
PATIENT = "pat-browser"
# The app's redirect: answered by the test (page.route), never by a server.
APP_REDIRECT = "https://app.example/callback"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, str, Path]]:
    tmp = tmp_path_factory.mktemp("browser")
    # Plain HTTP on 127.0.0.1: a secure context for WebCrypto, without teaching the
    # browser the node's certificate (TLS itself: test_smart_fhirclient.py).
    live = start_server(tmp / "node")
    try:
        with live.client(live.clinician) as clinician:
            patient = {"resourceType": "Patient", "id": PATIENT, "gender": "male"}
            assert put_json(clinician, f"/fhir/Patient/{PATIENT}", patient).status_code == 201
        wallet = PatientWallet.create(tmp / "wallet.pem", b"a wallet passphrase for chromium")
        node = live.node
        signature = wallet.enrollment_signature(
            node.config.institution, node.records.patient_pseudonym(PATIENT)
        )
        live.run(node.enrollments.enroll(PATIENT, wallet.public, signature))
        wallet.export_browser_key(tmp / "browser-key.json")
        store = factory.open_oauth_store("sqlite", live.root / "oauth.db")
        try:
            app, _ = register_client(
                store, now_ms=0, name="Browser app", redirect_uris=(APP_REDIRECT,)
            )
        finally:
            store.close()
        yield live, app.id, tmp / "browser-key.json"
    finally:
        stop_server(live)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


def assert_accessible(page: Page) -> None:
    """No violation of axe-core's WCAG rules (labels, contrast, landmarks, names)."""
    results = Axe().run(page)
    assert results.violations_count == 0, results.generate_report()


def authorize_url(live: LiveServer, client_id: str, verifier: str) -> str:
    query = "&".join(
        f"{k}={v}"
        for k, v in {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": APP_REDIRECT,
            "scope": "patient/*.read",
            "state": "browser-state",
            "code_challenge": pkce.s256(verifier),
            "code_challenge_method": "S256",
            "aud": f"{live.url}/fhir",
        }.items()
    )
    return f"{live.url}/oauth/authorize?{query.replace('/', '%2F').replace(':', '%3A')}"


def test_the_page_imports_the_key_signs_in_and_the_app_gets_a_code(
    live: tuple[LiveServer, str, Path], browser: Browser, tmp_path: Path
) -> None:
    server, client_id, key_file = live
    context = browser.new_context()
    landed: list[str] = []
    errors: list[str] = []

    def app_callback(route: Route) -> None:
        landed.append(route.request.url)
        route.fulfill(status=200, body="app")

    context.route(f"{APP_REDIRECT}**", app_callback)
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    try:
        verifier = pkce.new_secret()
        page.goto(authorize_url(server, client_id, verifier))
        page.screenshot(path=str(tmp_path / "signin.png"))  # kept with the test's files
        assert_accessible(page)
        page.set_input_files("#key-file", str(key_file))
        page.wait_for_url(f"{server.url}/oauth/authorize/patient", timeout=20_000)
        assert "You are signed in" in page.content() and "a patient" in page.content()
        assert_accessible(page)
        page.get_by_role("button", name="Approve").click()
        page.wait_for_url(f"{APP_REDIRECT}**", timeout=20_000)
        query = parse_qs(urlsplit(landed[-1]).query)
        assert query["state"] == ["browser-state"]
        with server.client() as app:
            tokens: dict[str, Any] = app.post(
                "/oauth/token",
                data={
                    "grant_type": "authorization_code",
                    "code": query["code"][0],
                    "redirect_uri": APP_REDIRECT,
                    "client_id": client_id,
                    "code_verifier": verifier,
                },
            ).json()
        assert tokens["patient"] == PATIENT
        page.goto(authorize_url(server, client_id, pkce.new_secret()))  # the node's origin again
        # The key stayed in the browser, non-extractable; this sign-in needs no file.
        extractable = page.evaluate(
            """() => new Promise((resolve, reject) => {
                const open = indexedDB.open("medledger");
                open.onsuccess = () => {
                    const get = open.result.transaction("keys").objectStore("keys").get("wallet");
                    get.onsuccess = () => resolve(get.result.privateKey.extractable);
                    get.onerror = () => reject(get.error);
                };
                open.onerror = () => reject(open.error);
            })"""
        )
        assert extractable is False
        page.get_by_role("button", name="Sign in with the key in this browser").click()
        page.wait_for_url(f"{server.url}/oauth/authorize/patient", timeout=20_000)
        assert "a patient" in page.content()
        assert errors == []
    finally:
        context.close()
