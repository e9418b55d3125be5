"""The one place where errors become HTTP responses: FHIR OperationOutcomes.

Every error the API returns is an ``OperationOutcome`` with a status code that
says what kind of failure it was; no traceback or internal detail leaks.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from medledger.api.responses import fhir_response
from medledger.core.errors import (
    Conflict,
    ConsentDenied,
    Gone,
    IntegrityError,
    InvalidInput,
    InvalidSignature,
    KeyStoreError,
    MedledgerError,
    NotFound,
    OrderingError,
    PreconditionFailed,
    RateLimited,
    RecordDamaged,
    RetryableStorageError,
    StorageError,
    StorageFull,
    VerificationError,
)
from medledger.services.fhir import FhirInvalid, Issue, operation_outcome

__all__ = [
    "CLIENT_CLOSED",
    "Forbidden",
    "NotAcceptable",
    "TooLarge",
    "Unauthorized",
    "UnexpectedErrorMiddleware",
    "UnsupportedMediaType",
    "error_outcome",
    "install_error_handlers",
    "outcome_response",
]

#: The status a request is counted with when its client went away before it was
#: answered (nginx's convention; it is never sent, there is no one to send it to).
CLIENT_CLOSED = 499

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger(__name__)


class Unauthorized(MedledgerError):
    """No valid bearer token (HTTP 401)."""


class Forbidden(MedledgerError):
    """The token's role may not do this (HTTP 403)."""


class TooLarge(InvalidInput):
    """The request body exceeds the limit (HTTP 413)."""


class NotAcceptable(InvalidInput):
    """The client accepts no format the server writes (HTTP 406): FHIR XML, say."""


class UnsupportedMediaType(InvalidInput):
    """The request body is in a format the server does not read (HTTP 415)."""


# Most specific first.
_STATUS: tuple[tuple[type[BaseException], int, str], ...] = (
    (RateLimited, 429, "throttled"),
    (Unauthorized, 401, "login"),
    (Forbidden, 403, "forbidden"),
    (ConsentDenied, 403, "forbidden"),
    (TooLarge, 413, "too-costly"),
    (NotAcceptable, 406, "not-supported"),
    (UnsupportedMediaType, 415, "not-supported"),
    (Gone, 410, "deleted"),
    (NotFound, 404, "not-found"),
    (PreconditionFailed, 412, "conflict"),
    (Conflict, 409, "conflict"),
    (FhirInvalid, 400, "invalid"),
    (InvalidInput, 400, "invalid"),
    (InvalidSignature, 403, "security"),
    # Acknowledged data lost or altered: a server fault, never "not found".
    (RecordDamaged, 500, "exception"),
    (IntegrityError, 500, "exception"),
    (VerificationError, 500, "exception"),
    (StorageFull, 507, "exception"),
    (RetryableStorageError, 503, "transient"),
    (StorageError, 503, "exception"),
    (OrderingError, 503, "transient"),
    (KeyStoreError, 500, "security"),
    (MedledgerError, 500, "exception"),
)


def outcome_response(
    status: int, issues: list[Issue] | tuple[Issue, ...], headers: dict[str, str] | None = None
) -> Response:
    return fhir_response(operation_outcome(issues), status=status, headers=headers)


def error_outcome(exc: MedledgerError) -> tuple[int, dict[str, Any]]:
    """The status and OperationOutcome ``exc`` answers with (a batch entry's answer)."""
    for cls, status, code in _STATUS:
        if isinstance(exc, cls):
            if isinstance(exc, FhirInvalid):
                return status, operation_outcome(exc.issues)
            issue = Issue(severity="error", code=code, diagnostics=str(exc))
            return status, operation_outcome([issue])
    raise AssertionError("unreachable: MedledgerError is in the table")


def _for(exc: MedledgerError) -> Response:
    for cls, status, code in _STATUS:
        if isinstance(exc, cls):
            if isinstance(exc, FhirInvalid):
                return outcome_response(status, exc.issues)
            if status >= 500:
                log.error("request failed: %s: %s", type(exc).__name__, exc)
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            if isinstance(exc, RateLimited):
                # Whole seconds (RFC 9110 §10.2.3), rounded up so a client that waits is let in.
                headers = {"Retry-After": str(max(1, -(-exc.retry_after_ms // 1000)))}
            return outcome_response(
                status, [Issue(severity="error", code=code, diagnostics=str(exc))], headers
            )
    raise AssertionError("unreachable: MedledgerError is in the table")


def _allowed_methods(request: Request) -> list[str]:
    """Every method served at this path, from the app's own OpenAPI description."""
    path = request.url.path
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            methods.update(m.upper() for m in operations)
    if "GET" in methods:
        methods.add("HEAD")  # api.headers answers HEAD wherever GET is served
    return sorted(methods)


def _internal_error() -> Response:
    return outcome_response(
        500, [Issue(severity="fatal", code="exception", diagnostics="internal error")]
    )


def _log_unexpected(scope: Scope) -> None:
    # The route template, never the path: a path can carry a resource id.
    template = getattr(scope.get("route"), "path", "?")
    log.exception("unexpected error on %s %s", scope.get("method", "?"), template)


class UnexpectedErrorMiddleware:
    """Answers an unexpected exception with a 500 OperationOutcome, logged once.

    Starlette's own last-resort handler answers too, but then re-raises to the
    server, which logs the error a second time and drops the keep-alive
    connection. Here the exception ends with the answer. An exception after
    the response has started cannot be answered any more: it propagates, and
    the server closes the connection (the client sees a truncated response).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if started:
                raise
            _log_unexpected(scope)
            await _internal_error()(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Map every error (ours, FastAPI's, Starlette's, unexpected) to an OperationOutcome.

    A client that disconnects before its request was read is not an error of
    ours: it is logged at debug level and counted with status 499.
    """

    async def medledger_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, MedledgerError)
        return _for(exc)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        issues = [
            Issue(
                severity="error",
                code="invalid",
                diagnostics=str(e.get("msg", "invalid")),
                expression=(".".join(str(p) for p in e.get("loc", ())),),
            )
            for e in exc.errors()[:20]
        ]
        return outcome_response(
            400, issues or [Issue(severity="error", code="invalid", diagnostics="invalid request")]
        )

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
        issue = Issue(severity="error", code=code, diagnostics=str(exc.detail))
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return outcome_response(exc.status_code, [issue], headers)

    async def client_gone(request: Request, exc: Exception) -> Response:
        # Nothing is sent (there is no one to send it to); the status is what /metrics
        # counts: 408 if the server closed the connection because the body was late.
        log.debug("client disconnected before its request was read")
        timed_out = request.scope.get("medledger.timed_out", False)
        return Response(status_code=408 if timed_out else CLIENT_CLOSED)

    async def unexpected(request: Request, exc: Exception) -> Response:
        # Reached only from outside UnexpectedErrorMiddleware (another middleware).
        _log_unexpected(request.scope)
        return _internal_error()

    app.add_exception_handler(MedledgerError, medledger_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(Exception, unexpected)
    app.add_middleware(UnexpectedErrorMiddleware)
