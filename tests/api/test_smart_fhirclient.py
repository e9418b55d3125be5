"""SMART on FHIR end to end: a third-party app launches standalone against a node served over
HTTPS, with the ``fhirclient`` library (the SMART on FHIR Python client).

The test plays the browser: it follows the authorize URL, signs the sign-in
challenge with the patient's wallet key as WebCrypto would (P1363 ``r||s``),
approves, and hands the redirect to the app, which exchanges the code and
reads the patient's data with fhirclient's models. Also: the scopes granted
narrow what the token may do, CSRF, revocation and staff sign-in over HTTP.
"""

from __future__ import annotations

import base64
import html
import re
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from api_helpers import LiveServer, post_json, put_json, start_server, stop_server
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from fhirclient import client as smart_client
from fhirclient.models.condition import Condition
from fhirclient.models.observation import Observation
from requests.adapters import HTTPAdapter

from medledger.services.oauth import pkce
from medledger.services.oauth.server import register_client
from medledger.services.patients import PatientWallet
from medledger.storage import factory

PATIENT = "pat-smart"
APP_REDIRECT = "http://127.0.0.1:1/app-callback"  # never contacted: the test reads the redirect


@dataclass
class Smart:
    live: LiveServer
    ca: str
    tls: ssl.SSLContext
    app_id: str
    wallet: PatientWallet


@pytest.fixture(scope="module")
def smart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Smart]:
    tmp = tmp_path_factory.mktemp("smart")
    live = start_server(tmp / "node", tls=True)
    try:
        ca = str(live.root / "tls.crt")
        tls = ssl.create_default_context(cafile=ca)
        with live.client(live.clinician, verify=tls) as clinician:
            for resource in (
                {"resourceType": "Patient", "id": PATIENT, "gender": "female"},
                {
                    "resourceType": "Observation",
                    "id": "obs-1",
                    "status": "final",
                    "code": {"text": "heart rate"},
                    "subject": {"reference": f"Patient/{PATIENT}"},
                    "valueQuantity": {"value": 61, "unit": "/min"},
                },
                {
                    "resourceType": "Condition",
                    "id": "cond-1",
                    "subject": {"reference": f"Patient/{PATIENT}"},
                    "code": {"text": "asthma"},
                },
            ):
                path = f"/fhir/{resource['resourceType']}/{resource['id']}"
                assert put_json(clinician, path, resource).status_code in (200, 201)
        wallet = PatientWallet.create(tmp / "wallet.pem", b"a wallet passphrase for smart")
        node = live.node
        pseudonym = node.records.patient_pseudonym(PATIENT)
        signature = wallet.enrollment_signature(node.config.institution, pseudonym)
        live.run(node.enrollments.enroll(PATIENT, wallet.public, signature))
        # As ``medledger node oauth-client add`` does, on the node's own store file.
        store = factory.open_oauth_store("sqlite", live.root / "oauth.db")
        try:
            app, _ = register_client(
                store, now_ms=0, name="Fitness app", redirect_uris=(APP_REDIRECT,)
            )
        finally:
            store.close()
        yield Smart(live, ca, tls, app.id, wallet)
    finally:
        stop_server(live)


def browser(smart: Smart) -> httpx.Client:
    return httpx.Client(base_url=smart.live.url, verify=smart.tls, timeout=30)


