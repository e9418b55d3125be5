"""A node served over HTTP, from opening to closing: what ``node start`` runs.

:class:`NodeServer` runs :func:`medledger.lifecycle.run_node` around a uvicorn
server for the node's app. Its order, on the way down: readiness turns false
(``stopping``), uvicorn stops accepting connections and lets the requests in
flight complete, and only then does the lifecycle stop the background tasks,
commit every queued write, close the ordering connection and close the
stores. An acknowledged write is therefore durable, and no request ever runs
against a closed store. The API tests serve their nodes through the same class.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI

from medledger.api.app import create_app
from medledger.api.auth import AUTH_FAILURES
from medledger.api.server import HttpLimits, server_config
from medledger.lifecycle import NodeRuntime, RunSettings, run_node
from medledger.services.ratelimit import RateLimit

__all__ = ["GracefulServer", "NodeServer"]

log = logging.getLogger("medledger.node")


class GracefulServer(uvicorn.Server):
    """uvicorn, minus re-raising SIGTERM/SIGINT after shutdown; a signal also calls ``on_exit``.

    uvicorn restores the default handlers and re-sends the signal once it has
    stopped serving, which would kill the process before the node's queued
    writes commit and its storage closes. Here a signal only asks the server
    to exit, and ``on_exit`` turns the node's readiness false; the caller then
    closes the node. A second SIGINT still forces the exit (uvicorn's rule).
    """

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn first: a second SIGINT forces the exit only if one came before it.
        super().handle_exit(sig, frame)
        self._on_exit()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            # Only the main thread may install signal handlers (a server in a thread:
            # it is stopped by its owner, e.g. the API tests).
            yield
            return
        previous = {
            sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@dataclass(slots=True, kw_only=True)
class NodeServer:
    """Serve the node in ``root`` until :meth:`stop` (or SIGTERM/SIGINT), then close it in order.

    Listens on ``host``:``port``, or on ``sockets`` already bound (tests use a
    free port of 127.0.0.1). :meth:`serve` raises what opening the node raised,
    or the :class:`~medledger.core.errors.DamagedStore` it stopped serving
    with; it returns once everything is closed.
    """

    root: Path
    passphrase: bytes
    settings: RunSettings = field(default_factory=RunSettings)
    host: str = "127.0.0.1"
    port: int = 8700
    sockets: list[socket.socket] | None = None
    limits: HttpLimits = field(default_factory=HttpLimits)
    #: Plain HTTP instead of HTTPS with the node's certificate: ``node start
    #: --plain-http`` (loopback only, checked by the CLI) and in-process API tests.
    plain_http: bool = False
    auth_failures: RateLimit = AUTH_FAILURES
    #: Set while serving (for tests and logs); None before the node opened.
    runtime: NodeRuntime | None = None
    app: FastAPI | None = None
    #: The uvicorn server, once the node opened.
    http_server: GracefulServer | None = None

    @property
    def started(self) -> bool:
        """True once the server accepts connections."""
        return self.http_server is not None and self.http_server.started

    @property
    def url(self) -> str:
        scheme = "http" if self.plain_http else "https"
        if self.sockets:
            host, port = self.sockets[0].getsockname()[:2]
            return f"{scheme}://{host}:{port}"
        return f"{scheme}://{self.host}:{self.port}"

    def stop(self) -> None:
        """Begin the shutdown (on the serving event loop): readiness false, stop accepting."""
        if self.runtime is not None:
            self.runtime.stop()
        if self.http_server is not None:
            self.http_server.should_exit = True

    async def serve(self) -> None:
        async with run_node(self.root, self.passphrase, self.settings) as runtime:
            self.runtime = runtime
            self.app = app = create_app(
                runtime.node,
                runtime.tokens,
                auth_failures=self.auth_failures,
                not_ready=runtime.not_ready,
                ordering=runtime.ordering,
                oauth_store=runtime.oauth,
            )
            tls = None if self.plain_http else runtime.node.server_tls_context()
            config = server_config(
                app, host=self.host, port=self.port, limits=self.limits, ssl_context=tls
            )
            self.http_server = server = GracefulServer(config, on_exit=runtime.stop)

            def exit_server() -> None:
                server.should_exit = True

            runtime.on_stop(exit_server)
            if runtime.stopping:  # refused (or stopped) before the server was made
                return
            log.info(
                "serving",
                extra={
                    "fields": {
                        "institution": runtime.node.config.institution,
                        "url": self.url,
                        "pid": os.getpid(),
                    }
                },
            )
            await server.serve(sockets=self.sockets)
