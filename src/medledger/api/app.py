"""The node's HTTP application: FHIR at /fhir, chains at /chain, admin operations at /admin,
health at /healthz, /readyz and /metrics.

``create_app`` wires an opened :class:`~medledger.node.Node` and a token
store into a FastAPI app; OpenAPI is served at ``/openapi.json`` and listed
as plain HTML at ``/docs`` (``api.headers``: no scripts, nothing from a CDN).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response

from medledger import __version__
from medledger.api import (
    admin,
    bulk,
    chain,
    everything,
    fhir,
    oauth,
    peer,
    portal,
    sharing,
    verify,
)
from medledger.api.auth import AUTH_FAILURES, SIGN_IN_OPENS, AuthFailures, SignInOpens
from medledger.api.deps import (
    AppServices,
    FailureBudget,
    Services,
    always_ready,
    install_services,
)
from medledger.api.dispatch import install_path_gates
from medledger.api.errors import install_error_handlers
from medledger.api.headers import install_docs, install_headers
from medledger.api.lean_reads import install_lean_reads
from medledger.api.metrics import Counts, Metrics, install_metrics
from medledger.api.responses import fhir_response
from medledger.config import public_base_url
from medledger.core.errors import MedledgerError
from medledger.ledger.clock import Clock
from medledger.ledger.ordering.observed import ObservedOrderer
from medledger.node import Node
from medledger.services.oauth.server import AuthorizationServer
from medledger.services.ratelimit import RateLimit
from medledger.storage.ports import OAuthStore, TokenStore

__all__ = ["create_app"]


_OUTCOME = {
    "description": "Error: a FHIR OperationOutcome",
    "content": {"application/fhir+json": {"schema": {"type": "object"}}},
}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, telling the truth about errors: every error is a FHIR
    OperationOutcome (400, 401, 403, 404, 409, 410, 412, 413, 429, 503), never FastAPI's 422."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for status in ("400", "401", "403", "404"):
                    responses.setdefault(status, _OUTCOME)
        schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
        schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(
    node: Node,
    tokens: TokenStore,
    *,
    clock: Clock | None = None,
    auth_failures: RateLimit | FailureBudget = AUTH_FAILURES,
    not_ready: Callable[[], str | None] = always_ready,
    ordering: ObservedOrderer | None = None,
    oauth_store: OAuthStore | None = None,
    sign_in_opens: RateLimit = SIGN_IN_OPENS,
    metrics: Metrics | None = None,
    worker_counts: Callable[[], Counts] | None = None,
    public_url: str | None = None,
    role: Callable[[], dict[str, Any]] | None = None,
) -> FastAPI:
    """A FastAPI app serving ``node``; callers own the node's and token store's lifetime.

    ``clock``: the time token expiry and the failure budgets are read from
    (default: the node's). ``auth_failures``: the failed-authentication budget
    of each client address and token id (``api.auth``), or the budgets themselves
    (an API worker's are its parent's, ``api.auth.SharedAuthFailures``). ``not_ready`` and
    ``ordering``: the node's lifecycle, when it runs under
    :func:`medledger.lifecycle.run_node` (``api.serving`` passes them).
    ``oauth_store``: the authorization server's store (``api.oauth``; without
    it the SMART endpoints answer that there is no authorization server);
    ``sign_in_opens``: how many sign-in steps each client address may open.
    ``metrics`` and ``worker_counts``: where this app counts its answers, and the
    API workers' counts its ``/metrics`` adds (``api.metrics``, ``api.worker_metrics``).
    ``public_url``: where clients reach this node (``config.public_base_url``; default:
    node.toml's ``advertise``), the only origin the authorization server names or
    accepts; without one it offers no sign-in.
    ``role``: this host's sequencer role for ``/readyz`` (``api.failover``).
    """
    app = FastAPI(
        title=f"medledger node — {node.config.name}",
        version=__version__,
        description="FHIR R4 records on a hybrid blockchain.",
        # FastAPI's Swagger UI and ReDoc pages load their scripts from a CDN.
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
        # FastAPI's native OpenTelemetry asks the global providers on every request
        # whether anything listens (a read's largest single cost after its own work);
        # the node reports through its own /metrics and JSON logs instead.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    clock = clock or node.clock
    if public_url is None:
        public_url = public_base_url(node.config.advertise)
    install_services(
        app,
        AppServices(
            node=node,
            tokens=tokens,
            clock=clock,
            auth_failures=AuthFailures(auth_failures, clock)
            if isinstance(auth_failures, RateLimit)
            else auth_failures,
            not_ready=not_ready,
            ordering=ordering,
            oauth=None
            if oauth_store is None or public_url is None
            else AuthorizationServer(
                store=oauth_store,
                tokens=tokens,
                clock=clock,
                institution=node.config.institution,
                patient_of_key=node.enrollments.patient_id,
                base_url=public_url,
            ),
            sign_in_opens=SignInOpens(sign_in_opens, clock),
            public_url=public_url,
            role=role,
        ),
    )
    install_error_handlers(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    # Routes are matched in order, one regex each: the busiest peer endpoint first
    # (its /peer/v1 prefix overlaps nothing), then Consent and AuditEvent, which
    # must come before /fhir's generic routes because they are served from the chains.
    # The search registry and the statement built from it: loaded now (about a second)
    # rather than in the first search's or the first /metadata request's time.
    fhir.declared_search()
    app.include_router(peer.router)
    app.include_router(sharing.router)
    app.include_router(bulk.router)
    app.include_router(everything.router)
    app.include_router(oauth.discovery_router)
    app.include_router(portal.router)
    app.include_router(fhir.router)
    app.include_router(verify.router)
    app.include_router(chain.router)
    app.include_router(admin.router)
    app.include_router(oauth.router)

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> Response:
        return fhir_response({"status": "ok"}, headers={"Content-Type": "application/json"})

    @app.get("/readyz", tags=["operations"])
    async def readyz(services: Services) -> Response:
        # ``not_ready``: the lifecycle's word (``catching up`` until the consortium
        # member has replayed the order it found at start, ``stopping`` once the
        # shutdown began). ``node.health``: every background task the node needs, by
        # name; a dead one makes the node unready, and the answer says which and why.
        node = services.node
        body: dict[str, Any] = {
            "status": "ready",
            "institution": node.config.institution,
            "private_height": node.chain.head.height,
        }
        if services.role is not None:
            body.update(services.role())
        if node.consortium is not None:
            body["consortium"] = node.consortium.chain_id
            body["consortium_height"] = node.consortium.final_height
        waiting = services.not_ready()
        if waiting is not None:
            body["status"] = waiting
        # After a write failed for lack of space, a small flushed probe write (off the
        # event loop) tells whether space is back.
        await asyncio.to_thread(node.store_health.probe)
        # Searches may miss records stored under older terms until this says "current".
        body["search_index"] = await asyncio.to_thread(node.records.reindexer.status)
        problems = node.health.problems()
        # A chain store that cannot even answer its head cannot serve (off the loop:
        # a damaged or stalled disk must not stall every other request).
        try:
            await asyncio.to_thread(node.store.head_header_bytes)
        except MedledgerError:
            problems["private-chain-store"] = "the private chain store cannot be read"
        if problems:
            body["status"] = "unhealthy"
            body["problems"] = problems
        return fhir_response(
            body,
            status=200 if body["status"] == "ready" else 503,
            headers={"Content-Type": "application/json"},
        )

    install_docs(app)
    install_metrics(app, metrics, worker_counts)
    install_headers(app)  # outermost: every answer, counted or not, carries the headers
    # Last, once every route is in: a FHIR read no longer tries the eleven routers
    # before the FHIR router one route at a time (``api.dispatch``).
    install_path_gates(app)
    # First of all routes: FHIR read and vread without FastAPI's per-request machinery,
    # the same checks and answer (``api.lean_reads``, decision 0055).
    install_lean_reads(app)
    return app
