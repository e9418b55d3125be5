"""``medledger token create|list|revoke`` and ``medledger node start``.

``node start``, the first ``token create`` and ``verify`` run as the console
script in a subprocess; the other token commands through the CLI's entry point
in this process (``cli_support.run_in_process``).

Tokens: printed once, stored only as hashes, never listed with their secrets,
failures are one ``error:`` line. The node service: answers ``/healthz`` and
FHIR over HTTP, stops on SIGTERM with exit status 0 (within a generous bound) after
finishing in-flight writes, leaves a chain that ``medledger verify`` accepts,
and serves every acknowledged record again after a restart.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli_support import medledger_command, run_in_process, start_node_process
from medledger.cli.service import machine_cores
from medledger.config import NodePaths
from medledger.localnet.natsserver import free_ports
from medledger.node import init_node
from medledger.services.tls import client_context, load_certificate
from medledger.storage.keystore import KdfParams
from medledger.synthetic import generate_patients

PASSPHRASE = "service test passphrase"
#: Bounds, not figures (those are the benchmarks'): a node that is not ready, or has not
#: stopped after SIGTERM, this long after is broken, even on a loaded machine.
READY_DEADLINE_S = 120.0
STOP_DEADLINE_S = 60.0
FHIR_JSON = "application/fhir+json"


def _env(passphrase: str | None = PASSPHRASE) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDLEDGER_")}
    if passphrase is not None:
        env["MEDLEDGER_PASSPHRASE"] = passphrase
    return env


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


def run_cli(*args: str | Path, process: bool = False) -> Run:
    """``medledger ARGS`` in this process, or with ``process`` as the console script."""
    if process:
        proc = subprocess.run(
            [*medledger_command(), *(str(a) for a in args)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=_env(),
            timeout=120,
            check=False,
        )
        run = Run(proc.returncode, proc.stdout.decode(), proc.stderr.decode())
    else:
        done = run_in_process(args, env={"MEDLEDGER_PASSPHRASE": PASSPHRASE})
        run = Run(done.code, done.out, done.err)
    assert "Traceback" not in run.out + run.err, run
    return run


def assert_one_error_line(run: Run, code: int = 1) -> None:
    assert run.code == code, run
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run
    assert run.out == "", run


@pytest.fixture(scope="module")
def node_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("service") / "node"
    init_node(
        root,
        name="Service Test Hospital",
        passphrase=PASSPHRASE.encode(),
        kdf=KdfParams(n=2**12),
    )
    return root


# -- tokens --------------------------------------------------------------------------------


def test_token_create_prints_the_token_once_and_stores_only_a_hash(node_dir: Path) -> None:
    run = run_cli(
        "token", "create", "--dir", node_dir, "--role", "clinician", "--label", "ehr", process=True
    )
    assert run.code == 0, run
    info = json.loads(run.out)
    token = info["token"]
    assert token.startswith(f"mlt_{info['id']}_")
    assert info["role"] == "clinician"
    assert info["patient"] is None
    assert info["expires_ms"] is None
    assert run.out.count(token) == 1
    assert token not in run.err
    secret = token.split("_", 2)[2]
    assert len(secret) >= 32
    stored = b"".join(p.read_bytes() for p in node_dir.glob("tokens.db*"))
    assert secret.encode() not in stored, "the token secret is stored in clear"


def test_token_create_patient_and_ttl(node_dir: Path) -> None:
    before = time.time() * 1000
    run = run_cli(
        "token",
        "create",
        "--dir",
        node_dir,
        "--role",
        "patient",
        "--patient",
        "p-123",
        "--ttl-hours",
        "2",
    )
    assert run.code == 0, run
    info = json.loads(run.out)
    assert info["role"] == "patient"
    assert info["patient"] == "p-123"
    assert before + 2 * 3_600_000 - 5_000 <= info["expires_ms"] <= time.time() * 1000 + 7_205_000


def test_token_create_refuses_bad_input(node_dir: Path, tmp_path: Path) -> None:
    assert_one_error_line(run_cli("token", "create", "--dir", node_dir, "--role", "patient"))
    assert_one_error_line(
        run_cli("token", "create", "--dir", node_dir, "--role", "auditor", "--patient", "p1")
    )
    usage = run_cli("token", "create", "--dir", node_dir, "--role", "superuser")
    assert usage.code == 2, usage
    assert_one_error_line(run_cli("token", "create", "--dir", tmp_path, "--role", "clinician"))


def test_token_list_never_shows_secrets_and_revoke_works(node_dir: Path) -> None:
    made = [
        json.loads(run_cli("token", "create", "--dir", node_dir, "--role", role).out)
        for role in ("auditor", "admin")
    ]
    listing = run_cli("token", "list", "--dir", node_dir)
    assert listing.code == 0, listing
    tokens = json.loads(listing.out)
    by_id = {t["id"]: t for t in tokens}
    for m in made:
        assert by_id[m["id"]]["role"] == m["role"]
        assert by_id[m["id"]]["revoked"] is False
        assert m["token"] not in listing.out
        assert m["token"].split("_", 2)[2] not in listing.out
    for t in tokens:
        assert set(t) == {"id", "role", "patient", "label", "expires_ms", "revoked"}
        assert "mlt_" not in json.dumps(t)

    revoked = run_cli("token", "revoke", "--dir", node_dir, made[0]["id"])
    assert revoked.code == 0, revoked
    assert json.loads(revoked.out) == {"revoked": made[0]["id"]}
    after = {t["id"]: t for t in json.loads(run_cli("token", "list", "--dir", node_dir).out)}
    assert after[made[0]["id"]]["revoked"] is True
    assert after[made[1]["id"]]["revoked"] is False


def test_revoking_an_unknown_token_is_one_error_line(node_dir: Path) -> None:
    assert_one_error_line(run_cli("token", "revoke", "--dir", node_dir, "000000000000"))


# -- node start ----------------------------------------------------------------------------


@dataclass
class NodeProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    #: What a client of this node trusts: its own certificate, nothing else.
    tls: ssl.SSLContext

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def clinician_token(node_dir: Path) -> str:
    run = run_cli("token", "create", "--dir", node_dir, "--role", "clinician")
    assert run.code == 0, run
    return str(json.loads(run.out)["token"])


def start_node(root: Path, log: Path, workers: int | None = 2) -> NodeProcess:
    """``node start`` with ``workers`` API worker processes (None: the default)."""
    worker_options = [] if workers is None else ["--workers", str(workers)]
    (port,) = free_ports(1)
    # Two API workers unless told otherwise: the graceful stop under writes
    # is pinned with the sequencer and its workers (decision 0035).
    proc = start_node_process(root, port, log, _env(), *worker_options)
    tls = client_context([load_certificate(NodePaths(root=root).tls_cert)])
    node = NodeProcess(proc, f"https://127.0.0.1:{port}", log, tls)
    deadline = time.monotonic() + READY_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"node start exited with {proc.returncode}: {node.stderr()}")
        try:
            # /readyz, not /healthz: ready once every API worker accepts connections.
            if httpx.get(f"{node.url}/readyz", timeout=1, verify=tls).status_code == 200:
                return node
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    pytest.fail(f"node start was not ready within {READY_DEADLINE_S:.0f} s: {node.stderr()}")


def stop_node(node: NodeProcess, sig: int = signal.SIGTERM) -> tuple[int, float]:
    started = time.monotonic()
    node.proc.send_signal(sig)
    try:
        code = node.proc.wait(timeout=STOP_DEADLINE_S)
    except subprocess.TimeoutExpired:
        node.proc.kill()
        node.proc.wait()
        return -9, time.monotonic() - started
    return code, time.monotonic() - started


@dataclass
class FirstRun:
    created: dict[str, Any]
    created_bytes: bytes
    read_bytes: bytes
    acked: dict[str, bytes] = field(default_factory=dict)
    exit_code: int = 0
    stop_seconds: float = 0.0
    log: str = ""


def _writer(node: NodeProcess, token: str, stop: threading.Event, acked: dict[str, bytes]) -> None:
    patient = generate_patients(1, seed=31, start_index=9, resources_per_patient=0)[0].patient
    del patient["id"]
    body = json.dumps(patient).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON}
    with httpx.Client(base_url=node.url, headers=headers, timeout=10, verify=node.tls) as client:
        while not stop.is_set():
            try:
                r = client.post("/fhir/Patient", content=body)
            except httpx.TransportError:
                return  # the server went away: anything unanswered was never acknowledged
            if r.status_code == 201:
                acked[r.json()["id"]] = r.content
            elif r.status_code >= 500:
                return


@pytest.fixture(scope="module")
def first_run(
    node_dir: Path, clinician_token: str, tmp_path_factory: pytest.TempPathFactory
) -> FirstRun:
    """Start the node, write over HTTP, then SIGTERM it while writers are busy."""
    node = start_node(node_dir, tmp_path_factory.mktemp("logs") / "first.log")
    try:
        headers = {"Authorization": f"Bearer {clinician_token}", "Content-Type": FHIR_JSON}
        patient = generate_patients(1, seed=31, start_index=4, resources_per_patient=0)[0].patient
        del patient["id"]
        with httpx.Client(
            base_url=node.url, headers=headers, timeout=10, verify=node.tls
        ) as client:
            created = client.post("/fhir/Patient", content=json.dumps(patient).encode())
            assert created.status_code == 201, created.text
            read = client.get(f"/fhir/Patient/{created.json()['id']}")
            assert read.status_code == 200, read.text
        stop = threading.Event()
        acked: dict[str, bytes] = {}
        writers = [
            threading.Thread(target=_writer, args=(node, clinician_token, stop, acked))
            for _ in range(4)
        ]
        for w in writers:
            w.start()
        # Stop while writes are in flight, but only once one was acknowledged: a
        # fixed pause found none on a loaded machine.
        deadline = time.monotonic() + 60
        while len(acked) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        code, seconds = stop_node(node)
        stop.set()
        for w in writers:
            w.join(15)
    except httpx.TransportError as exc:
        pytest.fail(f"the node dropped a connection ({exc!r}); its log:\n{node.stderr()}")
    finally:
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()
    return FirstRun(
        created=created.json(),
        created_bytes=created.content,
        read_bytes=read.content,
        acked=dict(acked),
        exit_code=code,
        stop_seconds=seconds,
        log=node.stderr(),
    )


def test_node_start_serves_fhir_over_http(first_run: FirstRun) -> None:
    assert first_run.read_bytes == first_run.created_bytes
    assert first_run.created["meta"]["versionId"] == "1"
    assert len(first_run.acked) > 0, "no write was acknowledged while the writers ran"


def test_sigterm_stops_the_node_with_status_0(first_run: FirstRun) -> None:
    # A node still running at STOP_DEADLINE_S is killed (-9): stopping is bounded here,
    # how fast it stops is not (a busy machine is no defect).
    assert first_run.exit_code == 0, (
        f"node start exited with {first_run.exit_code} on SIGTERM after"
        f" {first_run.stop_seconds:.1f} s; log:\n{first_run.log[-2000:]}"
    )
    assert "Traceback" not in first_run.log


def test_logs_carry_no_phi(first_run: FirstRun) -> None:
    name = first_run.created["name"][0]
    for value in (name["family"], *name["given"], first_run.created["birthDate"]):
        assert value not in first_run.log


def test_verify_passes_after_shutdown(node_dir: Path, first_run: FirstRun) -> None:
    run = run_cli("verify", "--dir", node_dir, process=True)
    assert run.code == 0, run
    assert run.out.startswith("OK: ")


@pytest.fixture
def second_node(node_dir: Path, first_run: FirstRun, tmp_path: Path) -> Iterator[NodeProcess]:
    node = start_node(node_dir, tmp_path / "second.log")
    try:
        yield node
    finally:
        if node.proc.poll() is None:
            stop_node(node)


def test_restart_serves_every_acknowledged_record(
    first_run: FirstRun, second_node: NodeProcess, clinician_token: str
) -> None:
    headers = {"Authorization": f"Bearer {clinician_token}"}
    with httpx.Client(
        base_url=second_node.url, headers=headers, timeout=10, verify=second_node.tls
    ) as client:
        r = client.get(f"/fhir/Patient/{first_run.created['id']}")
        assert r.status_code == 200, r.text
        assert r.content == first_run.created_bytes
        lost = []
        for rid, body in first_run.acked.items():
            got = client.get(f"/fhir/Patient/{rid}")
            if got.status_code != 200 or got.content != body:
                lost.append((rid, got.status_code))
        assert not lost, f"{len(lost)} of {len(first_run.acked)} acknowledged writes were lost"
        # And the restarted node still takes writes.
        more = client.post(
            "/fhir/Patient",
            content=b'{"resourceType":"Patient","gender":"unknown"}',
            headers={"Content-Type": FHIR_JSON},
        )
        assert more.status_code == 201, more.text


# -- TLS ----------------------------------------------------------------------------------


def test_the_node_serves_https_only_and_plain_http_is_refused_off_loopback(
    node_dir: Path, tmp_path: Path
) -> None:
    node = start_node(node_dir, tmp_path / "tls.log", workers=None)
    try:
        # By default one API worker per core this process may run on (its children).
        cores = machine_cores()
        task = Path(f"/proc/{node.proc.pid}/task/{node.proc.pid}/children")
        assert len(task.read_text().split()) == (cores if cores > 1 else 0), node.stderr()
        port = int(node.url.rsplit(":", 1)[1])
        with httpx.Client(base_url=node.url, timeout=10, verify=node.tls) as client:
            answer = client.get("/healthz")
            assert answer.status_code == 200
            assert answer.extensions["network_stream"].get_extra_info("ssl_object").version() in {
                "TLSv1.3",
                "TLSv1.2",
            }
        # A plaintext request on the HTTPS port gets no HTTP answer.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert not raw.recv(4096).startswith(b"HTTP/1.1 200")
        # A client that trusts something else (the system's CAs) refuses the node.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{node.url}/healthz", timeout=10, verify=ssl.create_default_context())
    finally:
        stop_node(node)
    refused = run_cli(
        "node", "start", "--dir", node_dir, "--host", "0.0.0.0", "--plain-http", "--port", "1",
        process=True,
    )  # fmt: skip
    assert refused.code != 0
    assert refused.err.strip() == (
        "error: --plain-http is for loopback addresses only, not '0.0.0.0'"
    )
