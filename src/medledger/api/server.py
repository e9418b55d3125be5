"""How the node's HTTP server treats connections: bounded heads, bodies and idle time.

uvicorn's httptools protocol (the fast one, llhttp) bounds nothing but the
idle time *after* a response: a client that connects and sends nothing, sends
a request head one byte at a time, or announces a body and never finishes it
holds its connection (and, for a body, the request's task) forever, and the
parser buffers a request head of any size. :class:`GuardedHttpToolsProtocol`
adds, per connection:

* **head timeout** — a request head must be complete within
  ``head_timeout_s`` of the connection opening or of the head's first byte;
  otherwise ``408`` (or a silent close if nothing was sent) and the
  connection closes.
* **head size** — a request line plus headers of more than
  ``max_head_bytes`` is answered ``431`` and the connection closes, without
  buffering more than that (plus one read).
* **body timeout** — a request body must be complete within
  ``body_timeout_s`` of its head; otherwise ``408`` if nothing was answered
  yet, and the connection closes. A route waiting for that body sees the
  client as gone (``api.errors`` logs that at debug level only).
* **idle timeout** — between requests: uvicorn's ``timeout_keep_alive``.

Nothing here reads the request or application data; the limits are about
bytes and time only. The 408 and 431 answers the protocol writes itself are
counted in ``/metrics`` with the application's. :func:`server_config` is the
one place ``uvicorn.Config`` is built for a node (``node start``, the API tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any, ClassVar, cast

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from medledger.services.sequencer_link import peer_uid

__all__ = [
    "PEER_CERT_SCOPE_KEY",
    "GuardedHttpToolsProtocol",
    "DrainingServerState",
    "GracefulServer",
    "HttpLimits",
    "guarded_protocol",
    "server_config",
]

#: ASGI scope key of the client certificate (DER) the TLS handshake verified, or None.
PEER_CERT_SCOPE_KEY = "medledger.peer_cert"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpLimits:
    """Per-connection limits (seconds and bytes); see the module docstring."""

    head_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: int = 5
    #: Request line plus header lines (h11's default, and uvicorn's with h11).
    max_head_bytes: int = 16 * 1024

    def __post_init__(self) -> None:
        if min(self.head_timeout_s, self.body_timeout_s, self.idle_timeout_s) <= 0:
            raise ValueError("HTTP timeouts must be positive")
        if self.max_head_bytes < 1024:
            raise ValueError("max_head_bytes must be at least 1024")


def _plain_response(status: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\n"
        b"content-type: application/fhir+json\r\n"
        b"x-content-type-options: nosniff\r\n"
        b"cache-control: no-store\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"connection: close\r\n\r\n" + body
    )


def _outcome(code: str, diagnostics: str) -> bytes:
    return (
        b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"'
        + code.encode()
        + b'","diagnostics":"'
        + diagnostics.encode()
        + b'"}]}'
    )


_TIMEOUT = _plain_response(
    b"408 Request Timeout", _outcome("timeout", "the request was not received in time")
)
_HEAD_TOO_LARGE = _plain_response(
    b"431 Request Header Fields Too Large",
    _outcome("too-costly", "the request line and headers are too large"),
)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head/body timeouts and a head size limit.

    Use :func:`guarded_protocol` to get a subclass bound to a set of limits.
    """

    limits: ClassVar[HttpLimits] = HttpLimits()
    #: Told the status of each answer written here rather than by the application
    #: (408 for a late head, 431), so /metrics counts them too.
    observe: ClassVar[Callable[[int], None] | None] = None

    def _answered(self, status: int) -> None:
        observe = type(self).observe
        if observe is not None:
            observe(status)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        #: Bytes received while waiting for the current head (raw, with the read
        #: that completes nothing) and counted by the parser (line and fields).
        self._head_bytes = 0
        self._head_fields = 0
        self._reading_head = True
        self._refused = False

    # -- timers --------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(
                self.limits.head_timeout_s, self._head_timed_out
            )

    def _cancel(self, timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        idle = self._head_bytes == 0 and self._head_fields == 0
        answering = self.cycle is not None and not self.cycle.response_complete
        if not idle and not answering:
            self.transport.write(_TIMEOUT)
            self._answered(408)
        log.debug("closing a connection whose request head did not arrive in time")
        self.transport.close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if not cycle.response_started:
                self.transport.write(_TIMEOUT)
            # The route sees its client gone (and writes nothing more); api.errors
            # counts that request as a 408 in /metrics.
            cast(dict[str, Any], cycle.scope)["medledger.timed_out"] = True
            cycle.disconnected = True
            cycle.message_event.set()
        log.debug("closing a connection whose request body did not arrive in time")
        self.transport.close()

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX and peer_uid(sock) != os.getuid():
            # The parent's socket for its API workers (api.workers): its own user's only.
            log.warning("refused a Unix-socket connection from another user")
            self._refused = True
            transport.close()
            return
        # The client certificate the TLS handshake verified (a current member's, by
        # the server context's trust anchors), or None: /peer/v1 binds it to the
        # request's signer (api.peer). Read once: it cannot change on a connection.
        ssl_object = transport.get_extra_info("ssl_object")
        self._peer_cert: bytes | None = (
            ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        )
        if _draining(self.server_state):
            # The TLS handshake ended after uvicorn's shutdown had told every connection
            # it knew to close: this one was not among them, and would otherwise serve
            # a keep-alive client for as long as it keeps writing (the shutdown waits).
            log.debug("closing a connection that opened while the server was stopping")
            self._refused = True  # whatever it already sent reaches no application
            transport.close()
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel(self._head_timer)
        self._cancel(self._body_timer)
        self._head_timer = self._body_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        was_reading_head = self._reading_head
        super().data_received(data)
        if self._refused or self.transport.is_closing():
            return
        if was_reading_head and self._reading_head:
            # The head is still incomplete after this read: bound what llhttp buffers
            # even where no callback has fired yet (one long header line).
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_head_bytes:
                self._refuse_head()
                return
            idle = self.cycle is None or self.cycle.response_complete
            if idle:  # e.g. only blank lines since the last response
                self._arm_head_timer()

    # -- parser callbacks ----------------------------------------------------------------
    # Once a head is refused the connection is closing: the callbacks still running
    # for the rest of that read do nothing (no request reaches the application).

    def _head_fits(self, size: int) -> bool:
        if self._refused:
            return False
        self._head_fields += size
        if self._head_fields > self.limits.max_head_bytes:
            self._refuse_head()
            return False
        return True

    def _refuse_head(self) -> None:
        if not self._refused:
            self._refused = True
            log.debug("refusing a request head larger than %d bytes", self.limits.max_head_bytes)
            self.transport.write(_HEAD_TOO_LARGE)
            self.transport.close()
            self._answered(431)

    def on_message_begin(self) -> None:
        if self._refused:
            return
        self._reading_head = True
        self._head_fields = 0
        self._arm_head_timer()
        super().on_message_begin()
        cast(dict[str, Any], self.scope)[PEER_CERT_SCOPE_KEY] = self._peer_cert

    def on_url(self, url: bytes) -> None:
        if self._head_fits(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_fits(len(name) + len(value) + 4):
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._reading_head = False
        self._head_bytes = 0
        self._cancel(self._head_timer)
        self._head_timer = None
        self._cancel(self._body_timer)
        self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timed_out)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._cancel(self._body_timer)
        self._body_timer = None
        super().on_message_complete()


class DrainingServerState(ServerState):
    """uvicorn's shared server state, plus whether the server has begun to stop."""

    def __init__(self) -> None:
        super().__init__()
        #: Set by :meth:`GracefulServer.shutdown` before uvicorn tells connections to close.
        self.draining = False


def _draining(state: ServerState) -> bool:
    return isinstance(state, DrainingServerState) and state.draining


def guarded_protocol(
    limits: HttpLimits, observe: Callable[[int], None] | None = None
) -> type[GuardedHttpToolsProtocol]:
    """A :class:`GuardedHttpToolsProtocol` subclass enforcing ``limits``.

    ``observe`` is called with the status of each answer the protocol writes itself.
    """
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"limits": limits, "observe": staticmethod(observe) if observe is not None else None},
    )


