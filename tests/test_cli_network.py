"""``medledger network up|status|down``: one real node process per institution.

The scenario, run through the real command as a user would: ``network up``
(3 institutions, solo ordering) → FHIR writes over HTTP with the printed
tokens, to every node at once → ``kill -9`` one node process while it is
being written to → ``network up`` resumes it → every acknowledged record is
served again, the network anchors the new heads, ``/metrics`` moved, logs
are JSON lines without PHI → ``network down`` stops every process it started
(and none it did not) → ``medledger verify --consortium`` passes on every
node. A JetStream variant (``slow``) does the same over a 3-server NATS
cluster. Every test stops what it started, also when it fails. ``network
status`` (it starts nothing) runs through the CLI's entry point in this process.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli_support import medledger_command
from medledger.localnet.netproc import PidRecord
from medledger.synthetic import generate_patients
from network_support import FHIR_JSON, PASSPHRASE, cli_env, pid_files, run_cli, tls


def _patient(seed: int, index: int) -> bytes:
    patient = generate_patients(1, seed=seed, start_index=index, resources_per_patient=0)[0].patient
    del patient["id"]
    return json.dumps(patient).encode()


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON}


def _writer(
    node: dict[str, Any],
    token: str,
    seed: int,
    stop: threading.Event,
    acked: dict[str, bytes],
    limit: int | None = None,
) -> None:
    """Write ``limit`` patients (without one: until ``stop``); record every acknowledged one."""
    with httpx.Client(
        base_url=node["url"], headers=_headers(token), timeout=30, verify=tls(node)
    ) as client:
        index = 0
        # A limited writer ignores ``stop``: on a loaded machine it may still be short
        # of its limit when the unlimited writer's node is killed.
        while index < limit if limit is not None else not stop.is_set():
            try:
                r = client.post("/fhir/Patient", content=_patient(seed, index))
            except httpx.TransportError:
                return  # the node went away: an unanswered write was never acknowledged
            index += 1
            if r.status_code == 201:
                acked[r.json()["id"]] = r.content
            elif r.status_code >= 500:
                return


def _metrics(node: dict[str, Any]) -> dict[str, float]:
    text = httpx.get(f"{node['url']}/metrics", timeout=10, verify=tls(node)).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _wait_anchored(nodes: list[dict[str, Any]], timeout: float = 120) -> None:
    """Until every node's private head is covered by its final anchor, seen by every node."""
    deadline = time.monotonic() + timeout
    while True:
        heights = {n["institution"]: _metrics(n) for n in nodes}
        if (
            all(
                m["medledger_anchored_height"] == m["medledger_private_height"]
                for m in heights.values()
            )
            and len({m["medledger_consortium_height"] for m in heights.values()}) == 1
        ):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"heads not anchored within {timeout} s: {heights}")
        time.sleep(0.2)


def _read_back(nodes: dict[str, dict[str, Any]], acked: dict[str, dict[str, bytes]]) -> None:
    for institution, records in acked.items():
        node = nodes[institution]
        token = node["tokens"]["clinician"]
        with httpx.Client(
            base_url=node["url"], headers=_headers(token), timeout=30, verify=tls(node)
        ) as client:
            lost = []
            for rid, body in records.items():
                got = client.get(f"/fhir/Patient/{rid}")
                if got.status_code != 200 or got.content != body:
                    lost.append((rid, got.status_code))
            assert not lost, f"{institution}: {len(lost)} of {len(records)} acknowledged lost"


