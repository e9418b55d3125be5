"""``node start --workers 2``: real processes, a real socket, real kills.

Every worker answers reads on its own; a worker killed under writes is
replaced and loses nothing acknowledged; a killed sequencer (the parent) takes
its workers with it, and after a restart every acknowledged write is there and
``verify --records`` passes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cli_support import medledger_command, start_node_process
from medledger.localnet.natsserver import free_ports
from medledger.node import init_node, open_token_store
from medledger.storage.keystore import KdfParams

PASSPHRASE = "api workers test passphrase"
FHIR_JSON = "application/fhir+json"
DEADLINE_S = 90.0


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDLEDGER_")}
    env["MEDLEDGER_PASSPHRASE"] = PASSPHRASE
    # No scrub pass while the tests look at the store.
    env["MEDLEDGER_SCRUB_INTERVAL_S"] = "0"
    return env


def _until(
    condition: Callable[[], bool],
    what: str,
    node: Node | None = None,
    deadline_s: float = DEADLINE_S,
) -> None:
    """Poll ``condition`` until it holds; past the deadline, fail with ``node``'s log."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() >= deadline:
            log = f"; the node's log ends:\n{node.stderr()[-3000:]}" if node is not None else ""
            pytest.fail(f"timed out waiting until {what}{log}")
        time.sleep(0.05)


