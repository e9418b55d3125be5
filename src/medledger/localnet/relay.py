"""A delaying TCP relay: network delay, jitter and loss between "institutions" on one machine.

Test and benchmark tooling (issue #20). Where the kernel has ``sch_netem``,
``tc qdisc … netem`` is the honest way to delay a link; on kernels without
it (the Firecracker VMs this project is measured on) the delay is added
here, in userspace, by a relay that every cross-institution TCP connection
is pointed at instead of its real target::

    client ──► 127.0.0.1:<listen port> ══ relay ══► target host:port
               (bytes held RTT/2 ± jitter each way, order kept)

Each accepted connection opens one connection to the target and pumps
both directions independently. A chunk read at time *t* is written on at
``max(t + one_way + jitter sample, release time of the previous chunk)``:
the one-way delay is at least ``one_way`` and bytes never overtake each
other, as on one TCP connection. Half-closes (EOF) travel with the same
delay after the last byte.

Loss is an approximation of what TCP shows to the application, not packet
loss: with probability ``loss`` a chunk is held one retransmission timeout
longer (``max(200 ms, RTT + 4 * jitter)``, Linux's minimum RTO and its
RTO formula with the jitter as the RTT variation), and, because order is
kept, everything behind it waits too (head-of-line blocking). Congestion
control, window limits and bandwidth are not modelled.

:class:`RelayGroup` runs all links of a run on one event loop in a daemon
thread of the caller's process, so the delay is applied even while the
caller blocks; :meth:`RelayGroup.close` stops listening, closes every
connection and joins the thread (bounded). :func:`netem_unavailable_reason`
says whether netem could be used instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

from medledger.core.errors import InvalidInput

__all__ = [
    "LinkDelay",
    "RelayGroup",
    "netem_unavailable_reason",
    "probe_netem",
]

#: Linux's minimum retransmission timeout (TCP_RTO_MIN).
RTO_MIN_S: Final = 0.2
_CHUNK = 64 * 1024
#: Chunks in flight per direction before the relay stops reading (a crude window).
_IN_FLIGHT = 1024
_CLOSE_TIMEOUT_S = 10.0
_CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkDelay:
    """What one link adds per direction: a one-way delay, jitter, loss (see module docstring)."""

    one_way_s: float
    jitter_s: float = 0.0
    #: Probability (0 … 1) that a chunk is "lost" and retransmitted after one RTO.
    loss: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.one_way_s <= 10:
            raise InvalidInput("a one-way delay is 0 to 10 s")
        if not 0 <= self.jitter_s <= 10:
            raise InvalidInput("jitter is 0 to 10 s")
        if not 0 <= self.loss < 1:
            raise InvalidInput("loss is a probability below 1")

    @classmethod
    def from_rtt(cls, rtt_ms: float, jitter_ms: float = 0.0, loss_pct: float = 0.0) -> LinkDelay:
        """A link with round trip ``rtt_ms`` (half each way), ± ``jitter_ms``, ``loss_pct`` %."""
        return cls(one_way_s=rtt_ms / 2000, jitter_s=jitter_ms / 1000, loss=loss_pct / 100)

    @property
    def rto_s(self) -> float:
        """The retransmission timeout a lost chunk waits for."""
        return max(RTO_MIN_S, 2 * self.one_way_s + 4 * self.jitter_s)

    def hold_s(self, rng: random.Random) -> float:
        """How long one chunk is held: one-way delay + uniform jitter (+ one RTO if lost)."""
        hold = self.one_way_s
        if self.jitter_s:
            hold += rng.uniform(0.0, self.jitter_s)
        if self.loss and rng.random() < self.loss:
            hold += self.rto_s
        return hold


class _Link:
    """One listening socket relaying to one target with one :class:`LinkDelay`."""

    def __init__(self, target: tuple[str, int], delay: LinkDelay, rng: random.Random) -> None:
        self.target = target
        self.delay = delay
        self.rng = rng
        self.server: asyncio.Server | None = None
        #: The connection handlers (``_accepted``) and their pumps: :meth:`close` ends them all.
        self.tasks: set[asyncio.Task[Any]] = set()
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str) -> int:
        self.server = await asyncio.start_server(self._accepted, host, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio runs each handler as a task of its own that nothing else keeps: tracked,
        # so that closing the link ends a handler still connecting to the target too.
        handler = asyncio.current_task()
        if handler is not None:
            self.tasks.add(handler)
            handler.add_done_callback(self.tasks.discard)
        self.writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.target), _CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError, asyncio.CancelledError):  # cancelled: the link is closing
            writer.close()
            self.writers.discard(writer)
            return
        self.writers.add(up_writer)

        def abort() -> None:  # one direction broke: the other cannot go on either
            for w in (writer, up_writer):
                w.close()

        pumps = [
            asyncio.ensure_future(self._pump(reader, up_writer, abort)),
            asyncio.ensure_future(self._pump(up_reader, writer, abort)),
        ]
        for task in pumps:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        try:
            # Closing the group cancels the pumps; the connection then just ends (asyncio
            # would log a cancelled connection handler as an error).
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*pumps)
        finally:
            for w in (writer, up_writer):
                w.close()
                self.writers.discard(w)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, abort: Callable[[], None]
    ) -> None:
        """Copy ``reader`` to ``writer``, each chunk held by the link's delay, in order."""
        loop = asyncio.get_running_loop()
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_IN_FLIGHT)

        async def release() -> None:
            while True:
                due, data = await held.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:  # EOF, after every byte before it
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(release())
        last_due = 0.0
        try:
            while True:
                try:
                    data = await reader.read(_CHUNK)
                except OSError:
                    data = b""
                # Never earlier than the chunk before: bytes keep their order.
                last_due = max(loop.time() + self.delay.hold_s(self.rng), last_due)
                await held.put((last_due, data))
                if not data:
                    break
            await sender
        except (OSError, ConnectionError):
            abort()
        finally:
            if not sender.done():
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError, ConnectionError):
                    await sender

    async def close(self) -> None:
        """Stop listening, close every connection and end every handler and pump.

        When this returns no task of the link is left: the loop can stop without
        abandoning one half-way (a pending task destroyed with its loop).
        """
        if self.server is not None:
            self.server.close()
        for writer in list(self.writers):
            writer.close()
        while self.tasks:  # until none is left, also one that started meanwhile
            tasks = list(self.tasks)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, OSError, ConnectionError):
                    await task
                self.tasks.discard(task)


