"""Refusals of the authorization server spend the failed-authentication budget (429 after it).

In-process over httpx's ASGI transport (each request from a chosen client
address), as tests/api/test_throttling.py does for bearer tokens.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import httpx
from api_helpers import serve_in_process

from medledger.services.oauth import pkce
from medledger.services.oauth.server import register_client
from medledger.services.ratelimit import RateLimit
from medledger.storage.sqlite.oauth import SqliteOAuthStore

BUDGET = RateLimit(burst=3, interval_ms=10_000)
REDIRECT = "https://app.example/cb"


def run(root: Path, story: Any, **app_options: Any) -> None:
    """Serve a new node in-process; ``story(client)``, ``client(address)`` a client there."""
    serve_in_process(
        root,
        lambda client, tokens: story(client),
        name="Throttle Test Hospital",
        oauth=True,
        auth_failures=BUDGET,
        public_url="http://node",
        **app_options,
    )


def test_bad_client_secrets_are_throttled_per_address(tmp_path: Path) -> None:
    async def story(client: Any) -> None:
        store = SqliteOAuthStore(tmp_path / "node" / "oauth.db")
        backend, secret = register_client(
            store, now_ms=0, name="B", redirect_uris=(), confidential=True, system_role="auditor"
        )
        store.close()
        form = {"grant_type": "client_credentials", "scope": "system/*.read"}
        async with client("203.0.113.7") as attacker, client("198.51.100.2") as other:
            for _ in range(3):
                wrong = await attacker.post("/oauth/token", data=form, auth=(backend.id, "guess"))
                assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
            throttled = await attacker.post("/oauth/token", data=form, auth=(backend.id, "guess"))
            assert throttled.status_code == 429
            right = await other.post("/oauth/token", data=form, auth=(backend.id, str(secret)))
            assert right.status_code == 200 and right.json()["scope"] == "system/*.read"

    run(tmp_path / "node", story)


def test_refused_sign_ins_are_throttled_and_say_so_on_the_page(tmp_path: Path) -> None:
    async def story(client: Any) -> None:
        store = SqliteOAuthStore(tmp_path / "node" / "oauth.db")
        app, _ = register_client(store, now_ms=0, name="App", redirect_uris=(REDIRECT,))
        store.close()
        query = {
            "response_type": "code",
            "client_id": app.id,
            "redirect_uri": REDIRECT,
            "scope": "user/*.read",
            "state": "s",
            "code_challenge": pkce.s256(pkce.new_secret()),
            "code_challenge_method": "S256",
            "aud": "http://node/fhir",
        }
        async with client("203.0.113.9") as attacker:

            async def guess() -> httpx.Response:
                page = (await attacker.get("/oauth/authorize", params=query)).text
                form = {
                    name: html.unescape(re.search(rf'name="{name}" value="([^"]*)"', page)[1])  # type: ignore[index]
                    for name in ("step", "csrf")
                }
                form["api_token"] = "mlt_000000000000_" + pkce.new_secret()
                return await attacker.post("/oauth/authorize/staff", data=form)

            for _ in range(3):
                refused = await guess()
                assert refused.status_code == 400 and "unknown token" in refused.text
            throttled = await guess()
            assert throttled.status_code == 429 and "too many failed" in throttled.text

    run(tmp_path / "node", story)


def test_each_address_opens_a_bounded_number_of_sign_ins(tmp_path: Path) -> None:
    async def story(client: Any) -> None:
        store = SqliteOAuthStore(tmp_path / "node" / "oauth.db")
        app, _ = register_client(store, now_ms=0, name="App", redirect_uris=(REDIRECT,))
        store.close()
        query = {
            "response_type": "code",
            "client_id": app.id,
            "redirect_uri": REDIRECT,
            "scope": "patient/*.read",
            "code_challenge": pkce.s256(pkce.new_secret()),
            "code_challenge_method": "S256",
            "aud": "http://node/fhir",
        }
        async with client("203.0.113.20") as flooder, client("198.51.100.20") as other:
            for _ in range(2):
                assert (await flooder.get("/oauth/authorize", params=query)).status_code == 200
            refused = await flooder.get("/oauth/authorize", params=query)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "60"
            assert "too many sign-ins" in refused.text
            assert (await other.get("/oauth/authorize", params=query)).status_code == 200
        store = SqliteOAuthStore(tmp_path / "node" / "oauth.db")
        try:  # what was written: the three steps opened, not the refused one
            rows = store._select("SELECT count(*) FROM oauth_pending WHERE kind = 'request'")
            assert rows[0][0] == 3
        finally:
            store.close()

    run(tmp_path / "node", story, sign_in_opens=RateLimit(burst=2, interval_ms=60_000))