def hidden(page: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert match is not None, f"no {name} field"
    return html.unescape(match.group(1))


def webcrypto_signature(wallet: PatientWallet, message: str) -> str:
    """The wallet key's signature in WebCrypto's form: P1363 ``r||s``, base64url."""
    der = wallet._key.sign(message.encode()).sig  # the browser holds the same key
    r, s = decode_dss_signature(der)
    return base64.urlsafe_b64encode(r.to_bytes(32, "big") + s.to_bytes(32, "big")).decode()


def patient_signs_in(smart: Smart, web: httpx.Client, authorize_url: str) -> httpx.Response:
    """Open the sign-in page, sign its challenge, and answer the approval page's form."""
    page = web.get(authorize_url)
    assert page.status_code == 200, page.text
    message = html.unescape(re.search(r'data-message="([^"]*)"', page.text).group(1))  # type: ignore[union-attr]
    public_key = base64.urlsafe_b64encode(smart.wallet.public.der()).decode().rstrip("=")
    approval = web.post(
        "/oauth/authorize/patient",
        data={
            "step": hidden(page.text, "step"),
            "csrf": hidden(page.text, "csrf"),
            "public_key": public_key,
            "signature": webcrypto_signature(smart.wallet, message),
        },
    )
    assert approval.status_code == 200, approval.text
    return approval


def approve(web: httpx.Client, approval: httpx.Response, decision: str = "approve") -> str:
    answer = web.post(
        "/oauth/authorize/decision",
        data={
            "step": hidden(approval.text, "step"),
            "csrf": hidden(approval.text, "csrf"),
            "decision": decision,
        },
    )
    assert answer.status_code == 303, answer.text
    return answer.headers["location"]


@contextmanager
def fhir_app(smart: Smart, scope: str) -> Iterator[smart_client.FHIRClient]:
    """The app, its HTTP session closed at the end (an open keep-alive would hold up the
    server's graceful stop)."""
    app = smart_client.FHIRClient(
        settings={
            "app_id": smart.app_id,
            "api_base": f"{smart.live.url}/fhir",
            "redirect_uri": APP_REDIRECT,
            "scope": scope,
        }
    )
    # Trust exactly the node's own certificate (the stdlib context given here; requests
    # would otherwise use its own CA bundle).
    app.server.session.mount(smart.live.url, _PinnedAdapter(smart.tls))
    try:
        yield app
    finally:
        app.server.session.close()


class _PinnedAdapter(HTTPAdapter):
    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def build_connection_pool_key_attributes(
        self, request: Any, verify: Any, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert
        )
        pool_kwargs["ssl_context"] = self._context
        pool_kwargs.pop("ca_certs", None)
        pool_kwargs.pop("ca_cert_dir", None)
        return host_params, pool_kwargs


def test_a_third_party_app_launches_standalone_and_reads_the_patients_data(smart: Smart) -> None:
    with fhir_app(smart, "patient/Patient.read patient/Observation.read offline_access") as app:
        launch_and_read(smart, app)


def launch_and_read(smart: Smart, app: smart_client.FHIRClient) -> None:
    assert not app.ready
    authorize_url = app.authorize_url  # discovered from /fhir/metadata (oauth-uris)
    assert authorize_url.startswith(f"{smart.live.url}/oauth/authorize?")
    with browser(smart) as web:
        approval = patient_signs_in(smart, web, authorize_url)
        assert "Fitness app" in approval.text and "patient/Observation.read" in approval.text
        callback = approve(web, approval)
    assert callback.startswith(APP_REDIRECT + "?")
    app.handle_callback(callback)
    assert app.ready and app.patient_id == PATIENT
    assert app.patient is not None and app.patient.gender == "female"
    found = list(Observation.where(struct={"patient": PATIENT}).perform_resources_iter(app.server))
    assert [(o.id, o.valueQuantity.value) for o in found] == [("obs-1", 61)]
    assert Observation.read("obs-1", app.server).code.text == "heart rate"
    # Narrower than what the patient may see: the token was not granted Condition.
    with pytest.raises(Exception) as refused:
        Condition.read("cond-1", app.server)
    assert getattr(refused.value, "response", None) is not None
    assert refused.value.response.status_code == 403  # type: ignore[attr-defined]
    assert "scopes do not allow read of Condition" in refused.value.response.text  # type: ignore[attr-defined]


def test_discovery_documents(smart: Smart) -> None:
    with browser(smart) as web:
        config = web.get("/.well-known/smart-configuration").json()
        # SMART App Launch: the document is found by appending to the FHIR base URL.
        assert web.get("/fhir/.well-known/smart-configuration").json() == config
        metadata = web.get("/fhir/metadata").json()
    base = smart.live.url
    assert config["authorization_endpoint"] == f"{base}/oauth/authorize"
    assert config["token_endpoint"] == f"{base}/oauth/token"
    assert config["revocation_endpoint"] == f"{base}/oauth/revoke"
    assert config["code_challenge_methods_supported"] == ["S256"]
    assert config["authorization_response_iss_parameter_supported"] is True  # RFC 9207
    for capability in ("launch-standalone", "client-public", "context-standalone-patient"):
        assert capability in config["capabilities"]
    extension = metadata["rest"][0]["security"]["extension"][0]
    assert {e["url"]: e["valueUri"] for e in extension["extension"]} == {
        "authorize": f"{base}/oauth/authorize",
        "token": f"{base}/oauth/token",
        "revoke": f"{base}/oauth/revoke",
    }


def manual_authorize_url(smart: Smart, verifier: str, scope: str, client_id: str = "") -> str:
    query = httpx.QueryParams(
        {
            "response_type": "code",
            "client_id": client_id or smart.app_id,
            "redirect_uri": APP_REDIRECT,
            "scope": scope,
            "state": "st",
            "code_challenge": pkce.s256(verifier),
            "code_challenge_method": "S256",
            "aud": f"{smart.live.url}/fhir",
        }
    )
    return f"{smart.live.url}/oauth/authorize?{query}"


def redeem(web: httpx.Client, smart: Smart, callback: str, verifier: str) -> httpx.Response:
    code = parse_qs(urlsplit(callback).query)["code"][0]
    return web.post(
        "/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": APP_REDIRECT,
            "client_id": smart.app_id,
            "code_verifier": verifier,
        },
    )