def _scenario(base: Path, ordering: str, writes: int) -> None:
    up = run_cli("network", "up", "--dir", base, "--institutions", "3", "--ordering", ordering)
    assert up.code == 0, up
    # Once more: everything is running, so nothing is started; --json gives the description.
    data = run_cli("network", "up", "--dir", base, "--json").json()
    for node in data["nodes"]:
        assert node["url"] in up.out and node["tokens"]["clinician"] in up.out
    assert [n["institution"] for n in data["nodes"]] == ["hospital-1", "hospital-2", "hospital-3"]
    nodes = {n["institution"]: n for n in data["nodes"]}
    # Tokens are written for the owner only; the passphrase is in no process's argv.
    assert stat.S_IMODE((base / "network.json").stat().st_mode) == 0o600
    assert json.loads((base / "network.json").read_text())["nodes"] == data["nodes"]
    records = {n: PidRecord.load(base / n / "node.pid") for n in nodes}
    for record in records.values():
        assert record is not None and record.running()
        assert PASSPHRASE not in " ".join(record.argv)

    before = {n: _metrics(node) for n, node in nodes.items()}
    # Writes to every node at once; hospital-2 keeps being written to until it is killed.
    acked: dict[str, dict[str, bytes]] = {n: {} for n in nodes}
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=_writer,
            args=(node, node["tokens"]["clinician"], i, stop, acked[n]),
            kwargs={"limit": None if n == "hospital-2" else writes},
        )
        for i, (n, node) in enumerate(nodes.items())
    ]
    for t in threads:
        t.start()
    try:
        while len(acked["hospital-2"]) < writes:
            assert threads[1].is_alive(), "the writer to hospital-2 stopped before the kill"
            time.sleep(0.05)
        # Refusals are counted by reason.
        h1 = nodes["hospital-1"]
        bad = httpx.get(f"{h1['url']}/fhir/Patient/x", timeout=10, verify=tls(h1))
        assert bad.status_code == 401
        victim = records["hospital-2"]
        assert victim is not None
        os.kill(victim.pid, signal.SIGKILL)
        threads[1].join(60)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert all(len(a) >= writes for a in acked.values()), {n: len(a) for n, a in acked.items()}

    status = run_cli("network", "status", "--dir", base, "--json", in_process=True).json()
    by_name = {n["institution"]: n for n in status["nodes"]}
    assert not by_name["hospital-2"]["running"] and not by_name["hospital-2"]["ready"]
    assert by_name["hospital-1"]["running"] and by_name["hospital-1"]["ready"]

    resumed = run_cli("network", "up", "--dir", base, "--json").json()
    assert resumed["nodes"] == data["nodes"], "resuming changed the network"
    status = run_cli("network", "status", "--dir", base, "--json", in_process=True).json()
    assert all(n["running"] and n["ready"] for n in status["nodes"]), status
    for n in ("hospital-1", "hospital-3"):  # the survivors were left alone
        assert PidRecord.load(base / n / "node.pid") == records[n]

    _read_back(nodes, acked)
    # The resumed node takes writes again, and the network anchors every head.
    more: dict[str, bytes] = {}
    node2 = nodes["hospital-2"]
    _writer(node2, node2["tokens"]["clinician"], 99, threading.Event(), more, limit=5)
    assert len(more) == 5
    acked["hospital-2"].update(more)
    _wait_anchored(list(nodes.values()))

    after = {n: _metrics(node) for n, node in nodes.items()}
    for n in ("hospital-1", "hospital-3"):  # hospital-2's counters restarted with it
        b, a = before[n], after[n]
        assert a["medledger_commit_latency_seconds_count"] - b[
            "medledger_commit_latency_seconds_count"
        ] == len(acked[n])
        assert (
            a['medledger_commit_latency_seconds_bucket{le="+Inf"}']
            == (a["medledger_commit_latency_seconds_count"])
        )
        assert a["medledger_anchors_submitted_total"] > b["medledger_anchors_submitted_total"]
    for n in nodes:
        b, a = before[n], after[n]
        assert a["medledger_private_height"] > b["medledger_private_height"]
        assert a["medledger_consortium_height"] > b["medledger_consortium_height"]
        assert a["medledger_consortium_ready"] == 1
    refusals = 'medledger_refusals_total{reason="unauthenticated"}'
    assert after["hospital-1"][refusals] == before["hospital-1"][refusals] + 1

    down = run_cli("network", "down", "--dir", base, "--json").json()
    assert len(down["nodes"]) == 3
    for pid_file in pid_files(base):
        pytest.fail(f"{pid_file} left behind by network down")
    for record in records.values():
        assert record is not None and not record.running()

    for n in nodes:
        verify = run_cli("verify", "--dir", base / n, "--consortium")
        assert verify.code == 0, verify
    # Logs: JSON lines, and no patient data in them.
    names = {
        json.loads(body)["name"][0]["family"]
        for records_of_node in acked.values()
        for body in records_of_node.values()
    }
    assert len(names) > 10
    for n in nodes:
        text = (base / n / "node.log").read_text()
        for line in text.splitlines():
            entry = json.loads(line)
            assert {"time", "level", "logger", "message", "fields"} <= set(entry), line
        for name in names:
            assert name not in text, f"a patient name is in {n}'s log"


def test_network_up_kill_resume_down_solo(network_dir: Path) -> None:
    _scenario(network_dir, "solo", writes=30)


