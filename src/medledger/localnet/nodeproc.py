"""A benchmark's ``medledger node start`` process: launch, wait until ready, CPU time, stop.

Benchmarks that measure a node as an institution runs it put the node in
its own process, so it has a core of its own and the load generator's CPU
is not counted against it.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from medledger.localnet.natsserver import free_ports

__all__ = ["NodeProcess", "medledger_command", "proc_cpu_s", "tree_pids"]

#: Run by ``/bin/sh`` before the node: the shell writes its own pid into the cgroup's
#: ``cgroup.procs`` (``$0``) and then *becomes* the node (``exec`` keeps the pid), so the
#: node is in the group from its first instruction and every process it forks inherits it.
#: A failed write stops here (exit 126, the reason in the node's log): no node outside.
_JOIN_CGROUP = 'echo "$$" > "$0" || exit 126; exec "$@"'


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc); 0 if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid``, its running children (API workers) and the ones it reaped."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    reaped = (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
    return proc_cpu_s(pid) + reaped + sum(proc_cpu_s(int(child)) for child in children)


def tree_pids(pid: int) -> list[int]:
    """``pid`` and every live descendant of it (Linux /proc), parents before children."""
    out: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop(0)
        out.append(current)
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue  # exited meanwhile
        for task in tasks:
            try:
                todo.extend(int(child) for child in (task / "children").read_text().split())
            except OSError:
                continue
    return out


def medledger_command() -> list[str]:
    """The ``medledger`` command of this environment (the script, else ``python -c``)."""
    script = Path(sys.executable).parent / "medledger"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from medledger.cli import main; main()"]


def _status(url: str, tls: ssl.SSLContext | None = None) -> int:
    try:
        # https verified against the node's pinned certificate, or http to loopback.
        with urllib.request.urlopen(url, timeout=1, context=tls) as answer:  # noqa: S310
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return 0


class NodeProcess:
    """``medledger node start --dir root --port port`` until :meth:`stop`."""

    def __init__(
        self,
        root: Path,
        *,
        passphrase: bytes,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        ready_path: str = "/healthz",
        timeout: float = 60.0,
        tls: bool = False,
        workers: int = 1,
        cgroup_procs: Path | None = None,
    ) -> None:
        """``tls``: serve HTTPS with the node's certificate (``self.tls`` trusts it);
        else plain HTTP on loopback (``--plain-http``). ``workers``: ``node start
        --workers`` (1: one process, what the benchmarks and tests measure unless told).
        ``cgroup_procs``: a cgroup's ``cgroup.procs`` the node joins before its first
        instruction (its workers, forked later, inherit the group)."""
        self.root = root
        self.port = port or free_ports(1)[0]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.tls: ssl.SSLContext | None = None
        if tls:
            from medledger.config import NodePaths
            from medledger.services.tls import client_context, load_certificate

            self.tls = client_context([load_certificate(NodePaths(root=root).tls_cert)])
        environment = {**os.environ, **(env or {}), "MEDLEDGER_PASSPHRASE": passphrase.decode()}
        self._log = (root / "server.log").open("ab")
        join = ("/bin/sh", "-c", _JOIN_CGROUP, str(cgroup_procs)) if cgroup_procs else ()
        try:
            self.proc = subprocess.Popen(
                [
                    *join,
                    *medledger_command(),
                    "node",
                    "start",
                    *(() if tls else ("--plain-http",)),
                    "--dir",
                    str(root),
                    "--port",
                    str(self.port),
                    "--workers",
                    str(workers),
                ],
                env=environment,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
        except BaseException:
            self._log.close()
            raise
        try:
            deadline = time.monotonic() + timeout
            while _status(self.url + ready_path, self.tls) != 200:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"node start did not get ready; see {root / 'server.log'}")
                time.sleep(0.1)
        except BaseException:
            # Also when interrupted while waiting: the node must not outlive its owner.
            self.stop()
            raise

    def cpu_s(self) -> float:
        """CPU seconds of the node: its process and its API workers."""
        return tree_cpu_s(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL (a crash: no shutdown work of any kind) and reap the process."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()

    def stop(self) -> None:
        """SIGTERM (the node commits what it acknowledged), SIGKILL after 30 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
