"""The portal in a real browser against a real two-institution network over TLS.

``network up`` (two institutions, solo ordering, HTTPS with each node's own
certificate) and Debian's chromium driven by Playwright. Chromium trusts
exactly the two nodes' certificates: their SPKI hashes are pinned with
``--ignore-certificate-errors-spki-list`` (the test CA is in no trust store
chromium reads, and nothing else is accepted; ``ignore_https_errors`` is not
used). The story:

a patient signs in at hospital-1, makes a key in the browser (WebCrypto,
non-extractable) and enrolls it, grants hospital-2 consent (signed in the
browser) — a clinician at hospital-2 fetches the record and sees it verified —
the access is on the patient's timeline — the patient revokes (by keyboard) —
the next fetch is refused and the page says why. A clinician at hospital-1
finds the patient and sees a verified provenance badge on each record. The
auditor's "verify now" reports a clean chain, then the edited block after a
stored block of hospital-1 is changed on disk.

Every page is screenshotted (into the test's tmp dir, copied to
``build/screenshots/``) and checked with axe-core: no serious or critical
violation. One browser for the module.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from medledger.core.encoding import canonical_bytes
from medledger.storage.sqlite.tokens import SqliteTokenStore
from medledger.synthetic import generate_patients
from network_support import FHIR_JSON, run_cli, tls

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        "chromium is not installed at /usr/bin/chromium (make test installs it as root: "
        "apt-get install -y chromium)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api")
axe_sync = pytest.importorskip("axe_playwright_python.sync_playwright")

pytestmark = pytest.mark.timeout(300)
SHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"
#: What each wait in the browser may take at most (a consent waits for finality).
WAIT_MS = 60_000


def _spki_pin(cert_path: str) -> str:
    """Chromium's pin of a certificate: base64 SHA-256 of its SubjectPublicKeyInfo."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def _token(base: Path, inst: str, role: str, patient: str | None = None) -> str:
    """A token from the institution's own token store, as ``medledger token create`` issues."""
    store = SqliteTokenStore(base / inst / "tokens.db")
    try:
        text, _ = store.create(
            role=role, patient=patient, now_ms=time.time_ns() // 1_000_000, label="portal test"
        )
    finally:
        store.close()
    return text


class Shots:
    """Screenshots and accessibility checks of every page visited."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.taken: list[Path] = []
        self.axe = axe_sync.Axe()

    def __call__(self, page: Any, name: str) -> None:
        path = self.directory / f"{len(self.taken) + 1:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        self.taken.append(path)
        results = self.axe.run(page)
        serious = [
            (v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3])
            for v in results.response["violations"]
            if v["impact"] in ("serious", "critical")
        ]
        assert serious == [], f"{name}: {serious}"


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from network_support import stop_network

    base = tmp_path_factory.mktemp("portal") / "net"
    try:
        up = run_cli(
            "network", "up", "--dir", base, "--institutions", "2", "--ordering", "solo", "--json"
        )
        nodes = {n["institution"]: n for n in up.json()["nodes"]}
        yield {"base": base, "nodes": nodes}
    finally:
        stop_network(base)


@pytest.fixture(scope="module")
def browser(network: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    pins = ",".join(_spki_pin(n["tls_cert"]) for n in network["nodes"].values())
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--ignore-certificate-errors-spki-list={pins}",
            ],
            viewport={"width": 1100, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


def _watch(page: Any) -> Any:
    """Collect script errors and CSP violations of ``page`` into ``page.errors``."""
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None,
    )
    page.errors = errors
    return page


def _token_sign_in(context: Any, node: dict[str, Any], token: str, landing: str) -> Any:
    """A new tab signed in with an API token through the portal's token form."""
    page = _watch(context.new_page())
    page.goto(node["url"] + "/portal/")
    page.get_by_label("API token", exact=True).fill(token)
    page.get_by_role("button", name="Use this token").click()
    page.wait_for_url(f"**{landing}")
    return page


def _smart_sign_in(
    context: Any, node: dict[str, Any], role: str, landing: str, *, staff_token: str = ""
) -> Any:
    """A new tab signed in through SMART on FHIR: the portal's PKCE flow, the node's
    sign-in page (the browser's wallet key for a patient, the API token for staff), the
    approval page, then back to the portal, whose address keeps no code or state."""
    page = _watch(context.new_page())
    page.goto(node["url"] + "/portal/")
    page.get_by_label("I am", exact=True).select_option(role)
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.wait_for_url("**/oauth/authorize**")
    assert "code_challenge_method=S256" in page.url and "client_id=medledger-portal" in page.url
    if role == "patient":
        page.get_by_role("button", name="Sign in with the key in this browser").click()
    else:
        page.get_by_label("Your medledger API token", exact=True).fill(staff_token)
        page.locator("form[action='/oauth/authorize/staff'] button[type=submit]").click()
    page.get_by_role("button", name="Approve").click()
    page.wait_for_url(f"**{landing}")
    assert "code=" not in page.url and "state=" not in page.url
    bearer = page.evaluate("sessionStorage.getItem('medledger.token')")
    assert bearer.startswith("mla_")  # an access token of the sign-in service
    return page


