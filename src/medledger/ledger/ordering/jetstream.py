"""The ``jetstream`` orderer: the total order is one replicated NATS JetStream stream.

Each consortium member runs one node of a NATS cluster; the stream is
replicated R3 (or R5) with Raft, so the order survives the crash of a
minority of nodes (``replicas`` must not exceed the cluster size; a single
development server takes ``replicas=1``). The stream is append-only by
configuration: file storage, limits retention with no limits (nothing is
ever discarded), ``deny_delete`` and ``deny_purge``, ``max_msg_size`` =
:data:`~medledger.ledger.ordering.port.MAX_MESSAGE_BYTES` plus room for the
headers (the server counts them; the payload limit is checked here
exactly), and a ``duplicate_window`` (2 minutes by default) inside which a
``Nats-Msg-Id`` seen before is not stored again: the ack says
``duplicate: true`` and carries the original sequence.

How the port's guarantees are kept:

* ``publish``: a JetStream publish acknowledged by the stream leader once a
  quorum of replicas stored it (with ``sync_interval: always`` on the
  servers — see :mod:`~medledger.localnet.natsserver` — also fsynced).
  A timeout or "no responders" while a leader is being elected is retried
  with the same ``Nats-Msg-Id`` (so a retry cannot duplicate) until
  ``retry_for`` seconds have passed.
* ``read``: an ephemeral pull consumer per reader (deliver by start
  sequence, no acks, idle heartbeats, in memory, R1). Every delivered stream
  sequence is checked to be exactly the next one; on a gap, a missed
  heartbeat (the consumer's node died, or we reconnected elsewhere), a
  leadership change or a deleted consumer, a new consumer starts from the
  last yielded sequence + 1, so readers never skip or repeat a message.
  Pull requests overlap, so the consumer is never without one (decision 0068).
  A reader never gives up on a transient failure: it retries for ever with
  capped exponential backoff and logs once when it starts failing and once
  when it recovers (a member must keep following the consortium through any
  outage, however long).
* Failover: the client lists every server, in the given order (the
  member's own server first; no shuffling), pings its server every
  ``ping_interval`` seconds and declares it stale after
  ``max_outstanding_pings`` unanswered pings, so a hung-but-connected server
  (a stopped process, a black-holed link) is left within a few seconds. A
  reconnect tries the servers it did not just lose first. See
  :class:`JetStreamTuning`.
* ``broadcast``: a core NATS publish on
  :func:`~medledger.ledger.ordering.natsconfig.broadcast_subject` (one hop
  over the cluster's routes, nothing stored or replicated); ``broadcasts``:
  one subscription to it per orderer, fanned out to its listeners, with
  bounded pending queues (a flood is dropped, not buffered).
* Every nats error becomes :class:`~medledger.core.errors.OrderingError`
  with a one-line message naming the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client, Server
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api

from medledger.core.errors import OrderingError
from medledger.ledger.ordering.listeners import LISTENER_QUEUE, Listeners
from medledger.ledger.ordering.natsconfig import broadcast_subject
from medledger.ledger.ordering.port import MAX_MESSAGE_BYTES, OrderedMessage

__all__ = ["JetStreamOrderer", "JetStreamTuning", "PullBudget"]

T = TypeVar("T")

log = logging.getLogger(__name__)

_MSG_ID = "Nats-Msg-Id"
# The server's max_msg_size covers headers + payload; the port limits the payload.
_HEADER_ROOM = 16 * 1024
# A publish attempt / API request gets this long before it is retried.
_ATTEMPT_S = 2.0
# Reader tuning: messages and bytes per pull request, its lifetime, and the
# heartbeat the server sends while it has nothing to deliver.
_BATCH = 256
_BATCH_BYTES = 8 * 1024 * 1024
_PULL_EXPIRES_S = 10.0
_HEARTBEAT_S = 1.0
# An abandoned reader's consumer is removed by the server after this long.
_INACTIVE_S = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class JetStreamTuning:
    """How fast a connection notices a dead or hung server, and how its readers retry.

    A hung server (process stopped, link black-holed) keeps the TCP connection
    open, so only unanswered pings reveal it: the client leaves it after about
    ``ping_interval * (max_outstanding_pings + 1)`` seconds (4 s by default;
    nats-py's own default is 2 pings every 120 s, i.e. 6 minutes). Whole
    seconds, as nats-py takes them. ``connect_timeout`` bounds one connection
    attempt, including the wait for the server's INFO (a stopped server
    accepts TCP connections but never answers). A reader whose stream cannot
    be reached retries after ``read_backoff_min`` seconds, doubling up to
    ``read_backoff_max``.
    """

    ping_interval: int = 1
    max_outstanding_pings: int = 3
    connect_timeout: float = 2.0
    read_backoff_min: float = 0.1
    read_backoff_max: float = 2.0

    def __post_init__(self) -> None:
        if self.ping_interval < 1 or self.max_outstanding_pings < 1:
            raise ValueError("ping_interval and max_outstanding_pings must be at least 1")
        if not 0 < self.read_backoff_min <= self.read_backoff_max or self.connect_timeout <= 0:
            raise ValueError("backoff and connect timeout must be positive, min <= max")


class _Transient(Exception):
    """A failure that the same call may not see again (leader election, reconnect)."""


def _describe(exc: BaseException) -> str:
    """One line for any nats error."""
    if isinstance(exc, nats.js.errors.APIError):
        return f"{exc.description or type(exc).__name__} (code {exc.code}, err_code {exc.err_code})"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# JetStream API errors that pass (nats-server errors.json): not assigned to
# this server, system temporarily unavailable, cluster cannot handle the
# request (no leader) — while a cluster elects leaders or recovers — and
# "duplicate message id is in process" (10158): another publisher's message
# with this Nats-Msg-Id is being replicated; a retry gets its sequence.
# "no suitable peers for placement" (10005): a peer is briefly offline or still
# catching up (after a restart, or on a loaded machine); placement succeeds once
# it is back, so stream creation waits for it within the retry window.
_TRANSIENT_ERR_CODES = frozenset({10005, 10007, 10008, 10009, 10158})


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, nats.js.errors.APIError):
        return exc.code == 503 or exc.err_code in _TRANSIENT_ERR_CODES
    return isinstance(
        exc,
        (
            TimeoutError,  # nats.errors.TimeoutError is one
            nats.errors.NoRespondersError,
            nats.js.errors.NoStreamResponseError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.OutboundBufferLimitError,
            nats.errors.StaleConnectionError,
            nats.errors.FlushTimeoutError,
            OSError,
        ),
    )


class _ServerChoice:
    """nats-py's reconnect handler: which server to try next, and after how long.

    Picks the least-failed server; among equals, one other than the server
    just lost (it may be hung: a stopped server still accepts TCP
    connections, so trying it first would cost a whole connect timeout),
    then the configured order (the member's own server first). Waits 0 s on
    a server's first try, then 0.1 s doubling to 2 s.
    """

    def __init__(self) -> None:
        #: ``host:port`` of the server the client is (or was last) connected to.
        self.current: str | None = None

    def connected(self, nc: Client) -> None:
        url = nc.connected_url
        if url is not None:
            self.current = url.netloc

    def __call__(self, servers: list[Server], _info: dict[str, Any]) -> tuple[Server | None, float]:
        chosen = min(servers, key=lambda s: (s.reconnects, s.uri.netloc == self.current))
        if chosen.reconnects == 0:
            return chosen, 0.0
        delay = min(2.0, 0.1 * 2 ** min(chosen.reconnects - 1, 5))
        return chosen, delay * random.uniform(0.8, 1.2)  # noqa: S311 (jitter, not crypto)


class _LastError:
    """nats-py's error callback: keeps the last connection error for our messages.

    nats-py reports connection errors here while it (re)connects; the calls
    that are affected raise (and are retried) on their own.
    """

    def __init__(self) -> None:
        self.text = "no answer"

    async def record(self, exc: Exception) -> None:  # nats-py wants a coroutine function
        self.text = _describe(exc)


class JetStreamOrderer:
    """A :class:`~medledger.ledger.ordering.port.Orderer` over a replicated JetStream stream.

    Create with :meth:`connect`. One instance is one NATS connection; it is
    safe for many concurrent ``publish`` calls and ``read`` iterators on one
    event loop.
    """

    def __init__(
        self,
        nc: Client,
        *,
        stream: str,
        subject: str,
        retry_for: float,
        tuning: JetStreamTuning,
        _token: object,
    ) -> None:
        if _token is not _CONNECT:
            raise TypeError("use 'await JetStreamOrderer.connect(...)'")
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream(timeout=_ATTEMPT_S)
        self._stream = stream
        self._subject = subject
        self._retry_for = retry_for
        self._tuning = tuning
        self._closed = False
        self._feeds: set[_Feed] = set()
        self._broadcast_subject = broadcast_subject(subject)
        self._listeners = Listeners()
        self._broadcast_sub: Subscription | None = None
        self._subscribing = asyncio.Lock()

    @classmethod
    async def connect(
        cls,
        servers: list[str],
        *,
        stream: str,
        subject: str,
        replicas: int = 3,
        create: bool = True,
        duplicate_window: float = 120.0,
        retry_for: float = 30.0,
        name: str | None = None,
        tuning: JetStreamTuning | None = None,
        tls: ssl.SSLContext | None = None,
        nkeys_seed: Path | None = None,
    ) -> JetStreamOrderer:
        """Connect to the NATS servers and make sure the stream exists.

        ``tls``: connect over TLS only, trusting that context's anchors (the
        members' pinned certificates); ``nkeys_seed``: the file holding this
        member's NKey seed, which the servers authenticate it by.

        Lists every server so the client can fail over, tried in the order
        given (put the member's own server first); after the first connection
        it reconnects forever with backoff, and leaves a server that stops
        answering pings (see :class:`JetStreamTuning`). ``create=False``
        requires the stream to exist. An existing stream must have exactly
        ``[subject]`` as its subjects. ``publish`` and ``last_seq`` retry
        transient failures (no leader, a reconnect) for up to ``retry_for``
        seconds, then raise :class:`OrderingError`; readers retry for ever.
        """
        if not servers:
            raise OrderingError("no NATS servers given")
        tuning = tuning or JetStreamTuning()
        nc = _Client()
        errors = _LastError()
        choice = _ServerChoice()

        async def disconnected() -> None:
            # Once per lost connection (nats-py then reconnects on its own).
            if not nc.is_closed:
                log.warning("NATS connection to %s lost; reconnecting", choice.current)

        async def reconnected() -> None:
            choice.connected(nc)
            log.warning("NATS connection moved to %s", choice.current)

        try:
            await asyncio.wait_for(
                nc.connect(
                    servers=list(servers),
                    name=name,
                    connect_timeout=tuning.connect_timeout,  # type: ignore[arg-type]
                    max_reconnect_attempts=-1,
                    dont_randomize=True,
                    ping_interval=tuning.ping_interval,
                    max_outstanding_pings=tuning.max_outstanding_pings,
                    reconnect_to_server_handler=choice,
                    tls=tls,
                    nkeys_seed=str(nkeys_seed) if nkeys_seed is not None else None,
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                    error_cb=errors.record,
                ),
                timeout=retry_for,
            )
        except TimeoutError:
            await _close_quietly(nc)
            raise OrderingError(
                f"cannot connect to NATS at {', '.join(servers)} within {retry_for:.0f} s:"
                f" {errors.text}"
            ) from None
        except (nats.errors.Error, OSError) as exc:
            await _close_quietly(nc)
            raise OrderingError(
                f"cannot connect to NATS at {', '.join(servers)}: {_describe(exc)}"
            ) from None
        except BaseException:
            # Cancelled (a member stopping while it starts) or failed otherwise: the
            # attempt's socket must not outlive it.
            await _close_quietly(nc)
            raise
        choice.connected(nc)
        orderer = cls(
            nc, stream=stream, subject=subject, retry_for=retry_for, tuning=tuning, _token=_CONNECT
        )
        try:
            await orderer._ensure_stream(
                replicas=replicas, create=create, duplicate_window=duplicate_window
            )
        except BaseException:
            await orderer.close()
            raise
        return orderer

    @property
    def stream(self) -> str:
        """The JetStream stream that holds the order."""
        return self._stream

    @property
    def subject(self) -> str:
        """The subject every message is published on (the stream's only subject)."""
        return self._subject

    # -- the port ---------------------------------------------------------------------------

    async def publish(self, msg_id: str, payload: bytes) -> int:
        """Append ``payload`` under ``msg_id``; return its stream sequence once acknowledged.

        A ``msg_id`` already stored within the duplicate window returns the
        original sequence and stores nothing.
        """
        self._check_open()
        if not msg_id:
            raise OrderingError(f"stream {self._stream}: empty msg_id (needed for de-duplication)")
        if len(payload) > MAX_MESSAGE_BYTES:
            raise OrderingError(
                f"stream {self._stream}: message of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}"
            )

        async def attempt() -> int:
            ack = await self._js.publish(
                self._subject,
                payload,
                timeout=_ATTEMPT_S,
                stream=self._stream,
                headers={_MSG_ID: msg_id},
            )
            if ack.stream != self._stream:
                raise OrderingError(
                    f"message {msg_id!r} went to stream {ack.stream}, not {self._stream}"
                )
            return int(ack.seq)

        return await self._retry(f"publish {msg_id!r}", attempt)

    async def read(self, start: int = 1) -> AsyncIterator[OrderedMessage]:
        """Every message from sequence ``start`` on, in order, without gaps; waits for new ones.

        Survives node failover, hung servers and reconnects by resuming from
        the last yielded sequence + 1; transient failures are retried for
        ever with capped exponential backoff (logged once when the reader
        starts failing and once when it recovers). Ends when the orderer is
        closed; raises :class:`OrderingError` only for what retrying cannot
        fix (a message missing from the stream, a refused consumer).
        """
        expected = max(start, 1)
        failing_since: float | None = None
        backoff = self._tuning.read_backoff_min
        stalls = 0
        idle_pause = 0.0
        while not self._closed:
            _resume_cancellation()
            if idle_pause:
                # the last consumer ended without delivering: do not hammer the servers
                await asyncio.sleep(idle_pause)
            try:
                feed = await self._open_consumer(expected)
            except _Transient as exc:
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning(
                        "stream %s: reader cannot resume at seq %d, retrying: %s",
                        self._stream,
                        expected,
                        exc,
                    )
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))  # noqa: S311 (jitter)
                backoff = min(backoff * 2, self._tuning.read_backoff_max)
                continue
            if failing_since is not None:
                log.warning(
                    "stream %s: reader resumed at seq %d after %.1f s",
                    self._stream,
                    expected,
                    time.monotonic() - failing_since,
                )
                failing_since = None
            backoff = self._tuning.read_backoff_min
            before = expected
            try:
                _resume_cancellation()
                async with contextlib.aclosing(self._pull(feed)) as delivered:
                    async for msg in delivered:
                        seq = msg.metadata.sequence.stream
                        if seq < expected:
                            continue  # a redelivery from before a reset
                        if seq > expected:
                            # A fresh consumer starts at ``expected``; a jump means a
                            # message was lost on the way: start over from it.
                            stalls += 1
                            if stalls > 3:
                                raise OrderingError(
                                    f"stream {self._stream}: message {expected} is missing"
                                    f" (next delivered is {seq})"
                                )
                            break
                        stalls = 0
                        yield OrderedMessage(
                            seq=seq,
                            payload=msg.data,
                            time_ms=int(msg.metadata.timestamp.timestamp() * 1000),
                        )
                        expected += 1
            finally:
                await self._drop_consumer(feed)
            idle_pause = 0.0 if expected > before else min(max(idle_pause * 2, 0.05), 1.0)

    async def broadcast(self, payload: bytes) -> None:
        """Publish ``payload`` on the broadcast subject (core NATS: unordered, not stored)."""
        self._check_open()
        if len(payload) > MAX_MESSAGE_BYTES:
            raise OrderingError(
                f"stream {self._stream}: message of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}"
            )
        try:
            await self._nc.publish(self._broadcast_subject, payload)
        except (nats.errors.Error, OSError) as exc:
            # Best effort by contract: whatever was broadcast also goes through the order.
            log.debug("stream %s: broadcast not sent: %s", self._stream, _describe(exc))

    async def broadcasts(self) -> AsyncIterator[bytes]:
        """Payloads on the broadcast subject from now on (anyone's: unauthenticated)."""
        if self._closed:
            return
        async with self._subscribing:
            if self._broadcast_sub is None:
                try:
                    self._broadcast_sub = await self._nc.subscribe(
                        self._broadcast_subject,
                        cb=self._on_broadcast,
                        # nats-py's own queue in front of ours: bounded too.
                        pending_msgs_limit=LISTENER_QUEUE,
                        pending_bytes_limit=4 * MAX_MESSAGE_BYTES,
                    )
                except (nats.errors.Error, OSError) as exc:
                    raise OrderingError(
                        f"stream {self._stream}: cannot listen for broadcasts: {_describe(exc)}"
                    ) from None
        async for payload in self._listeners.listen():
            yield payload

    async def _on_broadcast(self, msg: Msg) -> None:
        self._listeners.deliver(msg.data)

    async def last_seq(self) -> int:
        """The sequence of the last message in the stream (0 if empty)."""
        self._check_open()

        async def attempt() -> int:
            info = await self._js.stream_info(self._stream)
            return int(info.state.last_seq)

        return await self._retry("last_seq", attempt)

    async def close(self) -> None:
        """Close the connection; open readers end. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for feed in self._feeds:
            feed.queue.put_nowait(None)
        self._listeners.close()
        await _close_quietly(self._nc)

    # -- internals --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise OrderingError(f"stream {self._stream}: orderer is closed")

    async def _retry(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt`` until it succeeds, retrying transient nats failures for ``retry_for`` s."""
        deadline = time.monotonic() + self._retry_for
        delay = 0.05
        while True:
            self._check_open()
            try:
                return await attempt()
            except OrderingError:
                raise
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                if self._closed:
                    raise OrderingError(f"stream {self._stream}: orderer is closed") from None
                if not _is_transient(exc):
                    raise OrderingError(
                        f"stream {self._stream}: {what} failed: {_describe(exc)}"
                    ) from None
                if time.monotonic() + delay > deadline:
                    raise OrderingError(
                        f"stream {self._stream}: {what} not done within"
                        f" {self._retry_for:.0f} s: {_describe(exc)}"
                    ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _ensure_stream(self, *, replicas: int, create: bool, duplicate_window: float) -> None:
        config = api.StreamConfig(
            name=self._stream,
            subjects=[self._subject],
            retention=api.RetentionPolicy.LIMITS,
            max_consumers=-1,
            max_msgs=-1,
            max_bytes=-1,
            max_age=0,
            max_msgs_per_subject=-1,
            max_msg_size=MAX_MESSAGE_BYTES + _HEADER_ROOM,
            discard=api.DiscardPolicy.OLD,  # moot: without limits nothing is discarded
            storage=api.StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=duplicate_window,
            deny_delete=True,
            deny_purge=True,
        )

        async def attempt() -> None:
            try:
                info = await self._js.stream_info(self._stream)
            except nats.js.errors.NotFoundError:
                if not create:
                    raise OrderingError(f"stream {self._stream} does not exist") from None
                await self._js.add_stream(config)
                return
            subjects = info.config.subjects or []
            if subjects != [self._subject]:  # the order is the whole stream
                raise OrderingError(
                    f"stream {self._stream} exists with subjects {subjects}, not {self._subject!r}"
                )

        await self._retry("create stream", attempt)

    async def _open_consumer(self, start: int) -> _Feed:
        """An ephemeral pull consumer delivering from stream sequence ``start``."""
        name = uuid.uuid4().hex
        config = api.ConsumerConfig(
            name=name,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            ack_policy=api.AckPolicy.NONE,
            filter_subject=self._subject,
            inactive_threshold=_INACTIVE_S,
            num_replicas=1,
            mem_storage=True,
        )
        feed = _Feed(name, last_stream=start - 1)
        try:
            await self._js.add_consumer(self._stream, config, timeout=_ATTEMPT_S)
            feed.sub = await self._nc.subscribe(self._nc.new_inbox(), cb=feed.deliver)
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            if self._closed:
                raise _Transient("orderer is closed") from None
            if _is_transient(exc):
                raise _Transient(_describe(exc)) from None
            raise OrderingError(
                f"stream {self._stream}: cannot start a reader at seq {start}: {_describe(exc)}"
            ) from None
        self._feeds.add(feed)
        return feed

    async def _pull(self, feed: _Feed) -> AsyncGenerator[Msg, None]:
        """Data messages of ``feed`` in delivery order; returns when it must be recreated.

        Pull requests overlap (decision 0068): the next one is sent while the
        open ones still have half a batch left and the newest half its lifetime,
        so the consumer always holds a request and whatever is ordered when one
        ends (its batch, bytes or lifetime) need not wait for the next to reach
        the consumer's server. How many messages the open requests may still
        deliver is counted exactly (:class:`PullBudget`). The end of a request
        is not the end of the consumer: taking a completed batch's 409 for a
        lost consumer stalled every member's feed for 150 to 370 ms every 256
        messages at 40 ms between institutions.
        """
        assert feed.sub is not None
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self._stream}.{feed.consumer}"
        request = json.dumps(
            {
                "batch": _BATCH,
                "max_bytes": _BATCH_BYTES,
                "expires": int(_PULL_EXPIRES_S * 1e9),
                "idle_heartbeat": int(_HEARTBEAT_S * 1e9),
            }
        ).encode()
        budget = PullBudget(batch=_BATCH, lifetime_s=_PULL_EXPIRES_S)
        while not self._closed:
            if budget.wants_pull(time.monotonic()):
                try:
                    await self._nc.publish(subject, request, reply=feed.sub.subject)
                except (nats.errors.Error, OSError):
                    return
                budget.sent(time.monotonic())
            # Our own queue and asyncio.timeout rather than Subscription.next_msg:
            # on Python 3.11 its wait_for can swallow a cancellation of the reader.
            try:
                async with asyncio.timeout(3 * _HEARTBEAT_S):
                    msg = await feed.queue.get()
            except TimeoutError:
                return  # no message, no heartbeat: consumer or connection lost
            if msg is None:
                return  # the orderer was closed
            status = JetStreamContext.is_status_msg(msg)
            if status is None:
                budget.delivered()
                if msg.reply.startswith("$JS.ACK."):  # carries the stream sequence
                    feed.last_stream = max(feed.last_stream, msg.metadata.sequence.stream)
                    yield msg
            elif status == api.StatusCode.CONTROL_MESSAGE:
                if _last_stream(msg) > feed.last_stream:
                    # The consumer sent messages we never got: they were lost on
                    # the way (in a hung server we have since left). Without acks
                    # it will not resend them, so start over from the next one.
                    return
            elif status in (api.StatusCode.REQUEST_TIMEOUT, api.StatusCode.NO_MESSAGES) or (
                status == api.StatusCode.CONFLICT and _request_ended(msg)
            ):
                # Expired, reached max_bytes, or its whole batch was delivered: the
                # request ended, the consumer did not. (A completed batch's 409 was
                # once taken for a lost consumer, which was then made again: several
                # round trips to the stream's leader, every 256 messages.)
                budget.ended(_pending_messages(msg))
            else:
                return  # 409 leadership change / consumer deleted, 503, …

    async def _drop_consumer(self, feed: _Feed) -> None:
        """Best effort: the server drops it after ``_INACTIVE_S`` anyway."""
        self._feeds.discard(feed)
        if self._nc.is_closed:
            return
        try:
            if feed.sub is not None:
                await feed.sub.unsubscribe()
            await self._nc.request(
                f"$JS.API.CONSUMER.DELETE.{self._stream}.{feed.consumer}", b"", timeout=0.5
            )
        except (nats.errors.Error, TimeoutError, OSError):
            pass


class _Feed:
    """One reader's consumer: its name, inbox subscription and delivery queue.

    ``None`` in the queue means the orderer was closed. ``last_stream`` is the
    stream sequence of the last message received from it (start - 1 before
    the first).
    """

    def __init__(self, consumer: str, *, last_stream: int) -> None:
        self.consumer = consumer
        self.last_stream = last_stream
        self.sub: Subscription | None = None
        self.queue: asyncio.Queue[Msg | None] = asyncio.Queue()

    async def deliver(self, msg: Msg) -> None:
        self.queue.put_nowait(msg)


class PullBudget:
    """What a reader's open pull requests may still deliver, and when to send another.

    The server serves open requests in turn, not one after the other, and a data
    message does not say which request it answers, so no count per request is
    kept: only the total. Every request adds its batch; every data message takes
    one; a request that ends early (expired, or its byte limit reached) takes what
    it still had, which its status says (``Nats-Pending-Messages``). A request
    whose batch was delivered ends with no status, and the total already holds it.

    Another request is wanted when less than half a batch is left in all, or when
    the newest request is half way to expiring: so one with at least half its
    lifetime left is always open, and at most about two are open at once.
    """

    def __init__(self, *, batch: int, lifetime_s: float) -> None:
        self.batch = batch
        self.lifetime_s = lifetime_s
        #: Messages the open requests may still deliver, in all.
        self.capacity = 0
        self._newest_sent: float | None = None

    def wants_pull(self, now: float) -> bool:
        """Whether to send another pull request now."""
        if self.capacity <= self.batch // 2 or self._newest_sent is None:
            return True
        return now - self._newest_sent >= self.lifetime_s / 2

    def sent(self, now: float) -> None:
        """A pull request for a whole batch was sent at ``now``."""
        self.capacity += self.batch
        self._newest_sent = now

    def delivered(self) -> None:
        """A data message arrived."""
        self.capacity = max(0, self.capacity - 1)

    def ended(self, pending: int | None) -> None:
        """A request ended early with ``pending`` messages undelivered (``None``: its status
        did not say; then nothing is assumed left, and the next request goes out at once)."""
        if pending is None:
            self.capacity = 0
        else:
            self.capacity = max(0, self.capacity - pending)


def _last_stream(heartbeat: Msg) -> int:
    """The stream sequence of the last message the consumer sent, from its idle heartbeat.

    0 if the header is missing or malformed (then nothing is concluded from it).
    """
    text = (heartbeat.headers or {}).get(api.Header.LAST_STREAM.value, "")
    return int(text) if text.isascii() and text.isdigit() else 0


def _pending_messages(status: Msg) -> int | None:
    """What an ended pull request had still to deliver, from its status's header; ``None``
    if the header is missing or malformed."""
    text = (status.headers or {}).get("Nats-Pending-Messages", "")
    return int(text) if text.isascii() and text.isdigit() else None


def _request_ended(msg: Msg) -> bool:
    """Whether a 409 status ends only its pull request: its byte limit was reached, or its
    batch was delivered. Any other 409 (leadership change, consumer deleted) ends the
    consumer."""
    description = (msg.headers or {}).get(api.Header.DESCRIPTION, "")
    return "Message Size Exceeds MaxBytes" in description or description == "Batch Completed"


def _resume_cancellation() -> None:
    """Raise ``CancelledError`` if this task was cancelled but the cancellation got lost.

    On Python 3.11, ``asyncio.wait_for`` (which nats-py uses for requests with a
    timeout) returns its result and drops the cancellation when both arrive
    together. A reader whose cancellation was dropped would otherwise loop on,
    and whoever awaits it after cancelling (a closing member) would wait forever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class _Client(Client):
    """nats-py's client, made to leave no socket open and to stay closed once closed.

    Two nats-py 2.16 behaviours are corrected here:

    * It keeps one transport object across reconnection attempts: when a server
      accepts the TCP connection but does not complete the handshake (a hung or
      recovering server: no INFO, no answer to CONNECT), the next attempt opened a
      new connection over the old one's writer without closing it. Every such
      attempt left a socket open until the event loop closed: file descriptors
      leaked for as long as an outage lasted.
    * ``close()`` cancels a running reconnection and waits for it at most
      ``reconnect_time_wait`` seconds. On Python 3.11, ``asyncio.wait_for``
      returns a result that completed as the cancellation arrived instead of
      raising, so a reconnection cancelled just as its TCP connection opened
      carries on: it finishes its handshake after ``close()``, marks the client
      connected again, and its read loop, finding the transport closed, starts a
      new reconnection that dials a socket nobody closes. Once closing has begun,
      this client dials nothing, starts no reconnection, and ``close()`` returns
      only after the reconnection task has ended and the transport is closed.
    """

    _closing = False
    # close() waits this long, in all, for a reconnection that ignores cancellation.
    _RECONNECT_END_S = 5.0

    async def _connect_to_server(self, s: Any) -> None:
        self._end_dial_if_closing()
        transport = self._transport
        if transport is not None:
            transport.close()  # type: ignore[no-untyped-call]  # a no-op once closed (a reconnect closes it first)
        await super()._connect_to_server(s)
        self._end_dial_if_closing()  # the dial completed as close() cancelled it

    def _end_dial_if_closing(self) -> None:
        if self._closing:
            if self._transport is not None:
                self._transport.close()  # type: ignore[no-untyped-call]
            raise asyncio.CancelledError  # ends the reconnection loop (it breaks on this)

    async def _process_op_err(self, e: Exception) -> None:
        if self._closing:
            return  # a read loop that outlived close() must not start a reconnection
        await super()._process_op_err(e)

    async def _close(self, status: int, do_cbs: bool = True) -> None:
        if status != Client.CLOSED:
            # DISCONNECTED: ``connect()`` ending an attempt it gave up on before it tries
            # the next server. The client is not being closed: the next attempt dials.
            await super()._close(status, do_cbs)
            return
        self._closing = True
        try:
            await super()._close(status, do_cbs)
        finally:
            await self._end_reconnection()
            if self._transport is not None:
                self._transport.close()  # type: ignore[no-untyped-call]  # idempotent
            self._status = Client.CLOSED

    async def _end_reconnection(self) -> None:
        """Cancel the reconnection task until it has ended (bounded), unless it is us."""
        task = self._reconnection_task
        if task is None or task is asyncio.current_task():
            return
        deadline = time.monotonic() + self._RECONNECT_END_S
        while not task.done() and time.monotonic() < deadline:
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        if not task.done():
            log.error("NATS reconnection did not end %.0f s after close", self._RECONNECT_END_S)


async def _close_quietly(nc: Client) -> None:
    # AssertionError: nats-py asserts when closing a client whose connect()
    # never got far enough (we cancel it after ``retry_for``).
    with contextlib.suppress(nats.errors.Error, TimeoutError, OSError, AssertionError):
        try:
            await nc.close()
        except asyncio.CancelledError:
            # When the server died under the connection, nats-py can surface the
            # cancelled close-waiter of the dead socket from ``close()``. That is
            # a failed close, not a cancellation of the caller: re-raise only if
            # this task itself is being cancelled.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise


_CONNECT = object()
