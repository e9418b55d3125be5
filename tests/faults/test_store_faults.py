"""Store faults injected under real node processes (``medledger network up`` / ``node start``).

* One hex digit changed in a committed ``record.put``: ``node start`` refuses
  (exit 1, one ``error:`` line pointing to the repair procedure) and deletes
  nothing — the version's index row and blob are still there.
* ``chain.db-wal`` deleted after the node was killed with acknowledged,
  anchored writes in it: the node refuses to start, deletes nothing, and
  ``network up`` leaves no process behind; with the index's WAL and the
  consortium copy gone too, the node refuses once it has learnt its anchor
  from the ordered stream.
* A node process whose PID cannot be recorded is stopped by ``network up``
  (``network down`` could never find it).

Crash recovery after a clock excursion is covered in
``tests/services/test_records_recovery.py`` (an injected clock and a process
that dies inside the chain commit).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli_support import medledger_command
from medledger.localnet.netproc import PidRecord
from medledger.synthetic import generate_patients
from network_support import FHIR_JSON, cli_env, run_cli, stop_network, tls


def _patient(index: int) -> bytes:
    patient = generate_patients(1, seed=41, start_index=index, resources_per_patient=0)[0].patient
    del patient["id"]
    return json.dumps(patient).encode()


def _write(node: dict[str, Any], count: int) -> list[str]:
    headers = {"Authorization": f"Bearer {node['tokens']['clinician']}", "Content-Type": FHIR_JSON}
    ids = []
    with httpx.Client(
        base_url=node["url"], headers=headers, timeout=30, verify=tls(node)
    ) as client:
        for i in range(count):
            r = client.post("/fhir/Patient", content=_patient(i))
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
    return ids


def _metric(node: dict[str, Any], name: str) -> float:
    text = httpx.get(f"{node['url']}/metrics", timeout=10, verify=tls(node)).text
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


def _wait_anchored(node: dict[str, Any], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _metric(node, "medledger_anchored_height") < _metric(node, "medledger_private_height"):
        if time.monotonic() > deadline:
            pytest.fail(f"the private head was not anchored within {timeout} s")
        time.sleep(0.1)


def _stored(root: Path) -> tuple[list[Any], list[str]]:
    """Index rows (type, id, version, blob) and blob files: what recovery could delete."""
    conn = sqlite3.connect(f"file:{root / 'records.db'}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT rtype, rid, version, blob_hash FROM versions ORDER BY 1, 2, 3"
        ).fetchall()
    finally:
        conn.close()
    return rows, sorted(p.name for p in (root / "blobs").rglob("*") if p.is_file())


def _processes_under(directory: Path) -> list[int]:
    """PIDs of live processes whose command line names ``directory``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(str(directory).encode() in a for a in argv):
            found.append(int(entry.name))
    return found


def _kill9(pid_file: Path) -> None:
    record = PidRecord.load(pid_file)
    assert record is not None and record.running()
    os.kill(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while record.running():
        assert time.monotonic() < deadline, "the node did not die"
        time.sleep(0.05)


@pytest.fixture
def network(tmp_path: Path) -> Any:
    base = tmp_path / "net"
    up = run_cli("network", "up", "--dir", base, "--institutions", "1", "--json")
    try:
        assert up.code == 0, up
        yield base, up.json()["nodes"][0]
    finally:
        stop_network(base)
        for pid in _processes_under(base):  # nothing may outlive the test
            os.kill(pid, signal.SIGKILL)


def test_a_changed_record_put_makes_node_start_refuse_and_delete_nothing(
    network: tuple[Path, dict[str, Any]],
) -> None:
    base, node = network
    root = base / node["dir"]
    ids = _write(node, 3)
    assert run_cli("network", "down", "--dir", base).code == 0
    conn = sqlite3.connect(root / "chain.db")
    try:
        idx, data = next(
            (i, bytes(d))
            for i, d in conn.execute("SELECT idx, data FROM txs ORDER BY idx DESC")
            if json.loads(d)["type"] == "record.put"
        )
        blob = json.loads(data)["body"]["blob"]
        digit = "0" if blob[5] != "0" else "1"
        changed = data.replace(blob.encode(), (blob[:5] + digit + blob[6:]).encode())
        conn.execute("UPDATE txs SET data = ? WHERE idx = ?", (changed, idx))
        conn.commit()
    finally:
        conn.close()
    before = _stored(root)
    assert len(before[0]) == 3 and len(before[1]) == 3

    start = subprocess.run(
        [
            *medledger_command(),
            "node",
            "start",
            "--dir",
            str(root),
            "--port",
            str(node["port"]),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=cli_env(),
        timeout=120,
        check=False,
    )
    last = start.stderr.decode().strip().splitlines()[-1]
    assert start.returncode == 1, start.stderr.decode()
    assert last.startswith("error: ") and "tx_root" in last and "docs/reliability.md" in last
    assert "Traceback" not in start.stderr.decode()
    assert _stored(root) == before  # nothing "taken back"
    assert ids  # (the three acknowledged records are the ones still indexed)
    assert run_cli("verify", "--dir", root).code == 3  # and verify names the same damage


def test_a_lost_wal_behind_an_anchor_is_refused_and_nothing_is_deleted(
    network: tuple[Path, dict[str, Any]],
) -> None:
    base, node = network
    root = base / node["dir"]
    _write(node, 6)
    _wait_anchored(node)
    _kill9(root / "node.pid")  # no checkpoint: the acknowledged blocks are in the WAL only
    assert (root / "chain.db-wal").stat().st_size > 0
    (root / "chain.db-wal").unlink()
    (root / "chain.db-shm").unlink(missing_ok=True)
    # The index's main file as it is now, without its WAL (opening the index again
    # checkpoints the WAL into the main file).
    saved_index = (root / "records.db").read_bytes()
    before = _stored(root)
    assert len(before[0]) == 6

    up = run_cli("network", "up", "--dir", base, "--timeout", "60")
    assert up.code == 1, up
    assert "exited while starting" in up.err and "acknowledged blocks were lost" in up.err, up
    assert _stored(root) == before
    assert _processes_under(root) == []

    # The index lost its WAL too and the consortium copy is gone: the checks at open
    # pass, and the anchor learnt from the ordered stream is what stops the node.
    for name in ("records.db", "consortium.db"):
        for suffix in ("", "-wal", "-shm"):
            (root / f"{name}{suffix}").unlink(missing_ok=True)
    (root / "records.db").write_bytes(saved_index)
    up = run_cli("network", "up", "--dir", base, "--timeout", "60")
    assert up.code == 1, up
    assert "behind its own final anchor" in up.err, up
    assert _processes_under(root) == []


def test_network_up_stops_a_node_whose_pid_it_cannot_record(
    network: tuple[Path, dict[str, Any]],
) -> None:
    base, node = network
    root = base / node["dir"]
    assert run_cli("network", "down", "--dir", base).code == 0
    (root / "node.pid").mkdir()  # the PID record cannot be written (as on a full disk)
    try:
        up = run_cli("network", "up", "--dir", base, "--timeout", "60")
        assert up.code == 1, up
        assert up.err.startswith("error: cannot record the PID"), up
        assert _processes_under(root) == [], "network up left a node it cannot stop"
    finally:
        (root / "node.pid").rmdir()
