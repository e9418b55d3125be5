"""The node's HTTP application: FHIR at /fhir, chains at /chain, health at /healthz.

``create_app`` wires an opened :class:`~medledger.node.Node` and a token
store into a FastAPI app; OpenAPI is served at ``/docs``.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import Response

from medledger import __version__
from medledger.api import chain, fhir
from medledger.api.errors import install_error_handlers
from medledger.api.responses import fhir_response
from medledger.ledger.clock import Clock, SystemClock
from medledger.node import Node
from medledger.storage.tokens import TokenStore

__all__ = ["create_app"]


def create_app(node: Node, tokens: TokenStore, *, clock: Clock | None = None) -> FastAPI:
    """A FastAPI app serving ``node``; callers own the node's and token store's lifetime."""
    app = FastAPI(
        title=f"medledger node — {node.config.name}",
        version=__version__,
        description="FHIR R4 records on a hybrid blockchain.",
    )
    app.state.node = node
    app.state.tokens = tokens
    app.state.clock = clock or SystemClock()
    install_error_handlers(app)
    app.include_router(fhir.router)
    app.include_router(chain.router)

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> Response:
        return fhir_response({"status": "ok"}, headers={"Content-Type": "application/json"})

    @app.get("/readyz", tags=["operations"])
    async def readyz() -> Response:
        head = node.chain.head
        return fhir_response(
            {"status": "ready", "private_height": head.height},
            headers={"Content-Type": "application/json"},
        )

    return app