def test_the_sign_in_page_loads_only_its_own_script_and_checks_csrf(smart: Smart) -> None:
    verifier = pkce.new_secret()
    with browser(smart) as web:
        page = web.get(manual_authorize_url(smart, verifier, "patient/*.read user/*.read"))
        assert page.status_code == 200
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "unsafe-inline" not in csp
        assert re.findall(r"<script[^>]*>", page.text) == [
            '<script src="/oauth/static/signin.js" defer>'
        ]
        assert web.get("/oauth/static/signin.js").status_code == 200
        form = {"step": hidden(page.text, "step"), "api_token": smart.live.clinician}
        # No CSRF token in the form, or one that is not the cookie's: refused, nothing signed in.
        for csrf in ("", pkce.new_secret()):
            refused = web.post("/oauth/authorize/staff", data={**form, "csrf": csrf})
            assert refused.status_code == 400 and "CSRF" in refused.text
        # A form posted from another browser (no cookie) is refused too.
        with browser(smart) as other:
            stolen = other.post(
                "/oauth/authorize/staff", data={**form, "csrf": hidden(page.text, "csrf")}
            )
            assert stolen.status_code == 400 and "CSRF" in stolen.text
        # The step is still open for its own browser.
        ok = web.post("/oauth/authorize/staff", data={**form, "csrf": hidden(page.text, "csrf")})
        assert ok.status_code == 200 and "staff (clinician)" in ok.text


def test_a_staff_user_token_reads_but_cannot_write_and_revocation_ends_it(smart: Smart) -> None:
    with browser(smart) as web:
        tokens: dict[str, Any] = staff_sign_in(smart, web, "user/*.read offline_access")
        assert tokens["scope"] == "user/*.read offline_access" and "patient" not in tokens
        with smart.live.client(tokens["access_token"], verify=smart.tls) as app:
            assert app.get("/fhir/Condition/cond-1").status_code == 200
            write = put_json(app, "/fhir/Condition/cond-1", {"resourceType": "Condition"})
            assert write.status_code == 403
            revoked = web.post(
                "/oauth/revoke",
                data={"token": tokens["refresh_token"], "client_id": smart.app_id},
            )
            assert revoked.status_code == 200
            assert app.get("/fhir/Condition/cond-1").status_code == 401


