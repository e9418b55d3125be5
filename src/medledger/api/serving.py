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

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from medledger.api import fhir
from medledger.api.app import create_app
from medledger.api.auth import AUTH_FAILURES, AuthFailures
from medledger.api.failover import (
    DEFAULT_LINK,
    Election,
    dup_listener,
    elected,
    open_lease,
    parse_link_address,
    serve_standby,
)
from medledger.api.server import GracefulServer, HttpLimits, server_config
from medledger.api.worker_metrics import WorkerCounters
from medledger.api.workers import (
    API_SOCKET,
    WorkerPool,
    WorkerSettings,
    fork_workers,
    trust_forwarded,
)
from medledger.config import load_config, public_base_url
from medledger.core.errors import InvalidInput
from medledger.lifecycle import NodeRuntime, RunSettings, run_node
from medledger.services.fhir import validate_resource
from medledger.services.ratelimit import RateLimit
from medledger.services.sequencer_link import SOCKET_NAME as SEQUENCER_SOCKET
from medledger.services.sequencer_link import SequencerServer

__all__ = ["GracefulServer", "NodeServer"]

log = logging.getLogger("medledger.node")


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
    #: The uvicorn server, once the node opened (with workers: the parent's, on its
    #: Unix socket for the requests the workers forward).
    http_server: GracefulServer | None = None
    #: API worker processes (``node start --workers``); 1 serves in this process alone.
    workers: int = 1
    #: The worker processes, while serving with ``workers`` > 1.
    pool: WorkerPool | None = None
    #: The workers' shared counters, while serving with ``workers`` > 1 (``/metrics``).
    worker_counters: WorkerCounters | None = None
    #: With a PostgreSQL store, where this host's sequencer link listens once it is the
    #: active host (``HOST:PORT``, port 0: any; published for the standbys, ``api.failover``).
    sequencer_link: str = DEFAULT_LINK
    #: This host's side of the sequencer election (PostgreSQL store), once serving.
    election: Election | None = None
    _listener: socket.socket | None = None
    _forked: list[Any] = field(default_factory=list)
    _stop_standby: Callable[[], None] | None = None
    _stop_requested: bool = False

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

    def public_url(self, advertise: str) -> str | None:
        """Where clients reach this node: node.toml's ``advertise``, else the address it
        listens on unless that is a wildcard (``config.public_base_url``)."""
        if self.sockets:
            host, port = self.sockets[0].getsockname()[:2]
        else:
            host, port = self.host, self.port
        scheme = "http" if self.plain_http else "https"
        return public_base_url(advertise, scheme=scheme, host=host, port=port)

    def _say_public_url(self, public_url: str | None) -> None:
        if public_url is None:
            log.warning(
                "no sign-in service: node.toml has no advertise URL and the node listens on"
                " a wildcard address, so it cannot name itself to apps (node init --advertise)"
            )

    def stop(self) -> None:
        """Begin the shutdown (on the serving event loop): readiness false, stop accepting."""
        self._stop_requested = True
        if self._stop_standby is not None:
            self._stop_standby()
        if self.runtime is not None:
            self.runtime.stop()
        if self.http_server is not None and self.workers == 1:
            # With workers, the parent's server stops after them (``_serve_with_workers``).
            self.http_server.should_exit = True

    def prefork(self) -> None:
        """With workers: bind the socket and fork the workers now, before the event loop.

        Only from a process that runs no thread yet (``node start`` calls it right
        after reading its options): the workers then start with every module
        loaded and the FHIR models warm. Without it, :meth:`serve` starts them as
        new processes (slower: each imports everything again).
        """
        if self.workers <= 1 or self._listener is not None:
            return
        # Loaded before the fork, so that no worker pays for it (seconds each on a busy host).
        fhir.declared_search()
        validate_resource({"resourceType": "Patient"})
        listener = self.sockets[0] if self.sockets else _bind(self.host, self.port)
        self._listener = listener
        self.worker_counters = counters = WorkerCounters.create(self.workers)
        pool_settings = WorkerSettings(
            public_url=self.public_url(load_config(self.root).advertise) or "",
            root=str(self.root),
            passphrase_hex=self.passphrase.hex(),
            fd=listener.fileno(),
            plain_http=self.plain_http,
            head_timeout_s=self.limits.head_timeout_s,
            body_timeout_s=self.limits.body_timeout_s,
            idle_timeout_s=self.limits.idle_timeout_s,
            max_head_bytes=self.limits.max_head_bytes,
            parent_pid=os.getpid(),
            metrics_fd=counters.fd,
            slots=self.workers,
        )
        self._forked = fork_workers(self.workers, pool_settings)

    async def serve(self) -> None:
        if self.workers < 1:
            raise InvalidInput("a node serves with at least one worker")
        if elected(load_config(self.root)):
            await self._serve_elected()
            return
        await self._serve_role(None)

    async def _serve_role(self, election: Election | None) -> None:
        if self.workers > 1:
            await self._serve_with_workers(election)
        else:
            await self._serve_single(election)

    async def _serve_elected(self) -> None:
        """A PostgreSQL store: active sequencer while holding the lease, else a standby that
        takes over once the active host's session ends (``api.failover``)."""
        link = parse_link_address(self.sequencer_link)
        lease = open_lease(load_config(self.root))
        self.election = election = Election(lease=lease, link=link)
        if self._listener is None:
            self._listener = self.sockets[0] if self.sockets else _bind(self.host, self.port)
        listener = self._listener
        try:
            epoch = await asyncio.to_thread(lease.try_acquire)
            if epoch is None:
                epoch = await serve_standby(
                    self.root,
                    self.passphrase,
                    election,
                    listener,
                    limits=self.limits,
                    plain_http=self.plain_http,
                    public_url=self.public_url(load_config(self.root).advertise),
                    on_server=self._standby_serving,
                )
                self._stop_standby = None
            if epoch is None or self._stop_requested:
                return
            self.settings = replace(self.settings, fence_epoch=epoch)
            await self._serve_role(election)
        finally:
            await asyncio.to_thread(lease.close)
            if not self.sockets:
                listener.close()
        if election.deposed is not None:
            raise election.deposed

    def _standby_serving(self, server: GracefulServer, stop: Callable[[], None]) -> None:
        self.http_server = server
        self._stop_standby = stop
        if self._stop_requested:
            stop()

    async def _start_link(self, election: Election, runtime: NodeRuntime) -> SequencerServer:
        """The active host's link for the standbys (and its own workers' Unix socket's server)."""
        node = runtime.node
        # Crash recovery before any other host can hand over a write.
        await node.records.ensure_recovered()
        link = SequencerServer(
            self.root / SEQUENCER_SOCKET, chain=node.writer_chain, records=node.records
        )
        try:
            await election.start_active(link, node, runtime.stop)
        except BaseException:
            await link.close()
            raise
        return link

    async def _serve_single(self, election: Election | None) -> None:
        async with run_node(self.root, self.passphrase, self.settings) as runtime:
            self.runtime = runtime
            public_url = self.public_url(runtime.node.config.advertise)
            self._say_public_url(public_url)
            self.app = app = create_app(
                runtime.node,
                runtime.tokens,
                auth_failures=self.auth_failures,
                not_ready=runtime.not_ready,
                ordering=runtime.ordering,
                oauth_store=runtime.oauth,
                public_url=public_url,
                role=None if election is None else election.readiness,
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
            link = None if election is None else await self._start_link(election, runtime)
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
            try:
                if election is not None and self._listener is not None:
                    await server.serve(sockets=[dup_listener(self._listener)])
                else:
                    await server.serve(sockets=self.sockets)
            finally:
                if election is not None:
                    await election.stop_active()
                if link is not None:
                    await link.close()

    async def _serve_with_workers(self, election: Election | None = None) -> None:
        """The parent of ``workers`` API processes: listener, sequencer, forwarded requests.

        The shutdown order: readiness false; the workers stop accepting and
        complete their requests (which may still need the sequencer and this
        process's API); then this process's API and the sequencer stop; then
        ``run_node`` commits what is queued and closes the stores.
        """
        if self._listener is None:
            self._listener = self.sockets[0] if self.sockets else _bind(self.host, self.port)
        listener = self._listener
        if self.worker_counters is None:
            self.worker_counters = WorkerCounters.create(self.workers)
        counters = self.worker_counters
        try:
            await self._serve_as_parent(listener, counters, election)
        finally:
            self.worker_counters = None
            counters.close()

    async def _serve_as_parent(
        self, listener: socket.socket, counters: WorkerCounters, election: Election | None
    ) -> None:
        async with run_node(self.root, self.passphrase, self.settings) as runtime:
            self.runtime = runtime
            node = runtime.node
            workers_ready = False

            def not_ready() -> str | None:
                # /readyz (answered here for every worker) is true only once every worker
                # accepts connections: before, a client could reach one still starting.
                waiting = runtime.not_ready()
                if waiting is None and not workers_ready:
                    return "starting API workers"
                return waiting

            # One failed-authentication budget per node: the workers spend this one.
            auth_failures = AuthFailures(self.auth_failures, node.clock)
            public_url = self.public_url(node.config.advertise)
            self._say_public_url(public_url)
            self.app = app = create_app(
                node,
                runtime.tokens,
                auth_failures=auth_failures,
                not_ready=not_ready,
                ordering=runtime.ordering,
                oauth_store=runtime.oauth,
                # /metrics is answered here for every worker: their counts join this one's.
                worker_counts=counters.counts,
                public_url=public_url,
                role=None if election is None else election.readiness,
            )
            stopping = asyncio.Event()
            runtime.on_stop(stopping.set)
            if runtime.stopping:
                return
            # Crash recovery runs here, before any worker can hand over a write.
            await node.records.ensure_recovered()
            link = SequencerServer(
                self.root / SEQUENCER_SOCKET,
                chain=node.writer_chain,
                records=node.records,
                spend_failures=auth_failures.spend,
            )
            await link.start()
            if election is not None:
                try:
                    await election.start_active(link, node, runtime.stop)
                except BaseException:
                    await link.close()
                    raise
            api_socket = self.root / API_SOCKET
            with contextlib.suppress(FileNotFoundError):
                api_socket.unlink()  # left by a parent that was killed
            config = server_config(trust_forwarded(app), limits=self.limits, uds=str(api_socket))
            self.http_server = server = GracefulServer(config, on_exit=runtime.stop, exit_now=False)
            serving = asyncio.create_task(server.serve())
            self.pool = pool = WorkerPool(
                self.workers,
                root=self.root,
                passphrase=self.passphrase,
                listener=listener,
                limits=self.limits,
                plain_http=self.plain_http,
                forked=self._forked,
                counters=counters,
                public_url=public_url,
            )
            self._forked = []
            try:
                await pool.start()
                await pool.wait_ready()
                workers_ready = True
                log.info(
                    "serving",
                    extra={
                        "fields": {
                            "institution": node.config.institution,
                            "url": self.url,
                            "pid": os.getpid(),
                            "workers": self.workers,
                        }
                    },
                )
                stopped = asyncio.create_task(stopping.wait())
                await asyncio.wait({stopped, serving}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
            finally:
                await pool.stop()
                server.should_exit = True
                with contextlib.suppress(Exception):
                    await serving
                if election is not None:
                    await election.stop_active()
                await link.close()
                with contextlib.suppress(FileNotFoundError):
                    api_socket.unlink()
                if not self.sockets:
                    listener.close()


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket the workers share (bound here, before any worker starts)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        # Not listening yet: the first worker to start serving listens (uvicorn does), so
        # until one can answer, connections are refused rather than left waiting.
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise InvalidInput(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    sock.set_inheritable(True)
    return sock