def server_config(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8700,
    limits: HttpLimits | None = None,
    ssl_context: ssl.SSLContext | None = None,
    **options: Any,
) -> uvicorn.Config:
    """The uvicorn configuration a node is served with.

    httptools with :class:`GuardedHttpToolsProtocol`; no ``Server`` banner; no
    forwarding headers (the client is the TCP peer); no access log (paths and
    queries can carry identifiers); no WebSocket upgrade;
    no lifespan (the caller owns the node). ``ssl_context`` (from
    ``services.tls.server_context``) serves HTTPS; without it the server speaks
    plain HTTP, which only ``node start --plain-http`` on a loopback address and
    in-process tests ask for. ``options`` are passed through.
    """
    limits = limits or HttpLimits()
    # The node's app counts answers (api.metrics); the protocol's own answers join them.
    metrics = getattr(getattr(app, "state", None), "metrics", None)
    observe = getattr(metrics, "observe_answer", None)
    settings: dict[str, Any] = {
        "host": host,
        "port": port,
        "http": guarded_protocol(limits, observe),
        "ws": "none",
        "timeout_keep_alive": limits.idle_timeout_s,
        "server_header": False,
        # The client address keys the failed-authentication budget (api.auth): it is the
        # TCP peer's, never what an X-Forwarded-For header claims (uvicorn trusts those
        # from 127.0.0.1 by default, which would let any local process pick its address).
        "proxy_headers": False,
        "access_log": False,
        "log_level": "warning",
        "lifespan": "off",
        "log_config": None,
    }
    if ssl_context is not None:
        context = ssl_context
        settings["ssl_context_factory"] = lambda _config, _default: context
    settings.update(options)
    return uvicorn.Config(app, **settings)


class GracefulServer(uvicorn.Server):
    """uvicorn, minus re-raising SIGTERM/SIGINT after shutdown; a signal also calls ``on_exit``.

    uvicorn restores the default handlers and re-sends the signal once it has
    stopped serving, which would kill the process before the node's queued
    writes commit and its storage closes. Here a signal only asks the server
    to exit, and ``on_exit`` turns the node's readiness false; the caller then
    closes the node. A second SIGINT still forces the exit (uvicorn's rule).
    """

    def __init__(
        self, config: uvicorn.Config, on_exit: Callable[[], None], *, exit_now: bool = True
    ) -> None:
        """``exit_now=False``: a signal only calls ``on_exit`` (whose caller stops the
        server later, e.g. once the API workers are done)."""
        super().__init__(config)
        self.server_state = DrainingServerState()
        self._on_exit = on_exit
        self._exit_now = exit_now

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's graceful shutdown, with the connections it cannot see closed too.

        uvicorn tells the connections it knows to close after their current
        answer. A TLS connection joins that set only once its handshake is done,
        so one accepted just before the shutdown escaped it and was served
        keep-alive until its client stopped (with API workers, clients cut off
        by one worker reconnect to another one that is stopping: a node then
        took 15 s instead of 1 to stop under writes). :class:`DrainingServerState`
        closes every connection that opens from now on.
        """
        if isinstance(self.server_state, DrainingServerState):
            self.server_state.draining = True
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._exit_now:
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
