"""PKCE (RFC 7636) with ``S256`` only, and the random secrets of the authorization server.

Pure apart from :func:`new_secret` (the OS CSPRNG). ``plain`` is refused: it
protects nothing against an attacker who can read the authorization request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from typing import Final

from medledger.core.errors import InvalidInput

__all__ = ["CHALLENGE_METHODS", "check_challenge", "new_secret", "s256", "secret_hash", "verify"]

CHALLENGE_METHODS: Final = ("S256",)
# RFC 7636 §4.1: 43-128 unreserved characters.
_VERIFIER = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")
# An S256 challenge is base64url of 32 bytes without padding: exactly 43 characters.
_CHALLENGE = re.compile(r"^[A-Za-z0-9\-_]{43}$")


def s256(verifier: str) -> str:
    """``BASE64URL(SHA256(verifier))`` without padding (RFC 7636 §4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def check_challenge(challenge: str, method: str) -> None:
    """Refuse an authorization request's PKCE parameters unless they are a well-formed S256."""
    if method != "S256":
        raise InvalidInput("code_challenge_method must be S256 (plain is not accepted)")
    if not _CHALLENGE.match(challenge):
        raise InvalidInput("code_challenge must be base64url SHA-256 (43 characters)")


def verify(verifier: str, challenge: str) -> bool:
    """Whether ``verifier`` is the one ``challenge`` was made from (constant time)."""
    if not _VERIFIER.match(verifier):
        return False
    return hmac.compare_digest(s256(verifier), challenge)


def new_secret() -> str:
    """256 random bits, URL-safe: codes, token secrets, CSRF tokens, sign-in challenges."""
    return secrets.token_urlsafe(32)


def secret_hash(secret: str) -> bytes:
    """What is stored for a secret: SHA-256 (the secrets are random, so no stretching is needed)."""
    return hashlib.sha256(secret.encode("utf-8")).digest()