@dataclass
class Node:
    root: Path
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def workers(self) -> list[int]:
        """The parent's living children: its API workers."""
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except FileNotFoundError:
            return []
        return [int(pid) for pid in text.split() if _alive(int(pid))]

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def ready_workers(self) -> set[int]:
        """The workers the parent logged as accepting connections (``API worker ready``)."""
        ready = set()
        for line in self.stderr().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # not one of the node's log lines
            if isinstance(entry, dict) and entry.get("message") == "API worker ready":
                ready.add(entry["fields"]["pid"])
        return ready


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def start(root: Path, log: Path, workers: int = 2) -> Node:
    (port,) = free_ports(1)
    proc = start_node_process(
        root, port, log, _env(), "--plain-http", "--workers", str(workers), append=True
    )
    node = Node(root, proc, f"http://127.0.0.1:{port}", log)

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"node start exited with {proc.returncode}: {node.stderr()[-3000:]}")
        try:
            return httpx.get(f"{node.url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        _until(ready, "the node is ready", node)
        if workers > 1:
            _until(lambda: len(node.workers()) == workers, "every worker runs", node)
    except BaseException:
        _kill(node)  # a node that never got ready must not outlive the test
        raise
    return node


def _kill(node: Node) -> None:
    """SIGKILL the node and its workers, and reap the node."""
    workers = node.workers()
    if node.proc.poll() is None:
        node.proc.kill()
    node.proc.wait()
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stop(node: Node, sig: int = signal.SIGTERM) -> int:
    node.proc.send_signal(sig)
    try:
        return node.proc.wait(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        node.proc.kill()
        node.proc.wait()
        raise


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("workers") / "node"
    init_node(root, name="Workers Hospital", passphrase=PASSPHRASE.encode(), kdf=KdfParams(n=2**12))
    return root


@pytest.fixture(scope="module")
def token(root: Path) -> str:
    tokens = open_token_store(root)
    try:
        text, _ = tokens.create(role="clinician", now_ms=int(time.time() * 1000))
    finally:
        tokens.close()
    return text


@pytest.fixture(scope="module")
def running(root: Path) -> Iterator[Node]:
    """One node for the module: its last test kills it."""
    node = start(root, root.parent / "node.log")
    try:
        yield node
    finally:
        _kill(node)


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON}


def _patient(i: int) -> bytes:
    return json.dumps({"resourceType": "Patient", "name": [{"family": f"W{i}"}]}).encode()


class Writers:
    """Threads creating Patients until stopped; ``acked`` holds every 201's id and body."""

    def __init__(self, node: Node, token: str, count: int = 4) -> None:
        self.node, self.token = node, token
        self.acked: dict[str, bytes] = {}
        self.failures: list[int] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(count)]
        for thread in self._threads:
            thread.start()

    def _run(self, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                # One connection per request: each lands on whichever worker accepts it.
                r = httpx.post(
                    f"{self.node.url}/fhir/Patient",
                    content=_patient(n * 100_000 + i),
                    headers=_headers(self.token),
                    timeout=30,
                )
            except httpx.TransportError:
                time.sleep(0.05)  # a worker or the node went away: never acknowledged
                continue
            with self._lock:
                if r.status_code == 201:
                    self.acked[r.json()["id"]] = r.content
                else:
                    self.failures.append(r.status_code)

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def stop(self) -> dict[str, bytes]:
        self._stop.set()
        for thread in self._threads:
            thread.join(DEADLINE_S)
        return dict(self.acked)


def _check_store(root: Path, acked: dict[str, bytes], log: Path, token: str) -> None:
    """Restart alone (recovery runs), read every acknowledged write, stop, then verify."""
    node = start(root, log, workers=1)
    try:
        with httpx.Client(base_url=node.url, headers=_headers(token), timeout=30) as client:
            for rid, body in acked.items():
                r = client.get(f"/fhir/Patient/{rid}")
                assert r.status_code == 200, (rid, r.text)
                assert r.json() == json.loads(body)
    finally:
        assert stop(node) == 0
    run = subprocess.run(
        [*medledger_command(), "verify", "--dir", str(root), "--records"],
        capture_output=True,
        env=_env(),
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout.decode() + run.stderr.decode()


def test_every_worker_serves_reads_and_writes_on_its_own(running: Node, token: str) -> None:
    with httpx.Client(base_url=running.url, headers=_headers(token), timeout=30) as client:
        created = client.post("/fhir/Patient", content=_patient(1))
        assert created.status_code == 201, created.text
    rid = created.json()["id"]
    workers = running.workers()
    assert len(workers) == 2
    for paused in workers:
        # A stopped worker accepts nothing: every new connection goes to the other one.
        os.kill(paused, signal.SIGSTOP)
        try:
            for i in range(3):
                r = httpx.get(
                    f"{running.url}/fhir/Patient/{rid}", headers=_headers(token), timeout=30
                )
                assert r.status_code == 200 and r.json()["id"] == rid, r.text
                w = httpx.post(
                    f"{running.url}/fhir/Patient",
                    content=_patient(i),
                    headers=_headers(token),
                    timeout=30,
                )
                assert w.status_code == 201, w.text
            # Forwarded to the parent (a transaction Bundle), answered through this worker.
            bundle = {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {
                        "resource": {"resourceType": "Patient"},
                        "request": {"method": "POST", "url": "Patient"},
                    }
                ],
            }
            b = httpx.post(
                f"{running.url}/fhir",
                content=json.dumps(bundle),
                headers=_headers(token),
                timeout=30,
            )
            assert b.status_code == 200, b.text
            assert httpx.get(f"{running.url}/readyz", timeout=30).status_code == 200
        finally:
            os.kill(paused, signal.SIGCONT)


def test_a_client_cannot_claim_another_address_through_the_forwarding_header(
    running: Node,
) -> None:
    """The failed-authentication budget is per client address: a client that names
    another address in the workers' forwarding header is still charged as itself."""
    statuses = []
    for i in range(40):
        r = httpx.post(
            f"{running.url}/admin/keys/rotate",
            headers={
                "Authorization": "Bearer mlt_bad_token",
                "X-Medledger-Forwarded-For": f"10.0.{i}.1:1",
            },
            timeout=30,
        )
        statuses.append(r.status_code)
        if r.status_code == 429:
            break
    assert statuses[-1] == 429, statuses


def _scrape(node: Node) -> dict[str, float]:
    """Every series of ``/metrics`` (answered by the parent, whichever worker receives it)."""
    r = httpx.get(f"{node.url}/metrics", timeout=30)
    assert r.status_code == 200, r.text
    series: dict[str, float] = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            series[key] = float(value)
    return series


UNAUTHENTICATED = 'medledger_refusals_total{reason="unauthenticated"}'
FOUR_XX = 'medledger_requests_total{class="4xx"}'
COMMITS = "medledger_commit_latency_seconds_count"


def _through_one_worker(node: Node, served_by: int, requests: Callable[[], None]) -> None:
    """Run ``requests`` with every other worker stopped: ``served_by`` answers them all."""
    others = [pid for pid in node.workers() if pid != served_by]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        requests()
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


def _unauthenticated_reads(node: Node, count: int) -> Callable[[], None]:
    def send() -> None:
        for _ in range(count):
            # A worker answers this itself (a FHIR read): 401, no token presented, no budget.
            r = httpx.get(f"{node.url}/fhir/Patient/no-such-id", timeout=30)
            assert r.status_code == 401, r.text

    return send


def test_metrics_count_every_workers_answers_exactly_once(running: Node, token: str) -> None:
    """K answers spread over both workers are K in the scrape, wherever the scrape lands."""
    before = _scrape(running)
    per_worker = 7
    workers = running.workers()
    assert len(workers) == 2
    for pid in workers:
        _through_one_worker(running, pid, _unauthenticated_reads(running, per_worker))

        def create() -> None:
            r = httpx.post(
                f"{running.url}/fhir/Patient",
                content=_patient(7),
                headers=_headers(token),
                timeout=30,
            )
            assert r.status_code == 201, r.text

        _through_one_worker(running, pid, create)
    after = _scrape(running)
    assert after[UNAUTHENTICATED] - before[UNAUTHENTICATED] == 2 * per_worker
    assert after[FOUR_XX] - before[FOUR_XX] == 2 * per_worker
    assert after[COMMITS] - before[COMMITS] == 2


def test_a_killed_workers_counts_are_kept_by_its_replacement(running: Node) -> None:
    """Counters are monotonic: a worker killed and restarted loses none of its counts,
    and the new one counts on from them."""
    victim, survivor = running.workers()
    _through_one_worker(running, victim, _unauthenticated_reads(running, 5))
    counted = _scrape(running)[UNAUTHENTICATED]
    os.kill(victim, signal.SIGKILL)
    _until(
        lambda: len(running.workers()) == 2 and victim not in running.workers(),
        "a new worker replaced the killed one",
        running,
    )
    assert _scrape(running)[UNAUTHENTICATED] == counted
    (replacement,) = [pid for pid in running.workers() if pid != survivor]
    # A restarted worker imports everything anew (seconds; far longer on a loaded
    # machine): only once it accepts connections can it answer with the survivor stopped.
    _until(lambda: replacement in running.ready_workers(), "the new worker is ready", running)
    _through_one_worker(running, replacement, _unauthenticated_reads(running, 3))
    assert _scrape(running)[UNAUTHENTICATED] == counted + 3


def test_failed_authentications_through_several_workers_spend_one_budget(
    running: Node,
) -> None:
    """One budget per node (20 failures, then one per 3 s), not one per worker: a client
    whose guesses land on both workers is throttled as soon as on one."""
    first, second = running.workers()
    statuses: list[int] = []
    started = time.monotonic()

    def guesses(count: int) -> Callable[[], None]:
        def send() -> None:
            # From an address of its own: the budget of 127.0.0.1 is spent by another test.
            transport = httpx.HTTPTransport(local_address="127.0.0.3")
            with httpx.Client(transport=transport, timeout=30) as client:
                for _ in range(count):
                    r = client.get(
                        f"{running.url}/fhir/Patient",
                        headers={"Authorization": "Bearer mlt_bad_token"},
                    )
                    statuses.append(r.status_code)

        return send

    _through_one_worker(running, first, guesses(15))
    _through_one_worker(running, second, guesses(25))
    refilled = int((time.monotonic() - started) / 3) + 1
    assert set(statuses) == {401, 429}, statuses
    # With a budget per worker, the second worker alone would answer 20 guesses 401.
    assert statuses.count(401) <= 20 + refilled, statuses


def test_workers_and_their_parent_name_the_node_by_its_own_url(running: Node) -> None:
    """/fhir/metadata is a worker's own answer; discovery and sign-in are forwarded to the
    parent, which sees them on its Unix socket under another Host. Both name the node by
    where it is served, so the portal's sign-in on the node's URL is accepted."""
    endpoints = {f"{running.url}/oauth/{name}" for name in ("authorize", "token", "revoke")}
    for _ in range(4):  # new connections, spread over the workers
        metadata = httpx.get(f"{running.url}/fhir/metadata", timeout=30).json()
        extension = metadata["rest"][0]["security"]["extension"][0]["extension"]
        assert {e["valueUri"] for e in extension} == endpoints
        config = httpx.get(f"{running.url}/.well-known/smart-configuration", timeout=30).json()
        assert config["issuer"] == running.url, config
    query = {
        "response_type": "code",
        "client_id": "medledger-portal",
        "redirect_uri": f"{running.url}/portal/callback",
        "scope": "user/*.read",
        "state": "s",
        "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        "code_challenge_method": "S256",
        "aud": f"{running.url}/fhir",
    }
    page = httpx.get(f"{running.url}/oauth/authorize", params=query, timeout=30)
    assert page.status_code == 200, page.text
    assert 'name="csrf"' in page.text


def test_killed_workers_and_a_killed_sequencer_lose_nothing_acknowledged(
    running: Node, token: str, tmp_path: Path
) -> None:
    """A worker killed under writes is replaced and writes go on; then the sequencer
    (the parent) is killed and takes its workers with it. After a restart every
    acknowledged write reads back and ``verify --records`` passes."""
    writers = Writers(running, token)
    try:
        _until(lambda: writers.count() >= 10, "ten writes are acknowledged", running)
        victim = running.workers()[0]
        os.kill(victim, signal.SIGKILL)
        _until(
            lambda: len(running.workers()) == 2 and victim not in running.workers(),
            "a new worker replaced the killed one",
            running,
        )
        after_kill = writers.count()
        _until(lambda: writers.count() >= after_kill + 10, "writes continue", running)
        workers = running.workers()
        running.proc.kill()
        running.proc.wait()
        _until(
            lambda: not any(_alive(pid) for pid in workers),
            "the workers stop once their parent is gone",
            running,
        )
    finally:
        acked = writers.stop()
    # Writes in flight when a process died were answered 503, or not at all.
    assert all(status == 503 for status in writers.failures), writers.failures
    _check_store(running.root, acked, tmp_path / "after.log", token)
