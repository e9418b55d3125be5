"""The authorization server's tables, written once for every backend.

Clients, sign-in steps and codes (``oauth_pending``), grants and tokens; an
adapter supplies :meth:`OAuthTables._select` and :meth:`OAuthTables._execute`
(each durable when it returns) and a :class:`~medledger.storage.dialect.Dialect`.
Single use rests on one conditional ``UPDATE … WHERE stage = ?`` per step: the
database, not the caller, decides which of two racing redemptions wins.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, Final

from medledger.core.errors import Conflict
from medledger.storage.dialect import Dialect
from medledger.storage.ports import OAuthClient, OAuthGrant, OAuthPending, OAuthToken

__all__ = ["OAUTH_SCHEMA", "OAUTH_TOKEN_SCOPE", "OAuthTables"]

#: The tables, in SQL both backends accept (``BYTEA`` is ``BLOB`` affinity in SQLite).
OAUTH_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS oauth_clients (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    redirect_uris TEXT NOT NULL,
    secret_hash BYTEA,
    system_role TEXT,
    created_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS oauth_pending (
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    stage TEXT NOT NULL,
    secret_hash BYTEA NOT NULL,
    payload TEXT NOT NULL,
    expires_ms BIGINT NOT NULL,
    grant_id TEXT,
    PRIMARY KEY (kind, id)
);
CREATE INDEX IF NOT EXISTS oauth_pending_expiry ON oauth_pending (expires_ms);
CREATE TABLE IF NOT EXISTS oauth_grants (
    id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    role TEXT NOT NULL,
    patient TEXT,
    scope TEXT NOT NULL,
    label TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS oauth_tokens (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    grant_id TEXT NOT NULL,
    secret_hash BYTEA NOT NULL,
    expires_ms BIGINT NOT NULL,
    state TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS oauth_tokens_expiry ON oauth_tokens (expires_ms);
"""
#: The second step: an access token may carry less than its grant (a refresh that asked
#: for a narrower scope, RFC 6749 §6); NULL is the grant's scope, as before the step.
OAUTH_TOKEN_SCOPE: Final = "ALTER TABLE oauth_tokens ADD COLUMN scope TEXT;\n"  # noqa: S105

_CLIENT_COLUMNS = "id, name, redirect_uris, secret_hash, system_role, created_ms"
_PENDING_COLUMNS = "id, kind, stage, secret_hash, payload, expires_ms, grant_id"
_GRANT_COLUMNS = "id, client_id, role, patient, scope, label, created_ms, revoked"
_TOKEN_COLUMNS = "id, kind, grant_id, secret_hash, expires_ms, state, scope"  # noqa: S105 (column names)


def _client(r: Sequence[Any]) -> OAuthClient:
    return OAuthClient(
        id=r[0],
        name=r[1],
        redirect_uris=tuple(json.loads(r[2])),
        secret_hash=None if r[3] is None else bytes(r[3]),
        system_role=r[4],
        created_ms=int(r[5]),
    )


