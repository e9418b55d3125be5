"""API worker processes: ``node start --workers N`` (decision 0035).

The parent process opens the node as always, binds the listening socket and
is the node's **sequencer** (``services.sequencer_link``). It starts N worker
processes (``python -m medledger.api.workers``) that inherit the listening
socket; the kernel spreads connections over them.

A worker serves the hot paths itself: FHIR reads, searches and histories,
creates, updates and deletes of one resource, the private chain's read
endpoints, ``/healthz`` and the OpenAPI description (:func:`serves_locally`).
It reads straight from the stores and hands every chain transaction and record
commit to the sequencer. Everything else (Bundles, conditional writes,
operations, Consent and AuditEvent, sharing, ``/peer/v1``, ``/admin``,
``/readyz``, ``/metrics``) is forwarded unchanged to the parent's own copy of
the app on a Unix socket in the node directory, with the client's address and
verified TLS certificate in two headers only that socket trusts
(:func:`trust_forwarded`); a worker drops those headers from what its clients
send.

:class:`WorkerPool` restarts a worker that dies (one that keeps dying at
start is restarted at most once a second) and stops them all, letting their
requests in flight complete, before the parent stops its sequencer.

What stays the whole node's (decision 0047): each worker counts its answers in
its slot of the parent's shared counter region (``api.worker_metrics``), which
``/metrics`` adds up, and charges failed authentications to the parent's one
budget over the sequencer link (``api.auth.SharedAuthFailures``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from medledger.api.app import create_app
from medledger.api.auth import SharedAuthFailures
from medledger.api.errors import outcome_response
from medledger.api.headers import SecurityHeadersMiddleware
from medledger.api.metrics import Metrics
from medledger.api.server import PEER_CERT_SCOPE_KEY, GracefulServer, HttpLimits, server_config
from medledger.api.worker_metrics import WorkerCounters
from medledger.core.errors import InvalidInput, StorageError
from medledger.heap import ready_heap_for_serving
from medledger.services.fhir import Issue
from medledger.services.sequencer_link import SequencerClient

__all__ = [
    "API_SOCKET",
    "FORWARDED_CERT",
    "FORWARDED_FOR",
    "ForwardingApp",
    "WorkerPool",
    "WorkerSettings",
    "fork_workers",
    "serves_locally",
    "trust_forwarded",
]

log = logging.getLogger("medledger.node")

#: The parent's API for forwarded requests, inside the node directory (0700).
API_SOCKET = "api.sock"
#: The client's address (``host:port``) of a forwarded request.
FORWARDED_FOR = b"x-medledger-forwarded-for"
#: The client's verified TLS certificate (base64 DER) of a forwarded request, if any.
FORWARDED_CERT = b"x-medledger-forwarded-cert"
_FORWARDING_HEADERS = (FORWARDED_FOR, FORWARDED_CERT)
#: Types served from the chains and the consortium (``api.sharing``): the parent's.
_PARENT_TYPES = frozenset({"Consent", "AuditEvent"})
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"upgrade"})
#: What a worker writes on its standard output once it accepts connections.
READY = b"ready"
#: A worker that lived less than this is restarted only after a pause.
_QUICK_DEATH_S = 1.0

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def serves_locally(
    method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]]
) -> bool:
    """Whether a worker answers this request itself (module docstring); else it forwards it."""
    if "$" in path:
        return False
    parts = path.strip("/").split("/")
    if method in ("GET", "HEAD"):
        if path in ("/healthz", "/openapi.json", "/docs"):
            return True
        if parts[0] == "fhir" and len(parts) >= 2:
            return parts[1] not in _PARENT_TYPES
        return parts[0] == "chain" and len(parts) >= 3 and parts[1] == "private"
    if parts[0] != "fhir" or len(parts) < 2 or parts[1] in _PARENT_TYPES:
        return False
    if not parts[1][:1].isupper():  # "_history", "metadata", ...
        return False
    if method == "POST" and len(parts) == 2:
        return all(name.lower() != b"if-none-exist" for name, _ in headers)
    if method == "POST" and len(parts) == 3:
        return parts[2] == "_search"
    if method in ("PUT", "DELETE") and len(parts) == 3:
        return not query and not parts[2].startswith("_")
    return False


class ForwardingApp:
    """A worker's ASGI app: :func:`serves_locally` requests to ``app``, the rest to the parent."""

    def __init__(self, app: Any, parent_socket: Path) -> None:
        self.app = app
        # ``server_config`` finds the app's metrics here.
        self.state = app.state
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(parent_socket)),
            base_url="http://node",
            timeout=httpx.Timeout(300.0, connect=5.0),
        )
        self._unavailable = SecurityHeadersMiddleware(self._unavailable_answer)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # What a client claims in these headers is never passed on (only the parent's
        # socket trusts them, and only from a worker).
        headers = [(n, v) for n, v in scope["headers"] if n.lower() not in _FORWARDING_HEADERS]
        scope["headers"] = headers
        if serves_locally(scope["method"], scope["path"], scope.get("query_string", b""), headers):
            await self.app(scope, receive, send)
            return
        await self._forward(scope, receive, send, headers)

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, headers: list[tuple[bytes, bytes]]
    ) -> None:
        client = scope.get("client") or ("unknown", 0)
        out = [(n, v) for n, v in headers if n.lower() not in _HOP_BY_HOP and n.lower() != b"host"]
        out.append((FORWARDED_FOR, f"{client[0]}:{client[1]}".encode()))
        cert = scope.get(PEER_CERT_SCOPE_KEY)
        if cert:
            out.append((FORWARDED_CERT, base64.b64encode(cert)))
        query = scope.get("query_string", b"")
        target = scope.get("raw_path") or scope["path"].encode()
        if query:
            target += b"?" + query

        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return

        method = scope["method"]
        has_body = method not in ("GET", "HEAD") or any(
            n.lower() in (b"content-length", b"transfer-encoding") for n, _ in headers
        )
        request = self._client.build_request(
            method,
            target.decode("latin-1"),
            headers=out,
            content=body() if has_body else None,
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError:
            await self._unavailable(scope, receive, send)
            # Answered here, not by the parent's app: counted in this worker's metrics.
            self.state.metrics.observe_answer(503)
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (n, v) for n, v in response.headers.raw if n.lower() not in _HOP_BY_HOP
                    ],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError:
            # The answer started: the connection is cut rather than ended as if complete.
            raise ConnectionError("the node's parent process went away mid-answer") from None
        finally:
            await response.aclose()

    @staticmethod
    async def _unavailable_answer(scope: Scope, receive: Receive, send: Send) -> None:
        response = outcome_response(
            503,
            [
                Issue(
                    severity="error",
                    code="transient",
                    diagnostics="the node's sequencer is unavailable; retry the request",
                )
            ],
        )
        await response(scope, receive, send)

    async def close(self) -> None:
        await self._client.aclose()