def test_token_endpoint_refusals_are_oauth_json(smart: Smart) -> None:
    verifier = pkce.new_secret()
    with browser(smart) as web:
        approval = patient_signs_in(
            smart, web, manual_authorize_url(smart, verifier, "patient/*.read")
        )
        callback = approve(web, approval)
        first = redeem(web, smart, callback, verifier)
        assert first.status_code == 200 and first.headers["cache-control"] == "no-store"
        replay = redeem(web, smart, callback, verifier)
        assert replay.status_code == 400
        assert replay.json()["error"] == "invalid_grant"
        with smart.live.client(first.json()["access_token"], verify=smart.tls) as app:
            assert app.get("/fhir/Observation/obs-1").status_code == 401  # revoked by the replay
        unknown = web.post(
            "/oauth/token",
            data={"grant_type": "authorization_code", "code": "x", "client_id": "nobody"},
        )
        assert unknown.status_code == 401 and unknown.json()["error"] == "invalid_client"
        # A denial goes back to the app as access_denied, with its state.
        approval = patient_signs_in(
            smart, web, manual_authorize_url(smart, verifier, "patient/*.read")
        )
        denied = parse_qs(urlsplit(approve(web, approval, "deny")).query)
        assert denied["error"] == ["access_denied"] and denied["state"] == ["st"]


def test_a_wrong_signature_is_refused_on_the_page(smart: Smart) -> None:
    verifier = pkce.new_secret()
    with browser(smart) as web:
        page = web.get(manual_authorize_url(smart, verifier, "patient/*.read"))
        public_key = base64.urlsafe_b64encode(smart.wallet.public.der()).decode()
        refused = web.post(
            "/oauth/authorize/patient",
            data={
                "step": hidden(page.text, "step"),
                "csrf": hidden(page.text, "csrf"),
                "public_key": public_key,
                "signature": webcrypto_signature(smart.wallet, "not the challenge"),
            },
        )
        assert refused.status_code == 400 and "does not verify" in refused.text
        assert "Sign-in refused" in refused.text


def test_unregistered_redirects_are_never_followed(smart: Smart, tmp_path: Path) -> None:
    with browser(smart) as web:
        url = manual_authorize_url(smart, pkce.new_secret(), "patient/*.read")
        evil = url.replace("127.0.0.1%3A1", "evil.example")
        page = web.get(evil)
        assert page.status_code == 400 and "redirect_uri" in page.text
        assert "location" not in page.headers


def test_everything_and_export_hold_only_the_types_the_scopes_allow(smart: Smart) -> None:
    """$everything and $export answer many types behind one path's type: the scopes narrow
    them (the path's scope check alone would let ``Patient.read`` read everything)."""
    scope = "user/Patient.read user/Observation.read"
    with browser(smart) as web:
        tokens: dict[str, Any] = staff_sign_in(smart, web, scope)
    with smart.live.client(tokens["access_token"], verify=smart.tls) as app:
        everything = app.get(f"/fhir/Patient/{PATIENT}/$everything")
        assert everything.status_code == 200, everything.text
        shown = {
            (e["resource"]["resourceType"], e["resource"]["id"]) for e in everything.json()["entry"]
        }
        assert shown == {("Patient", PATIENT), ("Observation", "obs-1")}  # no cond-1
        by_post = post_json(
            app, f"/fhir/Patient/{PATIENT}/$everything", {"resourceType": "Parameters"}
        )
        assert by_post.status_code == 200, by_post.text  # reading, though a POST
        refused = app.get(f"/fhir/Patient/{PATIENT}/$everything", params={"_type": "Condition"})
        assert refused.status_code == 403
        kick_off = app.get("/fhir/Patient/$export", headers={"Prefer": "respond-async"})
        assert kick_off.status_code == 202, kick_off.text
        status_url = kick_off.headers["Content-Location"]
        deadline = time.monotonic() + 60
        while (status := app.get(status_url)).status_code == 202:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert status.status_code == 200, status.text
        assert {o["type"] for o in status.json()["output"]} <= {"Patient", "Observation"}
        assert app.delete(status_url).status_code == 202


