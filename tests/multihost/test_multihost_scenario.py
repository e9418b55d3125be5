"""Three institutions on three "machines" (network namespaces), deployed as docs/deploy.md says.

Every host (``medledger.localnet.hosts``) has its own address on a private
bridge and runs its institution's own ``nats-server`` (JetStream, routed to
the other two) and its own ``medledger node start``, listening on the
address it advertised at ``node init``. Every command is the real
``medledger`` run inside the host it belongs to; the institutions exchange
only public member entries (``node member-info``) and the genesis file.
NATS runs over TLS with one NKey per member and an operator key that creates
the stream. The story: form the consortium, check every node remotely (``node status``
from another host), write a patient's records at hospital-1, the patient
enrolls and grants hospital-2 consent, hospital-2 fetches and verifies the
record across the bridge, hospital-3 is refused, and after shutdown every
node's chains verify against the consortium's final anchors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from medledger.localnet.hosts import HostNetwork, unavailable_reason
from medledger.localnet.natsserver import find_nats_server
from medledger.localnet.nodeproc import medledger_command
from medledger.services.tls import write_certificate
from medledger.synthetic import generate_patients
from network_support import PASSPHRASE, cli_env

_REASON = unavailable_reason()
pytestmark = [pytest.mark.skipif(_REASON is not None, reason=_REASON or ""), pytest.mark.slow]

INSTITUTIONS = ("hospital-1", "hospital-2", "hospital-3")
API_PORT = 8700
NATS_PORT = 4222
ROUTE_PORT = 6222
MONITOR_PORT = 8222
WALLET_ENV = {"MEDLEDGER_WALLET_PASSPHRASE": "the patient's own passphrase"}
_DEADLINE_S = 60.0
STREAM = "CONSORTIUM"
SUBJECT = "consortium.order"


def _nkey_public(seed: Path) -> str:
    import nkeys  # type: ignore[import-untyped]  # (no type information shipped)

    return str(nkeys.from_seed(bytearray(seed.read_bytes())).public_key.decode("ascii"))


#: One HTTP request (JSON on stdin: method, url, token, body) from inside a host; prints the answer.
_HTTP = """
import json, ssl, sys, httpx
calls = json.load(sys.stdin)
out = []
for call in calls:
    # HTTPS: the node's pinned certificate (its tls.crt) is all the client trusts.
    verify = ssl.create_default_context(cafile=call["cert"]) if call.get("cert") else True
    if call.get("client_cert") and verify is not True:
        verify.load_cert_chain(call["client_cert"], call["client_key"])
    with httpx.Client(timeout=60, verify=verify) as client:
        headers = {"Content-Type": "application/fhir+json"}
        if call.get("token"):
            headers["Authorization"] = "Bearer " + call["token"]
        body = None if call.get("body") is None else json.dumps(call["body"]).encode()
        try:
            r = client.request(call["method"], call["url"], headers=headers, content=body)
        except (httpx.HTTPError, ssl.SSLError, OSError) as exc:
            out.append({"status": 0, "body": type(exc).__name__})
            continue
        out.append({"status": r.status_code, "body": r.text})
print(json.dumps(out))
"""


#: Every frame on every port of the bridge (AF_PACKET, all protocols, unbound: all the
#: namespace's interfaces; br0 itself sees only frames for the bridge) appended to argv[1].
_CAPTURE = """
import signal, socket, sys
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
sock.settimeout(0.2)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
print("capturing", flush=True)
with open(sys.argv[1], "ab") as out:
    while not stop:
        try:
            out.write(sock.recv(65535))
        except TimeoutError:
            pass
"""


#: As a NATS client from inside a host: argv = seed (or ""), members' PEM, action, URLs...
#: Prints one JSON object: what happened.
_NATS = """
import asyncio, json, ssl, sys
import nats
seed, anchors, action, urls = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]

async def main():
    tls = ssl.create_default_context(cafile=anchors) if anchors else None
    try:
        nc = await nats.connect(
            urls, tls=tls, nkeys_seed=seed or None, allow_reconnect=False,
            connect_timeout=3, max_reconnect_attempts=0,
        )
    except Exception as exc:
        return {"connected": False, "error": type(exc).__name__}
    out = {"connected": True}
    try:
        js = nc.jsm()
        if action == "destroy":
            before = (await js.stream_info("CONSORTIUM")).state.messages
            for what, attempt in (
                ("purge", lambda: js.purge_stream("CONSORTIUM")),
                ("delete", lambda: js.delete_stream("CONSORTIUM")),
            ):
                try:
                    await asyncio.wait_for(attempt(), 3)
                    out[what] = "done"
                except Exception as exc:
                    out[what] = type(exc).__name__
            out["before"] = before
            out["after"] = (await js.stream_info("CONSORTIUM")).state.messages
    finally:
        await nc.close()
    return out