def trust_forwarded(app: Any) -> ASGIApp:
    """The parent's app on its Unix socket: the client a worker forwarded for is the client.

    Only workers reach that socket (the node directory is owner-only, and
    ``api.server`` refuses a Unix-socket peer of another user).
    """

    async def forwarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            client: tuple[str, int] | None = None
            cert: bytes | None = None
            kept = []
            for name, value in scope["headers"]:
                lower = name.lower()
                if lower == FORWARDED_FOR:
                    host, _, port = value.decode("latin-1").rpartition(":")
                    client = (host, int(port) if port.isdigit() else 0)
                elif lower == FORWARDED_CERT:
                    cert = base64.b64decode(value, validate=True)
                else:
                    kept.append((name, value))
            scope = {**scope, "headers": kept, "client": client, PEER_CERT_SCOPE_KEY: cert}
        await app(scope, receive, send)

    forwarded.state = app.state  # type: ignore[attr-defined]
    return forwarded


# -- the pool (parent) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSettings:
    """What a worker is told: in memory when forked, else one JSON line on its standard
    input (the passphrase never appears on a command line or in the environment)."""

    root: str
    passphrase_hex: str
    fd: int
    plain_http: bool
    head_timeout_s: float
    body_timeout_s: float
    idle_timeout_s: int
    max_head_bytes: int
    parent_pid: int
    #: Where the worker writes :data:`READY` once it accepts connections.
    ready_fd: int = -1
    #: A forked worker serves only once the parent writes a byte here (after its
    #: start-up checks and crash recovery); the end of the pipe means: exit.
    go_fd: int = -1
    #: The node's shared counter region (``api.worker_metrics``) of ``slots`` slots,
    #: and this worker's slot in it (-1: none; the worker counts for itself alone).
    metrics_fd: int = -1
    slots: int = 1
    slot: int = 0
    #: Where clients reach the node (``NodeServer.public_url``; empty: unknown). The
    #: worker names the node by it, as the parent does, never by a request's Host.
    public_url: str = ""


