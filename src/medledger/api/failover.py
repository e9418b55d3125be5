"""One institution on several hosts: the sequencer elected through PostgreSQL (decision 0050).

With ``store = "postgres"`` every ``node start`` of an institution (one per
host, each with a copy of the node directory) competes for the sequencer
lease (``storage.postgres.lease``):

* the **active** host holds it: it is the one writer of the private chain
  and the record index (its chain store fenced with the lease's epoch), runs
  the consortium member, and serves the standbys' writes on a TCP link with
  mutual TLS pinned to the institution's own certificate, whose address it
  publishes in the lease row;
* a **standby** host serves what an API worker serves (reads, searches,
  creates, updates, deletes of one resource: ``api.workers.serves_locally``),
  hands its writes to the active host over that link, answers everything
  else with 503 naming the active host, and polls the lease every
  :data:`POLL_S`; once the active host's PostgreSQL session ended (it died),
  it takes the lease and becomes active, running the ordinary crash recovery.

``/readyz`` says which role a host has and where the active one is; a
standby whose link is down is ``unhealthy`` with the ``private-sequencer``
problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medledger.api.app import create_app
from medledger.api.errors import outcome_response
from medledger.api.headers import SecurityHeadersMiddleware
from medledger.api.server import GracefulServer, HttpLimits, server_config
from medledger.api.workers import Receive, Scope, Send, serves_locally
from medledger.config import NodeConfig, NodePaths
from medledger.core.errors import Deposed, InvalidInput, MedledgerError
from medledger.node import Node, open_oauth_store, open_token_store, open_worker_node
from medledger.services.fhir import Issue
from medledger.services.sequencer_link import SequencerClient, SequencerServer, tcp_dialer
from medledger.services.tls import link_contexts, load_certificate
from medledger.storage import factory
from medledger.storage.ports import OAuthStore

if TYPE_CHECKING:
    from medledger.storage.postgres.lease import SequencerLease

__all__ = [
    "DEFAULT_LINK",
    "POLL_S",
    "Election",
    "StandbyApp",
    "dup_listener",
    "elected",
    "open_lease",
    "parse_link_address",
    "serve_standby",
]

log = logging.getLogger("medledger.node")

#: How often a standby looks whether the lease is free, and the active host whether it
#: still holds it.
POLL_S = 0.5
#: Where the active host's link listens unless told (one machine; give a routable address
#: for several hosts: ``node start --sequencer-link HOST:PORT``).
DEFAULT_LINK = "127.0.0.1:0"
#: The paths a standby answers itself besides the API worker's.
_STANDBY_OWN = frozenset({"/readyz", "/metrics"})


def elected(config: NodeConfig) -> bool:
    """Whether ``node start`` takes the sequencer role through PostgreSQL (a shared store)."""
    return config.storage.store == "postgres"


def parse_link_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` of the link; the host must be one the other hosts can reach."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidInput(f"the sequencer link address must be HOST:PORT, not {text!r}")
    if _unspecified(host):
        raise InvalidInput(
            "the sequencer link address is published for the other hosts: give the address"
            f" they reach this one at, not {host!r}"
        )
    return host, int(port)


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a host name
        return False


def open_lease(config: NodeConfig) -> SequencerLease:
    storage = config.storage
    return factory.open_sequencer_lease(
        storage.store, storage.dsn, schema=factory.node_schema(config.institution, "chain")
    )


@dataclass(slots=True)
class Election:
    """This host's side of the election, as ``/readyz`` shows it."""

    lease: SequencerLease
    link: tuple[str, int] = ("127.0.0.1", 0)
    role: str = "standby"
    #: The active sequencer's link address (``host:port``), once published.
    active: str | None = None
    epoch: int | None = None
    #: Set when the active host lost its lease while serving (it then stops).
    deposed: Deposed | None = None
    _watch: asyncio.Task[None] | None = field(default=None, repr=False)

    def readiness(self) -> dict[str, Any]:
        return {"role": self.role, "active": self.active, "epoch": self.epoch}

    async def start_active(
        self, link: SequencerServer, node: Node, on_deposed: Callable[[], None]
    ) -> None:
        """As the lease's holder: serve the standbys on TCP with mutual TLS, publish where,
        and watch the lease (losing it calls ``on_deposed``: the node stops)."""
        server_tls, _ = link_contexts(node.paths.tls_cert, node.paths.tls_key)
        own = load_certificate(node.paths.tls_cert).der
        host, port = self.link
        _, bound = await link.start_tcp(host, port, server_tls, own)
        address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
        await asyncio.to_thread(self.lease.publish, address)
        self.role, self.active, self.epoch = "active", address, self.lease.epoch
        log.info("active sequencer", extra={"fields": {"link": address, "epoch": self.lease.epoch}})
        self._watch = asyncio.create_task(self._hold(on_deposed), name="medledger-lease")

    async def _hold(self, on_deposed: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                await asyncio.to_thread(self.lease.check)
            except Deposed as exc:
                # The fence already refuses this process's appends; stop serving as active.
                log.error("lost the sequencer lease: stopping", extra={"fields": {}})
                self.deposed = exc
                self.role = "deposed"
                on_deposed()
                return
            except MedledgerError:
                continue

    async def stop_active(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch


class StandbyApp:
    """A standby's app: an API worker's requests and ``/readyz``/``/metrics`` are served;
    anything else (it needs the active host's own state) is 503 naming the active host."""

    def __init__(self, app: Any, election: Election) -> None:
        self.app = app
        self.state = app.state  # ``server_config`` finds the app's metrics here
        self._election = election
        self._refuse = SecurityHeadersMiddleware(self._refusal)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] in _STANDBY_OWN
            or serves_locally(
                scope["method"], scope["path"], scope.get("query_string", b""), scope["headers"]
            )
        ):
            await self.app(scope, receive, send)
            return
        await self._refuse(scope, receive, send)

    async def _refusal(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = outcome_response(
            503,
            [
                Issue(
                    severity="error",
                    code="transient",
                    diagnostics="this host is a standby of the node; send this request to the"
                    f" active host (sequencer link {self._election.active or 'not known yet'})",
                )
            ],
        )
        await response(scope, receive, send)


async def serve_standby(
    root: Path,
    passphrase: bytes,
    election: Election,
    listener: socket.socket,
    *,
    limits: HttpLimits,
    plain_http: bool,
    public_url: str | None,
    on_server: Callable[[GracefulServer, Callable[[], None]], None],
) -> int | None:
    """Serve as a standby on ``listener`` until this host takes the lease (its epoch) or
    is told to stop (None). ``public_url``: where clients reach the node (``create_app``).
    ``on_server`` is given the HTTP server and its stop callback."""
    paths = NodePaths(root=root)
    _, link_tls = link_contexts(paths.tls_cert, paths.tls_key)
    dial = tcp_dialer(lambda: election.active, link_tls, load_certificate(paths.tls_cert).der)
    node = open_worker_node(root, passphrase, dial=dial)
    chain = node.chain
    assert isinstance(chain, SequencerClient)
    try:
        tokens = open_token_store(root, node.config)
    except BaseException:
        await node.close()
        raise
    oauth: OAuthStore | None = None
    stopped = False
    acquired: int | None = None
    try:
        oauth = open_oauth_store(root, node.config)

        def not_ready() -> str | None:
            return "stopping" if stopped else None

        app = StandbyApp(
            create_app(
                node,
                tokens,
                oauth_store=oauth,
                not_ready=not_ready,
                role=election.readiness,
                public_url=public_url,
            ),
            election,
        )
        tls = None if plain_http else node.server_tls_context()

        def on_exit() -> None:
            # A signal (uvicorn then exits the server) stops this host, not only its role.
            nonlocal stopped
            stopped = True

        http = GracefulServer(server_config(app, limits=limits, ssl_context=tls), on_exit=on_exit)

        def stop() -> None:
            on_exit()
            http.should_exit = True

        on_server(http, stop)

        async def watch() -> None:
            nonlocal acquired
            while not http.should_exit:
                try:
                    epoch = await asyncio.to_thread(election.lease.try_acquire)
                    if epoch is not None:
                        acquired = epoch
                        log.info("took the sequencer lease", extra={"fields": {"epoch": epoch}})
                        http.should_exit = True
                        return
                    row = await asyncio.to_thread(election.lease.active)
                    election.active = None if row is None else row.address
                    election.epoch = None if row is None else row.epoch
                except MedledgerError as exc:
                    log.warning(
                        "cannot read the sequencer lease",
                        extra={"fields": {"exception": type(exc).__name__}},
                    )
                await chain.probe()  # so that /readyz tells whether the link is up
                await asyncio.sleep(POLL_S)

        # Where the active host is, and whether its link answers, before the first request.
        with contextlib.suppress(MedledgerError):
            row = await asyncio.to_thread(election.lease.active)
            election.active = None if row is None else row.address
            election.epoch = None if row is None else row.epoch
        await chain.probe()
        watcher = asyncio.create_task(watch(), name="medledger-standby")
        log.info("serving as a standby", extra={"fields": {"institution": node.config.institution}})
        try:
            await http.serve(sockets=[dup_listener(listener)])
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    finally:
        try:
            await node.stop()
            await node.close_stores()
        finally:
            tokens.close()
            if oauth is not None:
                oauth.close()
    return None if stopped else acquired


def dup_listener(listener: socket.socket) -> socket.socket:
    """Another descriptor of ``listener``: the server that closes it at the end of one role
    leaves the socket listening (connections wait in its backlog) for the next."""
    return socket.socket(fileno=listener.dup().detach())