class RelayGroup:
    """Delaying relays on ``listen_host``, run by one event loop in a daemon thread; use ``with``.

    :meth:`add` starts a link and returns the port to point clients at.
    ``seed`` makes jitter and loss reproducible. With ``namespace`` (an
    ``ip netns`` name, e.g. :attr:`HostNetwork.bridge_namespace`) the loop's
    thread enters that network namespace before it makes any socket, so the
    relays listen and connect there while the rest of the process stays in
    its own namespace (a namespace is per thread); :class:`HostNetworkError`
    if it cannot.
    """

    def __init__(
        self, *, listen_host: str = "127.0.0.1", seed: int = 20, namespace: str | None = None
    ) -> None:
        self.listen_host = listen_host
        self._rng = random.Random(seed)  # noqa: S311 - simulated jitter, not secrets
        self._links: list[_Link] = []
        self._loop = asyncio.new_event_loop()
        entered: Future[None] = Future()

        def serve() -> None:
            if namespace is not None:
                from medledger.localnet.hosts import enter_namespace

                try:
                    enter_namespace(namespace)
                except BaseException as exc:
                    entered.set_exception(exc)
                    return
            entered.set_result(None)
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="delay-relay", daemon=True)
        self._thread.start()
        try:
            entered.result(_CONNECT_TIMEOUT_S)
        except BaseException:
            if entered.done():  # the thread gave up before running the loop: it is ending
                self._thread.join(_CLOSE_TIMEOUT_S)
                self._loop.close()
            else:
                self.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def add(self, target_host: str, target_port: int, delay: LinkDelay) -> int:
        """Relay a new listening port to ``target_host:target_port`` with ``delay``; its port."""
        link = _Link((target_host, target_port), delay, random.Random(self._rng.random()))  # noqa: S311
        self._links.append(link)
        started: Future[int] = asyncio.run_coroutine_threadsafe(
            link.start(self.listen_host), self._loop
        )
        return started.result(_CONNECT_TIMEOUT_S)

    def close(self) -> None:
        """Stop every link and the loop's thread. Safe to call twice."""
        if self._loop.is_closed():
            return
        if self._loop.is_running():

            async def close_all() -> None:
                await asyncio.gather(*(link.close() for link in self._links))

            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(_CLOSE_TIMEOUT_S)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_CLOSE_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()


def netem_unavailable_reason() -> str | None:
    """Why ``tc … netem`` cannot delay a link here; ``None`` if it can.

    Probes in a scratch network namespace (root only), so nothing of the
    machine's own interfaces is touched.
    """
    from medledger.localnet.hosts import HostNetwork, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        return reason
    tc = shutil.which("tc")
    if tc is None:
        return "the 'tc' command (iproute2) is not installed"
    with HostNetwork(["probe"]) as net:
        done = net.run(
            "probe", [tc, "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "1ms"]
        )
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip() or f"exit {done.returncode}"
        return f"tc netem: {message}"
    return None


def probe_netem() -> str:
    """``"netem"`` if the kernel can delay links, else ``"userspace relay (<why not netem>)"``."""
    try:
        reason = netem_unavailable_reason()
    except (OSError, subprocess.SubprocessError) as exc:
        reason = str(exc)
    return "netem" if reason is None else f"userspace relay ({reason})"
