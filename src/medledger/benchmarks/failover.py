"""``medledger bench failover``: kill the active sequencer under writes; how soon writes resume.

One institution on two "hosts" (two node directories with the same keystore
and configuration, one machine) sharing one PostgreSQL (decision 0050):

1. ``node start`` in the first directory takes the sequencer lease (active),
   ``node start`` in the second serves as its standby;
2. clients write FHIR creates through both hosts (a client whose host stops
   answering moves to the other one, as behind a load balancer; a 503 is
   retried);
3. once writes were acknowledged through both, the active host is SIGKILLed;
4. measured: seconds from the kill to the first acknowledged write after it,
   and — after the writers stop — how many acknowledged writes cannot be read
   back with the acknowledged content through the surviving host (must be 0);
   then ``medledger verify`` on the survivor and one block per height.

The test of the failover (``tests/storage/test_sequencer_failover.py``) runs
this same scenario with smaller numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

from medledger.benchmarks.common import BENCH_PASSPHRASE
from medledger.config import NodePaths, StorageConfig
from medledger.localnet.natsserver import free_ports
from medledger.localnet.nodeproc import medledger_command
from medledger.node import init_node
from medledger.services.fhir import FHIR_JSON
from medledger.services.tls import client_context, load_certificate
from medledger.storage.factory import NODE_SCHEMA_PARTS, node_schema
from medledger.storage.keystore import KdfParams

__all__ = ["FailoverSettings", "failover_scenario", "run_failover_bench"]

_PASSPHRASE = BENCH_PASSPHRASE.decode()


@dataclass(frozen=True, slots=True, kw_only=True)
class FailoverSettings:
    """``writers`` per host; ``acks_before_kill`` per host; ``acks_after_kill`` in all;
    every wait bounded by ``deadline_s``; ``api_workers``: ``node start --workers``."""

    writers: int = 4
    api_workers: int = 1
    acks_before_kill: int = 20
    acks_after_kill: int = 40
    deadline_s: float = 90.0


@dataclass(slots=True)
class _Host:
    root: Path
    url: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass(slots=True)
class _Acks:
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: id -> (acknowledged body, monotonic times the request was sent and acknowledged,
    #: host index)
    acked: dict[str, tuple[bytes, float, float, int]] = field(default_factory=dict)
    refused: int = 0

    def sent_after(self, moment: float) -> list[float]:
        """When the writes sent after ``moment`` were acknowledged (an answer that was on
        its way at ``moment`` does not count), in order."""
        with self.lock:
            return sorted(acked for _, sent, acked, _ in self.acked.values() if sent > moment)

    def through(self, host: int) -> int:
        with self.lock:
            return sum(1 for _, _, _, h in self.acked.values() if h == host)


def _env(dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDLEDGER_")}
    env["MEDLEDGER_PASSPHRASE"] = _PASSPHRASE
    env["MEDLEDGER_DSN"] = dsn
    return env


def _start(host: _Host, dsn: str, workers: int) -> None:
    port = host.url.rsplit(":", 1)[1]
    with host.log.open("ab") as sink:
        host.proc = subprocess.Popen(
            [
                *medledger_command(),
                "node",
                "start",
                "--dir",
                str(host.root),
                "--port",
                port,
                "--workers",
                str(workers),
            ],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
            env=_env(dsn),
        )


def _readyz(host: _Host, tls: Any) -> dict[str, Any] | None:
    try:
        answer = httpx.get(f"{host.url}/readyz", timeout=5, verify=tls)
    except httpx.HTTPError:
        return None
    try:
        body: dict[str, Any] = answer.json()
    except ValueError:
        return None
    return body if answer.status_code == 200 else None


def _wait_role(host: _Host, tls: Any, role: str, deadline_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert host.proc is not None
        if host.proc.poll() is not None:
            raise RuntimeError(
                f"node start exited with {host.proc.returncode}; its log:\n{host.log_tail()}"
            )
        body = _readyz(host, tls)
        if body is not None and body.get("role") == role:
            return body
        time.sleep(0.1)
    raise RuntimeError(f"{host.url} was not ready as {role} in time; its log:\n{host.log_tail()}")


def _writer(
    hosts: list[_Host], first: int, token: str, tls: Any, stop: threading.Event, acks: _Acks
) -> None:
    """Create Patients through ``hosts[first]``; on a dead host move to the next one."""
    body = json.dumps({"resourceType": "Patient", "gender": "unknown"}).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON}
    current = first
    client = httpx.Client(headers=headers, timeout=30, verify=tls)
    try:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                answer = client.post(f"{hosts[current].url}/fhir/Patient", content=body)
            except httpx.HTTPError:
                current = (current + 1) % len(hosts)  # unanswered: never acknowledged
                time.sleep(0.05)
                continue
            if answer.status_code == 201:
                with acks.lock:
                    acks.acked[answer.json()["id"]] = (
                        answer.content,
                        sent,
                        time.monotonic(),
                        current,
                    )
            else:
                with acks.lock:
                    acks.refused += 1
                time.sleep(0.05)  # 503 while the sequencer moves: retry
    finally:
        client.close()


def _logs(hosts: list[_Host]) -> str:
    """Every host's log tail, for an error message."""
    return "\n".join(f"--- {h.root.name}:\n{h.log_tail()}" for h in hosts)


