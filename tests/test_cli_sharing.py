"""The consent-and-sharing story across real node processes talking HTTP on loopback.

``network up`` (3 institutions) → a patient is written at hospital-1 and
enrolls a wallet (``patient init`` / ``patient enroll``) → hospital-2 is
refused → the patient grants consent (``consent grant``) → hospital-2 fetches
and verifies (``share fetch``), hospital-3 is still refused → the patient
revokes → hospital-2 is refused again → ``audit --patient`` lists every step
and the FHIR ``AuditEvent`` / ``Consent`` searches agree. Solo ordering, and
JetStream (slow). ``network``, the first command of each kind a patient or
hospital runs, ``audit`` and ``verify`` are the console script in a subprocess,
as a user runs them; the other client commands go through the CLI's entry point
in this process (``cli_support.run_in_process``).
"""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from medledger.synthetic import generate_patients
from network_support import FHIR_JSON, run_cli, tls

WALLET_ENV = {"MEDLEDGER_WALLET_PASSPHRASE": "the patient's own passphrase"}


def _api(node: dict[str, Any], role: str = "clinician") -> httpx.Client:
    token = node["tokens"][role]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON}
    return httpx.Client(base_url=node["url"], headers=headers, timeout=60, verify=tls(node))


def _as(node: dict[str, Any], role: str = "clinician") -> list[str]:
    return ["--node", node["url"], "--node-cert", node["tls_cert"], "--token", node["tokens"][role]]


def _story(base: Path, ordering: str) -> None:
    up = run_cli("network", "up", "--dir", base, "--institutions", "3", "--ordering", ordering)
    assert up.code == 0, up
    nodes = {
        n["institution"]: n
        for n in run_cli("network", "up", "--dir", base, "--json").json()["nodes"]
    }
    a, b, c = nodes["hospital-1"], nodes["hospital-2"], nodes["hospital-3"]

    # Records of one patient at hospital-1.
    bundle = generate_patients(1, seed=11, resources_per_patient=6)[0]
    with _api(a) as client:
        for resource in bundle.all_resources():
            r = client.put(f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource)
            assert r.status_code == 201, r.text
    observation = next(r for r in bundle.resources if r["resourceType"] == "Observation")
    target = f"Observation/{observation['id']}"

    wallet = base / "patient.wallet"
    fingerprint = run_cli("patient", "init", "--wallet", wallet, env=WALLET_ENV).json()[
        "fingerprint"
    ]
    enrolled = run_cli(
        "patient",
        "enroll",
        "--wallet",
        wallet,
        *_as(a),
        "--patient-id",
        bundle.patient_id,
        env=WALLET_ENV,
        in_process=True,
    ).json()
    assert enrolled["fingerprint"] == fingerprint

    # No consent yet: refused, with the reason, and nothing of the record in the answer.
    refused = run_cli(
        "share",
        "fetch",
        *_as(b),
        "--holder",
        "hospital-1",
        "--consent",
        "ab" * 32,
        target,
        in_process=True,
    )
    assert refused.code == 1 and "403" in refused.err and "no final consent" in refused.err
    assert observation["id"] not in refused.out + refused.err

    consent = run_cli(
        "consent",
        "grant",
        "--wallet",
        wallet,
        *_as(a),
        "--grantee",
        "hospital-2",
        "--scope",
        "Observation,Condition",
        "--purpose",
        "TREAT",
        "--days",
        "1",
        env=WALLET_ENV,
    ).json()
    assert consent["resourceType"] == "Consent" and consent["status"] == "active"
    consent_id = consent["id"]

    listed = run_cli(
        "share", "list", *_as(b), "--holder", "hospital-1", "--consent", consent_id, in_process=True
    ).json()
    assert target in listed["entries"]
    assert all(e.split("/")[0] in ("Observation", "Condition") for e in listed["entries"])
    shared = run_cli(
        "share", "fetch", *_as(b), "--holder", "hospital-1", "--consent", consent_id, target
    ).json()
    with _api(a) as client:
        original = client.get(f"/fhir/{target}").json()
    assert shared["resource"] == original
    assert shared["provenance"]["holder"] == "hospital-1"
    assert shared["provenance"]["kem"] == "MLKEM768_X25519"
    assert len(shared["provenance"]["certified_by"]) >= 2

    # The consent is hospital-2's, not hospital-3's.
    other = run_cli(
        "share",
        "fetch",
        *_as(c),
        "--holder",
        "hospital-1",
        "--consent",
        consent_id,
        target,
        in_process=True,
    )
    assert other.code == 1 and "granted to hospital-2, not hospital-3" in other.err

    # A consent for hospital-3 that starts the day after tomorrow: final now, refused until then.
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)
    later = run_cli(
        "consent",
        "grant",
        "--wallet",
        wallet,
        *_as(a),
        "--grantee",
        "hospital-3",
        "--start",
        start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "--days",
        "1",
        env=WALLET_ENV,
        in_process=True,
    ).json()
    period = later["provision"]["period"]
    assert datetime.fromisoformat(period["start"]) == start
    assert datetime.fromisoformat(period["end"]) == start + timedelta(days=1)
    early = run_cli(
        "share",
        "fetch",
        *_as(c),
        "--holder",
        "hospital-1",
        "--consent",
        later["id"],
        target,
        in_process=True,
    )
    assert early.code == 1 and "period has not started yet" in early.err
    bad_start = run_cli(
        "consent", "grant", "--wallet", wallet, *_as(a), "--grantee", "hospital-3",
        "--start", "next tuesday", env=WALLET_ENV, in_process=True,
    )  # fmt: skip
    assert bad_start.code == 2 and bad_start.err.startswith("error: --start 'next tuesday'")

    revoked = run_cli(
        "consent",
        "revoke",
        "--wallet",
        wallet,
        *_as(a),
        consent_id,
        env=WALLET_ENV,
        in_process=True,
    ).json()
    assert revoked["status"] == "inactive"
    again = run_cli(
        "share",
        "fetch",
        *_as(b),
        "--holder",
        "hospital-1",
        "--consent",
        consent_id,
        target,
        in_process=True,
    )
    assert again.code == 1 and "revoked" in again.err

    # The patient's trail at the holder: consent, the reads allowed and refused.
    trail = run_cli("audit", "--dir", base / "hospital-1", "--patient", fingerprint).json()
    steps = [(t["type"], t.get("reader"), t.get("outcome")) for t in trail["trail"]]
    cross = [s for s in steps if s[0] == "access" and s[1] != "hospital-1"]
    assert ("consent.grant", None, None) in steps and ("consent.revoke", None, None) in steps
    assert ("access", "hospital-2", "allowed") in cross
    assert ("access", "hospital-3", "refused") in cross
    assert cross[-1] == ("access", "hospital-2", "refused")
    # hospital-1's own clinician read the original: a local access, also in the trail.
    assert ("access", "hospital-1", "allowed") in steps
    assert bundle.patient_id not in json.dumps(trail)

    with _api(a, "admin") as client:
        events = client.get("/fhir/AuditEvent", params={"patient": fingerprint}).json()
        consents = client.get("/fhir/Consent", params={"patient": fingerprint}).json()
    assert events["resourceType"] == "Bundle" and events["total"] >= 4
    outcomes = {e["resource"]["outcome"] for e in events["entry"]}
    assert outcomes == {"0", "4"}
    statuses = {e["resource"]["id"]: e["resource"]["status"] for e in consents["entry"]}
    assert statuses == {consent_id: "inactive", later["id"]: "active"}

    down = run_cli("network", "down", "--dir", base)
    assert down.code == 0, down
    for inst in nodes:
        check = run_cli("verify", "--dir", base / inst, "--consortium")
        assert check.code == 0, check


