"""nats-server configuration written by ``medledger nats config``, run by real nats-servers.

Two member nodes (``init_node``, ``consortium init``, ``node nats-key``), each
with its own nats-server started from the generated file, routed to the
other over mutual TLS; the operator creates the stream with ``nats stream``.
The member's credential orders and reads, and is refused everything else;
anonymous and plaintext clients are refused; monitoring answers on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.errors
import pytest
from click.testing import CliRunner

from medledger.cli import cli
from medledger.core.consortium import MemberSet
from medledger.core.errors import InvalidInput
from medledger.ledger.ordering.jetstream import JetStreamOrderer
from medledger.ledger.ordering.natsconfig import NatsServerConfig, check_user_nkey
from medledger.localnet.natsserver import find_nats_server, free_ports
from medledger.node import init_node, load_genesis
from medledger.services.tls import client_context
from medledger.storage.keystore import KdfParams

pytestmark = pytest.mark.timeout(180)
STREAM, SUBJECT = "CONSORTIUM", "consortium.order"
PASSPHRASE = b"nats config test passphrase"


def run_cli(*args: str | Path) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


@dataclass
class Deployment:
    roots: dict[str, Path]
    client_ports: dict[str, int]
    monitor_ports: dict[str, int]
    operator_seed: Path
    configs: dict[str, Path]

    def urls(self) -> list[str]:
        return [f"tls://127.0.0.1:{p}" for p in self.client_ports.values()]

    def tls(self) -> object:
        genesis = load_genesis(self.roots["alpha"] / "genesis.json")
        return client_context(MemberSet(genesis.members).tls_certificates())


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"nats-server exited with {proc.returncode}")
        url = f"http://127.0.0.1:{port}/healthz"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.1)
    raise AssertionError("nats-server did not become healthy")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    base = tmp_path_factory.mktemp("nats-config")
    names = ("alpha", "beta")
    roots = {n: base / n for n in names}
    for name, root in roots.items():
        init_node(root, name=name.title(), passphrase=PASSPHRASE, kdf=KdfParams(n=2**12))
    run_cli(
        "consortium", "init", "--id", "conf", *(a for r in roots.values() for a in ("--member", r))
    )
    nkeys = {n: run_cli("node", "nats-key", "--dir", r).strip() for n, r in roots.items()}
    operator_seed = base / "operator.nk"
    operator_nkey = run_cli("nats", "operator-key", "--out", operator_seed).strip()
    ports = free_ports(6)
    client = dict(zip(names, ports[0:2], strict=True))
    route = dict(zip(names, ports[2:4], strict=True))
    monitor = dict(zip(names, ports[4:6], strict=True))
    configs: dict[str, Path] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name in names:
            other = next(n for n in names if n != name)
            configs[name] = base / f"nats-{name}.conf"
            run_cli(
                "nats", "config", "--dir", roots[name], "--server-name", name,
                "--listen", f"127.0.0.1:{client[name]}",
                "--cluster-listen", f"127.0.0.1:{route[name]}",
                "--route", f"127.0.0.1:{route[other]}",
                *(a for n, k in nkeys.items() for a in ("--nkey", f"{n}={k}")),
                "--operator-nkey", operator_nkey,
                "--store-dir", str(base / f"js-{name}"),
                "--monitor-port", str(monitor[name]),
                "--out", configs[name], "--ca-out", base / f"members-{name}.pem",
            )  # fmt: skip
            log = (base / f"nats-{name}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [str(find_nats_server()), "-c", str(configs[name])],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()
        deadline = time.monotonic() + 60
        for name, proc in zip(names, procs, strict=True):
            _wait_healthy(monitor[name], proc, deadline)
        yield Deployment(roots, client, monitor, operator_seed, configs)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_the_operator_creates_the_stream_and_a_member_may_only_order_and_read(
    deployment: Deployment,
) -> None:
    urls = ",".join(deployment.urls())
    run_cli(
        "nats", "stream", "--dir", deployment.roots["alpha"], "--operator-seed",
        deployment.operator_seed, "--replicas", "2",
        *(a for u in urls.split(",") for a in ("--url", u)),
    )  # fmt: skip
    seed = deployment.roots["beta"] / "nats.nk"

    async def main() -> None:
        tls = deployment.tls()
        member = await JetStreamOrderer.connect(
            deployment.urls(),
            stream=STREAM,
            subject=SUBJECT,
            replicas=2,
            create=False,
            tls=tls,  # type: ignore[arg-type]
            nkeys_seed=seed,
            retry_for=20,
        )
        try:
            seq = await member.publish("m-1", b"signed tx")
            reader = member.read(seq)
            assert (await asyncio.wait_for(anext(reader), 30)).payload == b"signed tx"
            await reader.aclose()
            nc = await nats.connect(deployment.urls(), tls=tls, nkeys_seed=str(seed))  # type: ignore[arg-type]
            try:
                js = nc.jsm()
                for attempt in (
                    lambda: js.purge_stream(STREAM),
                    lambda: js.delete_stream(STREAM),
                    lambda: js.delete_msg(STREAM, seq),
                    lambda: js.add_stream(name="OTHER", subjects=["other"]),
                ):
                    with pytest.raises((nats.errors.Error, TimeoutError)):
                        await asyncio.wait_for(attempt(), 2)
                assert await member.last_seq() == seq
            finally:
                await nc.close()
            # No key: refused (there is no anonymous user).
            with pytest.raises(nats.errors.Error, match=r"(?i)authorization violation"):
                await nats.connect(
                    deployment.urls()[:1],
                    tls=tls,  # type: ignore[arg-type]
                    allow_reconnect=False,
                    max_reconnect_attempts=0,
                    connect_timeout=5,
                )
        finally:
            await member.close()

    asyncio.run(main())


def test_plaintext_is_refused_and_monitoring_is_on_loopback_only(
    deployment: Deployment,
) -> None:
    port = deployment.client_ports["alpha"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        info = raw.recv(4096)
        raw.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
        with contextlib.suppress(ConnectionError, TimeoutError):
            assert b"PONG" not in raw.recv(4096)
    assert b'"tls_required":true' in info
    text = deployment.configs["alpha"].read_text()
    assert f'http: "127.0.0.1:{deployment.monitor_ports["alpha"]}"' in text
    assert "no_auth_user" not in text and "allow_anonymous" not in text


def test_hostile_values_never_reach_the_file(tmp_path: Path) -> None:
    seed_key = run_cli("nats", "operator-key", "--out", tmp_path / "k.nk").strip()
    good = {
        "server_name": "alpha",
        "listen": ("127.0.0.1", 4222),
        "routes": (),
        "cluster_listen": None,
        "cert_file": "/n/tls.crt",
        "key_file": "/n/tls.key",
        "ca_file": "/n/members.pem",
        "store_dir": "/n/js",
        "member_nkeys": {"alpha": seed_key},
        "operator_nkey": run_cli("nats", "operator-key", "--out", tmp_path / "o.nk").strip(),
    }
    NatsServerConfig(**good)  # type: ignore[arg-type]
    altered = seed_key[:-1] + ("A" if seed_key[-1] != "A" else "B")
    bad = [
        {"server_name": 'a"\nauthorization {}'},
        {"store_dir": '/n/js"\nlisten: 0.0.0.0:1'},
        {"member_nkeys": {"alpha": altered}},
        {"member_nkeys": {"alpha": good["operator_nkey"]}},
        {"operator_nkey": "N" + seed_key[1:]},
    ]
    for change in bad:
        with pytest.raises(InvalidInput):
            NatsServerConfig(**{**good, **change})  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        check_user_nkey("U" * 56)


def test_every_member_and_no_one_else_needs_a_key(deployment: Deployment, tmp_path: Path) -> None:
    operator = run_cli("nats", "operator-key", "--out", tmp_path / "op.nk").strip()
    alpha_key = run_cli("nats", "operator-key", "--out", tmp_path / "a.nk").strip()
    common = [
        "nats", "config", "--dir", str(deployment.roots["alpha"]), "--server-name", "alpha",
        "--listen", "127.0.0.1:4222", "--operator-nkey", operator, "--store-dir", "/js",
        "--out", str(tmp_path / "n.conf"), "--ca-out", str(tmp_path / "m.pem"),
    ]  # fmt: skip
    for extra, reason in (
        (["--nkey", f"alpha={alpha_key}"], "no --nkey for member beta"),
        (["--nkey", f"alpha={alpha_key}", "--nkey", f"mallory={operator}"], "not a current"),
    ):
        result = CliRunner().invoke(cli, [*common, *extra])
        assert result.exit_code != 0 and reason in str(result.exception), result.output
    assert not (tmp_path / "n.conf").exists() and not (tmp_path / "m.pem").exists()
