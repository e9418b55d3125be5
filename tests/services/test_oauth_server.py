"""The authorization server's flows on a real SQLite store: PKCE, single-use codes and sign-in
challenges, refresh rotation and reuse detection, revocation, redirect URI matching, scopes.

The patient's key and its enrollment are stood in by a dictionary (the real
enrollment look-up is exercised end to end in ``tests/api/test_smart_fhirclient.py``).
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from medledger.core.errors import InvalidInput, OAuthError
from medledger.core.keys import SigningKey
from medledger.services.oauth import pkce
from medledger.services.oauth.scopes import parse_scopes, request_access
from medledger.services.oauth.server import (
    ACCESS_TTL_MS,
    CODE_TTL_MS,
    PORTAL_CLIENT,
    AuthorizationServer,
    SignIn,
)
from medledger.storage.ports import OAuthClient
from medledger.storage.sqlite.oauth import SqliteOAuthStore
from medledger.storage.sqlite.tokens import SqliteTokenStore

T0 = 1_800_000_000_000
ORIGIN = "https://node.example:8700"
APP_REDIRECT = "https://app.example/callback"
VERIFIER = "v" * 20 + pkce.new_secret()


class ManualClock:
    def __init__(self) -> None:
        self.now = T0

    def now_ms(self) -> int:
        return self.now


@dataclass
class World:
    server: AuthorizationServer
    clock: ManualClock
    app: OAuthClient
    patient_key: SigningKey
    staff_token: str
    bindings: dict[str, str]
    tokens: SqliteTokenStore


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    store = SqliteOAuthStore(tmp_path / "oauth.db")
    tokens = SqliteTokenStore(tmp_path / "tokens.db")
    clock = ManualClock()
    key = SigningKey.generate()
    bindings = {key.fingerprint: "pat-1"}

    async def patient_of_key(fingerprint: str) -> str | None:
        return bindings.get(fingerprint)

    server = AuthorizationServer(
        store=store,
        tokens=tokens,
        clock=clock,
        institution="alpha",
        patient_of_key=patient_of_key,
        base_url=ORIGIN,
    )
    app, _ = server.register_client(name="Test app", redirect_uris=(APP_REDIRECT,))
    staff, _ = tokens.create(role="clinician", now_ms=T0, label="dr")
    yield World(server, clock, app, key, staff, bindings, tokens)
    store.close()
    tokens.close()


def authorize_params(client_id: str, **changes: str) -> dict[str, str]:
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": APP_REDIRECT,
        "scope": "launch/patient patient/Observation.read offline_access user/*.read",
        "state": "s-123",
        "code_challenge": pkce.s256(VERIFIER),
        "code_challenge_method": "S256",
        "aud": f"{ORIGIN}/fhir",
    }
    params.update(changes)
    return params


def p1363(key: SigningKey, message: bytes) -> str:
    """What WebCrypto returns: r||s, 32 bytes each (here base64url, as the page posts it)."""
    r, s = decode_dss_signature(key.sign(message).sig)
    return base64.urlsafe_b64encode(r.to_bytes(32, "big") + s.to_bytes(32, "big")).decode()


def spki(key: SigningKey) -> str:
    return base64.urlsafe_b64encode(key.public.der()).decode().rstrip("=")


def patient_sign_in(world: World, signin: SignIn, key: SigningKey | None = None) -> SignIn:
    key = key or world.patient_key
    return asyncio.run(
        world.server.sign_in_patient(
            signin.step,
            signin.csrf,
            public_key=spki(key),
            signature=p1363(key, signin.message.encode()),
        )
    )


def code_of(location: str) -> str:
    query = parse_qs(urlsplit(location).query)
    assert query["state"] == ["s-123"]
    assert query["iss"] == [ORIGIN]  # RFC 9207: which server answered
    return query["code"][0]


def approved_code(world: World, **changes: str) -> str:
    signin = world.server.begin(authorize_params(world.app.id, **changes))
    approved = patient_sign_in(world, signin)
    return code_of(world.server.decide(approved.step, approved.csrf, approve=True))


def exchange(world: World, code: str, **changes: str) -> dict[str, Any]:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": APP_REDIRECT,
        "code_verifier": VERIFIER,
        **changes,
    }
    return asyncio.run(world.server.token(form, world.app))


def refresh(world: World, refresh_token: str, scope: str | None = None) -> dict[str, Any]:
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    if scope is not None:
        form["scope"] = scope
    return asyncio.run(world.server.token(form, world.app))


def test_pkce_s256_matches_rfc_7636_and_plain_is_refused() -> None:
    # RFC 7636 Appendix B.
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert pkce.s256(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    assert pkce.verify(verifier, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM")
    assert not pkce.verify(verifier[:-1] + "l", "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM")
    assert not pkce.verify("short", pkce.s256("short"))  # under 43 characters
    with pytest.raises(InvalidInput, match="S256"):
        pkce.check_challenge(verifier, "plain")


def test_a_patient_signs_in_approves_and_gets_a_patient_token(world: World) -> None:
    signin = world.server.begin(authorize_params(world.app.id))
    assert "institution: alpha" in signin.message and world.app.id in signin.message
    approved = patient_sign_in(world, signin)
    assert approved.role == "patient"
    # A patient gets the patient/ scopes only: user/*.read is not granted.
    assert approved.scopes == ("launch/patient", "patient/Observation.read", "offline_access")
    answer = exchange(world, code_of(world.server.decide(signin.step, signin.csrf, approve=True)))
    assert answer["patient"] == "pat-1"
    assert answer["token_type"] == "Bearer" and answer["expires_in"] == ACCESS_TTL_MS // 1000
    assert answer["scope"] == "launch/patient patient/Observation.read offline_access"
    info = asyncio.run(world.server.check_access(answer["access_token"], now_ms=T0 + 1))
    assert (info.role, info.patient) == ("patient", "pat-1")
    assert info.scopes == ("launch/patient", "patient/Observation.read", "offline_access")
    with pytest.raises(InvalidInput, match="expired"):
        asyncio.run(world.server.check_access(answer["access_token"], now_ms=T0 + ACCESS_TTL_MS))


def test_staff_sign_in_with_an_api_token_gets_user_scopes_and_its_role(world: World) -> None:
    signin = world.server.begin(authorize_params(world.app.id))
    approved = world.server.sign_in_staff(signin.step, signin.csrf, api_token=world.staff_token)
    assert (approved.role, approved.scopes) == ("clinician", ("offline_access", "user/*.read"))
    answer = exchange(world, code_of(world.server.decide(signin.step, signin.csrf, approve=True)))
    info = asyncio.run(world.server.check_access(answer["access_token"], now_ms=T0))
    assert (info.role, info.patient, "patient" in answer) == ("clinician", None, False)


def test_a_wrong_verifier_wrong_redirect_and_expired_code_are_refused(world: World) -> None:
    with pytest.raises(OAuthError, match="code_verifier") as refused:
        exchange(world, approved_code(world), code_verifier="w" * 43)
    assert refused.value.error == "invalid_grant"
    with pytest.raises(OAuthError, match="redirect_uri"):
        exchange(world, approved_code(world), redirect_uri=APP_REDIRECT + "/other")
    late = approved_code(world)
    world.clock.now += CODE_TTL_MS
    with pytest.raises(OAuthError, match="expired"):
        exchange(world, late)


def test_a_replayed_code_is_refused_and_revokes_what_it_issued(world: World) -> None:
    code = approved_code(world)
    first = exchange(world, code)
    asyncio.run(world.server.check_access(first["access_token"], now_ms=T0))
    with pytest.raises(OAuthError, match="already used") as replay:
        exchange(world, code)
    assert replay.value.error == "invalid_grant"
    with pytest.raises(InvalidInput, match="revoked"):
        asyncio.run(world.server.check_access(first["access_token"], now_ms=T0))
    with pytest.raises(OAuthError):
        refresh(world, first["refresh_token"])


def test_refresh_rotates_and_reuse_of_a_rotated_token_revokes_the_family(world: World) -> None:
    first = exchange(world, approved_code(world))
    second = refresh(world, first["refresh_token"])
    assert second["refresh_token"] != first["refresh_token"]
    asyncio.run(world.server.check_access(second["access_token"], now_ms=T0))
    third = refresh(world, second["refresh_token"])  # the rotated one works, once
    with pytest.raises(OAuthError, match="already used"):
        refresh(world, first["refresh_token"])  # stolen copy of a rotated token
    for dead in (first["access_token"], third["access_token"]):
        with pytest.raises(InvalidInput, match="revoked"):
            asyncio.run(world.server.check_access(dead, now_ms=T0))
    with pytest.raises(OAuthError):
        refresh(world, third["refresh_token"])


def test_a_refresh_asking_for_less_gets_only_that_and_the_grant_keeps_the_rest(
    world: World,
) -> None:
    """RFC 6749 §6: the new access token carries the narrower scope asked for; the
    refresh token keeps the original grant, so the next refresh may ask for all of it."""
    first = exchange(world, approved_code(world, scope="patient/*.read offline_access"))
    assert first["scope"] == "patient/*.read offline_access"
    narrow = refresh(world, first["refresh_token"], scope="patient/Observation.rs")
    assert narrow["scope"] == "patient/Observation.rs"
    info = asyncio.run(world.server.check_access(narrow["access_token"], now_ms=T0))
    assert info.scopes == ("patient/Observation.rs",)
    scopes = world.server.scopes_of(info)
    assert scopes is not None and scopes.allows("Observation", "r")
    assert not scopes.allows("Condition", "r")  # the grant's patient/*.read is not in it
    # Omitted: the whole grant again (RFC 6749 §6: "treated as equal to the scope
    # originally granted"), from the refresh token the narrow refresh returned.
    full = refresh(world, narrow["refresh_token"])
    assert full["scope"] == "patient/*.read offline_access"
    info = asyncio.run(world.server.check_access(full["access_token"], now_ms=T0))
    assert info.scopes == ("patient/*.read", "offline_access")


def test_a_refresh_asking_for_more_than_the_grant_is_refused_and_spends_nothing(
    world: World,
) -> None:
    first = exchange(world, approved_code(world, scope="patient/Observation.read offline_access"))
    for wider in (
        "patient/*.read",  # another type
        "patient/Observation.write",  # another action
        "patient/Observation.cruds",
        "user/Observation.read",  # another context
        "launch/patient",  # an extra scope not granted
        "patient/Observation.read launch/patient",
        "patient/Observation.rs?category=vital-signs",  # not understood here: not granted
        "",
    ):
        with pytest.raises(OAuthError) as refused:
            refresh(world, first["refresh_token"], scope=wider)
        assert refused.value.error == "invalid_scope", wider
    # The refresh token was not spent by the refusals, nor its grant revoked.
    asyncio.run(world.server.check_access(first["access_token"], now_ms=T0))
    again = refresh(world, first["refresh_token"], scope="patient/Observation.r")
    assert again["scope"] == "patient/Observation.r"


def test_an_access_token_does_not_refresh_and_a_refresh_token_does_not_give_access(
    world: World,
) -> None:
    # The prefix is the presenter's text: swapping it must not turn one kind into the other.
    answer = exchange(world, approved_code(world))
    as_refresh = "mlr_" + answer["access_token"].removeprefix("mla_")
    with pytest.raises(OAuthError, match="unknown refresh token"):
        refresh(world, as_refresh)
    as_access = "mla_" + answer["refresh_token"].removeprefix("mlr_")
    with pytest.raises(InvalidInput, match="unknown token"):
        asyncio.run(world.server.check_access(as_access, now_ms=T0))
    # Both real tokens still work as what they are.
    asyncio.run(world.server.check_access(answer["access_token"], now_ms=T0))
    refresh(world, answer["refresh_token"])


def test_a_re_bound_patient_key_ends_its_grants_at_once(world: World) -> None:
    first = exchange(world, approved_code(world))
    asyncio.run(world.server.check_access(first["access_token"], now_ms=T0))
    world.bindings.clear()  # e.g. the patient rotated to a new key, or a break-glass re-binding
    with pytest.raises(InvalidInput, match="revoked"):
        asyncio.run(world.server.check_access(first["access_token"], now_ms=T0))
    world.bindings[world.patient_key.fingerprint] = "pat-1"  # the grant stays revoked
    with pytest.raises(InvalidInput, match="revoked"):
        asyncio.run(world.server.check_access(first["access_token"], now_ms=T0))
    with pytest.raises(OAuthError):
        refresh(world, first["refresh_token"])


def test_revoking_the_staff_api_token_ends_the_grants_made_with_it(world: World) -> None:
    def staff_grant() -> dict[str, Any]:
        signin = world.server.begin(authorize_params(world.app.id))
        world.server.sign_in_staff(signin.step, signin.csrf, api_token=world.staff_token)
        return exchange(world, code_of(world.server.decide(signin.step, signin.csrf, approve=True)))

    used, kept = staff_grant(), staff_grant()
    asyncio.run(world.server.check_access(used["access_token"], now_ms=T0))
    world.tokens.revoke(world.staff_token.split("_")[1])
    with pytest.raises(InvalidInput, match="revoked"):
        asyncio.run(world.server.check_access(used["access_token"], now_ms=T0))
    with pytest.raises(OAuthError, match="no longer holds"):
        refresh(world, kept["refresh_token"])


def test_revocation_of_refresh_and_access_tokens(world: World) -> None:
    a = exchange(world, approved_code(world))
    b = exchange(world, approved_code(world))
    world.server.revoke(b["access_token"], world.app)
    with pytest.raises(InvalidInput, match="revoked"):
        asyncio.run(world.server.check_access(b["access_token"], now_ms=T0))
    refresh(world, b["refresh_token"])  # revoking an access token leaves its grant
    world.server.revoke(a["refresh_token"], world.app)
    with pytest.raises(InvalidInput, match="revoked"):
        asyncio.run(world.server.check_access(a["access_token"], now_ms=T0))
    with pytest.raises(OAuthError):
        refresh(world, a["refresh_token"])
    # Unknown tokens and another client's tokens: nothing happens, nothing is said.
    other, _ = world.server.register_client(name="Other", redirect_uris=(APP_REDIRECT,))
    c = exchange(world, approved_code(world))
    world.server.revoke("mla_000000000000000000000000_" + "x" * 43, world.app)
    world.server.revoke(c["access_token"], other)
    asyncio.run(world.server.check_access(c["access_token"], now_ms=T0))


def test_redirect_uri_must_match_exactly_and_errors_before_it_are_not_redirected(
    world: World,
) -> None:
    for uri in (APP_REDIRECT + "/", APP_REDIRECT + "?x=1", "https://evil.example/callback", ""):
        with pytest.raises(OAuthError, match="redirect_uri") as refused:
            world.server.begin(authorize_params(world.app.id, redirect_uri=uri))
        assert refused.value.redirect_uri is None  # shown to the user, never sent there
    with pytest.raises(OAuthError, match="client_id") as unknown:
        world.server.begin(authorize_params("no-such-app"))
    assert unknown.value.redirect_uri is None
    # After the redirect URI checked, refusals go back to the client with its state.
    for changes, error in [
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": ""}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"scope": "openid fhirUser"}, "invalid_scope"),
        ({"aud": "https://other.example/fhir"}, "invalid_request"),
    ]:
        with pytest.raises(OAuthError) as refused:
            world.server.begin(authorize_params(world.app.id, **changes))
        assert (refused.value.error, refused.value.redirect_uri) == (error, APP_REDIRECT)
        assert refused.value.state == "s-123"


def test_the_portal_is_registered_with_a_redirect_on_the_nodes_own_origin(world: World) -> None:
    assert world.server.client(PORTAL_CLIENT.id) == PORTAL_CLIENT
    params = authorize_params(PORTAL_CLIENT.id, redirect_uri=f"{ORIGIN}/portal/callback")
    world.server.begin(params)
    # Only on the node's configured base URL: no other origin is the portal's.
    for origin in ("https://evil.example", "http://node.example:8700", "https://node.example"):
        with pytest.raises(OAuthError, match="redirect_uri") as refused:
            world.server.begin({**params, "redirect_uri": f"{origin}/portal/callback"})
        assert refused.value.redirect_uri is None


def test_aud_is_required_and_must_be_this_nodes_fhir_base(world: World) -> None:
    """SMART App Launch 2.x: a request without ``aud``, or for another server, gets no
    sign-in (a token for one server must not be phished for another)."""
    missing = authorize_params(world.app.id)
    del missing["aud"]
    for params in (
        missing,
        authorize_params(world.app.id, aud=""),
        authorize_params(world.app.id, aud="https://other.example/fhir"),
        authorize_params(world.app.id, aud=ORIGIN),  # the node, not its FHIR base
        authorize_params(world.app.id, aud=f"{ORIGIN}/fhir/Patient"),
        authorize_params(world.app.id, aud="http://node.example:8700/fhir"),
    ):
        with pytest.raises(OAuthError, match="aud") as refused:
            world.server.begin(params)
        assert (refused.value.error, refused.value.redirect_uri) == (
            "invalid_request",
            APP_REDIRECT,
        )
        assert refused.value.state == "s-123"
    rows = world.server.store._select("SELECT count(*) FROM oauth_pending")  # type: ignore[attr-defined]
    assert rows[0][0] == 0  # no sign-in step was opened for any of them
    world.server.begin(authorize_params(world.app.id, aud=f"{ORIGIN}/fhir/"))  # fhirclient's form


def test_a_sign_in_challenge_is_single_use_and_bound_to_its_step(world: World) -> None:
    signin = world.server.begin(authorize_params(world.app.id))
    signature = p1363(world.patient_key, signin.message.encode())
    asyncio.run(
        world.server.sign_in_patient(
            signin.step, signin.csrf, public_key=spki(world.patient_key), signature=signature
        )
    )
    with pytest.raises(InvalidInput, match="already used"):
        asyncio.run(
            world.server.sign_in_patient(
                signin.step, signin.csrf, public_key=spki(world.patient_key), signature=signature
            )
        )
    # The same signature does not open another step: its challenge differs.
    other = world.server.begin(authorize_params(world.app.id))
    with pytest.raises(InvalidInput, match="does not verify"):
        asyncio.run(
            world.server.sign_in_patient(
                other.step, other.csrf, public_key=spki(world.patient_key), signature=signature
            )
        )


def test_refused_sign_ins_spend_the_step(world: World) -> None:
    stranger = SigningKey.generate()
    for key, words in [(stranger, "not enrolled"), (None, "does not verify")]:
        signin = world.server.begin(authorize_params(world.app.id))
        signature = p1363(key or world.patient_key, b"something else")
        if key is not None:
            signature = p1363(key, signin.message.encode())
        with pytest.raises(InvalidInput, match=words):
            asyncio.run(
                world.server.sign_in_patient(
                    signin.step,
                    signin.csrf,
                    public_key=spki(key or world.patient_key),
                    signature=signature,
                )
            )
        with pytest.raises(InvalidInput, match="already used"):
            patient_sign_in(world, signin)  # the right key cannot reuse a spent step


def test_expired_sign_in_steps_are_forgotten_when_new_ones_open(world: World) -> None:
    old = world.server.begin(authorize_params(world.app.id))
    world.clock.now += 10 * 60_000 + 1
    new = world.server.begin(authorize_params(world.app.id))
    assert world.server.store.pending(old.step, "request") is None
    assert world.server.store.pending(new.step, "request") is not None


def test_csrf_token_expiry_and_denial(world: World) -> None:
    signin = world.server.begin(authorize_params(world.app.id))
    with pytest.raises(InvalidInput, match="CSRF"):
        world.server.sign_in_staff(signin.step, "", api_token=world.staff_token)
    with pytest.raises(InvalidInput, match="CSRF"):
        world.server.sign_in_staff(signin.step, pkce.new_secret(), api_token=world.staff_token)
    with pytest.raises(InvalidInput, match="sign-in refused"):
        world.server.sign_in_staff(signin.step, signin.csrf, api_token="mlt_000000000000_x")
    late = world.server.begin(authorize_params(world.app.id))
    world.clock.now += 10 * 60_000
    with pytest.raises(InvalidInput, match="expired"):
        patient_sign_in(world, late)
    world.clock.now = T0
    denied = world.server.begin(authorize_params(world.app.id))
    patient_sign_in(world, denied)
    location = world.server.decide(denied.step, denied.csrf, approve=False)
    query = parse_qs(urlsplit(location).query)
    assert query["error"] == ["access_denied"] and "code" not in query
    with pytest.raises(InvalidInput, match="already used"):
        world.server.decide(denied.step, denied.csrf, approve=True)


def test_client_registration_refuses_what_could_leak_a_code(world: World) -> None:
    for uri, words in [
        ("http://app.example/cb", "https"),  # plain HTTP off this machine
        ("https://app.example/cb#frag", "fragment"),
        ("/relative", "absolute"),
        ("app.example/cb", "absolute"),
    ]:
        with pytest.raises(InvalidInput, match=words):
            world.server.register_client(name="X", redirect_uris=(uri,))
    world.server.register_client(name="Loopback app", redirect_uris=("http://127.0.0.1:9/cb",))
    for kwargs, words in [
        ({"client_id": PORTAL_CLIENT.id}, "portal"),
        ({"client_id": "bad id"}, "client id"),
        ({"system_role": "auditor"}, "confidential"),
        ({"system_role": "patient", "confidential": True}, "system role"),
        ({"name": " "}, "name"),
    ]:
        with pytest.raises(InvalidInput, match=words):
            world.server.register_client(
                **{"name": "X", "redirect_uris": (APP_REDIRECT,), **kwargs}
            )


def test_confidential_clients_authenticate_and_get_system_tokens(world: World) -> None:
    backend, secret = world.server.register_client(
        name="Backend", redirect_uris=(), confidential=True, system_role="auditor"
    )
    assert secret is not None and backend.secret_hash == pkce.secret_hash(secret)
    assert world.server.authenticate_client(backend.id, secret) == backend
    for wrong in (None, secret + "x"):
        with pytest.raises(OAuthError, match="client") as refused:
            world.server.authenticate_client(backend.id, wrong)
        assert (refused.value.error, refused.value.status) == ("invalid_client", 401)
    with pytest.raises(OAuthError):  # a public client shows no secret
        world.server.authenticate_client(world.app.id, "anything")
    form = {"grant_type": "client_credentials", "scope": "system/*.read patient/*.read"}
    answer = asyncio.run(world.server.token(form, backend))
    assert answer["scope"] == "system/*.read" and "refresh_token" not in answer
    info = asyncio.run(world.server.check_access(answer["access_token"], now_ms=T0))
    assert info.role == "auditor" and info.scopes == ("system/*.read",)
    with pytest.raises(OAuthError, match="client_credentials"):
        asyncio.run(world.server.token(form, world.app))


def test_scopes_v1_and_v2_and_what_a_request_needs() -> None:
    v1 = parse_scopes("patient/Observation.read patient/Consent.write bogus openid")
    assert v1.granted == ("patient/Observation.read", "patient/Consent.write")
    assert v1.allows("Observation", "r") and v1.allows("Observation", "s")
    assert not v1.allows("Observation", "c") and not v1.allows("Condition", "r")
    assert v1.allows("Consent", "c") and not v1.allows("Consent", "r")
    v2 = parse_scopes("patient/*.rs user/Patient.cruds patient/Observation.rs?category=vital")
    assert v2.allows("Condition", "r") and not v2.allows("Condition", "u")
    assert v2.allows(None, "r")  # * covers requests that name no one type
    assert len(v2.resources) == 2  # a query-restricted scope is not granted (cannot narrow)
    assert parse_scopes("patient/Observation.sr").granted == ()  # v2 letters must be in order
    assert [
        request_access(m, p)
        for m, p in [
            ("GET", "/fhir/Observation"),
            ("GET", "/fhir/Observation/1"),
            ("GET", "/fhir/Observation/1/_history/2"),
            ("GET", "/fhir/Observation/_history"),
            ("POST", "/fhir/Observation/_search"),
            ("POST", "/fhir/Consent"),
            ("PUT", "/fhir/Consent/c1"),
            ("DELETE", "/fhir/Observation/1"),
            ("GET", "/chain/private/head"),
            ("POST", "/fhir"),
        ]
    ] == [
        ("Observation", "s"),
        ("Observation", "r"),
        ("Observation", "r"),
        ("Observation", "s"),
        ("Observation", "s"),
        ("Consent", "c"),
        ("Consent", "u"),
        ("Observation", "d"),
        (None, "r"),
        (None, "c"),
    ]


def test_secrets_are_stored_only_as_hashes(world: World, tmp_path: Path) -> None:
    answer = exchange(world, approved_code(world))
    raw = (tmp_path / "oauth.db").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("oauth.db-wal")
    )
    for token in (answer["access_token"], answer["refresh_token"]):
        secret = re.split("_", token, maxsplit=2)[2]
        assert secret.encode() not in raw
        assert pkce.secret_hash(secret) in raw
