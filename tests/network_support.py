"""Running ``medledger network`` from tests: the real command, and cleanup that always happens."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli_support import medledger_command, run_in_process
from medledger.core.errors import MedledgerError
from medledger.localnet.netproc import PidRecord, load_network, node_tls
from medledger.services.tls import client_context, load_certificate

__all__ = [
    "FHIR_JSON",
    "PASSPHRASE",
    "Run",
    "cli_env",
    "member_tls",
    "pid_files",
    "run_cli",
    "stop_network",
    "tls",
]

PASSPHRASE = "network test passphrase"
FHIR_JSON = "application/fhir+json"


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDLEDGER_")}
    env["MEDLEDGER_PASSPHRASE"] = PASSPHRASE
    return env


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self
        return json.loads(self.out)


def run_cli(
    *args: str | Path,
    timeout: float = 240,
    env: dict[str, str] | None = None,
    in_process: bool = False,
) -> Run:
    """Run ``medledger ARGS`` (with ``env`` added to the test environment); no tracebacks.

    A subprocess running the console script, or with ``in_process`` the CLI's
    entry point in this process (``cli_support.run_in_process``): for commands
    that only print and exit, never for one that starts processes (``network up``).
    """
    if in_process:
        done = run_in_process(args, env={"MEDLEDGER_PASSPHRASE": PASSPHRASE, **(env or {})})
        run = Run(done.code, done.out, done.err)
        assert "Traceback" not in run.out + run.err, run
        return run
    proc = subprocess.run(
        [*medledger_command(), *(str(a) for a in args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env={**cli_env(), **(env or {})},
        timeout=timeout,
        check=False,
    )
    run = Run(proc.returncode, proc.stdout.decode(), proc.stderr.decode())
    assert "Traceback" not in run.out + run.err, run
    return run


def tls(node: dict[str, Any]) -> ssl.SSLContext:
    """What a client of a ``network up`` node trusts: that node's pinned certificate alone."""
    return node_tls(node)


def member_tls(node: dict[str, Any], member_dir: Path) -> ssl.SSLContext:
    """As the member in ``member_dir`` connects to ``node``: mutual TLS with its certificate."""
    return client_context(
        [load_certificate(Path(node["tls_cert"]))],
        cert_path=member_dir / "tls.crt",
        key_path=member_dir / "tls.key",
    )


def pid_files(base: Path) -> list[Path]:
    return [*base.glob("*/node.pid"), *base.glob("nats/*/nats.pid")]


def stop_network(base: Path) -> None:
    """Stop whatever runs from ``base``: ``network down``, then SIGKILL by verified PID."""
    if (base / "network.json").exists():
        run_cli("network", "down", "--dir", base, "--timeout", "10")
        with contextlib.suppress(MedledgerError):  # a test may have broken the file on purpose
            pg = load_network(base.resolve()).postgres
            if pg is not None and not pg.data_dir.is_relative_to(base.resolve()):
                shutil.rmtree(pg.data_dir.parent, ignore_errors=True)
    for pid_file in pid_files(base):  # last resort, by the same /proc identity check
        record = PidRecord.load(pid_file)
        if record is not None and record.running():
            os.kill(record.pid, signal.SIGKILL)