def test_sharing_story_across_processes_solo(network_dir: Path) -> None:
    _story(network_dir, "solo")


@pytest.mark.slow
def test_sharing_story_across_processes_jetstream(network_dir: Path) -> None:
    _story(network_dir, "jetstream")


@pytest.mark.parametrize("weak", ["a", " ", "    ", "short-pass1"])
def test_patient_init_refuses_a_weak_wallet_passphrase(tmp_path: Path, weak: str) -> None:
    wallet = tmp_path / "patient.wallet"
    run = run_cli(
        "patient",
        "init",
        "--wallet",
        wallet,
        env={"MEDLEDGER_WALLET_PASSPHRASE": weak},
        in_process=True,
    )
    assert run.code != 0 and run.out == ""
    assert run.err.startswith("error: the wallet passphrase is too weak"), run
    assert len(run.err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_network_up_refuses_a_weak_passphrase_and_creates_nothing(tmp_path: Path) -> None:
    base = tmp_path / "net"
    run = run_cli("network", "up", "--dir", base, env={"MEDLEDGER_PASSPHRASE": "a"})
    assert run.code != 0 and run.out == ""
    assert run.err.startswith("error: the keystore passphrase is too weak"), run
    assert not (base / "network.json").exists()
    assert not base.exists()


def test_an_unreachable_node_is_a_one_line_error_with_its_reason(tmp_path: Path) -> None:
    wallet = tmp_path / "patient.wallet"
    env = {"MEDLEDGER_WALLET_PASSPHRASE": "a wallet passphrase long enough"}
    assert run_cli("patient", "init", "--wallet", wallet, env=env, in_process=True).code == 0
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        run = run_cli(
            "patient",
            "enroll",
            "--wallet",
            wallet,
            "--node",
            url,
            "--token",
            "a-token-that-must-not-be-printed",
            "--patient-id",
            "p1",
            env=env,
            in_process=True,
        )
    assert run.code != 0 and run.out == ""
    assert run.err.startswith(f"error: cannot reach {url}: ConnectError: "), run
    assert "refused" in run.err.lower()
    assert len(run.err.strip().splitlines()) == 1
    assert "a-token-that-must-not-be-printed" not in run.err
