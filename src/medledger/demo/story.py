"""The story ``medledger demo`` tells, step by step, through the HTTP API of a real network.

Three hospitals run one ``medledger node start`` process each (``network up``,
solo ordering, SQLite). Everything below goes over HTTP exactly as an EHR or
a patient's app would send it; only the attacker at the end touches files.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console, RenderableType
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table

from medledger import netproc
from medledger.config import NodePaths
from medledger.core.consortium import quorum
from medledger.core.encoding import canonical_bytes
from medledger.core.errors import MedledgerError
from medledger.core.hashing import hash_from_hex
from medledger.core.merkle import verify_inclusion
from medledger.core.models import BlockHeader
from medledger.demo.attacks import Verdict, edit_one_transaction, rewrite_history, run_verify
from medledger.demo.client import Answer, DemoFailed, NodeApi
from medledger.ledger.ordering.solo import SoloOrderer
from medledger.services.consent_fhir import consent_for_grant, revocation_for
from medledger.services.patients import PatientWallet
from medledger.services.synthetic import PatientBundle, generate_patients
from medledger.storage.keystore import FileKeyStore, KdfParams

__all__ = [
    "DEMO_CONSORTIUM",
    "DEMO_PASSPHRASE",
    "WALLET_PASSPHRASE",
    "Story",
    "prepare_directory",
]

DEMO_CONSORTIUM = "medledger-demo"
DEMO_PASSPHRASE = "demo-passphrase"  # noqa: S105 - the demo's published passphrase
WALLET_PASSPHRASE = "demo-wallet-passphrase"  # noqa: S105 - likewise
_DAY_MS = 86_400_000
_PATIENTS_AT_A = 20
_RESOURCES_PER_PATIENT = 20
_WRITERS = 16
#: The sharing service prefixes what the holder answered; the table says it already.
_HOLDER_SAID = re.compile(r"^holder refused \(\d+\): ")
_LONG_HEX = re.compile(r"\b([0-9a-f]{12})[0-9a-f]{20,}\b")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _short(text: str, n: int = 12) -> str:
    return text if len(text) <= n else text[:n] + "…"


@dataclass
class Story:
    """One run of the demo in ``base`` (a fresh network directory), told on ``console``."""

    console: Console
    base: Path
    kdf: KdfParams | None = None
    nodes: dict[str, NodeApi] = field(default_factory=dict)
    bundles: list[PatientBundle] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    # -- narration ---------------------------------------------------------------------

    def say(self, text: RenderableType = "") -> None:
        self.console.print(text)

    def why(self, text: str) -> None:
        self.console.print(Padding(f"[dim italic]Why it matters: {text}[/]", (0, 0, 0, 3)))

    def section(self, number: int, title: str) -> None:
        self.console.print()
        self.console.rule(f"[bold]{number}. {title}", align="left")

    def step(self, text: str) -> None:
        self.console.print(Padding(f"• {text}", (0, 0, 0, 1)))

    @contextmanager
    def _nodes(self) -> Iterator[None]:
        try:
            yield
        finally:
            for api in self.nodes.values():
                api.close()
            self.nodes.clear()

    # -- the whole story ---------------------------------------------------------------

    def run(self, *, keep_running: bool) -> None:
        """Tell the story; the network is stopped at the end unless ``keep_running``."""
        self.intro()
        started = time.perf_counter()
        stopped = False
        try:
            with self._nodes():
                self.start_network()
                self.write_records()
                self.wait_anchored()
                self.share_with_consent()
                self.erase_a_patient()
                self.rotate_keys()
                self.byzantine_member()
            self.section(8, "The network stops; nothing identifies a patient on disk")
            netproc.down(self.base)
            stopped = True
            self.scan_disk()
            self.attacks()
            if keep_running:
                self.section(10, "The network starts again, with all its data")
                data = netproc.up(self.base, passphrase=DEMO_PASSPHRASE.encode())
                stopped = False
                self.step(
                    f"{len(data['nodes'])} node processes resumed from their directories "
                    "(`network up` on an existing directory keeps everything)."
                )
        finally:
            if not stopped and not keep_running:
                netproc.down(self.base)
        self.next_steps(keep_running=keep_running, elapsed=time.perf_counter() - started)

    def intro(self) -> None:
        self.console.print(
            Panel.fit(
                "[bold]medledger[/] keeps health records for collaborating institutions on a "
                "[bold]hybrid blockchain[/]: each institution writes to its own fast private "
                "chain; one consortium chain shared by all anchors those chains, carries "
                "patients' consent and records who read what. Records are FHIR R4, encrypted "
                "off-chain; chains hold only hashes, pseudonyms and signatures.\n"
                "This demo starts three hospitals as three processes on this machine and tells "
                "the story through their HTTP APIs, as clinical systems and a patient's app "
                f"would. Network directory: [bold]{self.base}[/]",
                title="medledger demo",
            )
        )

    # -- 1. the network ----------------------------------------------------------------

    def start_network(self) -> None:
        self.section(1, "Three hospitals start their nodes and form a consortium")
        t0 = time.perf_counter()
        data = netproc.up(
            self.base,
            passphrase=DEMO_PASSPHRASE.encode(),
            institutions=3,
            ordering="solo",
            store="sqlite",
            consortium=DEMO_CONSORTIUM,
            kdf=self.kdf,
        )
        for spec in data["nodes"]:
            self.nodes[spec["institution"]] = NodeApi(spec)
        table = Table(title=f"network up ({time.perf_counter() - t0:.1f} s)", title_justify="left")
        for column in ("institution", "process", "API", "ready"):
            table.add_column(column)
        report = netproc.status(self.base)
        for node in report["nodes"]:
            table.add_row(
                node["institution"],
                f"pid {node['pid']}",
                node["url"],
                "yes" if node["ready"] else "no",
            )
        self.say(table)
        members = len(data["nodes"])
        self.step(
            "Each node has its own passphrase-protected keystore (ECDSA P-256 signing key, "
            "key-encryption key, search key), its own private chain, and a copy of the "
            f"consortium chain, whose genesis lists the {members} members. A consortium block "
            f"is final with {quorum(members)} of {members} member signatures."
        )
        self.why(
            "no institution hands its data or its keys to anyone; the consortium only sees "
            "hashes and signatures."
        )

    # -- 2. records --------------------------------------------------------------------

    def write_records(self) -> None:
        self.section(2, "Hospital 1's clinical systems write FHIR records, many at once")
        a = self.nodes["hospital-1"]
        self.bundles = generate_patients(
            _PATIENTS_AT_A, seed=2026, resources_per_patient=_RESOURCES_PER_PATIENT
        )
        resources = [r for b in self.bundles for r in b.all_resources()]
        before = a.get("/chain/private/head")["height"]
        t0 = time.perf_counter()
        written = asyncio.run(a.put_all(resources, writers=_WRITERS))
        elapsed = time.perf_counter() - t0
        head = a.get("/chain/private/head")
        blocks = head["height"] - before
        self.step(
            f"{written} FHIR resources of {len(self.bundles)} synthetic patients PUT by "
            f"{_WRITERS} concurrent clients in {elapsed:.1f} s ({written / elapsed:,.0f}/s): "
            f"each validated, encrypted under its own AES-256-GCM key, and committed on "
            f"Hospital 1's private chain in [bold]{blocks} blocks[/] (one fsync each)."
        )
        self.why(
            "the private chain group-commits: whatever is queued becomes one signed block, and "
            "a write is acknowledged only once its block is on disk — no consortium round trip "
            "on the write path."
        )
        patient = self.bundles[0]
        family = patient.patient["name"][0]["family"]
        obs = next(r for r in patient.resources if r["resourceType"] == "Observation")
        self.facts.update(patient=patient, family=family, observation=obs)
        stored = a.get(f"/fhir/Observation/{obs['id']}")
        coding = stored["code"]["coding"][0]
        block = a.get(f"/chain/private/blocks/{head['height']}")
        record_tx = next(t for t in block["txs"] if t["type"] == "record.put")
        self.step(
            f"GET /fhir/Observation/{_short(obs['id'], 8)} decrypts it: "
            f"{coding.get('display', coding['code'])} of patient {family}. What the chain "
            "holds for a record — no name, no code, no value:"
        )
        self.say(f"     [dim]{canonical_bytes(record_tx['body']).decode()}[/]")
        by_name = a.get("/fhir/Patient", family=family[:3])
        by_patient = a.get("/fhir/Observation", patient=patient.patient_id)
        table = Table(title="search without a plaintext index", title_justify="left")
        table.add_column("query")
        table.add_column("matches", justify="right")
        table.add_row(f"GET /fhir/Patient?family={family[:3]}", str(by_name["total"]))
        table.add_row(
            f"GET /fhir/Observation?patient={_short(patient.patient_id, 8)}",
            str(by_patient["total"]),
        )
        self.say(table)
        self.why(
            "search runs on blind-index tokens (HMAC under the node's search key), so even "
            "the index on disk reveals no names, codes or dates."
        )

    # -- 3. anchoring ------------------------------------------------------------------

    def wait_anchored(self) -> None:
        self.section(3, "Anchoring: every private chain becomes globally tamper-evident")
        a = self.nodes["hospital-1"]
        size = a.get("/chain/private/head")["log_size"]
        t0 = time.perf_counter()
        status = self._until(
            lambda: a.get("/chain/consortium/status"),
            lambda s: s["anchors"].get("hospital-1", {}).get("log_size", 0) >= size,
            "hospital-1's head to be anchored",
        )
        waited = time.perf_counter() - t0
        table = Table(title="final anchors on the consortium chain", title_justify="left")
        for column in ("institution", "private height", "log size", "log root"):
            table.add_column(column)
        for inst, anchor in sorted(status["anchors"].items()):
            table.add_row(
                inst,
                str(anchor.get("height", "")),
                str(anchor.get("log_size", "")),
                _short(str(anchor.get("log_root", "")), 16),
            )
        self.say(table)
        self.step(
            f"Hospital 1's head (log size {size}) was final on the consortium chain "
            f"{waited * 1000:.0f} ms after the last write returned; consortium height "
            f"{status['final_height']}."
        )
        self.why(
            "each anchor carries an RFC 6962 consistency proof from the previous one, checked "
            "by every member and signed by a quorum: from now on not even Hospital 1 can "
            "present a different history of what it wrote."
        )

    def _until(
        self,
        probe: Callable[[], Any],
        done: Callable[[Any], bool],
        what: str,
        timeout: float = 30.0,
    ) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if done(value):
                return value
            if time.monotonic() > deadline:
                raise DemoFailed(f"waited {timeout:.0f} s for {what}")
            time.sleep(0.05)

    # -- 4. consent and sharing --------------------------------------------------------

    def share_with_consent(self) -> None:
        self.section(4, "Consent: a patient decides which hospital may read their records")
        a, b, c = (self.nodes[f"hospital-{i}"] for i in (1, 2, 3))
        patient: PatientBundle = self.facts["patient"]
        obs = self.facts["observation"]
        target = f"Observation/{obs['id']}"
        wallet_path = self.base / "patient.wallet"
        wallet = PatientWallet.create(wallet_path, WALLET_PASSPHRASE.encode())
        fingerprint = wallet.fingerprint
        self.facts.update(fingerprint=fingerprint, wallet=wallet_path)
        enroll = a.call(
            "POST",
            f"/fhir/Patient/{patient.patient_id}/$enroll",
            body={
                "patient_key": wallet.public.der().hex(),
                "signature": wallet.enrollment_signature(
                    "hospital-1", patient.patient_id
                ).to_json(),
            },
        ).body
        self.step(
            f"Patient {self.facts['family']} creates a wallet (a key pair only they hold) and "
            f"enrolls it at Hospital 1: on every chain they are only the key fingerprint "
            f"{_short(enroll['fingerprint'], 16)}."
        )
        rows: list[tuple[str, str, str]] = []

        def attempt(who: NodeApi, consent: str, what: str, label: str) -> Answer:
            answer = who.call(
                "GET", f"/share/hospital-1/{what}", consent=consent, expect=(200, 403)
            )
            outcome = (
                "[green]allowed, verified[/]"
                if answer.status == 200
                else f"[red]refused by hospital-1 ({answer.status})[/]: "
                + _HOLDER_SAID.sub("", answer.reason)
            )
            rows.append((label, f"{who.institution} reads {what.split('/')[0]}", outcome))
            return answer

        attempt(b, "00" * 32, target, "no consent yet")
        chain = a.get("/readyz", role=None)["consortium"]
        now = _now_ms()
        grant = wallet.grant(
            chain=chain,
            grantee="hospital-2",
            scope=["Observation", "Condition"],
            purpose="TREAT",
            expires_ms=now + _DAY_MS,
            time_ms=now,
        )
        t0 = time.perf_counter()
        consent = a.call("POST", "/fhir/Consent", body=consent_for_grant(grant), expect=201).body
        final_ms = (time.perf_counter() - t0) * 1000
        consent_id = consent["id"]
        self.facts["consent"] = consent_id
        rows.append(
            (
                "patient grants",
                "hospital-2 · Observation, Condition · TREAT · 1 day",
                f"[green]final on the consortium in {final_ms:.0f} ms[/]",
            )
        )
        listed = b.get("/share/hospital-1", consent=consent_id)
        shared = attempt(b, consent_id, target, "with consent").body
        original = a.get(f"/fhir/{target}")
        if shared["resource"] != original:
            raise DemoFailed("the shared record differs from the holder's")
        attempt(b, consent_id, f"Patient/{patient.patient_id}", "outside the scope")
        attempt(c, consent_id, target, "someone else's consent")
        revocation = wallet.revoke(
            chain=chain, grant=hash_from_hex(consent_id, "consent id"), time_ms=_now_ms()
        )
        revoked = a.call("PUT", f"/fhir/Consent/{consent_id}", body=revocation_for(revocation))
        rows.append(("patient revokes", f"consent {_short(consent_id)}", revoked.body["status"]))
        attempt(b, consent_id, target, "after revocation")

        table = Table(title="the consent story, as each hospital saw it", title_justify="left")
        for column in ("step", "request", "answer"):
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        self.say(table)
        self.step(
            f"With the consent, Hospital 2 could list {len(listed['entries'])} records it may "
            "fetch, and the Observation it fetched is byte-for-byte Hospital 1's record."
        )
        self.provenance(shared["provenance"])
        self.why(
            "Hospital 1 releases a record only under a final, unrevoked, unexpired consent "
            "signed by the patient's own key, to the very member it names, for the resource "
            "types it names; Hospital 2 believes the record only after checking it against "
            "Hospital 1's anchored log."
        )
        self.audit_trail(a, fingerprint)

    def provenance(self, prov: Mapping[str, Any]) -> None:
        a = self.nodes["hospital-1"]
        proof = a.get(
            "/chain/private/proof/inclusion",
            tx=prov["record_tx"],
            size=prov["anchored_log_size"],
        )
        verify_inclusion(
            bytes.fromhex(proof["leaf_hash"]),
            int(proof["index"]),
            int(proof["size"]),
            [bytes.fromhex(h) for h in proof["proof"]],
            bytes.fromhex(prov["anchored_log_root"]),
        )
        table = Table(title="what Hospital 2 checked before decrypting", title_justify="left")
        table.add_column("check")
        table.add_column("evidence")
        table.add_row(
            "the record is Hospital 1's",
            f"record.put {_short(prov['record_tx'])} at log entry {prov['leaf_index']}",
        )
        table.add_row(
            "it is in Hospital 1's anchored log",
            f"RFC 6962 inclusion proof against root {_short(prov['anchored_log_root'], 16)} "
            f"(log size {prov['anchored_log_size']})",
        )
        table.add_row(
            "that root is final on the consortium",
            f"block {prov['consortium_height']} signed by {', '.join(prov['certified_by'])}",
        )
        table.add_row(
            "the data key reached only Hospital 2",
            f"HPKE, {prov['kem']} (post-quantum hybrid)",
        )
        table.add_row(
            "an outsider can re-check it",
            f"GET /chain/private/proof/inclusion → {len(proof['proof'])} hashes: "
            "[green]verified here too[/]",
        )
        self.say(table)

    def audit_trail(self, a: NodeApi, fingerprint: str) -> None:
        # A cross-institution read is on the holder's private chain at once and on the
        # consortium once final: wait until both halves of every such read are listed.
        events = self._until(
            lambda: a.get("/fhir/AuditEvent", role="admin", patient=fingerprint),
            _both_chains_listed,
            "the consortium's access entries",
            timeout=10,
        )
        consents = a.get("/fhir/Consent", role="admin", patient=fingerprint)
        rows: list[_TrailRow] = []
        for entry in consents["entry"]:
            r = entry["resource"]
            rows.append(
                _TrailRow(
                    time=r["dateTime"],
                    who="the patient",
                    what="consent granted to hospital-2",
                    outcome=f"now {r['status']}",
                    why="",
                    chains={"consortium"},
                )
            )
        for entry in sorted(events["entry"], key=lambda e: str(e["resource"]["recorded"])):
            r = entry["resource"]
            reader = str(r["agent"][0]["who"]["identifier"]["value"])
            actor = str(r["agent"][0].get("altId", "")).split(":")[0]
            what = str(r["entity"][0]["what"]["identifier"]["value"]).split(":")[0]
            row = _TrailRow(
                time=r["recorded"],
                who=f"{reader} {actor}".strip() if reader == a.institution else reader,
                what="read " + ("list" if what == "*" else what),
                outcome="[green]allowed[/]" if r["outcome"] == "0" else "[red]refused[/]",
                why=str(r.get("outcomeDesc", "")),
                chains={str(r["source"]["site"]).split(":")[0]},
            )
            if not rows or not rows[-1].absorb(row):
                rows.append(row)
        rows.sort(key=lambda row: row.time)
        table = Table(
            title=f"the patient's trail at Hospital 1 (GET /fhir/AuditEvent and /fhir/Consent "
            f"?patient={_short(fingerprint, 8)})",
            title_justify="left",
        )
        for column in ("time", "who", "event", "why", "on chain"):
            table.add_column(column)
        for row in rows:
            table.add_row(
                row.time[11:19],
                row.who,
                row.what.strip()
                + (f" ({row.count})" if row.count > 1 else "")
                + ": "
                + row.outcome,
                row.why,
                ", ".join(sorted(row.chains, reverse=True)),
            )
        self.say(table)
        self.facts["audit_events"] = events["total"]
        self.why(
            "every read of the patient's records — allowed or refused, by Hospital 1's own "
            "staff or across institutions — is an `access` entry on a chain (cross-institution "
            "ones on both the holder's private chain and the consortium), and the patient can "
            "list them all."
        )

    # -- 5. erasure --------------------------------------------------------------------

    def erase_a_patient(self) -> None:
        self.section(5, "Erasure: the right to be forgotten, on an append-only chain")
        a = self.nodes["hospital-1"]
        victim = self.bundles[1]
        resources = list(reversed(victim.all_resources()))  # the Patient last
        for r in resources:
            a.call("DELETE", f"/fhir/{r['resourceType']}/{r['id']}", expect=204)
        gone = a.call("GET", f"/fhir/Patient/{victim.patient_id}", expect=410)
        obs = next(r for r in victim.resources if r["resourceType"] == "Observation")
        history = a.get(f"/fhir/Observation/{obs['id']}/_history")
        statuses = ", ".join(e["response"]["status"] for e in history["entry"])
        self.step(
            f"DELETE of all {len(resources)} resources of patient #2: their data keys and "
            f"ciphertexts are destroyed (crypto-shredding) and a record.erase tombstone is "
            f"appended. GET Patient now answers {gone.status} ({gone.reason}); the "
            f"Observation's _history keeps only its tombstone: {statuses}."
        )
        self.why(
            "the chain still holds every hash — it keeps verifying — but nothing that could "
            "ever be decrypted into the patient's data remains anywhere."
        )

    # -- 6. key rotation ---------------------------------------------------------------

    def rotate_keys(self) -> None:
        self.section(6, "Key rotation on a running node")
        a = self.nodes["hospital-1"]
        refused = a.call("POST", "/admin/keys/rotate", expect=403)
        t0 = time.perf_counter()
        summary = a.call("POST", "/admin/keys/rotate", role="admin").body
        elapsed = time.perf_counter() - t0
        obs = self.facts["observation"]
        again = a.call("GET", f"/fhir/Observation/{obs['id']}")
        self.step(
            f"POST /admin/keys/rotate with a clinician token: {refused.status} "
            f"({refused.reason}). With the admin token: a new key-encryption key, "
            f"[bold]{summary['rewrapped']} data keys re-wrapped[/] in {elapsed:.1f} s, the old "
            f"key destroyed, a key.rotate entry on the chain. Reading the Observation again: "
            f"{again.status}."
        )
        self.why(
            "a leaked or aging key is replaced without re-encrypting a single record and "
            "without stopping the node."
        )

    # -- 7. a Byzantine member ---------------------------------------------------------

    def byzantine_member(self) -> None:
        self.section(7, "A Byzantine member signs two different blocks")
        a = self.nodes["hospital-1"]
        height = a.get("/chain/consortium/status")["final_height"]
        real = BlockHeader.from_json(a.get(f"/chain/consortium/blocks/{height}")["header"])
        forged = replace(real, time_ms=real.time_ms + 1)
        paths = NodePaths(root=self.base / "hospital-3")
        key = FileKeyStore.open(paths.keystore, DEMO_PASSPHRASE.encode()).signing_key()
        vote = canonical_bytes(
            {
                "kind": "vote",
                "header": forged.to_json(),
                "signature": key.sign(forged.hash()).to_json(),
            }
        )
        asyncio.run(_publish(self.base / "order.db", vote))
        status = self._until(
            lambda: a.get("/chain/consortium/status"),
            lambda s: bool(s["evidence"]),
            "equivocation evidence",
            timeout=15,
        )
        evidence = status["evidence"][0]
        self.step(
            f"Hospital 3's key signs a second, conflicting block at height {height} and sends "
            f"the vote to the consortium. Every honest member records the two signed headers "
            f"as evidence: [bold]equivocation by {evidence['member']}[/] at height "
            f"{evidence['height']} (GET /chain/consortium/status)."
        )
        self.why(
            "a member that signs two histories is caught with proof anyone can check, and its "
            "signatures no longer count toward finality."
        )

    # -- 8-10. offline checks ----------------------------------------------------------

    def scan_disk(self) -> None:
        family = self.facts["family"]
        hits = sorted(
            str(p.relative_to(self.base))
            for p in self.base.rglob("*")
            if p.is_file() and family.encode() in p.read_bytes()
        )
        self.step(
            f"Searching every file of all three nodes (databases, blobs, logs) for the name "
            f"{family!r}: "
            + (f"[red]found in {', '.join(hits)}[/]" if hits else "[green]not found anywhere[/]")
            + "."
        )

    def attacks(self) -> None:
        self.section(9, "An attacker edits the stored chain; `medledger verify` catches it")
        node = self.base / "hospital-1"
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
        table = Table(
            title="medledger verify --dir <a copy of hospital-1> [--consortium]",
            title_justify="left",
            show_lines=True,
        )
        table.add_column("attack")
        table.add_column("--consortium")
        table.add_column("exit", justify="right")
        table.add_column("verify says")
        for attack, v in verdicts:
            colour = "green" if v.code == 0 else "red"
            table.add_row(
                attack,
                "yes" if v.command.endswith("--consortium") else "no",
                f"[{colour}]{v.code}[/]",
                f"[{colour}]{_verdict_text(v)}[/]",
            )
        self.say(table)
        self.facts["verdicts"] = [v.code for _, v in verdicts]
        expected = [0, 3, 0, 3]
        if self.facts["verdicts"] != expected:
            raise DemoFailed(f"verify exit codes {self.facts['verdicts']}, expected {expected}")
        self.why(
            "a re-signed history is internally perfect — only the roots anchored on the "
            "consortium chain, final under a quorum of other institutions' signatures, expose "
            "it. That is what the hybrid design buys over a private chain alone."
        )

    # -- what next ---------------------------------------------------------------------

    def next_steps(self, *, keep_running: bool, elapsed: float) -> None:
        self.console.print()
        self.console.rule("[bold]What to try next", align="left")
        data = netproc.load_network(self.base)
        first = data["nodes"][0]
        d = str(self.base)
        lines: list[str] = []
        if keep_running:
            self.step(f"The network is [bold]running[/] (story told in {elapsed:.0f} s):")
            table = Table()
            for column in ("institution", "API (OpenAPI at /docs)"):
                table.add_column(column)
            for node in data["nodes"]:
                table.add_row(node["institution"], node["url"])
            self.say(table)
            lines += [
                f"# API tokens (admin, clinician) of every node: {d}/network.json",
                f"TOKEN=$(python3 -c \"import json;print(json.load(open('{d}/network.json'))"
                f"['nodes'][0]['tokens']['clinician'])\")",
                f'curl -H "Authorization: Bearer $TOKEN" '
                f"'{first['url']}/fhir/Patient?family={self.facts['family'][:3]}'",
                f'curl -H "Authorization: Bearer $TOKEN" {first["url"]}/chain/consortium/status',
                f"medledger network status --dir {d}",
                f"medledger consent list --node {first['url']} --token $TOKEN",
                f"medledger network down --dir {d}      # stop it when you are done",
            ]
        else:
            self.step(
                f"The network is [bold]stopped[/] (story told in {elapsed:.0f} s); its data "
                f"stays in {d}. Run `medledger demo --keep-running` to explore it live, or "
                "resume this one:"
            )
            lines += [
                f"MEDLEDGER_PASSPHRASE={DEMO_PASSPHRASE} medledger network up --dir {d}",
                f"medledger network down --dir {d}",
            ]
        lines += [
            f"medledger audit --dir {d}/hospital-1 --patient {self.facts['fingerprint']}",
            f"medledger verify --consortium --dir {d}/hospital-1",
            f"medledger consortium status --dir {d}/hospital-1",
            "medledger bench hybrid --quick     # the hybrid vs consortium-only measurement",
            "make test                          # the whole test suite",
        ]
        for line in lines:
            self.say(
                f"   [cyan]{line}[/]",
            )
        self.say(
            f"   The demo's keystore passphrase is {DEMO_PASSPHRASE!r} and the patient wallet "
            f"({self.facts['wallet']}) opens with {WALLET_PASSPHRASE!r} — a demo, never for "
            "real data."
        )


@dataclass
class _TrailRow:
    """One line of the trail table: consecutive like entries are counted, not repeated."""

    time: str
    who: str
    what: str
    outcome: str
    why: str
    chains: set[str]
    count: int = 1

    def absorb(self, other: _TrailRow) -> bool:
        """Take ``other`` into this row if it is the same event (True) or a repeat of it."""
        if (self.who, self.what, self.outcome) != (other.who, other.what, other.outcome):
            return False
        if self.count == 1 and not other.chains <= self.chains:
            # One cross-institution read, logged on the private chain and the consortium.
            self.chains |= other.chains
            self.why = self.why or other.why
            return True
        if self.chains == other.chains and self.why == other.why:
            self.count += 1
            return True
        return False


def _both_chains_listed(events: Mapping[str, Any]) -> bool:
    sites = [
        str(e["resource"]["source"]["site"]).split(":")[0]
        for e in events["entry"]
        if e["resource"]["agent"][0]["who"] != e["resource"]["source"]["observer"]
    ]
    return sites.count("private") == sites.count("consortium")


def _verdict_text(v: Verdict) -> str:
    """verify's key line, without the CLI's ``error:`` prefix and with long hashes cut."""
    text = v.message.removeprefix("error: verification ")
    if v.code == 0:
        # Keep the private chain's line: blocks, transactions, anchors.
        text = next((part for part in text.split(" · ") if "private:" in part), text)
    return _LONG_HEX.sub(lambda m: m.group(1) + "…", text)


async def _publish(order_file: Path, payload: bytes) -> None:
    orderer = SoloOrderer(order_file)
    try:
        await orderer.publish(f"demo-equivocation-{_now_ms()}", payload)
    finally:
        await orderer.close()


def prepare_directory(base: Path) -> bool:
    """Make ``base`` ready for a fresh demo network; True if a previous demo was replaced.

    A previous demo's directory (its ``network.json`` names the demo consortium)
    is stopped and removed; any other non-empty directory is refused.
    """
    if not base.exists() or not any(base.iterdir()):
        return False
    try:
        data = netproc.load_network(base)
    except MedledgerError:
        data = {}
    if data.get("consortium") != DEMO_CONSORTIUM:
        raise DemoFailed(
            f"{base} is not empty and holds no previous demo; give a new --dir for the demo"
        )
    netproc.down(base, timeout=10)
    shutil.rmtree(base)
    return True
