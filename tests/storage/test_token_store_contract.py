"""Conformance suite for the :class:`~medledger.storage.ports.TokenStore` port: API bearer tokens.

Every test runs on SQLite and on a real PostgreSQL server (``pg_server.py``);
a PostgreSQL node imports the tokens its ``tokens.db`` held before, once.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from pg_server import shared_dsn, unique

from medledger.core.errors import InvalidInput, NotFound
from medledger.storage import factory
from medledger.storage.ports import TokenStore
from medledger.storage.postgres.migrations import drop_schema
from medledger.storage.postgres.tokens import PostgresTokenStore
from medledger.storage.sqlite.tokens import SqliteTokenStore

T0 = 1_700_000_000_000


@dataclass
class TokenBackend:
    """Opens one (initially empty) token store as often as a test asks, and reads raw rows."""

    name: str
    path: Path
    dsn: str = ""
    schema: str = ""

    def open(self) -> TokenStore:
        if self.name == "sqlite":
            return SqliteTokenStore(self.path)
        return PostgresTokenStore(self.dsn, schema=self.schema)

    def stored_columns(self) -> list[tuple[str, bytes]]:
        """``(id, secret_hash)`` of every stored token: what a stolen store would reveal."""
        if self.name == "sqlite":
            db = sqlite3.connect(self.path)
            try:
                return [(r, bytes(h)) for r, h in db.execute("SELECT id, secret_hash FROM tokens")]
            finally:
                db.close()
        with psycopg.connect(self.dsn) as conn:
            query = f'SELECT id, secret_hash FROM "{self.schema}".tokens'
            return [(str(r), bytes(h)) for r, h in conn.execute(query.encode())]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TokenBackend]:
    if request.param == "sqlite":
        yield TokenBackend("sqlite", tmp_path / "tokens.db")
        return
    dsn, schema = shared_dsn(), unique("tokens")
    PostgresTokenStore.initialize(dsn, schema=schema)
    yield TokenBackend("postgres", tmp_path / "unused", dsn, schema)
    drop_schema(dsn, schema)


@pytest.fixture
def store(backend: TokenBackend) -> Iterator[TokenStore]:
    opened = backend.open()
    yield opened
    opened.close()


def test_an_issued_token_checks_and_only_its_hash_is_stored(
    store: TokenStore, backend: TokenBackend
) -> None:
    text, info = store.create(role="clinician", now_ms=T0, label="ward 3")
    assert text.startswith(f"mlt_{info.id}_")
    assert store.check(text, now_ms=T0 + 1) == info
    secret = text.split("_", 2)[2]
    assert backend.stored_columns() == [(info.id, hashlib.sha256(secret.encode()).digest())]


def test_malformed_unknown_and_wrong_secret_tokens_are_refused(store: TokenStore) -> None:
    text, info = store.create(role="auditor", now_ms=T0)
    for bad, words in [
        ("not-a-token", "malformed"),
        ("xyz_a_b", "malformed"),
        (f"mlt_{info.id}_wrong-secret", "unknown token"),
        ("mlt_000000000000_" + text.split("_", 2)[2], "unknown token"),
    ]:
        with pytest.raises(InvalidInput, match=words):
            store.check(bad, now_ms=T0)


def test_expiry_and_revocation(store: TokenStore) -> None:
    short, info = store.create(role="clinician", now_ms=T0, ttl_ms=1_000)
    assert info.expires_ms == T0 + 1_000
    store.check(short, now_ms=T0 + 999)
    with pytest.raises(InvalidInput, match="expired"):
        store.check(short, now_ms=T0 + 1_000)
    kept, kept_info = store.create(role="admin", now_ms=T0)
    store.revoke(kept_info.id)
    with pytest.raises(InvalidInput, match="revoked"):
        store.check(kept, now_ms=T0)
    with pytest.raises(NotFound):
        store.revoke("000000000000")


def test_current_tells_by_id_whether_a_token_still_works(store: TokenStore) -> None:
    _, info = store.create(role="clinician", now_ms=T0, label="dr", ttl_ms=1_000)
    assert store.current(info.id, now_ms=T0 + 999) == info
    assert store.current(info.id, now_ms=T0 + 1_000) is None  # expired
    _, kept = store.create(role="auditor", now_ms=T0)
    assert store.current(kept.id, now_ms=T0 + 10**12) == kept
    store.revoke(kept.id)
    assert store.current(kept.id, now_ms=T0) is None
    assert store.current("000000000000", now_ms=T0) is None


def test_patient_tokens_name_exactly_their_patient(store: TokenStore) -> None:
    text, info = store.create(role="patient", patient="pat-1.a", now_ms=T0)
    assert store.check(text, now_ms=T0).patient == "pat-1.a" == info.patient
    for role, patient in [("patient", None), ("clinician", "pat-1"), ("patient", "bad id!")]:
        with pytest.raises(InvalidInput):
            store.create(role=role, patient=patient, now_ms=T0)
    with pytest.raises(InvalidInput, match="role must be one of"):
        store.create(role="root", now_ms=T0)


def test_tokens_are_listed_oldest_first_and_survive_reopening(backend: TokenBackend) -> None:
    first = backend.open()
    try:
        a, a_info = first.create(role="clinician", now_ms=T0, label="a")
        _, b_info = first.create(role="auditor", now_ms=T0 + 5, label="b", ttl_ms=60_000)
        first.revoke(b_info.id)
    finally:
        first.close()
    again = backend.open()
    try:
        listed = again.list()
        assert [(t.id, t.label, t.revoked) for t in listed] == [
            (a_info.id, "a", False),
            (b_info.id, "b", True),
        ]
        assert listed[1].expires_ms == T0 + 5 + 60_000
        assert again.check(a, now_ms=T0 + 10) == a_info
    finally:
        again.close()


def test_a_postgres_node_imports_the_tokens_of_its_former_sqlite_file(tmp_path: Path) -> None:
    """Tokens issued before a PostgreSQL node kept them in PostgreSQL keep working — once.

    Revoked ones stay revoked; the file is renamed so it is never read again
    (a later revocation in PostgreSQL cannot be undone by a re-import).
    """
    legacy = tmp_path / "tokens.db"
    old = SqliteTokenStore(legacy)
    live, _ = old.create(role="clinician", now_ms=T0, label="before the move")
    dead, dead_info = old.create(role="admin", now_ms=T0 + 1)
    old.revoke(dead_info.id)
    old.close()
    dsn, schema = shared_dsn(), unique("tokens")
    try:
        store = factory.open_token_store("postgres", dsn, schema=schema, legacy=legacy)
        try:
            info = store.check(live, now_ms=T0 + 2)
            assert info.label == "before the move"
            with pytest.raises(InvalidInput, match="revoked"):
                store.check(dead, now_ms=T0 + 2)
            store.revoke(info.id)
        finally:
            store.close()
        assert not legacy.exists() and legacy.with_name("tokens.db.imported").exists()
        store = factory.open_token_store("postgres", dsn, schema=schema, legacy=legacy)
        try:
            with pytest.raises(InvalidInput, match="revoked"):
                store.check(live, now_ms=T0 + 3)
            assert len(store.list()) == 2
        finally:
            store.close()
    finally:
        drop_schema(dsn, schema)