def _status(page: Any, selector: str, text: str) -> str:
    locator = page.locator(selector)
    sync_api.expect(locator).to_contain_text(text, timeout=WAIT_MS)
    return str(locator.inner_text())


def test_patient_clinician_and_auditor_in_a_browser(
    network: dict[str, Any], browser: Any, tmp_path: Path
) -> None:
    base, nodes = network["base"], network["nodes"]
    h1, h2 = nodes["hospital-1"], nodes["hospital-2"]
    shots = Shots(tmp_path / "screenshots")
    shots.directory.mkdir()

    person = generate_patients(1, seed=21, resources_per_patient=5)[0]
    headers = {"Authorization": f"Bearer {h1['tokens']['clinician']}", "Content-Type": FHIR_JSON}
    with httpx.Client(base_url=h1["url"], headers=headers, timeout=60, verify=tls(h1)) as api:
        for resource in person.all_resources():
            r = api.put(f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource)
            assert r.status_code == 201, r.text
    observation = next(r for r in person.resources if r["resourceType"] == "Observation")
    target = f"Observation/{observation['id']}"

    # -- the patient: sign in, make a key in the browser, enroll it, grant consent --------
    # First visit with the token the institution issued at the desk: the browser makes
    # the patient's key and enrolls it. Then a real SMART sign-in with that key.
    first = _token_sign_in(
        browser,
        h1,
        _token(base, "hospital-1", "patient", person.patient_id),
        "/portal/patient.html",
    )
    first.get_by_role("button", name="Create my key and enroll").click()
    _status(first, "#key", "This browser holds your key")
    # The key cannot be read out of the browser: WebCrypto made it non-extractable.
    assert (
        first.evaluate(
            """async () => {
            const db = await new Promise((ok) => { const r = indexedDB.open("medledger", 1); r.onsuccess = () => ok(r.result); });
            const entry = await new Promise((ok) => { const r = db.transaction("keys").objectStore("keys").get("wallet"); r.onsuccess = () => ok(r.result); });
            return entry.privateKey.extractable;
        }"""
        )
        is False
    )
    shots(first, "patient-enrolled")
    first.get_by_role("button", name="Sign out").click()
    first.wait_for_url("**/portal/index.html")
    assert first.evaluate("sessionStorage.getItem('medledger.token')") is None
    first.close()

    patient = _smart_sign_in(browser, h1, "patient", "/portal/patient.html")
    _status(patient, "#key", "This browser holds your key")

    patient.get_by_label("Institution that may read", exact=True).select_option("hospital-2")
    patient.get_by_label("Purpose", exact=True).select_option("TREAT")
    patient.get_by_role("button", name="Sign and grant").click()
    granted = _status(patient, "#grant-status", "final on the consortium chain")
    consent_id = granted.split()[1]
    assert len(consent_id) == 64
    _status(patient, "#consents", consent_id)
    shots(patient, "patient-consent-granted")

    # -- a clinician at hospital-2 fetches the record under that consent ------------------
    reader = _smart_sign_in(
        browser, h2, "clinician", "/portal/clinician.html", staff_token=h2["tokens"]["clinician"]
    )
    reader.get_by_label("Institution holding the record", exact=True).select_option("hospital-1")
    reader.get_by_label("Consent id", exact=True).fill(consent_id)
    reader.locator("#target").fill("")
    reader.get_by_role("button", name="Fetch and verify").click()
    _status(reader, "#shared", target)
    reader.locator("#target").fill(target)
    reader.get_by_role("button", name="Fetch and verify").click()
    verified = _status(reader, "#share-status", "Verified")
    assert "hospital-1" in verified
    _status(reader, "#shared", "hospital-1, hospital-2")  # the finality certificate's signers
    shots(reader, "clinician-fetch-verified")

    # -- the access is on the patient's timeline -----------------------------------------
    patient.get_by_role("button", name="Refresh").click()
    _status(patient, "#trail", "hospital-2")
    read_by_h2 = patient.locator("#trail tr", has_text="hospital-2").filter(has_text="Observation")
    # Recorded by the holder on its private chain and summarized on the consortium.
    sync_api.expect(read_by_h2.filter(has_text="allowed").first).to_be_visible()
    assert consent_id[:12] in read_by_h2.first.inner_text()
    shots(patient, "patient-timeline")
    with patient.expect_download() as download_info:
        patient.get_by_role("button", name="Download my audit trail").click()
    trail = json.loads(Path(download_info.value.path()).read_text())
    assert trail["resourceType"] == "Bundle" and trail["total"] >= 2

    # -- the patient revokes, using only the keyboard ------------------------------------
    revoke = patient.get_by_role("button", name="Revoke consent for hospital-2")
    revoke.focus()
    patient.keyboard.press("Enter")
    _status(patient, "#status", "revoked")
    _status(patient, "#consents", "inactive")

    reader.get_by_role("button", name="Fetch and verify").click()
    refused = _status(reader, "#share-status", "Refused")
    assert "revoked" in refused
    _status(reader, "#shared", "refused")
    shots(reader, "clinician-fetch-refused")
    patient.get_by_role("button", name="Refresh").click()
    refused_rows = patient.locator("#trail tr", has_text="hospital-2").filter(has_text="refused")
    sync_api.expect(refused_rows.filter(has_text="revoked").first).to_be_visible(timeout=WAIT_MS)

    # -- a clinician at hospital-1 finds the patient and sees verified provenance --------
    local = _token_sign_in(browser, h1, h1["tokens"]["clinician"], "/portal/clinician.html")
    family = person.patient["name"][0]["family"]
    local.get_by_label("Name", exact=True).fill(family)
    local.get_by_role("button", name="Search").click()
    local.get_by_role("button", name="Open the records of", exact=False).first.click()
    records = local.locator("#records")
    sync_api.expect(records.locator(".badge.ok").first).to_contain_text("verified", timeout=WAIT_MS)
    sync_api.expect(records.locator(".badge.wait")).to_have_count(0, timeout=WAIT_MS)
    assert records.locator(".badge.bad").count() == 0
    assert "certified by hospital-1, hospital-2" in records.inner_text()
    shots(local, "clinician-records-provenance")

    # -- the auditor: network status, explorer, verify now; then a stored block is edited
    auditor = _smart_sign_in(
        browser,
        h1,
        "auditor",
        "/portal/auditor.html",
        staff_token=_token(base, "hospital-1", "auditor"),
    )
    _status(auditor, "#network", "hospital-2")
    _status(auditor, "#block", "Transactions as the chain holds them")
    auditor.get_by_label("Chain", exact=True).select_option("consortium")
    auditor.get_by_label("Block height", exact=True).fill("")
    auditor.get_by_role("button", name="Show block").click()
    _status(auditor, "#block", "Finality certificate")
    auditor.get_by_role("button", name="Verify now").click()
    _status(auditor, "#verify-status", "no tampering found")
    shots(auditor, "auditor-verified")

    with sqlite3.connect(base / "hospital-1" / "chain.db") as conn:
        header = conn.execute("SELECT header FROM blocks WHERE height = 2").fetchone()[0]
        edited = json.loads(header)
        edited["time_ms"] += 1
        conn.execute("UPDATE blocks SET header = ? WHERE height = 2", (canonical_bytes(edited),))
    auditor.get_by_role("button", name="Verify now").click()
    _status(auditor, "#verify-status", "TAMPERING FOUND")
    report = _status(auditor, "#verify-report", "FAILED")
    assert "block 2" in report
    shots(auditor, "auditor-tampering-found")

    index = browser.new_page()
    index.goto(h1["url"] + "/portal/index.html")
    shots(index, "sign-in")

    for page in (patient, reader, local, auditor):
        assert page.errors == [], page.errors
    SHOTS.mkdir(parents=True, exist_ok=True)
    for shot in shots.taken:
        shutil.copy(shot, SHOTS / shot.name)
    assert len(shots.taken) == 9