@pytest.mark.slow
def test_network_up_kill_resume_down_jetstream(network_dir: Path) -> None:
    _scenario(network_dir, "jetstream", writes=15)
    # nats-servers were stopped too
    assert not list(network_dir.glob("nats/*/nats.pid"))


def test_down_leaves_alone_a_pid_that_is_not_the_process_it_started(tmp_path: Path) -> None:
    """A recorded PID now belonging to another process (or another command) is not signalled."""
    base = tmp_path / "net"
    up = run_cli("network", "up", "--dir", base, "--institutions", "1")
    try:
        assert up.code == 0, up
        node_pid = base / "hospital-1" / "node.pid"
        real = PidRecord.load(node_pid)
        assert real is not None and real.running()
        down = run_cli("network", "down", "--dir", base, "--json").json()
        assert down["nodes"] == [real.pid]
        assert not real.running()
        sleeper = subprocess.Popen(["sleep", "60"])
        try:
            stat = Path(f"/proc/{sleeper.pid}/stat").read_text()
            ticks = int(stat.rsplit(")", 1)[1].split()[19])
            for impostor in (
                PidRecord(pid=sleeper.pid, start_ticks=ticks, argv=real.argv),  # another command
                PidRecord(pid=sleeper.pid, start_ticks=ticks + 1, argv=("sleep", "60")),  # reused
            ):
                impostor.save(node_pid)
                down = run_cli("network", "down", "--dir", base, "--json").json()
                assert down["nodes"] == []
                assert sleeper.poll() is None, "network down killed a process it did not start"
            # The check is not simply "never": the very process it recorded is stopped.
            PidRecord(pid=sleeper.pid, start_ticks=ticks, argv=("sleep", "60")).save(node_pid)
            down = run_cli("network", "down", "--dir", base, "--json").json()
            assert down["nodes"] == [sleeper.pid]
            assert sleeper.wait(10) == -signal.SIGTERM
        finally:
            sleeper.kill()
            sleeper.wait()
    finally:
        run_cli("network", "down", "--dir", base, "--timeout", "10")


def test_up_refuses_a_different_shape_and_a_wrong_passphrase(network_dir: Path) -> None:
    first = run_cli("network", "up", "--dir", network_dir, "--institutions", "1", "--json")
    first.json()
    other = run_cli("network", "up", "--dir", network_dir, "--institutions", "2")
    assert other.code == 1 and other.err.startswith("error: "), other
    assert "institutions" in other.err
    # A wrong passphrase is refused before anything is started.
    run_cli("network", "down", "--dir", network_dir)
    env = {**cli_env(), "MEDLEDGER_PASSPHRASE": "wrong"}
    wrong = subprocess.run(
        [*medledger_command(), "network", "up", "--dir", str(network_dir)],
        capture_output=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )
    assert wrong.returncode == 1, wrong
    assert wrong.stderr.decode().startswith("error: ")
    assert PidRecord.load(network_dir / "hospital-1" / "node.pid") is None


@pytest.mark.slow
def test_network_on_embedded_postgres_survives_kill_and_restart(network_dir: Path) -> None:
    """--store postgres: one embedded PostgreSQL for the network, started and stopped with it."""
    data = run_cli(
        "network",
        "up",
        "--dir",
        network_dir,
        "--institutions",
        "2",
        "--store",
        "postgres",
        "--json",
    ).json()
    assert data["postgres"] is not None
    node_toml = (network_dir / "hospital-1" / "node.toml").read_text()
    assert 'store = "postgres"' in node_toml
    assert data["postgres"]["password"] not in node_toml
    node = data["nodes"][0]
    acked: dict[str, bytes] = {}
    _writer(node, node["tokens"]["clinician"], 5, threading.Event(), acked, limit=10)
    assert len(acked) == 10
    record = PidRecord.load(network_dir / "hospital-1" / "node.pid")
    assert record is not None
    os.kill(record.pid, signal.SIGKILL)
    run_cli("network", "up", "--dir", network_dir, "--json").json()
    _read_back({node["institution"]: node}, {node["institution"]: acked})
    status = run_cli("network", "status", "--dir", network_dir, "--json", in_process=True).json()
    assert status["postgres"]["running"]
    postmaster = status["postgres"]["pid"]
    down = run_cli("network", "down", "--dir", network_dir, "--json").json()
    assert down["postgres"] is True
    assert (
        not Path(f"/proc/{postmaster}").exists()
        or "Z" in Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()[:1]
    )
