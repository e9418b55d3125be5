"""The authorization server names itself by the node's configured URL, never the Host header.

In-process over httpx's ASGI transport: each request's ``Host`` header is the
``base_url`` of its client, so a test chooses it as an attacker would. The node
advertises ``https://node.example:8700`` (``node init --advertise``); whatever
Host a request carries, discovery, the CapabilityStatement, the ``aud``
accepted, the portal's redirect URI and where the browser is sent stay that URL.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from api_helpers import InProcessClient, serve_in_process

from medledger.services.oauth import pkce
from medledger.services.oauth.server import PORTAL_CLIENT, register_client
from medledger.storage.sqlite.oauth import SqliteOAuthStore
from medledger.storage.sqlite.tokens import SqliteTokenStore

PUBLIC = "https://node.example:8700"
APP_REDIRECT = "https://app.example/cb"
#: Hosts a client may claim: the real one, an attacker's, the loopback address.
HOSTS = ("node.example:8700", "evil.example", "127.0.0.1:8700")

Client = Callable[[str], httpx.AsyncClient]


def run(root: Path, story: Callable[[Client, str], Awaitable[None]], advertise: str) -> None:
    """Serve a new node in-process; ``story(client, staff_token)``, ``client(host)`` a
    client whose requests claim that Host."""

    async def signed_in(client: InProcessClient, tokens: SqliteTokenStore) -> None:
        staff, _ = tokens.create(role="clinician", now_ms=0, label="dr")
        await story(lambda host: client(host=host), staff)

    serve_in_process(root, signed_in, name="Host Test Hospital", advertise=advertise, oauth=True)


def open_steps(root: Path) -> int:
    store = SqliteOAuthStore(root / "oauth.db")
    try:
        rows = store._select("SELECT count(*) FROM oauth_pending WHERE kind = 'request'")
        return int(rows[0][0])
    finally:
        store.close()


def authorize_query(client_id: str, redirect_uri: str, aud: str, challenge: str) -> dict[str, str]:
    return {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": "user/*.read",
        "state": "st-1",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "aud": aud,
    }


def hidden(page: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert match is not None, f"no {name} field"
    return html.unescape(match.group(1))


def test_discovery_and_metadata_name_the_configured_url_whatever_the_host(
    tmp_path: Path,
) -> None:
    async def story(client: Client, staff: str) -> None:
        for host in HOSTS:
            async with client(host) as web:
                for path in (
                    "/.well-known/smart-configuration",
                    "/fhir/.well-known/smart-configuration",
                ):
                    config = (await web.get(path)).json()
                    assert config["issuer"] == PUBLIC, host
                    assert config["authorization_endpoint"] == f"{PUBLIC}/oauth/authorize"
                    assert config["token_endpoint"] == f"{PUBLIC}/oauth/token"
                    assert config["revocation_endpoint"] == f"{PUBLIC}/oauth/revoke"
                metadata = (await web.get("/fhir/metadata")).json()
                extension = metadata["rest"][0]["security"]["extension"][0]["extension"]
                assert {e["url"]: e["valueUri"] for e in extension} == {
                    "authorize": f"{PUBLIC}/oauth/authorize",
                    "token": f"{PUBLIC}/oauth/token",
                    "revoke": f"{PUBLIC}/oauth/revoke",
                }, host

    run(tmp_path / "node", story, advertise=PUBLIC)


def test_a_forged_host_changes_neither_the_aud_accepted_nor_the_portals_redirect(
    tmp_path: Path,
) -> None:
    root = tmp_path / "node"
    verifier = pkce.new_secret()
    challenge = pkce.s256(verifier)

    async def story(client: Client, staff: str) -> None:
        store = SqliteOAuthStore(root / "oauth.db")
        app, _ = register_client(store, now_ms=0, name="App", redirect_uris=(APP_REDIRECT,))
        store.close()
        async with client("evil.example") as attacker:
            # The portal's relative redirect URI on the attacker's origin: shown, never followed.
            evil = "http://evil.example"
            for redirect_uri, aud in (
                (f"{evil}/portal/callback", f"{evil}/fhir"),
                (f"{evil}/portal/callback", f"{PUBLIC}/fhir"),
            ):
                page = await attacker.get(
                    "/oauth/authorize",
                    params=authorize_query(PORTAL_CLIENT.id, redirect_uri, aud, challenge),
                )
                assert page.status_code == 400 and "redirect_uri" in page.text
                assert "location" not in page.headers
            # An app asking for a token for the Host's FHIR base: refused back to the app.
            refused = await attacker.get(
                "/oauth/authorize",
                params=authorize_query(app.id, APP_REDIRECT, f"{evil}/fhir", challenge),
            )
            assert refused.status_code == 303
            answer = parse_qs(urlsplit(refused.headers["location"]).query)
            assert answer["error"] == ["invalid_request"] and answer["state"] == ["st-1"]
            assert answer["iss"] == [PUBLIC]  # RFC 9207: the node, not the Host it was sent to
            assert "aud" in answer["error_description"][0]
            assert open_steps(root) == 0  # nothing was opened for any of them
            # The real portal request, though sent with a forged Host, works as the node's.
            page = await attacker.get(
                "/oauth/authorize",
                params=authorize_query(
                    PORTAL_CLIENT.id, f"{PUBLIC}/portal/callback", f"{PUBLIC}/fhir", challenge
                ),
            )
            assert page.status_code == 200, page.text
            # Secure as the node's URL is https, though this request came as plain HTTP.
            cookie = page.headers["set-cookie"]
            assert "Secure" in cookie and "HttpOnly" in cookie
            name, _, rest = cookie.partition("=")
            jar = {"Cookie": f"{name}={rest.split(';')[0]}"}
            step = {"step": hidden(page.text, "step"), "csrf": hidden(page.text, "csrf")}
            approval = await attacker.post(
                "/oauth/authorize/staff", data={**step, "api_token": staff}, headers=jar
            )
            assert approval.status_code == 200, approval.text
            decided = await attacker.post(
                "/oauth/authorize/decision", data={**step, "decision": "approve"}, headers=jar
            )
            assert decided.status_code == 303
            location = decided.headers["location"]
            assert location.startswith(f"{PUBLIC}/portal/callback?"), location
            answer = parse_qs(urlsplit(location).query)
            assert answer["iss"] == [PUBLIC] and answer["state"] == ["st-1"]
            code = answer["code"][0]
            token = await attacker.post(
                "/oauth/token",
                data={
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": f"{PUBLIC}/portal/callback",
                    "client_id": PORTAL_CLIENT.id,
                    "code_verifier": verifier,
                },
            )
            assert token.status_code == 200, token.text

    run(root, story, advertise=PUBLIC)


def test_a_node_that_cannot_name_itself_offers_no_sign_in(tmp_path: Path) -> None:
    """No advertise URL and no listening address given (``create_app`` alone): the node does
    not guess its URL from the request; sign-in is off and says how to turn it on."""
    root = tmp_path / "node"

    async def story(client: Client, staff: str) -> None:
        async with client("node.example:8700") as web:
            for path in (
                "/.well-known/smart-configuration",
                "/fhir/.well-known/smart-configuration",
            ):
                answer = await web.get(path)
                assert answer.status_code == 404
                assert "advertise" in answer.json()["error_description"]
            metadata: dict[str, Any] = (await web.get("/fhir/metadata")).json()
            assert "extension" not in metadata["rest"][0]["security"]
            query = authorize_query(
                PORTAL_CLIENT.id,
                "http://node.example:8700/portal/callback",
                "http://node.example:8700/fhir",
                pkce.s256(pkce.new_secret()),
            )
            page = await web.get("/oauth/authorize", params=query)
            assert page.status_code == 400 and "advertise" in page.text
            assert "location" not in page.headers
        assert open_steps(root) == 0

    run(root, story, advertise="")


def test_no_code_token_or_secret_reaches_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A whole flow with every kind of refusal the server logs (a wrong staff token, a bad
    client secret, a replayed code, a replayed refresh token): the log names what
    happened, never a credential."""
    root = tmp_path / "node"
    verifier = pkce.new_secret()
    seen: list[str] = [verifier]
    caplog.set_level(logging.DEBUG)

    async def story(client: Client, staff: str) -> None:
        store = SqliteOAuthStore(root / "oauth.db")
        backend, secret = register_client(
            store, now_ms=0, name="B", redirect_uris=(), confidential=True, system_role="auditor"
        )
        store.close()
        seen.extend([staff, str(secret)])
        query = authorize_query(
            PORTAL_CLIENT.id, f"{PUBLIC}/portal/callback", f"{PUBLIC}/fhir", pkce.s256(verifier)
        )
        query["scope"] = "user/*.read offline_access"
        async with client("node.example:8700") as web:

            async def signed_in_step(api_token: str) -> tuple[dict[str, str], dict[str, str]]:
                page = await web.get("/oauth/authorize", params=query)
                name, _, rest = page.headers["set-cookie"].partition("=")
                jar = {"Cookie": f"{name}={rest.split(';')[0]}"}
                step = {"step": hidden(page.text, "step"), "csrf": hidden(page.text, "csrf")}
                seen.append(step["csrf"])
                signed = await web.post(
                    "/oauth/authorize/staff", data={**step, "api_token": api_token}, headers=jar
                )
                assert signed.status_code == (200 if api_token == staff else 400)
                return step, jar

            wrong = "mlt_000000000000_" + pkce.new_secret()
            seen.append(wrong)
            await signed_in_step(wrong)
            step, jar = await signed_in_step(staff)
            decided = await web.post(
                "/oauth/authorize/decision", data={**step, "decision": "approve"}, headers=jar
            )
            code = parse_qs(urlsplit(decided.headers["location"]).query)["code"][0]
            seen.append(code)
            form = {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": f"{PUBLIC}/portal/callback",
                "client_id": PORTAL_CLIENT.id,
                "code_verifier": verifier,
            }
            tokens = (await web.post("/oauth/token", data=form)).json()
            seen.extend([tokens["access_token"], tokens["refresh_token"]])
            assert (await web.post("/oauth/token", data=form)).status_code == 400  # replayed
            refresh = {
                "grant_type": "refresh_token",
                "refresh_token": tokens["refresh_token"],
                "client_id": PORTAL_CLIENT.id,
            }
            assert (await web.post("/oauth/token", data=refresh)).status_code == 400
            bad = pkce.new_secret()
            seen.append(bad)
            refused = await web.post(
                "/oauth/token",
                data={"grant_type": "client_credentials", "scope": "system/*.read"},
                auth=(backend.id, bad),
            )
            assert refused.status_code == 401

    run(root, story, advertise=PUBLIC)
    logged = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    assert "refused" in logged and "presented again" in logged  # the refusals were logged
    for secret in seen:
        # The secret part (a token's ``ml?_<id>_`` may be named; the random part may itself
        # hold "_"), and its tail: a truncated copy is a leak too.
        token = re.match(r"^ml[art]_[0-9a-f]+_(.+)$", secret)
        hidden_part = secret if token is None else token.group(1)
        assert len(hidden_part) >= 43
        for piece in (hidden_part, hidden_part[-16:]):
            assert piece not in logged, piece
