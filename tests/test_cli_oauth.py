"""``medledger node oauth-client`` and ``medledger patient export-key --for-browser``.

The first command of each test runs as a user runs it (the console script in a
subprocess); the others through the CLI's entry point in this process.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from medledger.config import NodeConfig
from medledger.services.oauth import pkce
from network_support import run_cli

MakeNode = Callable[..., tuple[Path, NodeConfig]]
WALLET_ENV = {"MEDLEDGER_WALLET_PASSPHRASE": "the patient's own passphrase"}


def test_apps_are_registered_secrets_shown_once_and_bad_uris_refused(
    make_node: MakeNode,
) -> None:
    root, _ = make_node()
    added = run_cli(
        "node", "oauth-client", "add", "--dir", root, "--name", "Lab backend",
        "--confidential", "--system-role", "auditor", "--client-id", "lab",
    )  # fmt: skip
    assert added.code == 0, added
    answer = added.json()
    assert (answer["client_id"], answer["confidential"]) == ("lab", True)
    listed = run_cli("node", "oauth-client", "list", "--dir", root, in_process=True)
    assert [c["client_id"] for c in listed.json()] == ["medledger-portal", "lab"]
    assert answer["client_secret"] not in listed.out  # never shown again
    # Stored as a hash only.
    assert answer["client_secret"].encode() not in (root / "oauth.db").read_bytes()
    assert pkce.secret_hash(answer["client_secret"]) in (root / "oauth.db").read_bytes()
    refused = run_cli(  # the rules: tests/services/test_oauth_server.py
        "node", "oauth-client", "add", "--dir", root, "--name", "X", "--redirect-uri", "http://a.example/cb",
        in_process=True,
    )  # fmt: skip
    assert refused.code == 1 and refused.err.startswith("error: ") and "https" in refused.err
    removed = run_cli(
        "node", "oauth-client", "remove", "--dir", root, "--client-id", "lab", in_process=True
    )
    assert removed.code == 0, removed
    assert removed.json() == {"removed": "lab", "grants_revoked": 0}
    listed = run_cli("node", "oauth-client", "list", "--dir", root, in_process=True)
    assert [c["client_id"] for c in listed.json()] == ["medledger-portal"]
    for client_id in ("lab", "medledger-portal"):
        again = run_cli(
            "node", "oauth-client", "remove", "--dir", root, "--client-id", client_id,
            in_process=True,
        )  # fmt: skip
        assert again.code != 0 and again.err.startswith("error: ") and again.out == "", again


def test_export_key_for_browser_writes_a_new_owner_only_jwk(tmp_path: Path) -> None:
    wallet = tmp_path / "patient.wallet"
    fingerprint = run_cli("patient", "init", "--wallet", wallet, env=WALLET_ENV).json()[
        "fingerprint"
    ]
    out = tmp_path / "browser-key.json"
    exported = run_cli(
        "patient", "export-key", "--wallet", wallet, "--for-browser", "--out", out, env=WALLET_ENV,
        in_process=True,
    )  # fmt: skip
    assert exported.code == 0, exported
    assert out.stat().st_mode & 0o777 == 0o600
    jwk = json.loads(out.read_text())
    assert (jwk["kty"], jwk["crv"], jwk["kid"]) == ("EC", "P-256", fingerprint)

    def number(field: str) -> int:
        return int.from_bytes(base64.urlsafe_b64decode(jwk[field] + "=" * (-len(jwk[field]) % 4)))

    key = ec.derive_private_key(number("d"), ec.SECP256R1())
    assert key.public_key().public_numbers().x == number("x")
    # Never overwritten; never without --for-browser.
    before = out.read_bytes()
    again = run_cli(
        "patient", "export-key", "--wallet", wallet, "--for-browser", "--out", out, env=WALLET_ENV,
        in_process=True,
    )  # fmt: skip
    assert again.code == 1 and "already exists" in again.err and out.read_bytes() == before
    plain = run_cli(
        "patient", "export-key", "--wallet", wallet, "--out", tmp_path / "k.json", env=WALLET_ENV,
        in_process=True,
    )  # fmt: skip
    assert plain.code == 2 and not (tmp_path / "k.json").exists()