class OAuthTables:
    """:class:`~medledger.storage.ports.OAuthStore` over the tables of :data:`OAUTH_SCHEMA`."""

    dialect: Dialect

    @abstractmethod
    def _select(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """Rows of one read-only statement."""

    @abstractmethod
    def _execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one write, committed (durable) when this returns; the rows it changed."""

    @abstractmethod
    def _insert(self, sql: str, args: Sequence[Any]) -> bool:
        """Run one INSERT; ``False`` (nothing written) if it broke a unique key."""

    def _sql(self, text: str) -> str:
        return self.dialect.render(text)

    # -- clients ---------------------------------------------------------------------

    def add_client(self, client: OAuthClient) -> None:
        added = self._insert(
            self._sql(f"INSERT INTO oauth_clients ({_CLIENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"),
            (
                client.id,
                client.name,
                json.dumps(list(client.redirect_uris)),
                client.secret_hash,
                client.system_role,
                client.created_ms,
            ),
        )
        if not added:
            raise Conflict(f"a client {client.id!r} is already registered")

    def client(self, client_id: str) -> OAuthClient | None:
        rows = self._select(
            self._sql(f"SELECT {_CLIENT_COLUMNS} FROM oauth_clients WHERE id = ?"), (client_id,)
        )
        return _client(rows[0]) if rows else None

    def clients(self) -> list[OAuthClient]:
        rows = self._select(f"SELECT {_CLIENT_COLUMNS} FROM oauth_clients ORDER BY created_ms, id")
        return [_client(r) for r in rows]

    def remove_client(self, client_id: str) -> int | None:
        if self.client(client_id) is None:
            return None
        revoked = self._execute(
            self._sql("UPDATE oauth_grants SET revoked = 1 WHERE client_id = ? AND revoked = 0"),
            (client_id,),
        )
        self._execute(self._sql("DELETE FROM oauth_clients WHERE id = ?"), (client_id,))
        return revoked

    # -- sign-in steps and codes ---------------------------------------------------------

    def put_pending(self, pending: OAuthPending) -> None:
        added = self._insert(
            self._sql(
                f"INSERT INTO oauth_pending ({_PENDING_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
            ),
            (
                pending.id,
                pending.kind,
                pending.stage,
                pending.secret_hash,
                pending.payload,
                pending.expires_ms,
                pending.grant,
            ),
        )
        if not added:
            raise Conflict(f"a {pending.kind} {pending.id!r} exists already")

    def pending(self, pending_id: str, kind: str) -> OAuthPending | None:
        rows = self._select(
            self._sql(f"SELECT {_PENDING_COLUMNS} FROM oauth_pending WHERE kind = ? AND id = ?"),
            (kind, pending_id),
        )
        if not rows:
            return None
        r = rows[0]
        return OAuthPending(
            id=r[0],
            kind=r[1],
            stage=r[2],
            secret_hash=bytes(r[3]),
            payload=r[4],
            expires_ms=int(r[5]),
            grant=r[6],
        )

    def advance_pending(
        self,
        pending_id: str,
        kind: str,
        from_stage: str,
        to_stage: str,
        *,
        payload: str | None = None,
        grant: str | None = None,
    ) -> bool:
        return (
            self._execute(
                self._sql(
                    "UPDATE oauth_pending SET stage = ?, payload = COALESCE(?, payload),"
                    " grant_id = COALESCE(?, grant_id) WHERE kind = ? AND id = ? AND stage = ?"
                ),
                (to_stage, payload, grant, kind, pending_id, from_stage),
            )
            == 1
        )

    # -- grants and tokens ---------------------------------------------------------------

    def add_grant(self, grant: OAuthGrant) -> None:
        added = self._insert(
            self._sql(
                f"INSERT INTO oauth_grants ({_GRANT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            ),
            (
                grant.id,
                grant.client_id,
                grant.role,
                grant.patient,
                grant.scope,
                grant.label,
                grant.created_ms,
                int(grant.revoked),
            ),
        )
        if not added:
            raise Conflict(f"a grant {grant.id!r} exists already")

    def grant(self, grant_id: str) -> OAuthGrant | None:
        rows = self._select(
            self._sql(f"SELECT {_GRANT_COLUMNS} FROM oauth_grants WHERE id = ?"), (grant_id,)
        )
        if not rows:
            return None
        r = rows[0]
        return OAuthGrant(
            id=r[0],
            client_id=r[1],
            role=r[2],
            patient=r[3],
            scope=r[4],
            label=r[5],
            created_ms=int(r[6]),
            revoked=bool(r[7]),
        )

    def revoke_grant(self, grant_id: str) -> None:
        self._execute(self._sql("UPDATE oauth_grants SET revoked = 1 WHERE id = ?"), (grant_id,))

    def add_token(self, token: OAuthToken) -> None:
        added = self._insert(
            self._sql(f"INSERT INTO oauth_tokens ({_TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"),
            (
                token.id,
                token.kind,
                token.grant,
                token.secret_hash,
                token.expires_ms,
                token.state,
                token.scope,
            ),
        )
        if not added:
            raise Conflict(f"a token {token.id!r} exists already")

    def token(self, token_id: str) -> OAuthToken | None:
        rows = self._select(
            self._sql(f"SELECT {_TOKEN_COLUMNS} FROM oauth_tokens WHERE id = ?"), (token_id,)
        )
        if not rows:
            return None
        r = rows[0]
        return OAuthToken(
            id=r[0],
            kind=r[1],
            grant=r[2],
            secret_hash=bytes(r[3]),
            expires_ms=int(r[4]),
            state=r[5],
            scope=r[6],
        )

    def advance_token(self, token_id: str, from_state: str, to_state: str) -> bool:
        return (
            self._execute(
                self._sql("UPDATE oauth_tokens SET state = ? WHERE id = ? AND state = ?"),
                (to_state, token_id, from_state),
            )
            == 1
        )

    def forget_expired(self, *, now_ms: int, retain_ms: int) -> int:
        before = now_ms - retain_ms
        forgotten = self._execute(
            self._sql(
                "DELETE FROM oauth_pending WHERE expires_ms < ?"
                " OR (kind = 'request' AND expires_ms < ?)"
            ),
            (before, now_ms),
        )
        return forgotten + self._execute(
            self._sql("DELETE FROM oauth_tokens WHERE expires_ms < ?"), (before,)
        )
