"""Conformance suite for the :class:`~medledger.storage.ports.OAuthStore` port.

Every test runs on SQLite and on a real PostgreSQL server (``pg_server.py``):
clients, single-use steps (exactly one of two redemptions wins), grants and
tokens, forgetting what expired, and everything surviving a reopen.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pg_server import shared_dsn, unique

from medledger.core.errors import Conflict
from medledger.storage import factory
from medledger.storage.ports import OAuthClient, OAuthGrant, OAuthPending, OAuthStore, OAuthToken
from medledger.storage.postgres.migrations import drop_schema

T0 = 1_700_000_000_000


@dataclass
class OAuthBackend:
    name: str
    path: Path
    dsn: str = ""
    schema: str = ""

    def open(self) -> OAuthStore:
        if self.name == "sqlite":
            return factory.open_oauth_store("sqlite", self.path)
        return factory.open_oauth_store("postgres", self.dsn, schema=self.schema)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OAuthBackend]:
    if request.param == "sqlite":
        yield OAuthBackend("sqlite", tmp_path / "oauth.db")
        return
    dsn, schema = shared_dsn(), unique("oauth")
    yield OAuthBackend("postgres", tmp_path / "unused", dsn, schema)
    drop_schema(dsn, schema)


@pytest.fixture
def store(backend: OAuthBackend) -> Iterator[OAuthStore]:
    opened = backend.open()
    yield opened
    opened.close()


def client(client_id: str = "app-1", secret: bytes | None = None) -> OAuthClient:
    return OAuthClient(
        id=client_id,
        name="App",
        redirect_uris=("https://app.example/cb", "http://127.0.0.1:9/cb"),
        secret_hash=secret,
        system_role="auditor" if secret else None,
        created_ms=T0,
    )


def step(step_id: str = "s1", kind: str = "code", expires_ms: int = T0 + 60_000) -> OAuthPending:
    return OAuthPending(
        id=step_id,
        kind=kind,
        stage="issued",
        secret_hash=b"\x01" * 32,
        payload='{"a":1}',
        expires_ms=expires_ms,
    )


def test_clients_are_registered_once_and_listed(store: OAuthStore) -> None:
    store.add_client(client())
    store.add_client(client("app-2", secret=b"\x02" * 32))
    with pytest.raises(Conflict):
        store.add_client(client())
    assert store.client("app-1") == client()
    assert store.client("nobody") is None
    assert [c.id for c in store.clients()] == ["app-1", "app-2"]
    assert store.clients()[1].confidential and not store.clients()[0].confidential


def test_a_step_advances_once_and_keeps_its_grant(store: OAuthStore) -> None:
    store.put_pending(step())
    with pytest.raises(Conflict):
        store.put_pending(step())
    store.put_pending(step(kind="request"))  # another kind: another namespace
    assert store.advance_pending("s1", "code", "issued", "redeemed")
    assert not store.advance_pending("s1", "code", "issued", "redeemed")
    assert store.advance_pending("s1", "code", "redeemed", "redeemed", grant="g1", payload="{}")
    found = store.pending("s1", "code")
    assert found is not None
    assert (found.stage, found.grant, found.payload) == ("redeemed", "g1", "{}")
    other = store.pending("s1", "request")
    assert other is not None and other.stage == "issued" and other.grant is None
    assert not store.advance_pending("absent", "code", "issued", "redeemed")


def test_of_concurrent_redemptions_exactly_one_wins(backend: OAuthBackend) -> None:
    setup = backend.open()
    setup.put_pending(step("race"))
    setup.close()
    stores = [backend.open() for _ in range(4)]
    wins: list[bool] = []
    barrier = threading.Barrier(len(stores))

    def redeem(s: OAuthStore) -> None:
        barrier.wait(timeout=30)
        wins.append(s.advance_pending("race", "code", "issued", "redeemed"))

    threads = [threading.Thread(target=redeem, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s in stores:
        s.close()
    assert sorted(wins) == [False, False, False, True]


def test_removing_a_client_revokes_its_grants_first(store: OAuthStore) -> None:
    store.add_client(client())
    store.add_client(client("app-2"))
    for grant_id, client_id in (("g1", "app-1"), ("g2", "app-1"), ("g3", "app-2")):
        store.add_grant(
            OAuthGrant(
                id=grant_id,
                client_id=client_id,
                role="clinician",
                patient=None,
                scope="user/*.read",
                label="token:t",
                created_ms=T0,
            )
        )
    store.revoke_grant("g2")
    assert store.remove_client("app-1") == 1  # g1; g2 was revoked already
    assert store.client("app-1") is None and [c.id for c in store.clients()] == ["app-2"]
    assert [store.grant(g).revoked for g in ("g1", "g2", "g3")] == [True, True, False]  # type: ignore[union-attr]
    assert store.remove_client("app-1") is None


def test_grants_tokens_revocation_and_forgetting(store: OAuthStore) -> None:
    grant = OAuthGrant(
        id="g1",
        client_id="app-1",
        role="patient",
        patient="pat-1",
        scope="patient/*.read",
        label="key:ab",
        created_ms=T0,
    )
    store.add_grant(grant)
    with pytest.raises(Conflict):
        store.add_grant(grant)
    live = OAuthToken(
        id="t1", kind="access", grant="g1", secret_hash=b"\x03" * 32, expires_ms=T0 - 5
    )
    later = OAuthToken(
        id="t2", kind="refresh", grant="g1", secret_hash=b"\x04" * 32, expires_ms=T0 + 10
    )
    store.add_token(live)
    store.add_token(later)
    assert store.token("t1") == live and store.grant("g1") == grant
    assert store.advance_token("t2", "live", "used")
    assert not store.advance_token("t2", "live", "used")
    token = store.token("t2")
    assert token is not None and token.state == "used"
    store.revoke_grant("g1")
    store.revoke_grant("absent")
    revoked = store.grant("g1")
    assert revoked is not None and revoked.revoked
    store.put_pending(step("old", expires_ms=T0 - 1))
    store.put_pending(step("new", expires_ms=T0 + 1))
    store.put_pending(step("late", expires_ms=T0 + 500))  # expired, within retention
    store.put_pending(step("signin", kind="request", expires_ms=T0 + 500))
    store.put_pending(step("open", kind="request", expires_ms=T0 + 1_001))
    # At T0 + 1000, keeping codes and tokens 1000 ms past expiry: the old code, token t1
    # (expired at T0 - 5) and the expired sign-in step go; the late code stays.
    assert store.forget_expired(now_ms=T0 + 1_000, retain_ms=1_000) == 3
    assert store.pending("old", "code") is None and store.pending("new", "code") is not None
    assert store.pending("late", "code") is not None
    assert store.pending("signin", "request") is None
    assert store.pending("open", "request") is not None
    assert store.token("t1") is None and store.token("t2") is not None


def test_everything_survives_reopening(backend: OAuthBackend) -> None:
    first = backend.open()
    first.add_client(client())
    first.put_pending(step())
    first.advance_pending("s1", "code", "issued", "redeemed", grant="g9")
    first.close()
    again = backend.open()
    try:
        assert again.client("app-1") == client()
        found = again.pending("s1", "code")
        assert found is not None and (found.stage, found.grant) == ("redeemed", "g9")
    finally:
        again.close()


def test_the_sqlite_file_is_the_owners_alone(tmp_path: Path) -> None:
    opened = factory.open_oauth_store("sqlite", tmp_path / "oauth.db")
    opened.close()
    assert (tmp_path / "oauth.db").stat().st_mode & 0o077 == 0


def test_an_access_token_keeps_its_own_narrower_scope(store: OAuthStore) -> None:
    narrow = OAuthToken(
        id="t3",
        kind="access",
        grant="g1",
        secret_hash=b"\x05" * 32,
        expires_ms=T0,
        scope="patient/Observation.rs",
    )
    whole = OAuthToken(id="t4", kind="access", grant="g1", secret_hash=b"\x06" * 32, expires_ms=T0)
    store.add_token(narrow)
    store.add_token(whole)
    assert store.token("t3") == narrow
    found = store.token("t4")
    assert found is not None and found.scope is None  # the grant's scope


def test_a_store_made_before_tokens_had_a_scope_is_upgraded_on_open(
    backend: OAuthBackend,
) -> None:
    """A node's oauth.db (or schema) from before the column: its tokens stay readable with
    the grant's scope, and new tokens carry their own."""
    if backend.name == "sqlite":
        import sqlite3

        from medledger.storage.oauth import OAUTH_SCHEMA

        old = sqlite3.connect(backend.path)
        old.executescript(OAUTH_SCHEMA)
        old.execute(
            "INSERT INTO oauth_tokens (id, kind, grant_id, secret_hash, expires_ms, state)"
            " VALUES ('t0', 'refresh', 'g1', ?, ?, 'live')",
            (b"\x07" * 32, T0),
        )
        old.commit()
        old.close()
    else:
        from psycopg import sql

        from medledger.storage.postgres.connection import connect
        from medledger.storage.postgres.migrations import migrate, schema_version

        with connect(backend.dsn) as conn:
            migrate(conn, backend.schema, "oauth", create=True, upto=1)
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (id, kind, grant_id, secret_hash, expires_ms, state)"
                    " VALUES ('t0', 'refresh', 'g1', %s, %s, 'live')"
                ).format(sql.Identifier(backend.schema, "oauth_tokens")),
                (b"\x07" * 32, T0),
            )
            conn.commit()
            assert schema_version(conn, backend.schema) == 1
    for _ in range(2):  # a second open finds the column there and changes nothing
        upgraded = backend.open()
        try:
            kept = upgraded.token("t0")
            assert kept is not None and (kept.state, kept.scope) == ("live", None)
            if upgraded.token("t5") is None:
                upgraded.add_token(
                    OAuthToken(
                        id="t5",
                        kind="access",
                        grant="g1",
                        secret_hash=b"\x08" * 32,
                        expires_ms=T0,
                        scope="patient/Observation.rs",
                    )
                )
            again = upgraded.token("t5")
            assert again is not None and again.scope == "patient/Observation.rs"
        finally:
            upgraded.close()
