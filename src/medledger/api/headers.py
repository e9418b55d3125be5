"""Response headers every answer carries, ``HEAD`` for every ``GET``, and a script-free /docs.

* ``Cache-Control: no-store`` — FHIR answers carry PHI and must not stay in
  any cache (browser, proxy); a route may set its own value instead.
* ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``,
  ``Referrer-Policy: no-referrer`` and a ``Content-Security-Policy`` that
  allows nothing to load: a JSON answer shown in a browser runs nothing.
* ``HEAD`` is answered as the ``GET`` of the same URL without its body (RFC
  9110 §9.3.2), with the same checks and the same audit entry: a ``HEAD`` of
  a record tells whether it exists and its version, so it is a read.
* ``/docs`` is a plain HTML list of the OpenAPI operations rendered here,
  with no script and nothing fetched from elsewhere (the interactive pages
  FastAPI offers load their code from a CDN, which would let that CDN run
  code next to a clinician's bearer token).
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

__all__ = ["SECURITY_HEADERS", "SecurityHeadersMiddleware", "install_docs", "install_headers"]

#: Added to every answer unless the route set the header itself.
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class SecurityHeadersMiddleware:
    """Adds :data:`SECURITY_HEADERS` to every HTTP answer and serves ``HEAD`` as ``GET``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = scope.get("method") == "HEAD"

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(h for h in SECURITY_HEADERS if h[0] not in present)
                message = {**message, "headers": headers}
            elif head and message["type"] == "http.response.body":
                # Content-Length stays the GET's; the body is not sent.
                message = {**message, "body": b""}
            await send(message)

        if head:
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, guarded_send)


def _docs_page(app: FastAPI) -> str:
    document = app.openapi()
    rows = []
    for path, operations in sorted(document.get("paths", {}).items()):
        for method, operation in operations.items():
            rows.append(
                "<tr><td><code>{}</code></td><td><code>{}</code></td><td>{}</td></tr>".format(
                    html.escape(method.upper()),
                    html.escape(path),
                    html.escape(str(operation.get("summary", ""))),
                )
            )
    title = html.escape(str(document.get("info", {}).get("title", "medledger")))
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{title}</title></head><body><h1>{title}</h1>"
        '<p>The machine-readable description is <a href="/openapi.json">/openapi.json</a>; '
        "every error is a FHIR OperationOutcome.</p>"
        "<table><thead><tr><th>method</th><th>path</th><th>what</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></body></html>"
    )


def install_docs(app: FastAPI) -> None:
    """Serve ``GET /docs``: the API's operations as plain HTML (no scripts, nothing remote)."""

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> Response:
        return HTMLResponse(_docs_page(request.app))


def install_headers(app: FastAPI) -> None:
    """Add :class:`SecurityHeadersMiddleware` (call last: it must wrap every other layer)."""
    app.add_middleware(SecurityHeadersMiddleware)
