"""``node tls-cert``: a renewal in a consortium waits beside the pinned pair; one at a time."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from medledger.cli import cli
from medledger.ledger.clock import SystemClock
from medledger.node import init_node, write_genesis
from medledger.services.tls import load_certificate
from medledger.storage.keystore import KdfParams


def test_renewal_in_a_consortium_waits_beside_the_pinned_pair(tmp_path: Path) -> None:
    root = tmp_path / "node"
    init_node(root, name="Alpha", passphrase=b"tls cert test passphrase", kdf=KdfParams(n=2**12))
    pinned = load_certificate(root / "tls.crt")
    write_genesis("c", [root], time_ms=SystemClock().now_ms())
    renewed = CliRunner().invoke(cli, ["node", "tls-cert", "--dir", str(root), "--renew"])
    assert renewed.exit_code == 0, renewed.output
    # The pinned pair is untouched; the new one names the same hosts.
    assert load_certificate(root / "tls.crt") == pinned
    pending = load_certificate(root / "tls.next.crt")
    assert pending != pinned and pending.hosts == pinned.hosts
    assert pending.fingerprint in renewed.output
    # A second renewal would orphan the first one's proposal: refused, nothing changed.
    again = CliRunner().invoke(cli, ["node", "tls-cert", "--dir", str(root), "--renew"])
    assert again.exit_code != 0 and "already waiting" in again.output
    assert load_certificate(root / "tls.next.crt") == pending