def staff_sign_in(smart: Smart, web: httpx.Client, scope: str, api_token: str = "") -> Any:
    """The app's whole sign-in in browser ``web`` for a staff member (the clinician unless
    ``api_token`` says otherwise), asking for ``scope``: the token endpoint's answer."""
    verifier = pkce.new_secret()
    page = web.get(manual_authorize_url(smart, verifier, scope))
    approval = web.post(
        "/oauth/authorize/staff",
        data={
            "step": hidden(page.text, "step"),
            "csrf": hidden(page.text, "csrf"),
            "api_token": api_token or smart.live.clinician,
        },
    )
    answer = redeem(web, smart, approve(web, approval), verifier)
    assert answer.status_code == 200, answer.text
    return answer.json()


def staff_access_token(smart: Smart, scope: str, api_token: str = "") -> str:
    """An access token of the app for a staff member, granted ``scope`` (user/ scopes)."""
    with browser(smart) as web:
        token: str = staff_sign_in(smart, web, scope, api_token)["access_token"]
        return token


def test_included_resources_are_only_of_the_types_the_scopes_allow(smart: Smart) -> None:
    """The path's scope check sees the searched type only: what _include and _revinclude
    add is of other types and must be narrowed to the scopes too."""
    token = staff_access_token(smart, "user/Patient.read user/Observation.read")
    with smart.live.client(token, verify=smart.tls) as app:
        search = app.get(
            "/fhir/Patient",
            params=[
                ("_id", PATIENT),
                ("_revinclude", "Observation:subject"),
                ("_revinclude", "Condition:subject"),
            ],
        )
        assert search.status_code == 200, search.text
        shown = {
            (e["resource"]["resourceType"], e["resource"]["id"]) for e in search.json()["entry"]
        }
        assert shown == {("Patient", PATIENT), ("Observation", "obs-1")}  # no cond-1
    only_observations = staff_access_token(smart, "user/Observation.read")
    with smart.live.client(only_observations, verify=smart.tls) as app:
        search = app.get(
            "/fhir/Observation", params={"_id": "obs-1", "_include": "Observation:subject"}
        )
        assert search.status_code == 200, search.text
        shown = {
            (e["resource"]["resourceType"], e["resource"]["id"]) for e in search.json()["entry"]
        }
        assert shown == {("Observation", "obs-1")}  # not the Patient it refers to


def test_an_admins_sign_in_does_not_give_an_app_the_admin_operations(smart: Smart) -> None:
    """SMART scopes are about FHIR data: an app an administrator approved for user/*.*
    reads and writes records as the admin, but erasing, key rotation and re-binding
    stay with the admin API token itself."""
    token = staff_access_token(smart, "user/*.*", api_token=smart.live.admin)
    with smart.live.client(token, verify=smart.tls) as app:
        assert app.get("/fhir/Observation/obs-1").status_code == 200
        for path in ("/admin/records/Condition/cond-1/erase", "/admin/keys/rotate"):
            refused = app.post(path)
            assert refused.status_code == 403, refused.text
            assert "admin API token" in refused.text
        assert app.get("/fhir/Condition/cond-1").status_code == 200  # not erased


def test_a_token_scoped_to_some_types_cannot_match_on_others_by_chain_or_has(
    smart: Smart,
) -> None:
    """A chain or _has matches on another type's values: with Observation scopes only,
    'which Observations are about a female Patient' would read the Patient's gender."""
    token = staff_access_token(smart, "user/Observation.read")
    with smart.live.client(token, verify=smart.tls) as app:
        for params in ({"subject:Patient.gender": "female"}, {"_has:Condition:subject:code": "x"}):
            refused = app.get("/fhir/Observation", params=params)
            assert refused.status_code == 403, refused.text
        assert app.get("/fhir/Observation", params={"code": "x"}).status_code == 200
    everything = staff_access_token(smart, "user/*.read")
    with smart.live.client(everything, verify=smart.tls) as app:
        found = app.get("/fhir/Observation", params={"subject:Patient.gender": "female"})
        assert found.status_code == 200, found.text
        assert [e["resource"]["id"] for e in found.json()["entry"]] == ["obs-1"]


