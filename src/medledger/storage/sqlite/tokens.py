"""SQLite adapter of :class:`~medledger.storage.ports.TokenStore`: API bearer tokens.

A token reads ``mlt_<id>_<secret>``; the store keeps the id, SHA-256 of the
secret, the role, the patient it is bound to (patient tokens), and expiry and
revocation. Checking a token compares hashes in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
from pathlib import Path

from medledger.core.errors import InvalidInput, NotFound, StorageError
from medledger.storage.ports import ROLES, TokenInfo

__all__ = ["SqliteTokenStore"]

_PATIENT_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL,
    role TEXT NOT NULL,
    patient TEXT,
    label TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER,
    revoked INTEGER NOT NULL DEFAULT 0
);
"""


class SqliteTokenStore:
    """Tokens in ``tokens.db`` of the node directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StorageError(f"{path}: {exc}") from None

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
        self._conn.execute(
            "INSERT INTO tokens (id, secret_hash, role, patient, label, created_ms, expires_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
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
        row = self._conn.execute(
            "SELECT secret_hash, role, patient, label, expires_ms, revoked FROM tokens WHERE id = ?",
            (parts[1],),
        ).fetchone()
        given = hashlib.sha256(parts[2].encode()).digest()
        if row is None or not hmac.compare_digest(bytes(row[0]), given):
            raise InvalidInput("unknown token")
        if row[5]:
            raise InvalidInput("token was revoked")
        if row[4] is not None and now_ms >= row[4]:
            raise InvalidInput("token expired")
        return TokenInfo(
            id=parts[1], role=row[1], patient=row[2], label=row[3], expires_ms=row[4], revoked=False
        )

    def revoke(self, token_id: str) -> None:
        cur = self._conn.execute("UPDATE tokens SET revoked = 1 WHERE id = ?", (token_id,))
        if cur.rowcount == 0:
            raise NotFound(f"no token {token_id}")

    def list(self) -> list[TokenInfo]:
        return [
            TokenInfo(
                id=r[0], role=r[1], patient=r[2], label=r[3], expires_ms=r[4], revoked=bool(r[5])
            )
            for r in self._conn.execute(
                "SELECT id, role, patient, label, expires_ms, revoked FROM tokens ORDER BY created_ms"
            )
        ]

    def close(self) -> None:
        self._conn.close()
