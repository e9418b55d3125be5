"""SMART on FHIR over HTTP: discovery, the sign-in pages, the token and revocation endpoints.

* ``GET /.well-known/smart-configuration`` (also under the FHIR base,
  ``/fhir/.well-known/smart-configuration``) — SMART App Launch 2.x discovery.
* ``GET /oauth/authorize`` — checks the authorization request and shows the
  sign-in page (server-rendered from ``oauth_pages/``; the only script is
  ``/oauth/static/signin.js``: the CSP is ``default-src 'self'``).
* ``POST /oauth/authorize/patient`` and ``/oauth/authorize/staff`` — sign
  in (a patient's signature over the challenge, or a staff API token); answer
  the approval page.
* ``POST /oauth/authorize/decision`` — approve or deny; 303 to the client's
  redirect URI with a code (or ``error=access_denied``) and ``state``.
* ``POST /oauth/token`` (authorization_code, refresh_token,
  client_credentials) and ``POST /oauth/revoke`` (RFC 7009).

Every form carries a CSRF token that must equal the one in the sign-in
step's cookie (``HttpOnly``, ``SameSite=Strict``, path ``/oauth``) and the
hash stored with the step. Errors of the token and revocation endpoints are
RFC 6749 JSON (``{"error", "error_description"}``), not OperationOutcomes:
that is what OAuth clients read. Refused sign-ins, unknown clients and bad
codes or refresh tokens count against the failed-authentication budget
(``api.auth``) and are logged without any secret.

These routes are not in ``/openapi.json``: that document describes the FHIR
and chain API, whose every error is an OperationOutcome; the authorization
server is described where OAuth clients look, ``/.well-known/smart-configuration``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import html
import logging
from importlib import resources
from string import Template
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from medledger.api.deps import services_of
from medledger.core.errors import InvalidInput, OAuthError, RateLimited
from medledger.services.oauth.pkce import CHALLENGE_METHODS
from medledger.services.oauth.scopes import parse_scopes
from medledger.services.oauth.server import AuthorizationServer, SignIn

__all__ = [
    "SCOPES_SUPPORTED",
    "discovery_router",
    "oauth_uris_extension",
    "public_url",
    "router",
]

log = logging.getLogger(__name__)
router = APIRouter(tags=["SMART on FHIR"])
#: Discovery, served at the node's root and at the FHIR base (SMART App Launch: "appending
#: /.well-known/smart-configuration to their base URL"); included before the FHIR routes,
#: whose ``/fhir/{type}/{id}`` would otherwise take the second.
discovery_router = APIRouter(tags=["SMART on FHIR"])

SCOPES_SUPPORTED: Final = (
    "launch/patient",
    "offline_access",
    "patient/*.read",
    "patient/*.rs",
    "patient/*.write",
    "patient/Consent.write",
    "user/*.read",
    "user/*.rs",
    "user/*.write",
    "system/*.read",
    "system/*.rs",
)
#: The sign-in pages may load this node's own script and style sheet, nothing else.
_PAGE_CSP: Final = "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
_FORM_MAX: Final = 16 * 1024
_STATIC: Final = {
    "signin.js": "text/javascript; charset=utf-8",
    "oauth.css": "text/css; charset=utf-8",
}
_COOKIE = "ml_oauth_csrf"
_ACTIONS: Final = {
    "c": "create",
    "r": "read",
    "u": "update",
    "d": "delete",
    "s": "search",
}


def _page(name: str) -> str:
    return resources.files("medledger.api").joinpath("oauth_pages", name).read_text("utf-8")


def public_url(request: Request) -> str | None:
    """Where clients reach this node, from its configuration (``config.public_base_url``).

    Never ``request.base_url``: that is the request's ``Host`` header, chosen by
    whoever sends it, and would let them pick the issuer, the endpoints, the
    ``aud`` accepted and the portal's redirect URI this node prints.
    """
    return services_of(request.app).public_url


def oauth_uris_extension(base: str) -> dict[str, Any]:
    """The CapabilityStatement's SMART security extension (``oauth-uris``)."""
    return {
        "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
        "extension": [
            {"url": "authorize", "valueUri": f"{base}/oauth/authorize"},
            {"url": "token", "valueUri": f"{base}/oauth/token"},
            {"url": "revoke", "valueUri": f"{base}/oauth/revoke"},
        ],
    }


