"""Several "hosts" on one machine: Linux network namespaces joined by a private bridge.

Test and laptop tooling for what a consortium really is, institutions on
different machines: every host is a network namespace with its own IPv4
address and its own loopback, so a process that listens on ``127.0.0.1``
there is unreachable from the other hosts, and one that listens on the
host's address is reached over a (virtual) wire, as between machines::

    namespace ml<tag>b (the "switch")       namespace ml<tag>h0 ("host" 0)
    ┌──────────────────────────────┐        ┌────────────────────────────┐
    │ bridge br0  10.77.0.254/24   │        │ eth0  10.77.0.1/24         │
    │   ├── v0 ═══════ veth pair ══╪════════╪═ (peer of v0)              │
    │   ├── v1 ═══ … host 1        │        │ lo    127.0.0.1            │
    │   └── v2 ═══ … host 2        │        └────────────────────────────┘
    └──────────────────────────────┘

The bridge lives in a namespace of its own, and each veth pair is created
with its two ends directly in the bridge's and the host's namespace, so the
machine's root namespace gets no interface, route or address: the only
trace outside the run's namespaces is their names under ``/var/run/netns``.
Names carry a random tag, so parallel runs never collide (an interface
name is per namespace, so ``br0``/``v<i>``/``eth0`` are reused safely).

:class:`HostNetwork` is a context manager: leaving it, after success or
failure, stops every process it started (by PID: SIGTERM, then SIGKILL
after a bounded wait), then every process still inside one of its
namespaces (a child of one of ours; ``ip netns pids`` names them, and a
namespace with this run's random tag holds nothing else), then deletes the
namespaces, which removes their interfaces. Every wait is bounded.

Link delay (issue #20): ``netem`` is not available on every kernel, so a
delay goes into a userspace relay in the bridge namespace, which can reach
every host, and which the clients of a delayed link are pointed at instead
of the host itself: a process started there (:meth:`HostNetwork.popen` with
``host=None``), or one thread of the caller that entered it
(:func:`enter_namespace`, as ``RelayGroup(namespace=…)`` does).

Needs root (``CAP_SYS_ADMIN`` and ``CAP_NET_ADMIN``) and the ``ip`` command
of iproute2; :func:`unavailable_reason` says why not where they are missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self, TypeVar

from medledger.core.errors import InvalidInput, MedledgerError

__all__ = [
    "Host",
    "HostNetwork",
    "HostNetworkError",
    "call_in_namespace",
    "enter_namespace",
    "unavailable_reason",
]

#: A private range no machine we run on routes: the namespaces never see the root's routes anyway.
DEFAULT_SUBNET: Final = "10.77.0.0/24"
#: A consortium is a handful of institutions; this bounds what a caller can ask to create.
MAX_HOSTS: Final = 64
_IP_TIMEOUT_S = 10.0
_STOP_GRACE_S = 10.0
_POLL_S = 0.05
#: ``setns(2)``'s flag for a network namespace (linux/sched.h).
_CLONE_NEWNET: Final = 0x40000000
#: Where ``ip netns add`` keeps a handle (a bind-mounted nsfs file) per named namespace.
_NETNS_DIR: Final = Path("/var/run/netns")
_NAMESPACE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

_T = TypeVar("_T")


class HostNetworkError(MedledgerError):
    """A namespace, link or address could not be set up (the command and its message)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Host:
    """One simulated machine: its name, network namespace and IPv4 address."""

    name: str
    namespace: str
    address: str

    def url(self, scheme: str, port: int) -> str:
        """``scheme://address:port``, e.g. ``nats://10.77.0.1:4222``."""
        return f"{scheme}://{self.address}:{port}"


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (not root, no ``ip``, no netns support); else ``None``."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    ip = shutil.which("ip")
    if ip is None:
        return "the 'ip' command (iproute2) is not installed"
    if not Path("/proc/self/ns/net").exists():
        return "the kernel has no network namespaces"
    probe = f"mlprobe{secrets.token_hex(4)}"
    try:
        made = subprocess.run(
            [ip, "netns", "add", probe], capture_output=True, timeout=_IP_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"'ip netns add' failed: {exc}"
    if made.returncode != 0:
        return f"'ip netns add' failed: {made.stderr.decode(errors='replace').strip()}"
    subprocess.run(
        [ip, "netns", "del", probe], capture_output=True, timeout=_IP_TIMEOUT_S, check=False
    )
    return None


def enter_namespace(namespace: str) -> None:
    """Move the calling *thread* into the named network namespace (``ip netns`` name).

    Why a helper: Python 3.11 has no ``os.setns``, so this calls libc's
    ``setns(2)`` through ``ctypes``. A network namespace belongs to a thread,
    not a process: only the calling thread moves, and threads and processes
    it creates afterwards start in the new namespace. So a process that must
    live in a namespace (a ``spawn`` child) calls this first thing, before it
    has made any socket or thread; a process that must stay where it is calls
    it only in a thread of its own (see :func:`call_in_namespace`). Sockets
    already open keep the namespace they were made in.

    Raises :class:`HostNetworkError` (with the reason) if the namespace does
    not exist or the caller may not enter it (needs ``CAP_SYS_ADMIN``).
    """
    if _NAMESPACE_NAME.fullmatch(namespace) is None:
        raise InvalidInput(f"not a network namespace name: {namespace!r}")
    try:
        fd = os.open(_NETNS_DIR / namespace, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise HostNetworkError(
            f"cannot enter network namespace {namespace}: {exc.strerror}"
        ) from None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) == -1:
            reason = os.strerror(ctypes.get_errno())
            raise HostNetworkError(f"cannot enter network namespace {namespace}: {reason}")
    finally:
        os.close(fd)


def call_in_namespace(namespace: str, fn: Callable[[], _T], *, timeout: float) -> _T:
    """``fn()`` run in a new thread inside ``namespace``; its result, or its exception.

    The rest of the calling process stays in its own namespace: the thread
    enters ``namespace`` (:func:`enter_namespace`) and ends with ``fn``, so
    nothing else ever runs there. Waits at most ``timeout`` seconds, then
    raises :class:`HostNetworkError` (the thread is a daemon and is left to
    finish on its own; ``fn`` should bound its own waits).
    """
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            enter_namespace(namespace)
            outcome.append((True, fn()))
        except BaseException as exc:  # handed to the caller below
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name=f"netns-{namespace}", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise HostNetworkError(f"no answer from namespace {namespace} after {timeout:.0f} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    result: _T = value
    return result


class HostNetwork:
    """``names`` hosts on one bridge (see the module docstring); use ``with``.

    Hosts get consecutive addresses of ``subnet`` from its first usable one,
    in the order of ``names``; the bridge gets the last one. Nothing is created before ``__enter__``.
    """

    def __init__(self, names: Sequence[str], *, subnet: str = DEFAULT_SUBNET) -> None:
        if not 1 <= len(names) <= MAX_HOSTS:
            raise InvalidInput(f"a host network has 1 to {MAX_HOSTS} hosts, not {len(names)}")
        if len(set(names)) != len(names):
            raise InvalidInput("host names must be different")
        network = ipaddress.IPv4Network(subnet)
        usable = list(network.hosts())
        if len(usable) < len(names) + 1:  # the bridge takes the last address
            room = max(len(usable) - 1, 0)
            raise InvalidInput(f"{subnet} has room for {room} hosts, not {len(names)}")
        self.prefix = network.prefixlen
        self.tag = secrets.token_hex(4)
        #: The namespace of the bridge (the "switch"); a capture or a relay runs there.
        self.bridge_namespace = f"ml{self.tag}b"
        #: The bridge's own address (the subnet's last): where a relay in its namespace listens.
        self.bridge_address = str(usable[-1])
        self.hosts: dict[str, Host] = {
            name: Host(name=name, namespace=f"ml{self.tag}h{i}", address=str(usable[i]))
            for i, name in enumerate(names)
        }
        self._ip = shutil.which("ip") or "ip"
        self._made: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _create(self) -> None:
        bridge = self.bridge_namespace
        self._netns_add(bridge)
        self._ip_run("-n", bridge, "link", "set", "lo", "up")
        self._ip_run("-n", bridge, "link", "add", "br0", "type", "bridge")
        self._ip_run(
            "-n", bridge, "addr", "add", f"{self.bridge_address}/{self.prefix}", "dev", "br0"
        )
        self._ip_run("-n", bridge, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts.values()):
            self._netns_add(host.namespace)
            self._ip_run("-n", host.namespace, "link", "set", "lo", "up")
            # Both ends are born in their namespaces: the root namespace never holds them.
            self._ip_run(
                "-n",
                bridge,
                "link",
                "add",
                f"v{i}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host.namespace,
            )
            self._ip_run("-n", bridge, "link", "set", f"v{i}", "master", "br0")
            self._ip_run("-n", bridge, "link", "set", f"v{i}", "up")
            self._ip_run(
                "-n", host.namespace, "addr", "add", f"{host.address}/{self.prefix}", "dev", "eth0"
            )
            self._ip_run("-n", host.namespace, "link", "set", "eth0", "up")

    def close(self) -> None:
        """Stop this run's processes, then delete its namespaces. Safe to call twice."""
        for proc in self._procs:
            _stop(proc)
        self._procs.clear()
        for namespace in reversed(self._made):
            self._kill_inside(namespace)
            subprocess.run(
                [self._ip, "netns", "del", namespace],
                capture_output=True,
                timeout=_IP_TIMEOUT_S,
                check=False,
            )
        self._made.clear()

    def namespaces(self) -> list[str]:
        """The namespaces this run has created and not yet deleted."""
        return list(self._made)

    # -- running things inside a host -------------------------------------------------

    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise InvalidInput(f"no host {name!r} in this network") from None

    def holds(self, host: str, pid: int) -> bool:
        """Whether process ``pid`` (its main thread) is inside ``host``'s namespace now."""
        try:
            theirs = Path(f"/proc/{pid}/ns/net").stat()
            ours = (_NETNS_DIR / self.host(host).namespace).stat()
        except OSError:
            return False
        return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)

    def command(self, host: str | None, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace (``None``: the bridge's)."""
        namespace = self.bridge_namespace if host is None else self.host(host).namespace
        return [self._ip, "netns", "exec", namespace, *argv]

    def popen(
        self,
        host: str | None,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = subprocess.STDOUT,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``host``; it is stopped by :meth:`close` at the latest."""
        proc = subprocess.Popen(
            self.command(host, argv),
            env=None if env is None else dict(env),
            stdout=stdout,
            stderr=stderr,
            stdin=stdin,
        )
        self._procs.append(proc)
        return proc

    def run(
        self,
        host: str | None,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` inside ``host`` to the end (within ``timeout``); exit codes do not raise."""
        return subprocess.run(
            self.command(host, argv),
            env=None if env is None else dict(env),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM one process :meth:`popen` started; SIGKILL it after a bounded wait."""
        _stop(proc)
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)

    # -- helpers ----------------------------------------------------------------------

    def _netns_add(self, namespace: str) -> None:
        self._ip_run("netns", "add", namespace)
        self._made.append(namespace)

    def _ip_run(self, *args: str) -> None:
        try:
            done = subprocess.run(
                [self._ip, *args], capture_output=True, timeout=_IP_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HostNetworkError(f"ip {' '.join(args)}: {exc}") from None
        if done.returncode != 0:
            message = done.stderr.decode(errors="replace").strip()
            raise HostNetworkError(f"ip {' '.join(args)}: {message}")

    def _kill_inside(self, namespace: str) -> None:
        """SIGKILL what still runs in ``namespace`` (only this run's processes can be there)."""
        deadline = time.monotonic() + _STOP_GRACE_S
        while time.monotonic() < deadline:
            listed = subprocess.run(
                [self._ip, "netns", "pids", namespace],
                capture_output=True,
                timeout=_IP_TIMEOUT_S,
                check=False,
            )
            pids = [int(p) for p in listed.stdout.split() if p.isdigit()]
            if listed.returncode != 0 or not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(_POLL_S)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(_STOP_GRACE_S)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
