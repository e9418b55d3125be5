"""The end of the demo: checks on the stopped network's files, then what to try next.

Section 8 searches every file for the patient's name, section 9 lets an
attacker edit copies of Hospital 1's stored chain (see
:mod:`~medledger.demo.attacks`) and shows ``medledger verify`` catching it;
the closing words list commands to explore the network further.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from rich.table import Column, Table

from medledger.demo.attacks import Verdict, edit_one_transaction, rewrite_history, run_verify
from medledger.demo.client import DemoFailed
from medledger.demo.scene import DEMO_PASSPHRASE, WALLET_PASSPHRASE, Scene, titled_table
from medledger.ledger.clock import SystemClock
from medledger.localnet import netproc
from medledger.node import open_token_store

__all__ = ["catch_tampering", "demo_accounts", "next_steps", "scan_disk"]

_DAY_MS = 86_400_000
_LONG_HEX = re.compile(r"\b([0-9a-f]{12})[0-9a-f]{20,}\b")


def scan_disk(scene: Scene) -> None:
    """Section 8 (network stopped): search every file under ``base`` for the patient's name."""
    family = scene.facts["family"]
    hits = sorted(
        str(p.relative_to(scene.base))
        for p in scene.base.rglob("*")
        if p.is_file() and family.encode() in p.read_bytes()
    )
    scene.step(
        f"Searching every file of all three nodes (databases, blobs, logs) for the name "
        f"{family!r}: "
        + (f"[red]found in {', '.join(hits)}[/]" if hits else "[green]not found anywhere[/]")
        + "."
    )


def catch_tampering(scene: Scene) -> None:
    """Section 9 (network stopped): ``medledger verify`` on Hospital 1 and tampered copies.

    Sets ``facts["verdicts"]`` to the exit codes; :class:`DemoFailed` unless
    they are the story's: intact 0, edited 3, rewritten 0 alone and 3 against
    the consortium.
    """
    scene.section(9, "An attacker edits the stored chain; `medledger verify` catches it")
    node = scene.base / "hospital-1"
    shown = str(node)
    verdicts: list[tuple[str, Verdict]] = [
        ("nobody: Hospital 1 as it is", run_verify(node, consortium=True, shown_as=shown))
    ]
    with tempfile.TemporaryDirectory(prefix="medledger-attack-") as tmp:
        edited = Path(tmp) / "hospital-1-edited"
        shutil.copytree(node, edited)
        what = edit_one_transaction(edited)
        verdicts.append(
            (
                f"someone with write access to the database changes one byte ({what})",
                run_verify(edited, consortium=True, shown_as=shown),
            )
        )
        rewritten = Path(tmp) / "hospital-1-rewritten"
        shutil.copytree(node, rewritten)
        what = rewrite_history(rewritten, DEMO_PASSPHRASE.encode())
        verdicts.append(
            (
                f"an insider with the keystore rewrites history ({what}) …",
                run_verify(rewritten, consortium=False, shown_as=shown),
            )
        )
        verdicts.append(
            (
                "… the same, checked against the consortium's final anchors",
                run_verify(rewritten, consortium=True, shown_as=shown),
            )
        )
    table = titled_table(
        "medledger verify --dir <a copy of hospital-1> [--consortium]",
        "attack",
        "--consortium",
        Column("exit", justify="right"),
        "verify says",
        show_lines=True,
    )
    for attack, v in verdicts:
        colour = "green" if v.code == 0 else "red"
        table.add_row(
            attack,
            "yes" if v.command.endswith("--consortium") else "no",
            f"[{colour}]{v.code}[/]",
            f"[{colour}]{_verdict_text(v)}[/]",
        )
    scene.say(table)
    scene.facts["verdicts"] = [v.code for _, v in verdicts]
    expected = [0, 3, 0, 3]
    if scene.facts["verdicts"] != expected:
        raise DemoFailed(f"verify exit codes {scene.facts['verdicts']}, expected {expected}")
    scene.why(
        "a re-signed history is internally perfect — only the roots anchored on the "
        "consortium chain, final under a quorum of other institutions' signatures, expose "
        "it. That is what the hybrid design buys over a private chain alone."
    )


