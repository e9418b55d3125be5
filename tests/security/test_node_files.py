"""What a real node leaves for other local users to read: no passphrase, no readable file.

Against ``medledger network up`` (two node processes, solo ordering), after
FHIR writes, a token and a consent-free local read:

* the keystore passphrase is in no node process's ``/proc/<pid>/environ`` or
  ``cmdline``, nor in its children's (it travels on a pipe, ``--passphrase-fd``);
* every directory under the network directory is 0700 and every file
  (databases, their WAL and SHM files, blobs, logs, PID records, tokens,
  network.json, node.toml, genesis.json, the order file) is owner-only.

And for a node started by hand with ``MEDLEDGER_PASSPHRASE`` (interactive use):
the variable is wiped from the running process's environment.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cli_support import start_node_process
from medledger.localnet.natsserver import free_ports
from medledger.localnet.netproc import PidRecord
from medledger.node import init_node
from medledger.storage.keystore import KdfParams
from medledger.synthetic import generate_patients
from network_support import FHIR_JSON, PASSPHRASE, cli_env, run_cli, tls

pytestmark = pytest.mark.timeout(300)


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from ``/proc/*/stat``)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(text[text.rindex(")") + 2 :].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found.extend(kids)
        frontier.extend(kids)
    return found


def _modes(base: Path) -> Iterator[tuple[Path, int, bool]]:
    """``(path, permission bits, is a directory)`` of ``base`` and everything under it."""
    yield base, stat.S_IMODE(base.lstat().st_mode), True
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            yield path, stat.S_IMODE(info.st_mode), stat.S_ISDIR(info.st_mode)


def test_network_nodes_hide_the_passphrase_and_create_owner_only_files(network_dir: Path) -> None:
    up = run_cli("network", "up", "--dir", network_dir, "--institutions", "2", "--json")
    nodes = up.json()["nodes"]
    bundle = generate_patients(1, seed=21, resources_per_patient=4)[0]
    for node in nodes:
        headers = {
            "Authorization": f"Bearer {node['tokens']['clinician']}",
            "Content-Type": FHIR_JSON,
        }
        with httpx.Client(
            base_url=node["url"], headers=headers, timeout=60, verify=tls(node)
        ) as client:
            for resource in bundle.all_resources():
                path = f"/fhir/{resource['resourceType']}/{resource['id']}"
                assert client.put(path, json=resource).status_code == 201
            assert client.get(f"/fhir/Patient/{bundle.patient_id}").status_code == 200
    made = run_cli("token", "create", "--dir", network_dir / "hospital-1", "--role", "auditor")
    assert made.code == 0, made

    # Item 15: no node process, nor any child of one, shows the passphrase.
    for node in nodes:
        record = PidRecord.load(network_dir / node["dir"] / "node.pid")
        assert record is not None and record.running()
        assert "--passphrase-fd" in record.argv
        for pid in [record.pid, *_children(record.pid)]:
            environ = (Path("/proc") / str(pid) / "environ").read_bytes()
            cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
            assert PASSPHRASE.encode() not in environ + cmdline, pid
            assert not any(v.startswith(b"MEDLEDGER_PASSPHRASE") for v in environ.split(b"\0"))

    # Item 16: directories 0700, files owner-only, everywhere under the network.
    seen = {p.name for p, _, _ in _modes(network_dir)}
    for expected in ("chain.db-wal", "records.db", "node.log", "tokens.db", "network.json"):
        assert expected in seen, f"no {expected} was checked"
    assert any((network_dir / "hospital-1" / "blobs").rglob("*")), "no blob was checked"
    loose = [
        f"{p.relative_to(network_dir.parent)} {oct(mode)}"
        for p, mode, is_dir in _modes(network_dir)
        if (mode != 0o700 if is_dir else mode & 0o077)
    ]
    assert not loose, loose


def test_a_node_started_with_the_variable_wipes_it_from_its_environment(tmp_path: Path) -> None:
    passphrase = "hand-started node passphrase"
    root = tmp_path / "node"
    init_node(root, name="Hand Started", passphrase=passphrase.encode(), kdf=KdfParams(n=2**12))
    root.chmod(0o755)  # as an older medledger (or a careless mkdir) left it
    port = free_ports(1)[0]
    env = {**cli_env(), "MEDLEDGER_PASSPHRASE": passphrase}
    log = tmp_path / "node.log"
    proc = start_node_process(root, port, log, env, "--plain-http")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "node not healthy within 60 s"
            time.sleep(0.1)
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        assert passphrase.encode() not in environ
        assert not any(
            v.startswith(b"MEDLEDGER_PASSPHRASE=") and v != b"MEDLEDGER_PASSPHRASE="
            for v in environ.split(b"\0")
        )
        # The node made its directory private when it opened it.
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