def test_the_consent_form_is_usable_by_keyboard(
    network: dict[str, Any], browser: Any, tmp_path: Path
) -> None:
    """Tab walks the grant form in reading order, every control labelled, the button
    reachable; on a phone-sized screen the page needs no sideways scrolling."""
    base, h1 = network["base"], network["nodes"]["hospital-1"]
    page = _token_sign_in(
        browser, h1, _token(base, "hospital-1", "patient", "nobody"), "/portal/patient.html"
    )
    page.locator("#grantee").focus()
    # A date input takes one Tab per part (day, month, year): count each control once.
    order: list[str] = []
    for _ in range(25):
        focused = page.evaluate("document.activeElement.id")
        if not order or order[-1] != focused:
            order.append(focused)
        if focused == "grant-submit":
            break
        page.keyboard.press("Tab")
    assert order == [
        "grantee", "scope-all", "scope-Observation", "scope-Condition", "scope-Encounter",
        "scope-AllergyIntolerance", "scope-MedicationRequest", "scope-Patient", "purpose",
        "start", "end", "grant-submit",
    ]  # fmt: skip
    # Each control has an accessible name from its label.
    for control in ("grantee", "purpose", "start", "end"):
        assert page.locator(f"#{control}").evaluate("e => e.labels.length") == 1
    # Space toggles a checkbox (keyboard only, no mouse).
    page.locator("#scope-Observation").focus()
    page.keyboard.press("Space")
    assert page.locator("#scope-Observation").is_checked()
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    shot = tmp_path / "10-patient-phone.png"
    page.screenshot(path=str(shot), full_page=True)
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, SHOTS / shot.name)
