"""network.json as typed values: what is written reads back equal; anything else is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medledger.core.errors import InvalidInput, NotFound
from medledger.localnet import netproc
from medledger.localnet.netproc import NETWORK_FILE, PidRecord
from medledger.localnet.spec import (
    MAX_NETWORK_FILE_BYTES,
    ApiTokens,
    InstitutionEntry,
    NatsEntry,
    NetworkSpec,
    PostgresEntry,
    dump_network,
    parse_network,
)
from network_support import run_cli

TOKEN = "mlt_0123456789ab_" + "A" * 43


def _node(i: int, port: int) -> dict[str, Any]:
    return {
        "institution": f"hospital-{i}",
        "name": f"Hospital {i}",
        "dir": f"hospital-{i}",
        "port": port,
        "url": f"https://127.0.0.1:{port}",
        "tls_cert": f"/tmp/net/hospital-{i}/tls.crt",
        "tokens": {"admin": TOKEN, "clinician": TOKEN.replace("A", "B")},
    }


def _valid(**changes: Any) -> dict[str, Any]:
    """A jetstream + postgres network.json as ``network up`` writes it, with ``changes``."""
    data: dict[str, Any] = {
        "version": 1,
        "consortium": "local",
        "ordering": "jetstream",
        "store": "postgres",
        "replicas": 1,
        "nodes": [_node(1, 8001), _node(2, 8002)],
        "nats": [{"name": "n0", "client": 4222, "cluster": 6222, "http": 8222}],
        "postgres": {"port": 5432, "password": "ab" * 16, "data_dir": "/tmp/net/postgres/data"},
    }
    data.update(changes)
    return data


def _with(path: str, value: Any) -> dict[str, Any]:
    """The valid file with the field at ``path`` (``nodes.0.dir``) set to ``value``."""
    data = _valid()
    *parents, last = path.split(".")
    target: Any = data
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return data


def test_the_valid_example_parses_to_typed_entries() -> None:
    spec = parse_network(json.dumps(_valid()))
    assert spec.nodes[1] == InstitutionEntry(
        institution="hospital-2",
        name="Hospital 2",
        dir="hospital-2",
        port=8002,
        tokens=ApiTokens(admin=TOKEN, clinician=TOKEN.replace("A", "B")),
        tls_cert=Path("/tmp/net/hospital-2/tls.crt"),
    )
    assert spec.nodes[1].url == "https://127.0.0.1:8002"
    assert spec.nats == (NatsEntry(name="n0", client=4222, cluster=6222, http=8222),)
    assert spec.nats[0].url == "nats://127.0.0.1:4222"
    assert spec.postgres == PostgresEntry(
        port=5432, password="ab" * 16, data_dir=Path("/tmp/net/postgres/data")
    )
    assert spec.node("hospital-1").tokens.for_role("clinician") == TOKEN.replace("A", "B")
    assert spec.to_json() == _valid()


MALFORMED: list[tuple[str, Callable[[], str | bytes], str]] = [
    ("not JSON", lambda: "{", "not JSON"),
    ("not UTF-8", lambda: b'{"version": 1, "consortium": "\xff"}', "not JSON"),
    ("a list", lambda: "[]", "expected an object"),
    ("future version", lambda: json.dumps(_valid(version=2)), "unknown version 2"),
    (
        "missing field",
        lambda: json.dumps({k: v for k, v in _valid().items() if k != "nodes"}),
        "missing nodes",
    ),
    ("unknown field", lambda: json.dumps(_valid(extra=1)), "unknown field 'extra'"),
    ("duplicate key", lambda: json.dumps(_valid())[:-1] + ', "store": "sqlite"}', "duplicate key"),
    ("NaN", lambda: json.dumps(_valid()).replace('"replicas": 1', '"replicas": NaN'), "NaN"),
    (
        "dir escapes the network",
        lambda: json.dumps(_with("nodes.0.dir", "../victim")),
        "nodes[0].dir",
    ),
    ("absolute dir", lambda: json.dumps(_with("nodes.0.dir", "/etc")), "nodes[0].dir"),
    ("dot dir", lambda: json.dumps(_with("nodes.1.dir", "..")), "nodes[1].dir"),
    ("nats name escapes", lambda: json.dumps(_with("nats.0.name", "a/../../b")), "nats[0].name"),
    (
        "dir is the network's own",
        lambda: json.dumps(_with("nodes.0.dir", "nats")),
        "the network's own",
    ),
    ("port 0", lambda: json.dumps(_with("nodes.0.port", 0)), "nodes[0].port"),
    ("port too large", lambda: json.dumps(_with("nats.0.http", 70000)), "nats[0].http"),
    ("port a bool", lambda: json.dumps(_with("postgres.port", True)), "postgres.port"),
    ("port a text", lambda: json.dumps(_with("nodes.1.port", "8002")), "nodes[1].port"),
    (
        "url elsewhere",
        lambda: json.dumps(_with("nodes.0.url", "http://evil.example:8001")),
        "nodes[0].url",
    ),
    (
        "a trust anchor outside the node's directory",
        lambda: json.dumps(_with("nodes.0.tls_cert", "/tmp/evil/tls.crt")),
        "nodes[0].tls_cert",
    ),
    (
        "a relative trust anchor",
        lambda: json.dumps(_with("nodes.0.tls_cert", "hospital-1/tls.crt")),
        "nodes[0].tls_cert",
    ),
    (
        "token ends a header",
        lambda: json.dumps(_with("nodes.0.tokens.admin", "x\r\nHost: e")),
        "nodes[0].tokens.admin",
    ),
    (
        "third token",
        lambda: json.dumps(_with("nodes.0.tokens.auditor", TOKEN)),
        "unknown field 'auditor'",
    ),
    (
        "password adds DSN keys",
        lambda: json.dumps(_with("postgres.password", "x" * 16 + " host=e")),
        "postgres.password",
    ),
    (
        "relative data_dir",
        lambda: json.dumps(_with("postgres.data_dir", "pg/data")),
        "postgres.data_dir",
    ),
    (
        "data_dir with ..",
        lambda: json.dumps(_with("postgres.data_dir", "/tmp/../etc")),
        "postgres.data_dir",
    ),
    (
        "control character in name",
        lambda: json.dumps(_with("nodes.0.name", "A\x1b[2J")),
        "nodes[0].name",
    ),
    ("no institutions", lambda: json.dumps(_valid(nodes=[])), "at least one institution"),
    (
        "two institutions, one dir",
        lambda: json.dumps(_valid(nodes=[_node(1, 8001), {**_node(2, 8002), "dir": "hospital-1"}])),
        "share one dir",
    ),
    ("two processes, one port", lambda: json.dumps(_with("nats.0.client", 8001)), "share one port"),
    ("solo with NATS servers", lambda: json.dumps(_valid(ordering="solo")), "solo ordering"),
    ("jetstream without servers", lambda: json.dumps(_valid(nats=[])), "at least one NATS"),
    ("more replicas than servers", lambda: json.dumps(_valid(replicas=2)), "replicas must be"),
    ("replicas missing", lambda: json.dumps(_valid(replicas=None)), "replicas must be"),
    (
        "postgres store without cluster",
        lambda: json.dumps(_valid(postgres=None)),
        "PostgreSQL entry",
    ),
    ("sqlite store with a cluster", lambda: json.dumps(_valid(store="sqlite")), "PostgreSQL entry"),
    ("unknown ordering", lambda: json.dumps(_valid(ordering="raft")), "ordering: expected one of"),
    ("oversized", lambda: b" " * (MAX_NETWORK_FILE_BYTES + 1), "larger than"),
]


@pytest.mark.parametrize(
    ("raw", "message"), [(make, msg) for _, make, msg in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_a_malformed_file_is_refused_naming_the_field(
    raw: Callable[[], str | bytes], message: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_network(raw(), source="/n/network.json")
    text = str(caught.value)
    assert text.startswith("/n/network.json: ") and message in text, text
    assert "\n" not in text


_ports = st.lists(st.integers(1, 65535), min_size=1, max_size=40, unique=True)


@st.composite
def _specs(draw: st.DrawFn) -> NetworkSpec:
    ports = draw(_ports)
    institutions = draw(st.integers(1, max(1, len(ports) // 2)))
    node_ports, rest = ports[:institutions], ports[institutions:]
    token = st.from_regex(r"[A-Za-z0-9_.~+/=-]{1,80}", fullmatch=True)
    nodes = tuple(
        InstitutionEntry(
            institution=f"h-{i}",
            name=draw(
                st.text(
                    st.characters(codec="utf-8", categories=["L", "N", "Zs"]),
                    min_size=1,
                    max_size=30,
                ).filter(str.isprintable)
            ),
            dir=f"h-{i}",
            port=port,
            tokens=ApiTokens(admin=draw(token), clinician=draw(token)),
            tls_cert=Path(f"/net/h-{i}/tls.crt"),
        )
        for i, port in enumerate(node_ports)
    )
    servers = len(rest) // 3 if draw(st.booleans()) else 0
    nats = tuple(
        NatsEntry(name=f"n{i}", client=rest[3 * i], cluster=rest[3 * i + 1], http=rest[3 * i + 2])
        for i in range(servers)
    )
    leftover = rest[3 * servers :]
    postgres = None
    if leftover and draw(st.booleans()):
        postgres = PostgresEntry(
            port=leftover[0],
            password=draw(st.from_regex(r"[A-Za-z0-9]{16,40}", fullmatch=True)),
            data_dir=Path("/")
            / draw(st.from_regex(r"[a-z]{1,8}(/[a-z0-9-]{1,8}){0,3}", fullmatch=True)),
        )
    return NetworkSpec(
        consortium=draw(st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True)),
        ordering="jetstream" if nats else "solo",
        store="postgres" if postgres else "sqlite",
        replicas=draw(st.integers(1, len(nats))) if nats else None,
        nodes=nodes,
        nats=nats,
        postgres=postgres,
    )


@settings(max_examples=60, deadline=None)
@given(_specs())
def test_what_is_written_reads_back_equal(spec: NetworkSpec) -> None:
    raw = dump_network(spec)
    assert parse_network(raw) == spec
    assert dump_network(parse_network(raw)) == raw


def test_a_spec_that_breaks_the_rules_cannot_be_built() -> None:
    node = InstitutionEntry(
        institution="a",
        name="A",
        dir="a",
        port=1,
        tokens=ApiTokens(admin="t", clinician="t"),
        tls_cert=Path("/net/a/tls.crt"),
    )
    with pytest.raises(InvalidInput, match="share one port"):
        NetworkSpec(
            consortium="c",
            ordering="jetstream",
            store="sqlite",
            replicas=1,
            nodes=(node,),
            nats=(NatsEntry(name="n0", client=1, cluster=2, http=3),),
        )


# -- load_network: the file in its directory ---------------------------------------------------


def test_load_network_names_a_missing_file_and_a_foreign_cluster(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="holds no network"):
        netproc.load_network(tmp_path)
    foreign = _valid(postgres={"port": 5432, "password": "ab" * 16, "data_dir": "/var/lib/pg"})
    (tmp_path / NETWORK_FILE).write_text(json.dumps(foreign))
    with pytest.raises(InvalidInput, match="is not this network's"):
        netproc.load_network(tmp_path)
    own = str(tmp_path / "postgres" / "data")
    mine = _valid(postgres={"port": 5432, "password": "ab" * 16, "data_dir": own})
    (tmp_path / NETWORK_FILE).write_text(json.dumps(mine))
    assert netproc.load_network(tmp_path).postgres == PostgresEntry(
        port=5432, password="ab" * 16, data_dir=Path(own)
    )


def _start_ticks(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rindex(")") + 2 :].split()[19])


def test_down_refuses_a_file_that_points_outside_the_network(tmp_path: Path) -> None:
    # A process of someone else's, recorded the way a node's would be, beside the network.
    argv = [sys.executable, "-c", "import time; time.sleep(120)"]
    victim = subprocess.Popen(argv)
    try:
        outside = tmp_path / "victim"
        outside.mkdir()
        PidRecord(pid=victim.pid, start_ticks=_start_ticks(victim.pid), argv=tuple(argv)).save(
            outside / "node.pid"
        )
        assert PidRecord.load(outside / "node.pid") is not None
        base = tmp_path / "net"
        base.mkdir()
        hostile = _valid(ordering="solo", store="sqlite", replicas=None, nats=[], postgres=None)
        hostile["nodes"][0]["dir"] = "../victim"
        (base / NETWORK_FILE).write_text(json.dumps(hostile))

        with pytest.raises(InvalidInput, match=r"nodes\[0\]\.dir"):
            netproc.down(base, timeout=5)
        assert victim.poll() is None, "down signalled a process outside its network"
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()


def test_the_cli_reports_a_malformed_file_in_one_line(tmp_path: Path) -> None:
    (tmp_path / NETWORK_FILE).write_text(json.dumps(_with("nodes.0.port", -1)))
    for command in ("status", "down"):
        run = run_cli("network", command, "--dir", tmp_path)
        assert run.code == 1 and run.out == "", run
        assert run.err.count("\n") == 1 and run.err.startswith("error: "), run
        assert "nodes[0].port: expected an integer 1..65535, got -1" in run.err