@dataclass(slots=True)
class _Worker:
    pid: int
    ready_fd: int
    popen: subprocess.Popen[bytes] | None = None
    #: The parent's end of a forked worker's go pipe (see ``WorkerSettings.go_fd``).
    go_fd: int = -1


def fork_workers(count: int, settings: WorkerSettings) -> list[_Worker]:
    """Fork ``count`` workers from a process that runs no thread and no event loop yet.

    ``node start`` calls this (through ``NodeServer.prefork``) after its imports
    and before anything else: the children start with every module loaded and the
    FHIR models warm, in a fraction of a second instead of several each.
    """
    if threading.active_count() != 1:
        raise InvalidInput("workers are forked only from a process without threads")
    workers: list[_Worker] = []
    for slot in range(count):
        read_end, write_end = os.pipe()
        go_read, go_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(read_end)
                os.close(go_write)
                for worker in workers:
                    os.close(worker.ready_fd)
                    os.close(worker.go_fd)
                _run_worker(replace(settings, ready_fd=write_end, go_fd=go_read, slot=slot))
                code = 0
            except BaseException:
                log.exception("API worker failed")
            finally:
                os._exit(code)
        os.close(write_end)
        os.close(go_read)
        workers.append(_Worker(pid=pid, ready_fd=read_end, go_fd=go_write))
    return workers


