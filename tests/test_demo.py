"""`make demo` is part of the README contract: it must run and tell the true story.

The real ``medledger demo`` command, as a user runs it (no terminal): three
node processes, the whole story over HTTP, tampering caught by ``verify``;
then no process left behind — or, with ``--keep-running``, a network that is
up until ``network down``.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from medledger.localnet.netproc import PidRecord, load_network
from network_support import pid_files, run_cli, tls

#: Wide enough that rich wraps no table cell, so phrases stay whole in the output.
WIDE = {"COLUMNS": "400"}


def _out(run_stdout: str) -> str:
    return " ".join(run_stdout.split())


def _running(base: Path) -> list[int]:
    records = [PidRecord.load(p) for p in pid_files(base)]
    return [r.pid for r in records if r is not None and r.running()]


def test_demo_tells_the_story_then_stops_everything(network_dir: Path) -> None:
    demo = run_cli("demo", "--dir", network_dir, timeout=600, env=WIDE)
    assert demo.code == 0, demo
    out = _out(demo.out)
    # The consent story (#6): refused, granted, fetched and verified, revoked, refused again.
    assert "no final consent with that hash" in out
    assert "final on the consortium in" in out
    assert "allowed, verified" in out and "byte-for-byte Hospital 1's record" in out
    assert "does not cover Patient resources" in out
    assert "granted to hospital-2, not hospital-3" in out
    assert "revoked by the patient" in out
    assert "inclusion proof against root" in out and "verified here too" in out
    # The patient's trail lists the consent and the reads, allowed and refused, on both chains.
    assert "the patient's trail at Hospital 1" in out
    assert "consent granted to hospital-2: now inactive" in out
    assert "read Observation: allowed" in out and "read: refused" in out
    assert "private, consortium" in out
    # Records, search, anchoring, erasure, rotation, a Byzantine member.
    assert "FHIR resources of 20 synthetic patients" in out
    assert "GET /fhir/Patient?family=" in out
    assert "was final on the consortium chain" in out
    assert "answers 410" in out and "410 Gone" in out
    assert "403 (role 'clinician' may not do this)" in out and "data keys re-wrapped" in out
    assert "equivocation by hospital-3" in out
    assert "not found anywhere" in out
    # Tampering: the edit and the re-signed rewrite (only with --consortium) are caught.
    assert out.count("FAILED: private chain of hospital-") == 2
    assert "tx_root does not match" in out and "history was rewritten" in out
    assert "The network is stopped" in out and "network up --dir" in out
    assert _running(network_dir) == []
    status = run_cli("network", "status", "--dir", network_dir, "--json").json()
    assert not any(n["running"] for n in status["nodes"])
    verify = run_cli("verify", "--consortium", "--dir", network_dir / "hospital-1")
    assert verify.code == 0, verify
    assert "quorum certificate" in verify.out and "published root" in verify.out

    # Run again in the same directory, keeping the network: the old demo is replaced.
    again = run_cli("demo", "--dir", network_dir, "--keep-running", timeout=600, env=WIDE)
    assert again.code == 0, again
    out = _out(again.out)
    assert "Replaced the previous demo network" in out
    assert "The network is running" in out and f"network down --dir {network_dir}" in out
    status = run_cli("network", "status", "--dir", network_dir, "--json").json()
    assert [n["running"] and n["ready"] for n in status["nodes"]] == [True, True, True]
    assert len(_running(network_dir)) == 3
    # The portal's address and the demo accounts: each token signs in where it says.
    nodes = {n.institution: n for n in load_network(network_dir.resolve()).nodes}
    assert f"{nodes['hospital-1'].url}/portal/" in out
    assert "patient, no key yet" in out and "auditor" in out
    accounts = re.findall(r"(hospital-\d)\W+(https://\S+/portal/)\W+(mlt_[0-9a-f]{12}_[\w-]+)", out)
    assert len(accounts) == 5, out
    roles = []
    for inst, url, token in accounts:
        assert url == f"{nodes[inst].url}/portal/"
        me = httpx.get(
            f"{nodes[inst].url}/portal/api/session",
            headers={"Authorization": f"Bearer {token}"},
            verify=tls(nodes[inst]),
            timeout=30,
        )
        assert me.status_code == 200, me.text
        roles.append(me.json()["role"])
    assert sorted(roles) == ["auditor", "clinician", "clinician", "patient", "patient"]
    down = run_cli("network", "down", "--dir", network_dir)
    assert down.code == 0, down
    assert _running(network_dir) == []


def test_demo_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    demo = run_cli("demo", "--dir", tmp_path, timeout=60)
    assert demo.code == 1
    assert demo.err.startswith("error:") and len(demo.err.strip().splitlines()) == 1
    assert (tmp_path / "something").read_text() == "x"