def _wait(predicate: Any, deadline_s: float, what: str, hosts: list[_Host]) -> None:
    deadline = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}; the logs:\n{_logs(hosts)}")
        time.sleep(0.05)


def _chain_heights(dsn: str, institution: str) -> tuple[int, int, int]:
    """(blocks, distinct heights, highest height) of the private chain."""
    table = sql.Identifier(node_schema(institution, "chain"), "blocks")
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*), count(DISTINCT height), max(height) FROM {}").format(table)
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def _drop_schemas(dsn: str, institution: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for part in NODE_SCHEMA_PARTS:
            conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                    sql.Identifier(node_schema(institution, part))
                )
            )


def failover_scenario(
    work: Path, dsn: str, settings: FailoverSettings | None = None
) -> dict[str, Any]:
    """Run the scenario of the module docstring in ``work`` on PostgreSQL ``dsn``.

    Returns the figures and checks (``resume_s``, ``lost``, ``verify_ok``, ``fork_free``,
    ...) and the two hosts' log tails; raises ``RuntimeError`` (with the logs) if a
    step does not happen within ``settings.deadline_s``. Leaves no process running
    and drops the institution's schemas.
    """
    settings = settings or FailoverSettings()
    name = f"Failover {secrets.token_hex(4)}"
    first = work / "host-a"
    config = init_node(
        first,
        name=name,
        passphrase=_PASSPHRASE.encode(),
        kdf=KdfParams(n=2**12),
        storage=StorageConfig(store="postgres", dsn=dsn, blobs="postgres"),
    )
    institution = config.institution
    try:
        second = work / "host-b"
        shutil.copytree(first, second)  # the node directory as copied to another host
        token_run = subprocess.run(
            [*medledger_command(), "token", "create", "--dir", str(first), "--role", "clinician"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=_env(dsn),
            timeout=120,
            check=True,
        )
        token = str(json.loads(token_run.stdout)["token"])
        ports = free_ports(2)
        hosts = [
            _Host(root, f"https://127.0.0.1:{port}", work / f"{root.name}.log")
            for root, port in zip((first, second), ports, strict=True)
        ]
        tls = client_context([load_certificate(NodePaths(root=first).tls_cert)])
        try:
            return _measure(hosts, dsn, token, tls, institution, settings)
        except subprocess.TimeoutExpired as exc:  # a process did not stop or answer in time
            raise RuntimeError(f"{exc}; the logs:\n{_logs(hosts)}") from None
    finally:
        _drop_schemas(dsn, institution)


def _measure(
    hosts: list[_Host],
    dsn: str,
    token: str,
    tls: Any,
    institution: str,
    settings: FailoverSettings,
) -> dict[str, Any]:
    stop = threading.Event()
    acks = _Acks()
    writers: list[threading.Thread] = []
    try:
        _start(hosts[0], dsn, settings.api_workers)
        active = _wait_role(hosts[0], tls, "active", settings.deadline_s)
        _start(hosts[1], dsn, settings.api_workers)
        standby = _wait_role(hosts[1], tls, "standby", settings.deadline_s)
        writers = [
            threading.Thread(
                target=_writer, args=(hosts, i % 2, token, tls, stop, acks), daemon=True
            )
            for i in range(2 * settings.writers)
        ]
        for w in writers:
            w.start()
        _wait(
            lambda: min(acks.through(0), acks.through(1)) >= settings.acks_before_kill,
            settings.deadline_s,
            "acknowledged writes through both hosts",
            hosts,
        )
        before = len(acks.acked)
        assert hosts[0].proc is not None
        killed = time.monotonic()
        hosts[0].proc.send_signal(signal.SIGKILL)
        hosts[0].proc.wait(timeout=30)
        _wait(
            lambda: len(acks.sent_after(killed)) >= settings.acks_after_kill,
            settings.deadline_s,
            "writes acknowledged after the kill",
            hosts,
        )
        resume_s = acks.sent_after(killed)[0] - killed
        stop.set()
        for w in writers:
            w.join(60)
        after = _readyz(hosts[1], tls)
        lost = _lost(hosts[1], token, tls, acks)
        assert hosts[1].proc is not None
        hosts[1].proc.send_signal(signal.SIGTERM)
        survivor_exit = hosts[1].proc.wait(timeout=60)
        verify = subprocess.run(
            [*medledger_command(), "verify", "--dir", str(hosts[1].root)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=_env(dsn),
            timeout=300,
            check=False,
        )
        blocks, heights, top = _chain_heights(dsn, institution)
        return {
            "resume_s": round(resume_s, 3),
            "acked_before_kill": before,
            "acked_total": len(acks.acked),
            "refused_or_retried": acks.refused,
            "lost": len(lost),
            "lost_ids": lost[:10],
            "active_before": {k: active.get(k) for k in ("role", "epoch")},
            "standby_before": {k: standby.get(k) for k in ("role", "active", "epoch")},
            "survivor_after": None
            if after is None
            else {k: after.get(k) for k in ("status", "role", "epoch")},
            "survivor_exit": survivor_exit,
            "verify_ok": verify.returncode == 0 and verify.stdout.startswith("OK"),
            "verify_output": (verify.stdout + verify.stderr)[-2000:],
            "blocks": blocks,
            "fork_free": blocks == heights == top + 1,
            "logs": {h.root.name: h.log_tail() for h in hosts},
        }
    finally:
        stop.set()
        for w in writers:
            w.join(60)
        for host in hosts:
            if host.proc is not None and host.proc.poll() is None:
                host.proc.kill()
                host.proc.wait(timeout=30)


def _lost(survivor: _Host, token: str, tls: Any, acks: _Acks) -> list[str]:
    """The acknowledged writes the survivor does not serve with the acknowledged content."""
    lost = []
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=survivor.url, headers=headers, timeout=30, verify=tls) as client:
        for rid, (body, _, _, _) in sorted(acks.acked.items()):
            got = client.get(f"/fhir/Patient/{rid}")
            if got.status_code != 200 or got.content != body:
                lost.append(rid)
    return lost


def run_failover_bench(
    *,
    root: Path | None,
    dsn: str | None,
    settings: FailoverSettings,
    json_out: Path | None,
    quick: bool = False,
) -> dict[str, Any]:
    """The bench command: the scenario on ``dsn`` or on an embedded PostgreSQL of its own.

    ``quick``: 2 writers per host, 5 writes per host before the kill, 10 after."""
    if quick:
        settings = FailoverSettings(
            writers=2,
            api_workers=settings.api_workers,
            acks_before_kill=5,
            acks_after_kill=10,
            deadline_s=settings.deadline_s,
        )
    from rich.console import Console

    from medledger.benchmarks.common import finish_results, results_header, work_dir, write_json
    from medledger.localnet.pg_embedded import EmbeddedPostgres

    started = time.perf_counter()
    results = results_header(
        {
            "writers_per_host": settings.writers,
            "api_workers": settings.api_workers,
            "acks_before_kill": settings.acks_before_kill,
            "acks_after_kill": settings.acks_after_kill,
        },
        quick=quick,
    )
    console = Console(stderr=True)
    with work_dir(root, "failover") as work, contextlib.ExitStack() as stack:
        if dsn is None:
            server = stack.enter_context(EmbeddedPostgres.start_new())
            dsn = server.create_database("medledger_failover")
        console.print("[bold]failover[/]: two hosts, one PostgreSQL; killing the active host")
        run = failover_scenario(work, dsn, settings)
    logs = run.pop("logs")
    verify_output = run.pop("verify_output")
    results["failover"] = run
    finish_results(results, started)
    console.print(
        f"writes resumed {run['resume_s']:.2f} s after the kill; acknowledged writes lost:"
        f" {run['lost']} of {run['acked_total']}; verify "
        f"{'passed' if run['verify_ok'] else 'FAILED'}; "
        f"{'one block per height' if run['fork_free'] else 'FORK'}"
    )
    if not (run["verify_ok"] and run["fork_free"] and run["lost"] == 0):
        console.print(verify_output)
        for name, text in logs.items():
            console.print(f"--- {name}:\n{text}", markup=False)
    if json_out is not None:
        write_json(json_out, results)
    print(json.dumps(results["failover"], indent=2))
    return results