class WorkerPool:
    """N worker processes on ``listener``, restarted when they die, stopped in order.

    Workers forked before the event loop started (:func:`fork_workers`) are adopted;
    the others, and every restart, are started as ``python -m medledger.api.workers``.
    """

    def __init__(
        self,
        count: int,
        *,
        root: Path,
        passphrase: bytes,
        listener: socket.socket,
        limits: HttpLimits,
        plain_http: bool,
        forked: list[_Worker] | None = None,
        counters: WorkerCounters | None = None,
        public_url: str | None = None,
    ) -> None:
        """``forked``: workers :func:`fork_workers` started, in slot order; ``counters``:
        the region every worker counts in, one slot each (``api.worker_metrics``)."""
        self.count = count
        self._counters = counters
        self._public_url = public_url
        self._root = root
        self._passphrase = passphrase
        self._listener = listener
        self._limits = limits
        self._plain_http = plain_http
        self._forked = list(forked or [])
        self._workers: list[_Worker | None] = [None] * count
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._ready: dict[int, asyncio.Future[bool]] = {}
        #: Workers started after one died (for tests and logs).
        self.restarts = 0
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None

    def settings(self) -> WorkerSettings:
        limits = self._limits
        return WorkerSettings(
            root=str(self._root),
            passphrase_hex=self._passphrase.hex(),
            fd=self._listener.fileno(),
            plain_http=self._plain_http,
            head_timeout_s=limits.head_timeout_s,
            body_timeout_s=limits.body_timeout_s,
            idle_timeout_s=limits.idle_timeout_s,
            max_head_bytes=limits.max_head_bytes,
            parent_pid=os.getpid(),
            metrics_fd=self._counters.fd if self._counters is not None else -1,
            slots=self.count,
            public_url=self._public_url or "",
        )

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def pids(self) -> list[int]:
        """The workers running now."""
        return [
            w.pid
            for w in self._workers
            if w is not None and w.pid in self._exits and not self._exits[w.pid].done()
        ]

    async def start(self) -> None:
        for slot in range(self.count):
            if self._forked:
                self._adopt(slot, self._forked.pop(0))
            else:
                self._spawn(slot)
        self._supervisor = asyncio.create_task(self._supervise(), name="medledger-workers")

    def _spawn(self, slot: int) -> None:
        """Start a worker for ``slot`` and watch it; ``OSError`` if no process could start."""
        read_end, write_end = os.pipe()
        settings = replace(self.settings(), ready_fd=write_end, slot=slot)
        inherited = [self._listener.fileno(), write_end]
        if settings.metrics_fd >= 0:
            inherited.append(settings.metrics_fd)
        try:
            popen = subprocess.Popen(
                [sys.executable, "-m", "medledger.api.workers"],
                stdin=subprocess.PIPE,
                pass_fds=inherited,
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        # Watched before it is told anything: however it ends from here on, it is reaped
        # and its slot restarted.
        self._adopt(slot, _Worker(pid=popen.pid, ready_fd=read_end, popen=popen))
        assert popen.stdin is not None
        try:
            with popen.stdin:
                popen.stdin.write(json.dumps(asdict(settings)).encode() + b"\n")
        except OSError:
            pass  # it ended before it read its settings: seen as any other exit

    def _adopt(self, slot: int, worker: _Worker) -> None:
        """Watch ``worker``: its ready line and its exit (a pidfd, readable once it ended)."""
        loop = asyncio.get_running_loop()
        self._workers[slot] = worker
        ready: asyncio.Future[bool] = loop.create_future()
        exited: asyncio.Future[int] = loop.create_future()
        self._ready[slot], self._exits[worker.pid] = ready, exited
        pidfd = os.pidfd_open(worker.pid)
        adopted = time.monotonic()

        def on_ready() -> None:
            try:
                line = os.read(worker.ready_fd, 64)
            except OSError:
                line = b""
            loop.remove_reader(worker.ready_fd)
            os.close(worker.ready_fd)
            if not ready.done():
                ready.set_result(line.strip() == READY)
            if line.strip() == READY:
                # Until now the slot answered nothing: how long a restart left it empty.
                start_s = round(time.monotonic() - adopted, 3)
                fields = {"slot": slot, "pid": worker.pid, "start_s": start_s}
                log.info("API worker ready", extra={"fields": fields})

        def on_exit() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            if worker.popen is not None:
                code = worker.popen.wait()
            else:
                code = os.waitstatus_to_exitcode(os.waitpid(worker.pid, 0)[1])
            if not exited.done():
                exited.set_result(code)

        loop.add_reader(worker.ready_fd, on_ready)
        loop.add_reader(pidfd, on_exit)
        if worker.go_fd >= 0:
            # The node passed its start-up checks and recovery: the worker may serve.
            with contextlib.suppress(OSError):
                os.write(worker.go_fd, b"g")
            os.close(worker.go_fd)
            worker.go_fd = -1
        log.info("API worker started", extra={"fields": {"slot": slot, "pid": worker.pid}})

    async def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Wait until every worker accepts connections.

        Raises :class:`StorageError` if one ended first or took longer than ``timeout_s``.
        """
        try:
            ready = await asyncio.wait_for(asyncio.gather(*self._ready.values()), timeout_s)
        except TimeoutError:
            raise StorageError(f"the API workers did not start within {timeout_s:.0f} s") from None
        if not all(ready):
            raise StorageError("an API worker ended while starting; see its log lines")

    async def _supervise(self) -> None:
        started = {slot: time.monotonic() for slot in range(self.count)}
        while True:
            slots = {
                self._exits[w.pid]: slot for slot, w in enumerate(self._workers) if w is not None
            }
            done, _ = await asyncio.wait(slots, return_when=asyncio.FIRST_COMPLETED)
            for exited in done:
                slot = slots[exited]
                log.warning(
                    "API worker ended; starting another",
                    extra={"fields": {"slot": slot, "exit": exited.result()}},
                )
                if time.monotonic() - started[slot] < _QUICK_DEATH_S:
                    # (stop() cancels this task, sleeping or not)
                    await asyncio.sleep(_QUICK_DEATH_S)
                await self._restart(slot)
                started[slot] = time.monotonic()

    async def _restart(self, slot: int) -> None:
        """Start another worker in ``slot``, trying again each second until one starts.

        A failed start (no process, no pipe: the machine is out of them for now) must
        not end the supervision: every other slot would then go unwatched too.
        """
        while True:
            try:
                self._spawn(slot)
            except OSError as exc:
                log.error(
                    "cannot start an API worker; trying again",
                    extra={"fields": {"slot": slot, "error": str(exc)}},
                )
                await asyncio.sleep(_QUICK_DEATH_S)
                continue
            self.restarts += 1
            return

    async def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM every worker, let each complete its requests; SIGKILL after ``timeout_s``."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            try:
                await self._supervisor
            except asyncio.CancelledError:
                pass
            except Exception:
                # A defect, but the workers must still be stopped below.
                log.exception("the API workers' supervision had failed")
        running = [w for w in self._workers if w is not None and not self._exits[w.pid].done()]
        log.info("stopping the API workers", extra={"fields": {"running": len(running)}})
        for worker in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
        for worker in running:
            try:
                await asyncio.wait_for(asyncio.shield(self._exits[worker.pid]), timeout_s)
            except TimeoutError:
                log.error("API worker did not stop in time; killed")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
                await self._exits[worker.pid]
        for future in self._ready.values():
            future.cancel()


# -- the worker process --------------------------------------------------------------------


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "worker": os.getpid(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update({k: v for k, v in fields.items() if k not in entry})
        return json.dumps(entry, default=str)


async def _serve_worker(settings: WorkerSettings) -> None:
    from medledger.node import open_oauth_store, open_token_store, open_worker_node

    root = Path(settings.root)
    server: GracefulServer | None = None

    def restart_for_new_keys() -> None:
        # The parent starts a fresh worker, which reads the rotated keystore.
        log.warning("the key-encryption key was rotated: this worker restarts")
        if server is not None:
            server.should_exit = True

    if settings.go_fd >= 0:
        # Forked before the parent opened the node: the stores are opened only once the
        # parent checked them, ran crash recovery and created what a new node lacks (a
        # worker opening them alongside could read a schema being created, and fail).
        go = await asyncio.to_thread(os.read, settings.go_fd, 1)
        os.close(settings.go_fd)
        if not go:
            log.debug("the node did not start: this worker ends")
            return
    node = open_worker_node(
        root, bytes.fromhex(settings.passphrase_hex), on_stale_keys=restart_for_new_keys
    )
    tokens = open_token_store(root, node.config)
    # OAuth access tokens are checked here too (api.oauth); sign-in itself is forwarded.
    oauth = open_oauth_store(root, node.config)
    metrics: Metrics | None = None
    if settings.metrics_fd >= 0:
        # This worker's slot of the node's counters: the parent's /metrics adds them up.
        metrics = WorkerCounters.attach(settings.metrics_fd, settings.slots).metrics(settings.slot)
        node.store_health.count_integrity_errors_in(metrics.observe_integrity_error)
    link = node.chain
    if not isinstance(link, SequencerClient):
        raise StorageError("an API worker's node writes through the sequencer link")
    app = ForwardingApp(
        create_app(
            node,
            tokens,
            oauth_store=oauth,
            metrics=metrics,
            # The node's one budget, kept by the parent: N workers do not give N times the guesses.
            auth_failures=SharedAuthFailures(link.spend_failures),
            public_url=settings.public_url or None,
        ),
        root / API_SOCKET,
    )
    limits = HttpLimits(
        head_timeout_s=settings.head_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        idle_timeout_s=settings.idle_timeout_s,
        max_head_bytes=settings.max_head_bytes,
    )
    try:
        tls = None if settings.plain_http else node.server_tls_context()
        config = server_config(app, limits=limits, ssl_context=tls)
        ready_heap_for_serving()
        server = GracefulServer(config, on_exit=lambda: None)
        watcher = asyncio.create_task(_watch_parent(settings.parent_pid, server))
        announcer = asyncio.create_task(_announce_ready(server, settings.ready_fd))
        listener = socket.socket(fileno=settings.fd)
        try:
            await server.serve(sockets=[listener])
        finally:
            watcher.cancel()
            announcer.cancel()
            listener.detach()  # the parent's socket: not this process's to close
    finally:
        try:
            await app.close()
            await node.stop()
            await node.close_stores()
        finally:
            tokens.close()
            oauth.close()


async def _announce_ready(server: Any, ready_fd: int) -> None:
    """Tell the parent once uvicorn accepts connections (``WorkerPool.wait_ready``)."""
    try:
        while not server.started:
            await asyncio.sleep(0.02)
        if ready_fd >= 0:
            os.write(ready_fd, READY + b"\n")
    finally:
        if ready_fd >= 0:
            os.close(ready_fd)


async def _watch_parent(parent_pid: int, server: Any) -> None:
    """Stop serving once the parent is gone: the socket and the sequencer were its."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(0.2)
    log.error("the node's parent process ended: this worker stops")
    server.should_exit = True


def _run_worker(settings: WorkerSettings) -> None:
    for name in ("httpx", "httpcore"):
        # Their INFO lines name each forwarded URL: paths and queries can carry identifiers.
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - e.g. Windows
        asyncio.run(_serve_worker(settings))
    else:
        uvloop.run(_serve_worker(settings))


def main() -> None:
    """A worker process started anew: settings on standard input, then serve until SIGTERM."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLines())
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(logging.INFO)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    _run_worker(WorkerSettings(**json.loads(sys.stdin.readline())))


if __name__ == "__main__":
    main()