def next_steps(scene: Scene, *, keep_running: bool, elapsed: float) -> None:
    """The closing words: commands for the running (or stopped) network and the passphrases."""
    scene.console.print()
    scene.console.rule("[bold]What to try next", align="left")
    spec = netproc.load_network(scene.base)
    first = spec.nodes[0]
    d = str(scene.base)
    lines: list[str] = []
    if keep_running:
        scene.step(f"The network is [bold]running[/] (story told in {elapsed:.0f} s):")
        table = Table("institution", "API (OpenAPI at /docs)", "web portal")
        for node in spec.nodes:
            table.add_row(node.institution, node.url, f"{node.url}/portal/")
        scene.say(table)
        _show_accounts(scene, first.tls_cert)
        lines += [
            f"# API tokens (admin, clinician) of every node: {d}/network.json",
            f"TOKEN=$(python3 -c \"import json;print(json.load(open('{d}/network.json'))"
            f"['nodes'][0]['tokens']['clinician'])\")",
            "# HTTPS: each node's pinned certificate is the only one its clients trust",
            f"CERT={first.tls_cert}",
            f'curl --cacert "$CERT" -H "Authorization: Bearer $TOKEN" '
            f"'{first.url}/fhir/Patient?family={scene.facts['family'][:3]}'",
            f'curl --cacert "$CERT" -H "Authorization: Bearer $TOKEN" '
            f"{first.url}/chain/consortium/status",
            f"medledger network status --dir {d}",
            f'medledger consent list --node {first.url} --node-cert "$CERT" --token $TOKEN',
            f"medledger network down --dir {d}      # stop it when you are done",
        ]
    else:
        scene.step(
            f"The network is [bold]stopped[/] (story told in {elapsed:.0f} s); its data "
            f"stays in {d}. Run `medledger demo --keep-running` to explore it live, or "
            "resume this one:"
        )
        lines += [
            f"MEDLEDGER_PASSPHRASE={DEMO_PASSPHRASE} medledger network up --dir {d}",
            f"medledger network down --dir {d}",
        ]
    lines += [
        f"medledger audit --dir {d}/hospital-1 --patient {scene.facts['fingerprint']}",
        f"medledger verify --consortium --dir {d}/hospital-1",
        f"medledger consortium status --dir {d}/hospital-1",
        "medledger bench hybrid --quick     # the hybrid vs consortium-only measurement",
        "make test                          # the whole test suite",
    ]
    for line in lines:
        scene.say(f"   [cyan]{line}[/]")
    scene.say(
        f"   The demo's keystore passphrase is {DEMO_PASSPHRASE!r} and the patient wallet "
        f"({scene.facts['wallet']}) opens with {WALLET_PASSPHRASE!r} — a demo, never for "
        "real data."
    )


def _verdict_text(v: Verdict) -> str:
    """verify's key line, without the CLI's ``error:`` prefix and with long hashes cut."""
    text = v.message.removeprefix("error: verification ")
    if v.code == 0:
        # Keep the private chain's line: blocks, transactions, anchors.
        text = next((part for part in text.split(" · ") if "private:" in part), text)
    return _LONG_HEX.sub(lambda m: m.group(1) + "…", text)


def demo_accounts(scene: Scene) -> list[tuple[str, str, str, str]]:
    """Portal sign-in tokens for the running network: ``(who, institution, page, token)``.

    A patient with records at Hospital 1 and no key yet (the portal makes one in
    the browser and enrolls it), the story's patient (enrolled with the wallet
    file: consents and trail to look at), a clinician at each of the first two
    institutions and an auditor at Hospital 1. Issued into each node's token
    store as ``medledger token create`` does, valid for a day.
    """
    spec = netproc.load_network(scene.base)
    by_name = {n.institution: n for n in spec.nodes}
    story_patient = scene.facts["patient"]
    fresh = next(b for b in scene.bundles[2:] if b.patient_id != story_patient.patient_id)
    wanted = [
        ("patient, no key yet", "hospital-1", "patient", fresh.patient_id),
        ("patient of the story", "hospital-1", "patient", story_patient.patient_id),
        ("clinician", "hospital-1", "clinician", None),
        ("clinician", "hospital-2", "clinician", None),
        ("auditor", "hospital-1", "auditor", None),
    ]
    now_ms = SystemClock().now_ms()
    accounts = []
    for who, inst, role, patient in wanted:
        node = by_name[inst]
        store = open_token_store(scene.base / node.dir)
        try:
            token, _ = store.create(
                role=role, patient=patient, label="demo portal", now_ms=now_ms, ttl_ms=_DAY_MS
            )
        finally:
            store.close()
        accounts.append((who, inst, f"{node.url}/portal/", token))
    return accounts


def _show_accounts(scene: Scene, cert: str | Path) -> None:
    table = Table(
        "demo account", "institution", "portal", "API token (paste it on the sign-in page)"
    )
    for who, inst, url, token in demo_accounts(scene):
        table.add_row(who, inst, url, token)
    scene.say(table)
    scene.step(
        "The portal is served over HTTPS with each node's own certificate: import "
        f"{cert} into the browser (or accept it once) to open it."
    )
