"""API bearer tokens, written once for every backend: issuing, checking, revoking, listing.

A token reads ``mlt_<id>_<secret>``; a store keeps the id, SHA-256 of the
secret, the role, the patient it is bound to (patient tokens), and expiry and
revocation — never the secret. Checking a token compares hashes in constant
time. An adapter supplies two hooks (:meth:`TokenTable._select`,
:meth:`TokenTable._execute`, each durable when it returns) and a
:class:`~medledger.storage.dialect.Dialect`.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import re
import secrets
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, Final

from medledger.core.errors import InvalidInput, NotFound
from medledger.storage.dialect import Dialect
from medledger.storage.ports import ROLES, TokenInfo

__all__ = ["COLUMNS", "TokenTable"]

_PATIENT_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
#: Every column of the ``tokens`` table, in import order (moving tokens between stores).
COLUMNS: Final = "id, secret_hash, role, patient, label, created_ms, expires_ms, revoked"


class TokenTable:
    """:class:`~medledger.storage.ports.TokenStore` over one ``tokens`` table (see module doc)."""

    dialect: Dialect

    @abstractmethod
    def _select(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """Rows of one read-only statement."""

    @abstractmethod
    def _execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one write, committed (durable) when this returns; the rows it changed."""

    def create(
        self,
        *,
        role: str,
        now_ms: int,
        patient: str | None = None,
        label: str = "",
        ttl_ms: int | None = None,
    ) -> tuple[str, TokenInfo]:
        """Issue a token; returns the secret token text (shown once) and its info."""
        if role not in ROLES:
            raise InvalidInput(f"role must be one of {', '.join(ROLES)}")
        if patient is not None and not _PATIENT_ID.match(patient):
            raise InvalidInput("patient must be a FHIR id: 1-64 of A-Z, a-z, 0-9, '-' and '.'")
        if (role == "patient") != (patient is not None):
            raise InvalidInput(
                "a patient token must name its patient, and only a patient token may"
            )
        token_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        expires = None if ttl_ms is None else now_ms + ttl_ms
        self._execute(
            self.dialect.render(
                "INSERT INTO tokens (id, secret_hash, role, patient, label, created_ms,"
                " expires_ms) VALUES (?, ?, ?, ?, ?, ?, ?)"
            ),
            (
                token_id,
                hashlib.sha256(secret.encode()).digest(),
                role,
                patient,
                label,
                now_ms,
                expires,
            ),
        )
        info = TokenInfo(
            id=token_id, role=role, patient=patient, label=label, expires_ms=expires, revoked=False
        )
        return f"mlt_{token_id}_{secret}", info

    def check(self, token: str, *, now_ms: int) -> TokenInfo:
        """The info of a valid token; ``InvalidInput`` for malformed, unknown, expired or revoked."""
        parts = token.split("_", 2)
        if len(parts) != 3 or parts[0] != "mlt":
            raise InvalidInput("malformed token")
        rows = self._select(
            self.dialect.render(
                "SELECT secret_hash, role, patient, label, expires_ms, revoked FROM tokens"
                " WHERE id = ?"
            ),
            (parts[1],),
        )
        row = rows[0] if rows else None
        given = hashlib.sha256(parts[2].encode()).digest()
        if row is None or not hmac.compare_digest(bytes(row[0]), given):
            raise InvalidInput("unknown token")
        if row[5]:
            raise InvalidInput("token was revoked")
        if row[4] is not None and now_ms >= row[4]:
            raise InvalidInput("token expired")
        return TokenInfo(
            id=parts[1],
            role=row[1],
            patient=row[2],
            label=row[3],
            expires_ms=None if row[4] is None else int(row[4]),
            revoked=False,
        )

    def revoke(self, token_id: str) -> None:
        """Revoke a token; ``NotFound`` if no such token."""
        changed = self._execute(
            self.dialect.render("UPDATE tokens SET revoked = TRUE WHERE id = ?"), (token_id,)
        )
        if changed == 0:
            raise NotFound(f"no token {token_id}")

    def current(self, token_id: str, *, now_ms: int) -> TokenInfo | None:
        """The info of token ``token_id`` if it is neither revoked nor expired, else ``None``."""
        rows = self._select(
            self.dialect.render(
                "SELECT role, patient, label, expires_ms, revoked FROM tokens WHERE id = ?"
            ),
            (token_id,),
        )
        if not rows or rows[0][4] or (rows[0][3] is not None and now_ms >= rows[0][3]):
            return None
        row = rows[0]
        return TokenInfo(
            id=token_id,
            role=row[0],
            patient=row[1],
            label=row[2],
            expires_ms=None if row[3] is None else int(row[3]),
            revoked=False,
        )

    def list(self) -> list[TokenInfo]:
        """Every token, oldest first (revoked and expired ones included)."""
        return [
            TokenInfo(
                id=r[0],
                role=r[1],
                patient=r[2],
                label=r[3],
                expires_ms=None if r[4] is None else int(r[4]),
                revoked=bool(r[5]),
            )
            for r in self._select(
                "SELECT id, role, patient, label, expires_ms, revoked FROM tokens"
                " ORDER BY created_ms, id"
            )
        ]

    def export_rows(self) -> builtins.list[tuple[Any, ...]]:
        """Every stored row (:data:`COLUMNS`), to move tokens to another store."""
        return [
            (r[0], bytes(r[1]), r[2], r[3], r[4], int(r[5]), r[6], bool(r[7]))
            for r in self._select(f"SELECT {COLUMNS} FROM tokens ORDER BY created_ms, id")
        ]
