"""Failed authentications are throttled per client address and per token id (429).

The app runs in-process over httpx's ASGI transport, which lets each request
come from a chosen client address; time is a clock the test moves by hand.
A valid token is always served, whatever other clients did.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import FAST_KDF, PASSPHRASE, assert_outcome, now_ms, serve_in_process

from medledger.api.app import create_app
from medledger.api.auth import AuthFailures, SharedAuthFailures
from medledger.core.errors import InvalidInput
from medledger.node import init_node, open_node, open_worker_node
from medledger.services.ratelimit import RateLimit
from medledger.services.sequencer_link import SOCKET_NAME as SEQUENCER_SOCKET
from medledger.services.sequencer_link import SequencerClient, SequencerServer
from medledger.storage.ports import TokenStore
from medledger.storage.sqlite.tokens import SqliteTokenStore

BUDGET = RateLimit(burst=3, interval_ms=10_000)


class HandClock:
    def __init__(self) -> None:
        self.now = now_ms()

    def now_ms(self) -> int:
        return self.now


def run(root: Path, story: Any) -> None:
    """Serve a new node in-process; ``story(client, tokens, clock)`` on a hand clock."""
    clock = HandClock()
    serve_in_process(
        root,
        lambda client, tokens: story(client, tokens, clock),
        name="Throttle Test Hospital",
        clock=clock,
        auth_failures=BUDGET,
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_an_address_that_keeps_failing_gets_429_and_others_do_not(tmp_path: Path) -> None:
    async def story(client: Any, tokens: TokenStore, clock: HandClock) -> None:
        good, _ = tokens.create(role="clinician", now_ms=clock.now)
        bad = bearer(f"mlt_000000000000_{secrets.token_urlsafe(32)}")
        async with client("203.0.113.7") as attacker, client("198.51.100.2") as other:
            for _ in range(3):
                assert_outcome(await attacker.get("/chain/private/head", headers=bad), 401)
            throttled = await attacker.get("/chain/private/head", headers=bad)
            assert_outcome(throttled, 429, code="throttled")
            assert throttled.headers["retry-after"] == "10"
            # Successes are never throttled: not the attacker's own, not another client's.
            assert (await attacker.get("/chain/private/head", headers=bearer(good))).is_success
            assert (await other.get("/chain/private/head", headers=bearer(good))).is_success
            # Another address has its own budget (for another token id: ids have theirs).
            guess = bearer(f"mlt_111111111111_{secrets.token_urlsafe(32)}")
            assert_outcome(await other.get("/chain/private/head", headers=guess), 401)
            # No token at all guesses nothing and is not charged (or throttled).
            assert_outcome(await attacker.get("/chain/private/head"), 401)
            clock.now += 9_000
            after = await attacker.get("/chain/private/head", headers=bad)
            assert_outcome(after, 429)
            assert after.headers["retry-after"] == "1"
            clock.now += 1_000
            assert_outcome(await attacker.get("/chain/private/head", headers=bad), 401)

    run(tmp_path, story)


def test_guessing_one_token_from_many_addresses_is_throttled_by_token_id(tmp_path: Path) -> None:
    async def story(client: Any, tokens: TokenStore, clock: HandClock) -> None:
        good, info = tokens.create(role="clinician", now_ms=clock.now)
        guesses = [bearer(f"mlt_{info.id}_{secrets.token_urlsafe(32)}") for _ in range(4)]
        statuses = []
        for i, guess in enumerate(guesses):
            async with client(f"192.0.2.{i + 1}") as guesser:
                statuses.append((await guesser.get("/fhir/Patient", headers=guess)).status_code)
        assert statuses == [401, 401, 401, 429]
        # The token's owner, with the right secret, is still served.
        async with client("192.0.2.200") as owner:
            assert (await owner.get("/fhir/Patient", headers=bearer(good))).is_success

    run(tmp_path, story)


def test_refused_and_throttled_answers_change_nothing(tmp_path: Path) -> None:
    async def story(client: Any, tokens: TokenStore, clock: HandClock) -> None:
        good, _ = tokens.create(role="clinician", now_ms=clock.now)
        async with client("203.0.113.9") as attacker:
            head = (await attacker.get("/chain/private/head", headers=bearer(good))).json()
            body = b'{"resourceType": "Patient", "name": [{"family": "Smith"}]}'
            for _ in range(10):
                r = await attacker.post(
                    "/fhir/Patient",
                    content=body,
                    headers={
                        **bearer("mlt_0123456789ab_x"),
                        "Content-Type": "application/fhir+json",
                    },
                )
                assert r.status_code in (401, 429)
            after = (await attacker.get("/chain/private/head", headers=bearer(good))).json()
            assert after == head

    run(tmp_path, story)


def test_api_workers_spend_one_budget_per_node(tmp_path: Path) -> None:
    """``node start --workers N``: each worker process has its own app, but a client's
    failures are charged to the parent's one budget over the sequencer link; two workers
    do not give a client twice the guesses (with a budget per worker, six 401s here)."""
    root = tmp_path / "node"
    init_node(root, name="Throttle Test Hospital", passphrase=PASSPHRASE, kdf=FAST_KDF)
    tokens = SqliteTokenStore(root / "tokens.db")
    clock = HandClock()

    async def main() -> None:
        sequencer = open_node(root, PASSPHRASE)
        budget = AuthFailures(BUDGET, clock)
        link = SequencerServer(
            root / SEQUENCER_SOCKET,
            chain=sequencer.writer_chain,
            records=sequencer.records,
            spend_failures=budget.spend,
        )
        await link.start()
        workers = [open_worker_node(root, PASSPHRASE) for _ in range(2)]
        try:
            clients = []
            for worker in workers:
                assert isinstance(worker.chain, SequencerClient)
                app = create_app(
                    worker,
                    tokens,
                    clock=clock,
                    auth_failures=SharedAuthFailures(worker.chain.spend_failures),
                )
                transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 40_000))
                clients.append(httpx.AsyncClient(transport=transport, base_url="http://node"))
            bad = bearer(f"mlt_000000000000_{secrets.token_urlsafe(32)}")
            statuses = [
                (await clients[i % 2].get("/chain/private/head", headers=bad)).status_code
                for i in range(6)
            ]
            assert statuses == [401, 401, 401, 429, 429, 429]
            # The parent's own app (forwarded requests) spends the same budget.
            assert budget.spend(["address:203.0.113.7"]) > 0
            for client in clients:
                await client.aclose()
        finally:
            for worker in workers:
                await worker.stop()
                await worker.close_stores()
            await link.close()
            await sequencer.close()

    try:
        asyncio.run(main())
    finally:
        tokens.close()


def test_the_parent_refuses_budget_keys_a_failed_authentication_does_not_make() -> None:
    budget = AuthFailures(BUDGET, HandClock())
    for keys in (
        [],
        ["free text"],
        ["address:a", "token:b", "address:c"],
        ["address:" + "x" * 200],
    ):
        with pytest.raises(InvalidInput):
            budget.spend(keys)
    assert budget.spend(["address:192.0.2.1", "token:0123456789ab"]) == 0
