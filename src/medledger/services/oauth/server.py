"""The node as an OAuth 2.0 authorization server for SMART on FHIR apps (SMART App Launch 2.x).

The authorization-code flow, step by step (every step single-use, every
secret stored only as its SHA-256):

1. :meth:`AuthorizationServer.begin` checks an authorization request — the
   client is registered, ``redirect_uri`` is one of its URIs *exactly*,
   ``response_type=code``, PKCE ``S256``, ``aud`` this node's FHIR base — and
   opens a sign-in step with a random CSRF token and a random sign-in
   challenge (10 minutes).
2. The user proves who they are, once per step: a patient signs the
   challenge with their wallet key (:meth:`~AuthorizationServer.sign_in_patient`;
   the key must be enrolled here, and the Patient it is bound to becomes the
   token's ``patient`` context), or a staff member presents the API token
   they already hold (:meth:`~AuthorizationServer.sign_in_staff`).
3. The user approves or denies the scopes (:meth:`~AuthorizationServer.decide`):
   approval issues a code valid for 60 seconds, sent to the redirect URI with ``state``.
4. The client redeems the code with the PKCE verifier
   (:meth:`~AuthorizationServer.exchange_code`). A code redeemed twice
   revokes every token the first redemption issued (OAuth 2.0 Security BCP
   §4.5): whoever replays it holds a stolen code.

Tokens: ``mla_<id>_<secret>`` access tokens (1 hour) and, with
``offline_access``, ``mlr_<id>_<secret>`` refresh tokens (30 days) of one
*grant*. Refreshing rotates the refresh token (and may ask for a narrower
access token; the refresh token keeps the grant); presenting a rotated one
again revokes the whole grant. Revocation (RFC 7009) of a refresh token
revokes the grant, of an access token that token.

Access tokens carry today's roles: a patient's grant the ``patient`` role
bound to its Patient, a staff grant the role of the API token used to sign
in; the granted scopes narrow further which resource types and actions
(``api.auth``). Confidential clients authenticate with a client secret;
``client_credentials`` grants ``system/`` scopes under the role the client was
registered with.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlencode, urlsplit

from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from medledger.core.encoding import canonical_bytes
from medledger.core.errors import InvalidInput, InvalidSignature, OAuthError
from medledger.core.keys import ECDSA_P256, VerifyingKey
from medledger.core.models import Signature
from medledger.ledger.clock import Clock
from medledger.services.oauth import pkce
from medledger.services.oauth.scopes import ScopeSet, narrowed_scope, parse_scopes
from medledger.storage.ports import (
    ROLES,
    OAuthClient,
    OAuthGrant,
    OAuthPending,
    OAuthStore,
    OAuthToken,
    TokenInfo,
    TokenStore,
)

__all__ = [
    "ACCESS_TTL_MS",
    "CODE_TTL_MS",
    "PORTAL_CLIENT",
    "REFRESH_TTL_MS",
    "SIGNIN_TTL_MS",
    "AuthorizationServer",
    "SignIn",
    "register_client",
    "signin_message",
]

log = logging.getLogger(__name__)

SIGNIN_TTL_MS: Final = 10 * 60_000
CODE_TTL_MS: Final = 60_000
ACCESS_TTL_MS: Final = 60 * 60_000
REFRESH_TTL_MS: Final = 30 * 24 * 60 * 60_000
#: Spent sign-in steps, codes and tokens are kept this long past expiry (replays are
#: recognized as replays, not as unknown codes), then forgotten.
_RETENTION_MS: Final = 24 * 60 * 60_000

#: The node's own web portal: a public client, registered on every node. Its one redirect
#: URI is relative: it means this path on the origin the authorization request came to.
PORTAL_CLIENT: Final = OAuthClient(
    id="medledger-portal",
    name="medledger portal",
    redirect_uris=("/portal/callback",),
    secret_hash=None,
    system_role=None,
    created_ms=0,
)

_CLIENT_ID = re.compile(r"^[A-Za-z0-9\-._~]{1,64}$")
_STEP_ID = re.compile(r"^[0-9a-f]{32}$")
_TOKEN = re.compile(r"^(mla|mlr)_([0-9a-f]{24})_([A-Za-z0-9\-_]{43})$")
_STAFF_ROLES: Final = ("clinician", "auditor", "admin")
_STATE_MAX = 512


def signin_message(institution: str, client_id: str, challenge: str) -> bytes:
    """The bytes a patient signs to sign in: names this node, the client and the challenge.

    Plain text (not canonical JSON) so the browser signs exactly what the page
    shows, without re-encoding anything.
    """
    return (
        f"medledger sign-in\ninstitution: {institution}\nclient: {client_id}\n"
        f"challenge: {challenge}\n"
    ).encode()


@dataclass(frozen=True, slots=True, kw_only=True)
class SignIn:
    """A sign-in step as the pages show it (ids and the CSRF token go into the forms)."""

    step: str
    csrf: str
    client_name: str
    scopes: tuple[str, ...]
    message: str
    #: Who signed in (after step 2): ``patient`` or the staff role.
    role: str | None = None


@dataclass(frozen=True, slots=True)
class _Subject:
    role: str
    patient: str | None
    label: str


def register_client(
    store: OAuthStore,
    *,
    now_ms: int,
    name: str,
    redirect_uris: tuple[str, ...],
    confidential: bool = False,
    system_role: str | None = None,
    client_id: str | None = None,
) -> tuple[OAuthClient, str | None]:
    """Register a client; returns it and (confidential clients) its secret, shown once.

    Redirect URIs must be absolute ``https`` URIs without a fragment
    (``http`` only for ``localhost``/``127.0.0.1``, RFC 8252 §7.3).
    """
    client_id = client_id or f"app-{pkce.new_secret()[:16]}"
    if not _CLIENT_ID.match(client_id) or client_id == PORTAL_CLIENT.id:
        raise InvalidInput("client id must be 1-64 of A-Z a-z 0-9 - . _ ~ (and not the portal's)")
    if not name.strip() or len(name) > 200:
        raise InvalidInput("a client needs a name of at most 200 characters")
    if not redirect_uris and system_role is None:
        raise InvalidInput("a client needs at least one redirect URI")
    for uri in redirect_uris:
        parts = urlsplit(uri)
        local = parts.hostname in ("localhost", "127.0.0.1", "::1")
        if parts.scheme not in ("https", "http") or not parts.netloc or parts.fragment:
            raise InvalidInput(f"redirect URI {uri!r} must be an absolute URI without fragment")
        if parts.scheme == "http" and not local:
            raise InvalidInput(f"redirect URI {uri!r} must use https (http only for localhost)")
    if system_role is not None:
        if not confidential:
            raise InvalidInput("only a confidential client may use client_credentials")
        if system_role not in _STAFF_ROLES:
            raise InvalidInput(f"system role must be one of {', '.join(_STAFF_ROLES)}")
    secret = pkce.new_secret() if confidential else None
    client = OAuthClient(
        id=client_id,
        name=name.strip(),
        redirect_uris=tuple(redirect_uris),
        secret_hash=None if secret is None else pkce.secret_hash(secret),
        system_role=system_role,
        created_ms=now_ms,
    )
    store.add_client(client)
    return client, secret


def _b64url(text: str, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{what} is not base64url") from None


def _append_query(uri: str, params: Mapping[str, str]) -> str:
    return uri + ("&" if urlsplit(uri).query else "?") + urlencode(params)


class AuthorizationServer:
    """SMART on FHIR authorization server of one node (see module docstring)."""

    def __init__(
        self,
        *,
        store: OAuthStore,
        tokens: TokenStore,
        clock: Clock,
        institution: str,
        patient_of_key: Callable[[str], Awaitable[str | None]],
        base_url: str,
    ) -> None:
        """``base_url``: where clients reach this node (``scheme://host:port``, from its
        configuration: ``config.public_base_url``). It is the issuer, the origin of every
        endpoint and of the portal's redirect URI, and ``<base_url>/fhir`` is the one
        ``aud`` accepted; nothing a request says (its ``Host`` header) changes it."""
        self.store = store
        self._tokens = tokens
        self._clock = clock
        self.institution = institution
        self._patient_of_key = patient_of_key
        self.base_url = base_url.rstrip("/")

    @property
    def fhir_base(self) -> str:
        """This node's FHIR base URL: the ``aud`` an authorization request must name."""
        return f"{self.base_url}/fhir"

    # -- clients --------------------------------------------------------------------------

    def register_client(
        self,
        *,
        name: str,
        redirect_uris: tuple[str, ...],
        confidential: bool = False,
        system_role: str | None = None,
        client_id: str | None = None,
    ) -> tuple[OAuthClient, str | None]:
        """:func:`register_client` in this server's store, now."""
        return register_client(
            self.store,
            now_ms=self._clock.now_ms(),
            name=name,
            redirect_uris=redirect_uris,
            confidential=confidential,
            system_role=system_role,
            client_id=client_id,
        )

    def client(self, client_id: str) -> OAuthClient | None:
        """A registered client (the portal is always registered)."""
        if client_id == PORTAL_CLIENT.id:
            return PORTAL_CLIENT
        if not _CLIENT_ID.match(client_id):
            return None
        return self.store.client(client_id)

    def redirect_matches(self, client: OAuthClient, redirect_uri: str) -> bool:
        """Exact match against a registered URI (a relative one is on this node's base URL)."""
        for registered in client.redirect_uris:
            expected = self.base_url + registered if registered.startswith("/") else registered
            if hmac.compare_digest(expected.encode(), redirect_uri.encode()):
                return True
        return False

    def authenticate_client(
        self, client_id: str, secret: str | None, *, confidential_only: bool = False
    ) -> OAuthClient:
        """The client of a token or revocation request; ``invalid_client`` (401) if it does not check.

        A confidential client must show its secret; a public client must show none.
        """
        client = self.client(client_id) if client_id else None
        if client is None:
            raise OAuthError("invalid_client", "unknown client", status=401)
        if client.secret_hash is None:
            if secret is not None or confidential_only:
                raise OAuthError("invalid_client", "a public client has no secret", status=401)
            return client
        if secret is None or not hmac.compare_digest(pkce.secret_hash(secret), client.secret_hash):
            raise OAuthError("invalid_client", "client authentication failed", status=401)
        return client

    # -- 1. the authorization request -------------------------------------------------------

    def begin(self, params: Mapping[str, str]) -> SignIn:
        """Check an authorization request and open its sign-in step (module docstring, 1).

        Refusals before the redirect URI is known good are shown to the user
        (``OAuthError`` without ``redirect_uri``); later ones go back to the client.
        ``aud`` is required and must be :attr:`fhir_base` (SMART App Launch 2.x:
        a token asked for another server must not be issued by this one).
        """
        client_id = params.get("client_id", "")
        client = self.client(client_id) if client_id else None
        if client is None:
            raise OAuthError("invalid_request", "unknown client_id")
        redirect_uri = params.get("redirect_uri", "")
        if not redirect_uri or not self.redirect_matches(client, redirect_uri):
            raise OAuthError(
                "invalid_request", "redirect_uri is not one registered for this client"
            )
        # From here on the redirect URI is trusted: refusals go back to the client.
        state = params.get("state", "")

        def refuse(error: str, message: str) -> OAuthError:
            return OAuthError(error, message, redirect_uri=redirect_uri, state=state or None)

        if len(state) > _STATE_MAX:
            raise refuse("invalid_request", f"state is longer than {_STATE_MAX} characters")
        if params.get("response_type") != "code":
            raise refuse("unsupported_response_type", "response_type must be code")
        try:
            pkce.check_challenge(
                params.get("code_challenge", ""), params.get("code_challenge_method", "")
            )
        except InvalidInput as exc:
            raise refuse("invalid_request", str(exc)) from None
        aud = params.get("aud", "")
        if not aud:
            raise refuse(
                "invalid_request", f"aud is required: this node's FHIR base URL, {self.fhir_base}"
            )
        # One trailing slash is tolerated (fhirclient sends its base URL with one).
        if aud.removesuffix("/") != self.fhir_base:
            raise refuse(
                "invalid_request", f"aud is not this node's FHIR base URL, {self.fhir_base}"
            )
        scopes = parse_scopes(params.get("scope", ""))
        if not scopes.resources:
            raise refuse("invalid_scope", "no resource scope this node understands was requested")
        # Opening a step writes a row before anyone signed in: expired ones go first,
        # so open steps stay bounded by the rate the API lets each address open them.
        self.store.forget_expired(now_ms=self._clock.now_ms(), retain_ms=_RETENTION_MS)
        step, csrf, challenge = pkce.new_secret(), pkce.new_secret(), pkce.new_secret()
        step = hashlib.sha256(step.encode()).hexdigest()[:32]
        payload = {
            "client_id": client.id,
            "redirect_uri": redirect_uri,
            "state": state,
            "scope": scopes.text,
            "code_challenge": params["code_challenge"],
            "challenge": challenge,
        }
        self.store.put_pending(
            OAuthPending(
                id=step,
                kind="request",
                stage="signin",
                secret_hash=pkce.secret_hash(csrf),
                payload=canonical_bytes(payload).decode(),
                expires_ms=self._clock.now_ms() + SIGNIN_TTL_MS,
            )
        )
        return SignIn(
            step=step,
            csrf=csrf,
            client_name=client.name,
            scopes=scopes.granted,
            message=signin_message(self.institution, client.id, challenge).decode(),
        )

    def _step(self, step: str, csrf: str, stage: str) -> tuple[OAuthPending, dict[str, Any]]:
        """The open sign-in step ``step`` at ``stage`` whose CSRF token is ``csrf``."""
        found = self.store.pending(step, "request") if _STEP_ID.match(step) else None
        if found is None or not hmac.compare_digest(
            found.secret_hash, pkce.secret_hash(csrf or "-")
        ):
            raise InvalidInput("this sign-in form is not valid (missing or wrong CSRF token)")
        if found.expires_ms <= self._clock.now_ms():
            raise InvalidInput("this sign-in has expired; start again from the app")
        if found.stage != stage:
            raise InvalidInput("this sign-in step was already used; start again from the app")
        payload: dict[str, Any] = json.loads(found.payload)
        return found, payload

    # -- 2. who the user is ----------------------------------------------------------------

    async def sign_in_patient(
        self, step: str, csrf: str, *, public_key: str, signature: str
    ) -> SignIn:
        """A patient signs in with the wallet key (module docstring, 2).

        ``public_key``: base64url of the key's DER SubjectPublicKeyInfo;
        ``signature``: base64url of the WebCrypto ECDSA P-256/SHA-256
        signature (IEEE P1363 ``r||s``, 64 bytes) over :func:`signin_message`.
        The challenge is spent whatever the outcome: a refused attempt starts again.
        """
        found, payload = self._step(step, csrf, "signin")
        if not self.store.advance_pending(step, "request", "signin", "refused"):
            raise InvalidInput("this sign-in step was already used; start again from the app")
        try:
            key = VerifyingKey.from_der(_b64url(public_key, "public key"))
            raw = _b64url(signature, "signature")
            if len(raw) != 64:
                raise InvalidSignature("a P-256 signature is 64 bytes (r||s)")
            der = encode_dss_signature(
                int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
            )
            message = signin_message(self.institution, payload["client_id"], payload["challenge"])
            key.verify(Signature(signer=key.fingerprint, alg=ECDSA_P256, sig=der), message)
        except InvalidInput as exc:
            raise InvalidInput(f"sign-in refused: {exc}") from None
        except InvalidSignature:
            raise InvalidInput("sign-in refused: the signature does not verify") from None
        patient = await self._patient_of_key(key.fingerprint)
        if patient is None:
            raise InvalidInput("sign-in refused: this key is not enrolled at this institution")
        subject = _Subject("patient", patient, f"key:{key.fingerprint}")
        return self._signed_in(found, payload, subject, csrf)

    def sign_in_staff(self, step: str, csrf: str, *, api_token: str) -> SignIn:
        """A staff member signs in with the API token they hold (module docstring, 2)."""
        found, payload = self._step(step, csrf, "signin")
        if not self.store.advance_pending(step, "request", "signin", "refused"):
            raise InvalidInput("this sign-in step was already used; start again from the app")
        try:
            info = self._tokens.check(api_token.strip(), now_ms=self._clock.now_ms())
        except InvalidInput as exc:
            raise InvalidInput(f"sign-in refused: {exc}") from None
        subject = _Subject(info.role, info.patient, f"token:{info.id}")
        return self._signed_in(found, payload, subject, csrf)

    def _signed_in(
        self, found: OAuthPending, payload: dict[str, Any], subject: _Subject, csrf: str
    ) -> SignIn:
        requested = parse_scopes(payload["scope"])
        # A patient gets patient/ scopes only; staff get user/ scopes only (no patient picker).
        granted = requested.only("patient" if subject.role == "patient" else "user")
        if not granted.resources:
            raise OAuthError(
                "invalid_scope",
                f"none of the requested scopes is for a {subject.role} signing in",
                redirect_uri=payload["redirect_uri"],
                state=payload["state"] or None,
            )
        payload = {
            **payload,
            "scope": granted.text,
            "role": subject.role,
            "patient": subject.patient,
            "label": subject.label,
        }
        # "refused" was only the guard while the proof was checked: the step goes on.
        if not self.store.advance_pending(
            found.id, "request", "refused", "approve", payload=canonical_bytes(payload).decode()
        ):
            raise InvalidInput("this sign-in step was already used; start again from the app")
        client = self.client(payload["client_id"])
        return SignIn(
            step=found.id,
            csrf=csrf,
            client_name=client.name if client is not None else payload["client_id"],
            scopes=granted.granted,
            message="",
            role=subject.role,
        )

    # -- 3. approve or deny ----------------------------------------------------------------

    def decide(self, step: str, csrf: str, *, approve: bool) -> str:
        """The URL to send the browser to: the redirect URI with a code and ``state``, or
        with ``error=access_denied``."""
        _found, payload = self._step(step, csrf, "approve")
        if not self.store.advance_pending(step, "request", "approve", "done"):
            raise InvalidInput("this sign-in step was already used; start again from the app")
        answer: dict[str, str] = {}
        if approve:
            code = pkce.new_secret()
            self.store.put_pending(
                OAuthPending(
                    id=pkce.secret_hash(code).hex(),
                    kind="code",
                    stage="issued",
                    secret_hash=pkce.secret_hash(code),
                    payload=canonical_bytes(payload).decode(),
                    expires_ms=self._clock.now_ms() + CODE_TTL_MS,
                )
            )
            answer["code"] = code
        else:
            answer["error"] = "access_denied"
            answer["error_description"] = "the user denied the request"
        if payload["state"]:
            answer["state"] = payload["state"]
        # RFC 9207: who answered, so a client talking to several servers can tell (mix-up).
        answer["iss"] = self.base_url
        return _append_query(payload["redirect_uri"], answer)

    # -- 4. the token endpoint ---------------------------------------------------------------

    async def token(self, form: Mapping[str, str], client: OAuthClient) -> dict[str, Any]:
        """Answer a token request of an authenticated ``client`` (RFC 6749 §5.1)."""
        grant_type = form.get("grant_type", "")
        if grant_type == "authorization_code":
            return self._exchange_code(form, client)
        if grant_type == "refresh_token":
            return await self._refresh(form, client)
        if grant_type == "client_credentials":
            return self._client_credentials(form, client)
        raise OAuthError("unsupported_grant_type", f"grant_type {grant_type!r} is not supported")

    def _exchange_code(self, form: Mapping[str, str], client: OAuthClient) -> dict[str, Any]:
        code = form.get("code", "")
        code_id = pkce.secret_hash(code).hex()
        found = self.store.pending(code_id, "code") if code else None
        if found is None:
            raise OAuthError("invalid_grant", "unknown authorization code")
        payload: dict[str, Any] = json.loads(found.payload)
        if not self.store.advance_pending(code_id, "code", "issued", "redeemed"):
            # Replayed: someone holds a copy of the code. Whatever it bought is revoked.
            if found.grant is not None:
                self.store.revoke_grant(found.grant)
            else:  # redeemed concurrently, grant not recorded yet: look again
                again = self.store.pending(code_id, "code")
                if again is not None and again.grant is not None:
                    self.store.revoke_grant(again.grant)
            log.warning(
                "oauth: an authorization code was presented again; its tokens are revoked",
                extra={"fields": {"client": client.id}},
            )
            raise OAuthError("invalid_grant", "authorization code was already used")
        if found.expires_ms <= self._clock.now_ms():
            raise OAuthError("invalid_grant", "authorization code expired")
        if payload["client_id"] != client.id:
            raise OAuthError("invalid_grant", "authorization code was issued to another client")
        if form.get("redirect_uri", "") != payload["redirect_uri"]:
            raise OAuthError("invalid_grant", "redirect_uri differs from the authorization request")
        if not pkce.verify(form.get("code_verifier", ""), payload["code_challenge"]):
            raise OAuthError("invalid_grant", "code_verifier does not match the code_challenge")
        grant = OAuthGrant(
            id=pkce.new_secret()[:16],
            client_id=client.id,
            role=payload["role"],
            patient=payload["patient"],
            scope=payload["scope"],
            label=payload["label"],
            created_ms=self._clock.now_ms(),
        )
        self.store.add_grant(grant)
        # Recorded before any token leaves: a replay from now on finds what to revoke.
        self.store.advance_pending(code_id, "code", "redeemed", "redeemed", grant=grant.id)
        return self._issue(grant, with_refresh="offline_access" in grant.scope.split())

    async def _refresh(self, form: Mapping[str, str], client: OAuthClient) -> dict[str, Any]:
        """RFC 6749 §6: rotate the refresh token and issue an access token.

        ``scope`` may ask for less than the grant: the new access token carries
        only that; asking for anything the grant lacks is ``invalid_scope`` and
        spends nothing (the refresh token stays valid). The new refresh token
        keeps the whole grant, so a later refresh may ask for all of it again.
        """
        presented = form.get("refresh_token", "")
        token, grant = self._lookup(presented, "mlr")
        if token is None or grant is None or grant.client_id != client.id:
            raise OAuthError("invalid_grant", "unknown refresh token")
        scope: str | None = None
        asked = form.get("scope")
        # Checked before the token is spent (a refused request changes nothing), and only
        # for a live one: a rotated token presented again is a replay whatever it asks.
        if asked is not None and token.state == "live":
            scope = narrowed_scope(asked, grant.scope)
            if scope is None:
                raise OAuthError(
                    "invalid_scope", "a refresh may ask only for scopes the grant holds"
                )
        if not self.store.advance_token(token.id, "live", "used"):
            if token.state == "used" or self._state(token.id) == "used":
                # A rotated refresh token came back: the family is compromised.
                self.store.revoke_grant(grant.id)
                log.warning(
                    "oauth: a rotated refresh token was presented again; its grant is revoked",
                    extra={"fields": {"client": client.id, "grant": grant.id}},
                )
            raise OAuthError("invalid_grant", "refresh token was already used or revoked")
        if grant.revoked:
            raise OAuthError("invalid_grant", "the grant was revoked")
        if token.expires_ms <= self._clock.now_ms():
            raise OAuthError("invalid_grant", "refresh token expired")
        if not await self._still_holds(grant, self._clock.now_ms()):
            raise OAuthError("invalid_grant", "what the user signed in with no longer holds")
        return self._issue(grant, with_refresh=True, scope=scope)

    def _client_credentials(self, form: Mapping[str, str], client: OAuthClient) -> dict[str, Any]:
        if client.secret_hash is None or client.system_role is None:
            raise OAuthError(
                "unauthorized_client", "this client is not registered for client_credentials"
            )
        scopes = parse_scopes(form.get("scope", "")).only("system")
        if not scopes.resources:
            raise OAuthError("invalid_scope", "client_credentials needs system/ scopes")
        grant = OAuthGrant(
            id=pkce.new_secret()[:16],
            client_id=client.id,
            role=client.system_role,
            patient=None,
            scope=" ".join(s for s in scopes.granted if s.startswith("system/")),
            label=f"client:{client.id}",
            created_ms=self._clock.now_ms(),
        )
        self.store.add_grant(grant)
        return self._issue(grant, with_refresh=False)

    def _issue(
        self, grant: OAuthGrant, *, with_refresh: bool, scope: str | None = None
    ) -> dict[str, Any]:
        """An access token (of ``scope``, narrower than the grant's; ``None``: all of it)
        and, ``with_refresh``, a refresh token of the whole grant."""
        now = self._clock.now_ms()
        if scope == grant.scope:
            scope = None
        access = self._new_token(grant, "mla", now + ACCESS_TTL_MS, scope=scope)
        answer: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": ACCESS_TTL_MS // 1000,
            "scope": grant.scope if scope is None else scope,
        }
        if grant.role == "patient" and grant.patient is not None:
            answer["patient"] = grant.patient
        if with_refresh:
            answer["refresh_token"] = self._new_token(grant, "mlr", now + REFRESH_TTL_MS)
        self.store.forget_expired(now_ms=now, retain_ms=_RETENTION_MS)
        return answer

    def _new_token(
        self, grant: OAuthGrant, prefix: str, expires_ms: int, *, scope: str | None = None
    ) -> str:
        token_id, secret = secrets.token_hex(12), pkce.new_secret()
        self.store.add_token(
            OAuthToken(
                id=token_id,
                kind="access" if prefix == "mla" else "refresh",
                grant=grant.id,
                secret_hash=pkce.secret_hash(secret),
                expires_ms=expires_ms,
                scope=scope,
            )
        )
        return f"{prefix}_{token_id}_{secret}"

    def _state(self, token_id: str) -> str | None:
        token = self.store.token(token_id)
        return None if token is None else token.state

    def _lookup(self, presented: str, prefix: str) -> tuple[OAuthToken | None, OAuthGrant | None]:
        """The stored token ``presented`` is (its secret checked) and its grant."""
        match = _TOKEN.match(presented.strip())
        if match is None or match.group(1) != prefix:
            return None, None
        token = self.store.token(match.group(2))
        if token is None or not hmac.compare_digest(
            token.secret_hash, pkce.secret_hash(match.group(3))
        ):
            return None, None
        # The prefix is text the caller chose: the stored kind decides. Otherwise an access
        # token re-prefixed ``mlr_`` would refresh (a one-hour leak becomes lasting access),
        # and a refresh token re-prefixed ``mla_`` would be a bearer token.
        if token.kind != ("access" if prefix == "mla" else "refresh"):
            return None, None
        return token, self.store.grant(token.grant)

    # -- using and revoking tokens ---------------------------------------------------------------

    async def _still_holds(self, grant: OAuthGrant, now_ms: int) -> bool:
        """Whether what the user signed in with still stands; if not, the grant is revoked.

        A patient's key must still be bound to that Patient (a rotation or a
        break-glass re-binding ends the grants of the old key); a staff API
        token must still be valid, with the same role (revoking it ends them).
        """
        kind, _, ident = grant.label.partition(":")
        if kind == "key":
            holds = await self._patient_of_key(ident) == grant.patient
        elif kind == "token":
            info = self._tokens.current(ident, now_ms=now_ms)
            holds = info is not None and (info.role, info.patient) == (grant.role, grant.patient)
        else:
            holds = kind == "client"  # client_credentials: the client is registered for good
        if not holds:
            self.store.revoke_grant(grant.id)
            log.warning(
                "oauth: a grant ended because its sign-in no longer holds",
                extra={"fields": {"client": grant.client_id, "grant": grant.id}},
            )
        return holds

    async def check_access(self, presented: str, *, now_ms: int) -> TokenInfo:
        """Who a valid access token speaks for; ``InvalidInput`` for anything else.

        Besides the token itself, what the user signed in with must still hold
        (:meth:`_still_holds`), so a revoked API token or a re-bound patient key
        ends the access at once, not when the access token expires.
        """
        token, grant = self._lookup(presented, "mla")
        if token is None or grant is None:
            raise InvalidInput("unknown token")
        if token.state != "live" or grant.revoked:
            raise InvalidInput("token was revoked")
        if now_ms >= token.expires_ms:
            raise InvalidInput("token expired")
        if grant.role not in ROLES:  # a row not written by this code
            raise InvalidInput("unknown token")
        if not await self._still_holds(grant, now_ms):
            raise InvalidInput("token was revoked")
        return TokenInfo(
            id=token.id,
            role=grant.role,
            patient=grant.patient,
            label=f"oauth:{grant.client_id}",
            expires_ms=token.expires_ms,
            revoked=False,
            # A refresh may have asked for less than the grant: the token's own scope.
            scopes=parse_scopes(grant.scope if token.scope is None else token.scope).granted,
            principal=_principal_of(grant),
        )

    def revoke(self, presented: str, client: OAuthClient) -> None:
        """RFC 7009: revoke a token of ``client`` (a refresh token: its whole grant).

        Unknown tokens and tokens of other clients change nothing and are not
        reported (§2.2: the answer is 200 either way).
        """
        for prefix in ("mlr", "mla"):
            token, grant = self._lookup(presented, prefix)
            if token is None or grant is None or grant.client_id != client.id:
                continue
            if prefix == "mlr":
                self.store.revoke_grant(grant.id)
            else:
                self.store.advance_token(token.id, "live", "revoked")
            return

    @staticmethod
    def scopes_of(info: TokenInfo) -> ScopeSet | None:
        """The scopes an access token carries (``None``: a plain API token)."""
        return None if info.scopes is None else parse_scopes(" ".join(info.scopes))


def _principal_of(grant: OAuthGrant) -> str:
    """Who owns what a grant's tokens start: the client for client_credentials (a new
    grant every hour), else the sign-in's grant (its tokens change at every refresh)."""
    kind, _, ident = grant.label.partition(":")
    return f"oauth-client:{ident}" if kind == "client" else f"oauth-grant:{grant.id}"