_NO_PUBLIC_URL: Final = (
    "this node does not know its public URL, so it offers no sign-in: set advertise in"
    " node.toml (node init --advertise) or listen on a named address"
)


def _server(request: Request) -> AuthorizationServer:
    services = services_of(request.app)
    if services.oauth is None:
        if services.public_url is None:
            raise OAuthError("temporarily_unavailable", _NO_PUBLIC_URL)
        raise OAuthError("temporarily_unavailable", "this node has no authorization server")
    return services.oauth


def _html(body: str, *, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    return HTMLResponse(
        body,
        status_code=status,
        headers={
            "Content-Security-Policy": _PAGE_CSP,
            "Cache-Control": "no-store",
            **(headers or {}),
        },
    )


def _scope_items(scopes: tuple[str, ...]) -> str:
    items = []
    for text in scopes:
        parsed = parse_scopes(text)
        if parsed.resources:
            scope = parsed.resources[0]
            what = "every kind of record" if scope.resource_type == "*" else scope.resource_type
            actions = ", ".join(_ACTIONS[a] for a in "cruds" if a in scope.actions)
            whose = {"patient": "your", "user": "any patient's", "system": "any"}[scope.context]
            meaning = f"{actions} — {whose} {what}"
        elif text == "offline_access":
            meaning = "stay signed in (refresh tokens, until you revoke them)"
        elif text == "launch/patient":
            meaning = "know which patient you are"
        else:
            meaning = "keep a session while you use it"
        items.append(f"<li><code>{html.escape(text)}</code>: {html.escape(meaning)}</li>")
    return "".join(items)


def _error_page(request: Request, message: str, status: int = 400) -> HTMLResponse:
    institution = services_of(request.app).node.config.institution
    body = Template(_page("error.html")).substitute(
        institution=html.escape(institution), message=html.escape(message)
    )
    return _html(body, status=status)


def _throttled_page(request: Request, exc: RateLimited) -> HTMLResponse:
    page = _error_page(request, str(exc), status=429)
    page.headers["Retry-After"] = str(max(1, -(-exc.retry_after_ms // 1000)))
    return page


def _redirect_error(request: Request, exc: OAuthError) -> Response:
    params: dict[str, str] = {"error": exc.error, "error_description": str(exc)}
    if exc.state:
        params["state"] = exc.state
    params["iss"] = _server(request).base_url  # RFC 9207, as on a code
    uri = str(exc.redirect_uri)
    return RedirectResponse(
        uri + ("&" if urlsplit(uri).query else "?") + urlencode(params), status_code=303
    )


async def _form(request: Request) -> dict[str, str]:
    """A ``application/x-www-form-urlencoded`` body; parameters may not repeat (RFC 6749 §3.1)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "the body must be application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _FORM_MAX:
            raise OAuthError("invalid_request", "the form is too large")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise OAuthError("invalid_request", "the form is not valid UTF-8") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise OAuthError("invalid_request", f"parameter {name!r} is given more than once")
        form[name] = value
    return form


async def _charge(request: Request, what: str, reason: str, **fields: str) -> None:
    """Log a refused credential (no secrets) and charge the client's failure budget."""
    log.warning("oauth: %s refused: %s", what, reason, extra={"fields": fields})
    await services_of(request.app).auth_failures.charge(request)


# -- discovery ------------------------------------------------------------------------------


@discovery_router.get("/.well-known/smart-configuration", include_in_schema=False)
@discovery_router.get("/fhir/.well-known/smart-configuration", include_in_schema=False)
async def smart_configuration(request: Request) -> Response:
    base = public_url(request)
    if base is None:
        return JSONResponse(
            {"error": "temporarily_unavailable", "error_description": _NO_PUBLIC_URL},
            status_code=404,
            headers={"Cache-Control": "no-store"},
        )
    return JSONResponse(
        {
            "issuer": base,
            "authorization_endpoint": f"{base}/oauth/authorize",
            "token_endpoint": f"{base}/oauth/token",
            "revocation_endpoint": f"{base}/oauth/revoke",
            "token_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "client_secret_post",
                "none",
            ],
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
            "response_types_supported": ["code"],
            "scopes_supported": list(SCOPES_SUPPORTED),
            "code_challenge_methods_supported": list(CHALLENGE_METHODS),
            "authorization_response_iss_parameter_supported": True,
            "capabilities": [
                "launch-standalone",
                "client-public",
                "client-confidential-symmetric",
                "context-standalone-patient",
                "permission-patient",
                "permission-user",
                "permission-offline",
                "permission-v1",
                "permission-v2",
            ],
        },
        headers={"Cache-Control": "no-store"},
    )


# -- the browser's part ------------------------------------------------------------------------


@router.get("/oauth/static/{name}", include_in_schema=False)
async def static(name: str) -> Response:
    if name not in _STATIC:
        return Response(status_code=404)
    return Response(
        _page(name),
        media_type=_STATIC[name],
        headers={"Cache-Control": "no-cache", "Content-Security-Policy": "default-src 'none'"},
    )


def _signin_page(request: Request, signin: SignIn) -> HTMLResponse:
    institution = services_of(request.app).node.config.institution
    body = Template(_page("signin.html")).substitute(
        institution=html.escape(institution),
        client_name=html.escape(signin.client_name),
        scopes=_scope_items(signin.scopes),
        step=html.escape(signin.step),
        csrf=html.escape(signin.csrf),
        message=html.escape(signin.message),
    )
    response = _html(body)
    response.set_cookie(
        f"{_COOKIE}_{signin.step}",
        signin.csrf,
        max_age=600,
        path="/oauth",
        # The node's scheme, not the request's: with API workers the request reached
        # this process over a Unix socket as plain HTTP, yet the browser used HTTPS.
        secure=urlsplit(_server(request).base_url).scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


def _approve_page(request: Request, signin: SignIn) -> HTMLResponse:
    institution = services_of(request.app).node.config.institution
    who = "a patient" if signin.role == "patient" else f"staff ({signin.role})"
    body = Template(_page("approve.html")).substitute(
        institution=html.escape(institution),
        client_name=html.escape(signin.client_name),
        who=html.escape(who),
        scopes=_scope_items(signin.scopes),
        step=html.escape(signin.step),
        csrf=html.escape(signin.csrf),
    )
    return _html(body)


@router.get("/oauth/authorize", include_in_schema=False)
async def authorize(request: Request) -> Response:
    params: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name in params:
            return _error_page(request, f"parameter {name!r} is given more than once")
        params[name] = value
    opens = services_of(request.app).sign_in_opens
    try:
        server = _server(request)
        if opens is not None:
            await opens.charge(request)
        signin = server.begin(params)
    except RateLimited as exc:
        return _throttled_page(request, exc)
    except OAuthError as exc:
        if exc.redirect_uri is not None:
            return _redirect_error(request, exc)
        return _error_page(request, str(exc))
    return _signin_page(request, signin)


def _csrf(request: Request, form: dict[str, str]) -> tuple[str, str]:
    """The step id and CSRF token of a posted form, which must equal the step's cookie."""
    step, csrf = form.get("step", ""), form.get("csrf", "")
    cookie = request.cookies.get(f"{_COOKIE}_{step}", "")
    if not csrf or not hmac.compare_digest(unquote(cookie).encode(), csrf.encode()):
        raise InvalidInput("this form is not valid (missing or wrong CSRF token); start again")
    return step, csrf


async def _posted(request: Request) -> dict[str, str] | Response:
    try:
        return await _form(request)
    except OAuthError as exc:
        return _error_page(request, str(exc))


async def _signin_refused(request: Request, exc: InvalidInput) -> Response:
    if isinstance(exc, OAuthError) and exc.redirect_uri is not None:
        # The user proved who they are; the app asked for scopes they cannot have.
        log.info("oauth: sign-in ends without a grant: %s", exc)
        return _redirect_error(request, exc)
    try:
        await _charge(request, "sign-in", str(exc))
    except RateLimited as limited:
        return _throttled_page(request, limited)
    return _error_page(request, str(exc), status=400)


@router.post("/oauth/authorize/patient", include_in_schema=False)
async def sign_in_patient(request: Request) -> Response:
    form = await _posted(request)
    if isinstance(form, Response):
        return form
    try:
        step, csrf = _csrf(request, form)
        signin = await _server(request).sign_in_patient(
            step, csrf, public_key=form.get("public_key", ""), signature=form.get("signature", "")
        )
    except InvalidInput as exc:
        return await _signin_refused(request, exc)
    return _approve_page(request, signin)


@router.post("/oauth/authorize/staff", include_in_schema=False)
async def sign_in_staff(request: Request) -> Response:
    form = await _posted(request)
    if isinstance(form, Response):
        return form
    try:
        step, csrf = _csrf(request, form)
        signin = _server(request).sign_in_staff(step, csrf, api_token=form.get("api_token", ""))
    except InvalidInput as exc:
        return await _signin_refused(request, exc)
    return _approve_page(request, signin)


@router.post("/oauth/authorize/decision", include_in_schema=False)
async def decision(request: Request) -> Response:
    form = await _posted(request)
    if isinstance(form, Response):
        return form
    choice = form.get("decision", "")
    if choice not in ("approve", "deny"):
        return _error_page(request, "decision must be approve or deny")
    try:
        step, csrf = _csrf(request, form)
        location = _server(request).decide(step, csrf, approve=choice == "approve")
    except InvalidInput as exc:
        return _error_page(request, str(exc))
    response = RedirectResponse(location, status_code=303)
    response.delete_cookie(f"{_COOKIE}_{step}", path="/oauth")
    return response


# -- the client's part ------------------------------------------------------------------------


def _oauth_json(exc: OAuthError) -> Response:
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="medledger"'
    return JSONResponse(
        {"error": exc.error, "error_description": str(exc)}, status_code=exc.status, headers=headers
    )


def _client_credentials(request: Request, form: dict[str, str]) -> tuple[str, str | None]:
    """``client_secret_basic`` (Authorization header) or ``client_secret_post`` / public ``client_id``."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise OAuthError("invalid_client", "malformed Basic credentials", status=401) from None
        client_id, sep, secret = decoded.partition(":")
        if not sep or "client_secret" in form:
            raise OAuthError("invalid_client", "malformed Basic credentials", status=401)
        return unquote(client_id), unquote(secret)
    return form.get("client_id", ""), form.get("client_secret")


async def _authenticated(request: Request) -> tuple[dict[str, str], Any]:
    form = await _form(request)
    client_id, secret = _client_credentials(request, form)
    if form.get("client_id") not in (None, client_id):
        raise OAuthError("invalid_request", "client_id differs from the authenticated client")
    try:
        client = _server(request).authenticate_client(client_id, secret)
    except OAuthError as exc:
        await _charge(request, "client authentication", str(exc), client=client_id[:64])
        raise
    return form, client


@router.post("/oauth/token", include_in_schema=False)
async def token(request: Request) -> Response:
    try:
        form, client = await _authenticated(request)
        try:
            answer = await _server(request).token(form, client)
        except OAuthError as exc:
            if exc.error == "invalid_grant":
                await _charge(request, "token request", str(exc), client=client.id)
            raise
    except OAuthError as exc:
        return _oauth_json(exc)
    return JSONResponse(answer, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


@router.post("/oauth/revoke", include_in_schema=False)
async def revoke(request: Request) -> Response:
    try:
        form, client = await _authenticated(request)
        if "token" not in form:
            raise OAuthError("invalid_request", "token is required")
        _server(request).revoke(form["token"], client)
    except OAuthError as exc:
        return _oauth_json(exc)
    return Response(status_code=200, headers={"Cache-Control": "no-store"})