def test_an_app_keeps_its_bulk_export_across_a_token_refresh(smart: Smart) -> None:
    """An export outlives the hour-long access token that started it: the job belongs to
    the sign-in (its grant), so the refreshed token polls it and another sign-in cannot."""
    with browser(smart) as web:
        tokens: dict[str, Any] = staff_sign_in(smart, web, "user/Patient.read offline_access")
        with smart.live.client(tokens["access_token"], verify=smart.tls) as app:
            kick_off = app.get("/fhir/Patient/$export", headers={"Prefer": "respond-async"})
            assert kick_off.status_code == 202, kick_off.text
        status_url = kick_off.headers["Content-Location"]
        refreshed = web.post(
            "/oauth/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": tokens["refresh_token"],
                "client_id": smart.app_id,
            },
        )
        assert refreshed.status_code == 200, refreshed.text
    new_access = refreshed.json()["access_token"]
    assert new_access != tokens["access_token"]
    other = staff_access_token(smart, "user/Patient.read")  # the same clinician, another sign-in
    with smart.live.client(other, verify=smart.tls) as stranger:
        assert stranger.get(status_url).status_code == 404
    with smart.live.client(new_access, verify=smart.tls) as app:
        deadline = time.monotonic() + 60
        while (status := app.get(status_url)).status_code == 202:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert status.status_code == 200, status.text
        assert app.delete(status_url).status_code == 202


def test_a_refresh_for_a_narrower_scope_gives_a_token_that_can_do_only_that(
    smart: Smart,
) -> None:
    """RFC 6749 §6 over HTTP: the refreshed token is refused what the refresh left out; a
    refresh asking for more than the grant is invalid_scope and spends nothing."""
    with browser(smart) as web:
        tokens: dict[str, Any] = staff_sign_in(smart, web, "user/*.read offline_access")

        def refresh(refresh_token: str, scope: str) -> httpx.Response:
            return web.post(
                "/oauth/token",
                data={
                    "grant_type": "refresh_token",
                    "refresh_token": refresh_token,
                    "client_id": smart.app_id,
                    "scope": scope,
                },
            )

        wider = refresh(tokens["refresh_token"], "user/*.read user/*.write")
        assert wider.status_code == 400 and wider.json()["error"] == "invalid_scope"
        narrow = refresh(tokens["refresh_token"], "user/Observation.read")  # not spent above
        assert narrow.status_code == 200, narrow.text
        assert narrow.json()["scope"] == "user/Observation.read"
    with smart.live.client(narrow.json()["access_token"], verify=smart.tls) as app:
        assert app.get("/fhir/Observation/obs-1").status_code == 200
        refused = app.get("/fhir/Condition/cond-1")
        assert refused.status_code == 403 and "scopes do not allow" in refused.text


def test_a_forged_host_header_changes_nothing_the_node_says_about_itself(smart: Smart) -> None:
    """Over real HTTP: the URLs come from where the node is served, not from the Host."""
    with browser(smart) as web:
        honest = web.get("/.well-known/smart-configuration").json()
        forged = web.get("/.well-known/smart-configuration", headers={"Host": "evil.example"})
        assert forged.status_code == 200 and forged.json() == honest
        assert honest["issuer"] == smart.live.url
        metadata = web.get("/fhir/metadata", headers={"Host": "evil.example"}).json()
        extension = metadata["rest"][0]["security"]["extension"][0]["extension"]
        assert {e["valueUri"] for e in extension} == {
            f"{smart.live.url}/oauth/{name}" for name in ("authorize", "token", "revoke")
        }