print(json.dumps(asyncio.run(main())))
"""


class Scenario:
    """The hosts, each institution's directory on its host, and running the CLI there."""

    def __init__(self, net: HostNetwork, base: Path) -> None:
        self.net = net
        self.base = base
        self.host = dict(zip(INSTITUTIONS, net.hosts, strict=True))
        self.env = {**cli_env(), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}

    def address(self, inst: str) -> str:
        return self.net.host(self.host[inst]).address

    def url(self, inst: str) -> str:
        return f"https://{self.address(inst)}:{API_PORT}"

    def cert(self, inst: str) -> Path:
        """``inst``'s pinned TLS certificate: what its clients trust."""
        return self.node_dir(inst) / "tls.crt"

    def node_dir(self, inst: str) -> Path:
        return self.base / inst / "node"

    def cli(self, inst: str, *args: str | Path, env: dict[str, str] | None = None) -> Any:
        """``medledger ARGS`` on ``inst``'s host; its JSON output (asserts success)."""
        done = self.run(inst, *args, env=env)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        out = done.stdout.decode()
        try:
            return json.loads(out)
        except ValueError:
            return out

    def run(
        self, inst: str, *args: str | Path, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        done = self.net.run(
            self.host[inst],
            [*medledger_command(), *(str(a) for a in args)],
            env={**self.env, **(env or {})},
            timeout=120,
        )
        assert b"Traceback" not in done.stdout + done.stderr, done.stderr
        return done

    def nats(
        self, inst: str, seed: Path | None, anchors: Path | None, action: str, urls: list[str]
    ) -> dict[str, Any]:
        """A NATS client on ``inst``'s host (``_NATS``): connect, or try to destroy the stream."""
        done = self.net.run(
            self.host[inst],
            [sys.executable, "-c", _NATS, str(seed or ""), str(anchors or ""), action, *urls],
            env=self.env,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        answer: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
        return answer

    def http(self, inst: str, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """HTTP requests made from ``inst``'s host."""
        done = self.net.run(
            self.host[inst],
            [sys.executable, "-c", _HTTP],
            env=self.env,
            input=json.dumps(calls).encode(),
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        answers: list[dict[str, Any]] = json.loads(done.stdout)
        return answers


@pytest.fixture
def scenario(tmp_path: Path) -> Iterator[Scenario]:
    with HostNetwork(["host-a", "host-b", "host-c"]) as net:
        yield Scenario(net, tmp_path)


def _wait_all_ready(
    s: Scenario, from_inst: str, *, current_members: bool = False
) -> list[dict[str, Any]]:
    """``node status`` of every node, asked from ``from_inst``'s host, until all are ready.

    Trusting the certificates the genesis pinned, or (``current_members``) those
    of ``from_inst``'s node's current membership (after a renewal).
    """
    urls = [arg for inst in INSTITUTIONS for arg in ("--node", s.url(inst))]
    if current_members:
        urls += ["--members-of", str(s.node_dir(from_inst))]
    else:
        urls += ["--genesis", str(s.base / "genesis.json")]  # trust the members' certificates
    deadline = time.monotonic() + _DEADLINE_S
    while True:
        done = s.run(from_inst, "node", "status", *urls, "--json")
        report: list[dict[str, Any]] = json.loads(done.stdout)
        if done.returncode == 0:
            return report
        assert time.monotonic() < deadline, report
        time.sleep(0.2)


def test_three_institutions_on_three_hosts(scenario: Scenario) -> None:
    s = scenario
    # -- each institution, on its own machine: a node that advertises its address ----------
    inits = {
        inst: s.net.popen(
            s.host[inst],
            [*medledger_command(), "node", "init", "--dir", str(s.node_dir(inst)),
             "--name", inst.replace("-", " ").title(), "--id", inst,
             "--advertise", s.url(inst)],
            env=s.env,
            stdout=subprocess.DEVNULL,
        )
        for inst in INSTITUTIONS
    }  # fmt: skip
    for inst, proc in inits.items():
        assert proc.wait(120) == 0, inst
    # -- exchange public member entries; hospital-1 writes the genesis ----------------------
    entries = []
    for inst in INSTITUTIONS[1:]:
        entry = s.base / f"{inst}.member.json"
        entry.write_text(json.dumps(s.cli(inst, "node", "member-info", "--dir", s.node_dir(inst))))
        entries += ["--member-info", str(entry)]
    genesis = s.base / "genesis.json"
    s.cli(
        INSTITUTIONS[0], "consortium", "init", "--id", "multihost",
        "--member", s.node_dir(INSTITUTIONS[0]), *entries, "--out", genesis,
    )  # fmt: skip
    for inst in INSTITUTIONS[1:]:
        adopted = s.cli(
            inst, "consortium", "adopt", "--dir", s.node_dir(inst), "--genesis", genesis
        )
        assert json.loads(genesis.read_text()) == json.loads(
            (s.node_dir(inst) / "genesis.json").read_text()
        )
        assert "genesis hash" in adopted
    members = json.loads(genesis.read_text())["members"]
    assert {m["id"]: m["peer_url"] for m in members} == {i: s.url(i) for i in INSTITUTIONS}

    # -- everything that crosses between the hosts is captured on the bridge --------------
    capture_file = s.base / "bridge.capture"
    capture = s.net.popen(
        None, [sys.executable, "-c", _CAPTURE, str(capture_file)], stdout=subprocess.PIPE
    )
    assert capture.stdout is not None and capture.stdout.readline() == b"capturing\n"

    # -- NATS credentials: an NKey per member (in its node directory), one for the operator;
    # -- each institution's server configuration generated from its view of the members ---
    operator = s.base / "operator.nk"
    operator_public = s.cli("hospital-1", "nats", "operator-key", "--out", operator).strip()
    assert operator_public == _nkey_public(operator)
    nkey_args: list[str] = []
    for inst in INSTITUTIONS:
        public = s.cli(inst, "node", "nats-key", "--dir", s.node_dir(inst)).strip()
        assert public == _nkey_public(s.node_dir(inst) / "nats.nk")
        nkey_args += ["--nkey", f"{inst}={public}"]

    # -- each institution's NATS server, routed to the others ---------------------------
    nats_binary = find_nats_server()
    for inst in INSTITUTIONS:
        conf = s.base / inst / "nats.conf"
        routes = [
            a
            for i in INSTITUTIONS
            if i != inst
            for a in ("--route", f"{s.address(i)}:{ROUTE_PORT}")
        ]
        s.cli(
            inst, "nats", "config", "--dir", s.node_dir(inst), "--server-name", inst,
            "--listen", f"{s.address(inst)}:{NATS_PORT}",
            "--cluster-listen", f"{s.address(inst)}:{ROUTE_PORT}", *routes,
            *nkey_args, "--operator-nkey", operator_public,
            "--store-dir", str(s.base / inst / "jetstream"),
            "--monitor-port", str(MONITOR_PORT),
            "--out", conf, "--ca-out", s.base / inst / "members.pem",
        )  # fmt: skip
        log = (s.base / inst / "nats.log").open("ab")
        s.net.popen(s.host[inst], [str(nats_binary), "-c", str(conf)], stdout=log)
        log.close()
    nats_urls = {i: f"tls://{s.address(i)}:{NATS_PORT}" for i in INSTITUTIONS}
    anchors = s.base / "hospital-1" / "members.pem"

    # The operator creates the stream (members may not), once the cluster has formed.
    deadline = time.monotonic() + _DEADLINE_S
    url_args = [a for u in nats_urls.values() for a in ("--url", u)]
    while True:
        created = s.run(
            "hospital-1", "nats", "stream", "--dir", s.node_dir("hospital-1"),
            "--operator-seed", operator, "--replicas", "3", *url_args,
        )  # fmt: skip
        if created.returncode == 0:
            break
        assert time.monotonic() < deadline, created.stderr
        time.sleep(0.5)

    # -- each institution's node: its own NATS server first, then the others --------------
    for inst in INSTITUTIONS:
        own_first = [nats_urls[inst], *(u for i, u in nats_urls.items() if i != inst)]
        with (s.node_dir(inst) / "node.toml").open("a", encoding="utf-8") as toml:
            toml.write(
                "\n[consortium]\n"
                'ordering = "jetstream"\n'
                f"nats_urls = {json.dumps(own_first)}\n"
                "replicas = 3\n"
                'nats_seed = "nats.nk"\n'
            )
        env = {**s.env, "MEDLEDGER_PASSPHRASE": PASSPHRASE}
        log = (s.base / inst / "node.log").open("ab")
        s.net.popen(
            s.host[inst],
            [*medledger_command(), "node", "start", "--dir", str(s.node_dir(inst))],
            env=env,
            stdout=log,
        )
        log.close()

    # -- remote status, from a third machine ----------------------------------------------
    report = _wait_all_ready(s, "hospital-3")
    assert [r["institution"] for r in report] == list(INSTITUTIONS)
    assert all(r["consortium"] == "consortium:multihost" for r in report)

    # The node listens on its advertised address only: not on the host's loopback.
    local = s.http("hospital-1", [{"method": "GET", "url": f"http://127.0.0.1:{API_PORT}/healthz"}])
    assert local == [{"status": 0, "body": "ConnectError"}]

    # -- only TLS on the API port; a certificate that is not a member's fails the handshake -
    intruder = write_certificate(
        s.base / "intruder.crt", s.base / "intruder.key", "intruder", [s.address("hospital-3")],
        now_ms=time.time_ns() // 1_000_000,
    )  # fmt: skip
    assert intruder.hex() not in genesis.read_text()
    healthz = f"{s.url('hospital-1')}/healthz"
    probes = s.http(
        "hospital-3",
        [
            *(
                {"method": "GET", "url": f"http://{s.address(i)}:{API_PORT}/healthz"}
                for i in INSTITUTIONS
            ),
            {"method": "GET", "url": healthz, "cert": str(s.cert("hospital-1"))},
            {
                "method": "GET", "url": healthz, "cert": str(s.cert("hospital-1")),
                "client_cert": str(s.base / "intruder.crt"),
                "client_key": str(s.base / "intruder.key"),
            },
            {
                "method": "GET", "url": healthz, "cert": str(s.cert("hospital-1")),
                "client_cert": str(s.cert("hospital-3")),
                "client_key": str(s.node_dir("hospital-3") / "tls.key"),
            },
        ],
    )  # fmt: skip
    assert [p["status"] for p in probes[:3]] == [0, 0, 0], probes  # plaintext: no answer
    assert probes[3]["status"] == 200  # no client certificate: a FHIR client
    assert probes[4]["status"] == 0, probes[4]  # not a member's certificate: handshake fails
    assert probes[5]["status"] == 200  # a member's own certificate

    # -- NATS: no plaintext, no anonymous client; a member cannot purge or delete -------
    url_a = [nats_urls["hospital-1"]]
    plain = s.nats("hospital-3", None, None, "connect", [f"nats://{s.address('hospital-1')}:4222"])
    assert plain["connected"] is False, plain
    anonymous = s.nats("hospital-3", None, anchors, "connect", url_a)
    assert anonymous["connected"] is False, anonymous
    member = s.nats("hospital-2", s.node_dir("hospital-2") / "nats.nk", anchors, "destroy", url_a)
    assert member["connected"] is True and member["before"] >= 1, member
    assert member["purge"] != "done" and member["delete"] != "done", member
    assert member["after"] == member["before"], member

    # -- write a patient's records at hospital-1 (its EHR is on another machine) ----------
    tokens = {
        inst: s.cli(inst, "token", "create", "--dir", s.node_dir(inst), "--role", "clinician")[
            "token"
        ]
        for inst in INSTITUTIONS
    }
    bundle = generate_patients(1, seed=17, resources_per_patient=4)[0]
    puts = [
        {
            "method": "PUT",
            "url": f"{s.url('hospital-1')}/fhir/{r['resourceType']}/{r['id']}",
            "token": tokens["hospital-1"],
            "body": r,
            "cert": str(s.cert("hospital-1")),
        }
        for r in bundle.all_resources()
    ]
    assert [a["status"] for a in s.http("hospital-3", puts)] == [201] * len(puts)
    observation = next(r for r in bundle.resources if r["resourceType"] == "Observation")
    target = f"Observation/{observation['id']}"

    # -- the patient enrolls a wallet and consents to hospital-2 -------------------------
    wallet = s.base / "patient.wallet"
    s.cli("hospital-1", "patient", "init", "--wallet", wallet, env=WALLET_ENV)
    at_a = ["--node", s.url("hospital-1"), "--node-cert", str(s.cert("hospital-1"))]
    at_a += ["--token", tokens["hospital-1"]]
    s.cli(
        "hospital-1", "patient", "enroll", "--wallet", wallet, *at_a,
        "--patient-id", bundle.patient_id, env=WALLET_ENV,
    )  # fmt: skip
    consent = s.cli(
        "hospital-1", "consent", "grant", "--wallet", wallet, *at_a,
        "--grantee", "hospital-2", "--scope", "Observation", "--purpose", "TREAT", "--days", "1",
        env=WALLET_ENV,
    )  # fmt: skip
    assert consent["status"] == "active"

    # -- hospital-2 fetches and verifies across the bridge; hospital-3 is refused ---------
    shared = s.cli(
        "hospital-2", "share", "fetch", "--node", s.url("hospital-2"),
        "--node-cert", s.cert("hospital-2"),
        "--token", tokens["hospital-2"], "--holder", "hospital-1",
        "--consent", consent["id"], target,
    )  # fmt: skip
    assert shared["resource"]["id"] == observation["id"]
    assert shared["resource"]["code"] == observation["code"]
    assert shared["provenance"]["holder"] == "hospital-1"
    assert len(shared["provenance"]["certified_by"]) >= 2
    refused = s.run(
        "hospital-3", "share", "fetch", "--node", s.url("hospital-3"),
        "--node-cert", s.cert("hospital-3"),
        "--token", tokens["hospital-3"], "--holder", "hospital-1",
        "--consent", consent["id"], target,
    )  # fmt: skip
    assert refused.returncode == 1
    assert b"granted to hospital-2, not hospital-3" in refused.stderr
    assert observation["id"].encode() not in refused.stdout + refused.stderr

    # -- hospital-1 renews its TLS certificate while everything runs: a member.tls proposed
    # -- on its host, signed on another, submitted from a third; then sharing goes on -----
    holder_dir = s.node_dir("hospital-1")
    old_cert = s.cert("hospital-1").read_bytes()
    s.cli("hospital-1", "node", "tls-cert", "--dir", holder_dir, "--renew")
    proposal = s.base / "member-tls.json"
    s.cli("hospital-1", "consortium", "propose-tls", "--dir", holder_dir, "--out", proposal)
    s.cli("hospital-2", "consortium", "sign", "--dir", s.node_dir("hospital-2"), "--tx", proposal)
    s.cli("hospital-3", "consortium", "submit", "--dir", s.node_dir("hospital-3"), "--tx", proposal)
    deadline = time.monotonic() + _DEADLINE_S
    while (holder_dir / "tls.next.crt").exists():  # the running node switches once final
        assert time.monotonic() < deadline, "the renewed certificate was not taken into use"
        time.sleep(0.2)
    assert s.cert("hospital-1").read_bytes() != old_cert
    again = s.cli(
        "hospital-2", "share", "fetch", "--node", s.url("hospital-2"),
        "--node-cert", s.cert("hospital-2"),
        "--token", tokens["hospital-2"], "--holder", "hospital-1",
        "--consent", consent["id"], target,
    )  # fmt: skip
    assert again["resource"]["id"] == observation["id"]
    # hospital-1's own API now presents the renewed certificate (a client trusting it).
    assert [
        a["status"] for a in s.http("hospital-3", [{**puts[0], "method": "GET", "body": None}])
    ] == [200]
    # -- anchored everywhere: every node's copy of the consortium holds hospital-1's head --
    # -- (asked trusting the current members' certificates: hospital-1 renewed its own) --
    final = _wait_all_ready(s, "hospital-2", current_members=True)
    head = next(r for r in final if r["institution"] == "hospital-1")["private_height"]

    # -- the capture: TLS records crossed the bridge, no PHI and no bearer token did ------
    s.net.stop(capture)
    captured = capture_file.read_bytes()
    assert len(captured) > 100_000 and b"\x17\x03\x03" in captured  # TLS application data
    patient = next(r for r in bundle.all_resources() if r["resourceType"] == "Patient")
    secrets_and_phi = [
        *tokens.values(),
        bundle.patient_id,
        observation["id"],
        *(part for name in patient.get("name", []) for part in [name.get("family", "")] if part),
        json.dumps(observation["code"]),
    ]
    for text in secrets_and_phi:
        assert text.encode() not in captured, text
    s.net.close()  # stops the nodes (SIGTERM: they commit what they acknowledged) and NATS
    for inst in INSTITUTIONS:
        status = json.loads(
            subprocess.run(
                [*medledger_command(), "consortium", "status", "--dir", str(s.node_dir(inst)),
                 "--json"],
                env=s.env, capture_output=True, check=True, timeout=120,
            ).stdout
        )  # fmt: skip
        assert status["members"] == list(INSTITUTIONS)
        assert status["anchors"]["hospital-1"]["height"] >= 1
        assert head >= status["anchors"]["hospital-1"]["height"]
        check = subprocess.run(
            [*medledger_command(), "verify", "--dir", str(s.node_dir(inst)), "--consortium"],
            env=s.env, capture_output=True, check=False, timeout=120,
        )  # fmt: skip
        assert check.returncode == 0, check.stderr
