"""Nodes on several machines: ``node init --advertise``, ``node member-info``, ``consortium init --member-info``.

Runs the command where the contract is the command line (what an operator
types on each machine): ``node init`` and the first ``consortium init`` as the
console script in a subprocess, the others through the CLI's entry point in
this process; and the Python API to make the other members quickly. A member entry comes from another institution: it is
checked like a genesis member, and a bad one writes nothing.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from medledger.config import load_config, parse_advertise
from medledger.core.errors import InvalidInput
from medledger.node import init_node, load_genesis, member_entry
from medledger.services.tls import load_certificate
from medledger.storage.keystore import KdfParams
from network_support import PASSPHRASE, run_cli

# Not ``from conftest import FAST_KDF``: every tests/ folder with a conftest.py
# puts its own module named ``conftest`` on the path, and which one the name
# finds depends on what was collected before (tests/storage's has no FAST_KDF).
FAST_KDF = KdfParams(n=2**12)


def _node(root: Path, name: str, advertise: str = "") -> Path:
    init_node(root, name=name, passphrase=PASSPHRASE.encode(), kdf=FAST_KDF, advertise=advertise)
    return root


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("https://st-mary.example.org:8700", ("https", "st-mary.example.org", 8700)),
        ("https://10.77.0.1:8700/", ("https", "10.77.0.1", 8700)),
        ("http://[::1]:9000", ("http", "::1", 9000)),
    ],
)
def test_an_advertised_url_is_scheme_host_and_port(url: str, parsed: tuple[str, str, int]) -> None:
    assert parse_advertise(url) == parsed


@pytest.mark.parametrize(
    "url",
    [
        "st-mary.example.org:8700",  # no scheme
        "ftp://st-mary:21",
        "https://st-mary",  # no port
        "https://st-mary:0",
        "https://st-mary:99999",
        "https://st-mary:8700/fhir",  # a path would be spliced before /peer/v1
        "https://user:pw@st-mary:8700",
        "https://st-mary:8700?x=1",
        "https://st-mary:8700#frag",
        "https://st mary:8700",
        "https://:8700",
    ],
)
def test_anything_else_is_refused(url: str) -> None:
    with pytest.raises(InvalidInput, match="advertised address"):
        parse_advertise(url)


def test_node_init_records_the_advertised_url_and_node_start_listens_there(
    tmp_path: Path,
) -> None:
    root = tmp_path / "st-mary"
    run = run_cli(
        "node", "init", "--dir", root, "--name", "St Mary", "--advertise", "https://10.77.0.1:8701"
    )
    assert run.code == 0, run
    doc = tomllib.loads((root / "node.toml").read_text())
    assert doc["node"]["advertise"] == "https://10.77.0.1:8701"
    # Clients check the host name against the certificate, so it names the advertised host.
    cert = load_certificate(root / "tls.crt")
    assert "10.77.0.1" in cert.hosts
    info = run_cli("node", "member-info", "--dir", root, in_process=True).json()
    assert info["peer_url"] == "https://10.77.0.1:8701"
    assert info["id"] == "st-mary"
    assert info["tls_cert"] == cert.hex()
    assert set(info) == {"id", "name", "signing_key", "hpke_key", "peer_url", "tls_cert"}
    from medledger.cli.service import _listen_address

    assert _listen_address(root, None, None) == ("10.77.0.1", 8701)
    assert _listen_address(root, "0.0.0.0", None) == ("0.0.0.0", 8701)
    assert _listen_address(_node(tmp_path / "plain", "Plain"), None, None) == ("127.0.0.1", 8700)


def test_a_bad_advertised_url_creates_no_node(tmp_path: Path) -> None:
    root = tmp_path / "st-mary"
    run = run_cli(
        "node",
        "init",
        "--dir",
        root,
        "--name",
        "St Mary",
        "--advertise",
        "st-mary:8700",
        in_process=True,
    )
    assert run.code != 0
    assert run.err.startswith("error: ") and "advertised address" in run.err
    assert not root.exists()
    # node.toml edited by hand is checked too.
    good = _node(tmp_path / "good", "Good", "https://good.example:8700")
    text = (good / "node.toml").read_text()
    (good / "node.toml").write_text(
        text.replace("https://good.example:8700", "https://good.example:8700/../x")
    )
    with pytest.raises(InvalidInput, match="advertised address"):
        load_config(good)


def test_members_on_other_machines_form_a_genesis_from_their_entries(tmp_path: Path) -> None:
    a = _node(tmp_path / "a", "Alpha", "https://10.77.0.1:8700")
    b = _node(tmp_path / "b", "Beta", "https://10.77.0.2:8700")
    c = _node(tmp_path / "c", "Gamma", "https://gamma.example.org:8443")
    for root in (b, c):  # what b and c send to a
        (tmp_path / f"{root.name}.json").write_text(
            run_cli("node", "member-info", "--dir", root, in_process=True).out
        )
    out = tmp_path / "genesis.json"
    run = run_cli(
        "consortium", "init", "--id", "three", "--member", a,
        "--member-info", tmp_path / "b.json", "--member-info", tmp_path / "c.json",
        "--out", out,
    )  # fmt: skip
    assert run.code == 0, run
    genesis = load_genesis(out)
    assert (a / "genesis.json").read_bytes() == out.read_bytes()
    assert [m.peer_url for m in genesis.members] == [
        "https://10.77.0.1:8700",
        "https://10.77.0.2:8700",
        "https://gamma.example.org:8443",
    ]
    assert [m for m in genesis.members] == [member_entry(r) for r in (a, b, c)]
    assert genesis.hash().hex() in run.out


def test_a_hostile_member_entry_writes_no_genesis(tmp_path: Path) -> None:
    a = _node(tmp_path / "a", "Alpha", "https://10.77.0.1:8700")
    good = member_entry(_node(tmp_path / "b", "Beta", "https://10.77.0.2:8700")).to_json()
    out = tmp_path / "genesis.json"
    cases = {
        "big": "x" * (64 * 1024 + 1),
        "nan": json.dumps(good)[:-1] + ', "x": NaN}',
        "extra": json.dumps({**good, "admin": "yes"}),
        "path-url": json.dumps({**good, "peer_url": "https://10.77.0.2:8700/evil"}),
        "bad-cert": json.dumps({**good, "tls_cert": "30" * 40}),
        "same-key": json.dumps({**member_entry(a).to_json(), "id": "alpha-2"}),
    }
    for label, text in cases.items():
        entry = tmp_path / f"{label}.json"
        entry.write_text(text)
        run = run_cli(
            "consortium", "init", "--id", "x", "--member", a, "--member-info", entry,
            "--out", out, in_process=True,
        )  # fmt: skip
        assert run.code != 0, (label, run)
        assert run.err.startswith("error: ") and run.err.count("\n") == 1, (label, run.err)
        assert not out.exists(), label
        assert not (a / "genesis.json").exists(), label
    run = run_cli(
        "consortium", "init", "--id", "x", "--member-info", tmp_path / "extra.json", in_process=True
    )
    assert run.code == 2 and "needs --out" in run.err


def test_node_status_reports_an_unreachable_node_and_refuses_a_bad_url() -> None:
    from medledger.localnet.natsserver import free_ports

    url = f"http://127.0.0.1:{free_ports(1)[0]}"
    run = run_cli("node", "status", "--node", url, "--json", in_process=True)
    assert run.code == 1
    assert json.loads(run.out) == [{"url": url, "status": "unreachable", "error": "ConnectError"}]
    bad = run_cli("node", "status", "--node", "127.0.0.1:8700", in_process=True)
    assert bad.code != 0 and bad.err.startswith("error: advertised address")


def test_a_genesis_is_adopted_only_if_it_lists_this_node_as_it_is(tmp_path: Path) -> None:
    a = _node(tmp_path / "a", "Alpha", "https://10.77.0.1:8700")
    b = _node(tmp_path / "b", "Beta", "https://10.77.0.2:8700")
    stranger = _node(tmp_path / "s", "Stranger", "https://10.77.0.9:8700")
    (tmp_path / "b.json").write_text(json.dumps(member_entry(b).to_json()))
    out = tmp_path / "genesis.json"
    made = run_cli(
        "consortium", "init", "--id", "two", "--member", a,
        "--member-info", tmp_path / "b.json", "--out", out, in_process=True,
    )  # fmt: skip
    assert made.code == 0, made
    # Not a member: refused, nothing written.
    run = run_cli("consortium", "adopt", "--dir", stranger, "--genesis", out, in_process=True)
    assert run.code == 1 and "does not list 'stranger'" in run.err
    assert not (stranger / "genesis.json").exists()
    # Listed with another URL (someone edited the entry in transit): refused.
    doc = json.loads(out.read_text())
    doc["members"][1]["peer_url"] = "https://10.66.6.6:8700"
    (tmp_path / "edited.json").write_text(json.dumps(doc))
    run = run_cli(
        "consortium", "adopt", "--dir", b, "--genesis", tmp_path / "edited.json", in_process=True
    )
    assert run.code == 1 and "other keys, URL or certificate" in run.err
    assert not (b / "genesis.json").exists()
    # The real one: installed byte for byte as the founder wrote it.
    run = run_cli("consortium", "adopt", "--dir", b, "--genesis", out, in_process=True)
    assert run.code == 0, run
    assert (b / "genesis.json").read_bytes() == (a / "genesis.json").read_bytes()
    assert load_genesis(out).hash().hex() in run.out
    # A node that has a genesis keeps it.
    (tmp_path / "other.json").write_text(json.dumps({**json.loads(out.read_text()), "time_ms": 1}))
    run = run_cli(
        "consortium", "adopt", "--dir", b, "--genesis", tmp_path / "other.json", in_process=True
    )
    assert run.code == 1 and "already holds a different genesis" in run.err


def test_node_nats_key_makes_an_owner_only_seed_once(tmp_path: Path) -> None:
    import nkeys  # type: ignore[import-untyped]

    root = _node(tmp_path / "a", "Alpha")
    run = run_cli("node", "nats-key", "--dir", root, in_process=True)
    assert run.code == 0, run
    seed = root / "nats.nk"
    assert seed.stat().st_mode & 0o777 == 0o600
    public = nkeys.from_seed(bytearray(seed.read_bytes())).public_key.decode()
    assert run.out.strip() == public and public.startswith("U")
    again = run_cli("node", "nats-key", "--dir", root, in_process=True)
    assert again.code == 1 and "exists" in again.err
    assert nkeys.from_seed(bytearray(seed.read_bytes())).public_key.decode() == public
