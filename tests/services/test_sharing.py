"""Consent and verified cross-institution sharing over real loopback HTTP (in one process).

Three institutions (alpha holds the patient's records, beta reads, gamma is
another member); every request travels through mutual TLS → uvicorn → FastAPI.
Refusals must give a clear reason, leave an access entry, and leak no
ciphertext or key material; the reader must refuse anything altered.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medledger.core.consortium import Member
from medledger.core.encoding import canonical_bytes
from medledger.core.errors import ConsentDenied, IntegrityError, InvalidInput, NotFound
from medledger.core.keys import SigningKey
from medledger.core.models import Transaction
from medledger.core.peer import PeerRequest
from medledger.core.tls import MemberCertificate
from medledger.core.transactions import ACCESS, ACCESS_BATCH
from medledger.services.access import REASONS
from medledger.services.consent_fhir import audit_event
from medledger.services.patients import PatientWallet
from medledger.services.sharing import PeerTransport, SharingService
from medledger.services.trail import patient_trail
from sharing_support import SharingNet, now_ms, sharing_network

pytestmark = pytest.mark.timeout(240)


def run(base: Path, story: Callable[[SharingNet], Any], **kwargs: Any) -> None:
    async def main() -> None:
        async with sharing_network(base, ["Alpha", "Beta", "Gamma"], **kwargs) as sn:
            await story(sn)

    asyncio.run(main())


def sharing(sn: SharingNet, inst: str) -> SharingService:
    service = sn.node(inst).sharing
    assert service is not None
    return service


def access_entries(sn: SharingNet, inst: str) -> list[dict[str, Any]]:
    """Access txs on ``inst``'s private chain, oldest first."""
    out = []
    for block in sn.node(inst).store.iter_blocks(1):
        for data in block.tx_data:
            tx = Transaction.decode(data)
            if tx.type == ACCESS:
                out.append(tx.body)
    return out


def observation(sn: SharingNet) -> str:
    return next(r for r in sn.records if r.startswith("Observation/"))


def test_the_whole_story(tmp_path: Path) -> None:
    async def story(sn: SharingNet) -> None:
        beta, target = sharing(sn, "beta"), observation(sn)
        with pytest.raises(ConsentDenied, match="no final consent"):
            await beta.fetch("alpha", "00" * 32, target)
        consent = await sn.grant("beta")
        assert set(await beta.list("alpha", consent)) == set(sn.records)
        shared = await beta.fetch("alpha", consent, target)
        original = await sn.node("alpha").records.read(*target.split("/"))
        assert shared.resource == original.resource()
        prov = shared.provenance
        assert prov["holder"] == "alpha" and prov["consent"] == consent
        assert prov["kem"] == "MLKEM768_X25519"
        assert len(prov["certified_by"]) >= 2
        await sn.revoke(consent)
        with pytest.raises(ConsentDenied, match="revoked"):
            await beta.fetch("alpha", consent, target)
        # Both sides wrote every attempt; nothing but pseudonyms and hashes.
        holder_log = [(e["reader"], e["outcome"]) for e in access_entries(sn, "alpha")]
        assert holder_log == [
            ("beta", "refused"),
            ("beta", "allowed"),
            ("beta", "allowed"),
            ("beta", "refused"),
        ]
        reader_log = [e["outcome"] for e in access_entries(sn, "beta")]
        assert reader_log == ["refused", "allowed", "allowed", "refused"]
        dumped = json.dumps(access_entries(sn, "alpha") + access_entries(sn, "beta"))
        assert sn.patient_id not in dumped and target.split("/")[1] not in dumped
        # The holder's summaries reach the consortium (signed by the holder).
        await sn.node("alpha").access.drain()
        await sn.settle()
        state = sn.node("gamma").consortium
        assert state is not None
        batches = [
            tx
            for block in sn.node("gamma").consortium_store.iter_blocks(1)  # type: ignore[union-attr]
            for tx in map(Transaction.decode, block.tx_data)
            if tx.type == ACCESS_BATCH
        ]
        assert {t.body["holder"] for t in batches} == {"alpha"}
        assert all(
            t.signatures[0].signer == sn.node("alpha").config.signing_key.fingerprint
            for t in batches
        )
        trail = [entry for t in batches for entry in t.body["entries"]]
        assert [e["outcome"] for e in trail] == ["refused", "allowed", "allowed", "refused"]
        # The first attempt named no known consent, so no patient either.
        assert [e["patient"] for e in trail] == ["", *[sn.wallet.fingerprint] * 3]

    run(tmp_path, story)


def test_consent_refusals(tmp_path: Path) -> None:
    async def story(sn: SharingNet) -> None:
        beta, gamma, target = sharing(sn, "beta"), sharing(sn, "gamma"), observation(sn)
        cases: list[tuple[str, str, str]] = []
        narrow = await sn.grant("beta", ["Condition"])
        cases.append(("out of scope", narrow, "does not cover Observation"))
        for_gamma = await sn.grant("gamma")
        cases.append(("another grantee", for_gamma, "granted to gamma, not beta"))
        short = await sn.grant("beta", expires_ms=now_ms() + 300)
        await asyncio.sleep(0.4)
        cases.append(("expired", short, "expired"))
        other = PatientWallet.create(sn.net.base / "other.wallet", b"another patient passphrase")
        strangers = await sn.grant("beta", wallet=other)
        cases.append(("not this patient's record", strangers, "not enrolled"))
        recorded = {
            "out of scope": "the consent does not cover this resource type",
            "another grantee": "the consent was granted to another member",
            "expired": "the consent has expired",
            "not this patient's record": (
                "the consenting patient is not enrolled at this institution"
            ),
            "starts tomorrow": "the consent's period has not started yet",
        }
        day = 24 * 3_600_000
        tomorrow = await sn.grant("beta", starts_ms=now_ms() + day, expires_ms=now_ms() + 2 * day)
        cases.append(("starts tomorrow", tomorrow, "period has not started yet"))
        for name, consent, reason in cases:
            before = len(access_entries(sn, "alpha"))
            with pytest.raises(ConsentDenied, match=reason):
                await beta.fetch("alpha", consent, target)
            entries = access_entries(sn, "alpha")
            assert len(entries) == before + 1, name
            # The entry carries the fixed sentence, never the message naming members or types.
            assert entries[-1]["outcome"] == "refused", name
            assert entries[-1]["reason"] == recorded[name], name
        with pytest.raises(ConsentDenied, match="period has not started yet"):
            await beta.list("alpha", tomorrow)  # a list is refused just the same
        # A consent starting shortly: refused before its start, honoured from then on.
        start = now_ms() + 1500
        soon = await sn.grant("beta", starts_ms=start)
        if now_ms() < start:  # (the grant took less than 1.5 s to become final)
            with pytest.raises(ConsentDenied, match="period has not started yet"):
                await beta.fetch("alpha", soon, target)
        deadline = time.monotonic() + 10
        while now_ms() <= start and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert (await beta.fetch("alpha", soon, target)).resource["id"] == target.split("/")[1]
        # The patient sees the early attempts on their trail, with the reason.
        await sn.node("alpha").access.drain()
        await sn.settle()
        store = sn.node("gamma").consortium_store
        assert store is not None
        trail = patient_trail([store], sn.wallet.fingerprint)
        early = [i for i in trail if i["type"] == ACCESS and i.get("consent") in (tomorrow, soon)]
        assert [i["outcome"] for i in early if i["consent"] == tomorrow] == ["refused"] * 2
        assert early[-1]["consent"] == soon and early[-1]["outcome"] == "allowed"
        # gamma's own consent does work for gamma: the refusals were about beta.
        assert (await gamma.fetch("alpha", for_gamma, target)).resource["id"] == target.split("/")[
            1
        ]

    run(tmp_path, story)


def _post(sn: SharingNet, document: Any, op: str = "fetch") -> httpx.Response:
    member = sn.node("alpha").consortium
    assert member is not None
    alpha = member.state.members.by_id("alpha")
    assert alpha is not None and alpha.tls_cert is not None
    body = document if isinstance(document, bytes) else canonical_bytes(document)
    # On beta's connection (mutual TLS with beta's certificate), as beta's node sends.
    tls = sn.node("beta").client_tls_context(alpha.tls_cert)
    return httpx.post(f"{alpha.peer_url}/peer/v1/{op}", content=body, timeout=10, verify=tls)


def _request(sn: SharingNet, consent: str, target: str, **changes: Any) -> PeerRequest:
    fields: dict[str, Any] = {
        "op": "fetch",
        "reader": "beta",
        "holder": "alpha",
        "consent": consent,
        "resource": target,
        "nonce": "ab" * 16,
        "time_ms": now_ms(),
    }
    fields.update(changes)
    return PeerRequest(**fields)


def test_request_refusals(tmp_path: Path) -> None:
    async def story(sn: SharingNet) -> None:
        consent, target = await sn.grant("beta"), observation(sn)
        beta_key = sn.node("beta").keystore.signing_key()
        skew = sn.node("alpha").consortium.genesis.params.max_clock_skew_ms  # type: ignore[union-attr]
        good = _request(sn, consent, target, nonce="01" * 16).sign(beta_key).to_json()
        tampered = json.loads(json.dumps(good))
        tampered["request"]["resource"] = sn.records[0]
        outsider = SigningKey.generate()
        cases: list[tuple[str, Any, int, str]] = [
            (
                "stale timestamp",
                _request(sn, consent, target, time_ms=now_ms() - skew - 5_000)
                .sign(beta_key)
                .to_json(),
                400,
                "outside the allowed skew",
            ),
            (
                "non-member",
                _request(sn, consent, target, reader="mallory").sign(outsider).to_json(),
                403,
                "not a consortium member",
            ),
            (
                "wrong key",
                _request(sn, consent, target).sign(outsider).to_json(),
                403,
                "not signed with beta's member key",
            ),
            ("tampered body", tampered, 403, "signature"),
            ("malformed", b'{"request": 1}', 400, "signed peer request"),
            ("oversized", b"{" + b" " * 40_000 + b"}", 413, "limit"),
        ]
        for name, document, status, reason in cases:
            before = len(access_entries(sn, "alpha"))
            response = await asyncio.to_thread(_post, sn, document)
            assert response.status_code == status, (name, response.text)
            outcome = response.json()
            assert outcome["resourceType"] == "OperationOutcome", name
            assert reason in outcome["issue"][0]["diagnostics"], (name, outcome)
            assert "ciphertext" not in response.text and "wrapped_key" not in response.text
            # Only an authenticated member's refusal is recorded: unsigned, wrongly
            # signed and non-member requests are answered before anything is written.
            recorded = 1 if name == "stale timestamp" else 0
            assert len(access_entries(sn, "alpha")) == before + recorded, name
        # The good request is served once; the same bytes again are a replay.
        first = await asyncio.to_thread(_post, sn, good)
        assert first.status_code == 200, first.text
        again = await asyncio.to_thread(_post, sn, good)
        assert again.status_code == 400 and "replay" in again.text
        assert "ciphertext" not in again.text

    run(tmp_path, story)


def test_request_text_never_reaches_a_chain(tmp_path: Path) -> None:
    """Arbitrary reader/holder text, signed by a member, an outsider or no one: unauthenticated
    requests write nothing; a member's refusal writes an entry of derived values only."""

    async def story(sn: SharingNet) -> None:
        # The reader side first: what a clinician names reaches beta's chain only as derived
        # values. No member, no FHIR type: refused before anything is written.
        beta, phi = sharing(sn, "beta"), "Jane Roe 1961-04-12 carcinoma"
        before = len(access_entries(sn, "beta"))
        with pytest.raises(NotFound):
            await beta.fetch(phi, "00" * 32, observation(sn))
        with pytest.raises(InvalidInput):
            await beta.fetch("alpha", "00" * 32, "JaneRoeCarcinoma/x")
        assert len(access_entries(sn, "beta")) == before
        # Hex the caller chose is not a consent this member knows: not recorded as one.
        chosen = phi.encode().ljust(32, b"!").hex()
        with pytest.raises(ConsentDenied):
            await beta.fetch("alpha", chosen, observation(sn))
        assert [e["consent"] for e in access_entries(sn, "beta")[before:]] == [""]
        assert access_entries(sn, "alpha")[-1]["consent"] == ""

        loop = asyncio.get_running_loop()
        beta_key, outsider = sn.node("beta").keystore.signing_key(), SigningKey.generate()
        sent: list[str] = [phi, chosen]

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            reader=st.one_of(st.just("beta"), st.text(min_size=1, max_size=40)),
            holder=st.one_of(st.just("alpha"), st.text(min_size=1, max_size=40)),
            signer=st.sampled_from(["beta", "outsider", "forged"]),
        )
        def attempt(reader: str, holder: str, signer: str) -> None:
            request = PeerRequest(
                op="fetch",
                reader=reader,
                holder=holder,
                consent="00" * 32,
                resource="Observation/x",
                nonce=secrets_hex(),
                time_ms=now_ms(),
            )
            document = request.sign(outsider if signer == "outsider" else beta_key).to_json()
            if signer == "forged":
                document["signature"]["sig"] = "30" + "00" * 40
            sent.extend(t for t in (reader, holder) if t not in ("alpha", "beta"))
            before = asyncio.run_coroutine_threadsafe(_entries_of(sn, "alpha"), loop).result(30)
            response = _post(sn, document)
            assert 400 <= response.status_code < 500, response.text
            after = asyncio.run_coroutine_threadsafe(_entries_of(sn, "alpha"), loop).result(30)
            authenticated = signer == "beta" and reader == "beta"
            assert len(after) == len(before) + authenticated, (reader, holder, signer)
            for entry in after[len(before) :]:
                assert entry["reader"] == "beta" and entry["holder"] == "alpha"
                assert entry["reason"] in REASONS and entry["consent"] == ""

        await asyncio.to_thread(attempt)
        await sn.node("alpha").access.drain()
        await sn.settle()
        chains = json.dumps(
            [
                Transaction.decode(data).to_json()
                for store in (
                    sn.node("alpha").store,
                    sn.node("alpha").consortium_store,
                    sn.node("beta").store,
                )
                for block in store.iter_blocks(0)  # type: ignore[union-attr]
                for data in block.tx_data
            ],
            ensure_ascii=False,
        )
        leaked = [t for t in sent if len(t.strip()) >= 6 and json.dumps(t)[1:-1] in chains]
        assert not leaked

    run(tmp_path, story)


def secrets_hex() -> str:
    return os.urandom(16).hex()


async def _entries_of(sn: SharingNet, inst: str) -> list[dict[str, Any]]:
    return access_entries(sn, inst)


class Tampering:
    """A transport that alters the holder's answer before the reader sees it."""

    def __init__(self, inner: PeerTransport, alter: Callable[[dict[str, Any]], None]) -> None:
        self.inner, self.alter = inner, alter

    async def post(
        self, url: str, body: bytes, server_cert: MemberCertificate | None
    ) -> tuple[int, Any]:
        status, answer = await self.inner.post(url, body, server_cert)
        if status == 200:
            self.alter(answer)
        return status, answer


def _flip_ciphertext(answer: dict[str, Any]) -> None:
    blob = bytearray(base64.b64decode(answer["ciphertext"]))
    blob[len(blob) // 2] ^= 1
    answer["ciphertext"] = base64.b64encode(bytes(blob)).decode()


def _wrong_proof(answer: dict[str, Any]) -> None:
    proof = answer["provenance"]["proof"]
    proof[0] = "00" * 32


def _not_final(answer: dict[str, Any]) -> None:
    answer["provenance"]["anchor"]["certificate"] = answer["provenance"]["anchor"]["certificate"][
        :1
    ]


def test_reader_refuses_what_was_altered(tmp_path: Path) -> None:
    async def story(sn: SharingNet) -> None:
        beta, target = sharing(sn, "beta"), observation(sn)
        consent = await sn.grant("beta")
        honest = beta.transport
        assert honest is not None
        gamma_key = sn.node("gamma").config.hpke_key

        def for_gamma(answer: dict[str, Any]) -> None:
            answer["wrapped_for"] = gamma_key

        cases = [
            ("tampered ciphertext", _flip_ciphertext, "tampered"),
            ("wrong proof", _wrong_proof, "wrong proof"),
            ("anchor not final", _not_final, "not final"),
            ("key wrapped for another member", for_gamma, "another member"),
        ]
        try:
            for name, alter, reason in cases:
                beta.transport = Tampering(honest, alter)
                before = len(access_entries(sn, "beta"))
                with pytest.raises(IntegrityError, match=reason):
                    await beta.fetch("alpha", consent, target)
                entries = access_entries(sn, "beta")
                assert len(entries) == before + 1 and entries[-1]["outcome"] == "refused", name
        finally:
            beta.transport = honest
        assert (await beta.fetch("alpha", consent, target)).resource["id"] == target.split("/")[1]

    run(tmp_path, story)


def test_no_fetch_is_served_after_the_revocation_is_final(tmp_path: Path) -> None:
    async def story(sn: SharingNet) -> None:
        beta, target = sharing(sn, "beta"), observation(sn)
        consent = await sn.grant("beta")
        alpha_member = sn.node("alpha").consortium
        assert alpha_member is not None
        revoked_at: list[int] = []
        results: list[tuple[str, int]] = []

        async def fetcher() -> None:
            for _ in range(40):
                try:
                    await beta.fetch("alpha", consent, target)
                    results.append(("ok", now_ms()))
                except ConsentDenied:
                    results.append(("refused", now_ms()))

        async def revoker() -> None:
            await asyncio.sleep(0.05)
            await sn.revoke(consent)
            revoked_at.append(now_ms())

        await asyncio.gather(fetcher(), fetcher(), revoker())
        assert revoked_at
        # Every allowed entry on the holder's chain precedes the final revocation in
        # the holder's own chain order; afterwards only refusals.
        entries = access_entries(sn, "alpha")
        outcomes = [e["outcome"] for e in entries]
        assert "refused" in outcomes and "allowed" in outcomes
        last_allowed = max(i for i, o in enumerate(outcomes) if o == "allowed")
        first_revoked = min(i for i, e in enumerate(entries) if "revoked" in e["reason"])
        assert last_allowed < first_revoked
        assert all(o == "refused" for o in outcomes[first_revoked:])

    run(tmp_path, story)


def test_concurrent_reads_are_summarized_in_batches_and_each_is_on_the_trail(
    tmp_path: Path,
) -> None:
    async def story(sn: SharingNet) -> None:
        consent = await sn.grant("beta")
        records = [r for r in sn.records if not r.startswith("Patient/")][:6]
        reads = records * 4
        shared = await asyncio.gather(
            *(sharing(sn, "beta").fetch("alpha", consent, r) for r in reads)
        )
        assert [f"{s.resource['resourceType']}/{s.resource['id']}" for s in shared] == reads
        await sn.node("alpha").access.drain()
        await sn.settle()
        store = sn.node("gamma").consortium_store
        assert store is not None
        batches = [
            tx
            for block in store.iter_blocks(1)
            for tx in map(Transaction.decode, block.tx_data)
            if tx.type == ACCESS_BATCH
        ]
        entries = [e for tx in batches for e in tx.body["entries"]]
        # Every read is reported once; reads that overlapped share a batch.
        assert len(entries) == len(reads)
        assert len(batches) < len(reads)
        assert {e["outcome"] for e in entries} == {"allowed"}
        trail = patient_trail([store], sn.wallet.fingerprint)
        reads_on_trail = [i for i in trail if i["type"] == ACCESS]
        assert len(reads_on_trail) == len(reads)
        assert {i["holder"] for i in reads_on_trail} == {"alpha"}
        events = [
            audit_event(i, tx_hash=i["tx"], time_ms=i["time_ms"], chain=i["chain"])
            for i in reads_on_trail
        ]
        assert len({e["id"] for e in events}) == len(reads)
        assert all(len(e["id"]) == 64 for e in events)

    run(tmp_path, story)


def test_x25519_members_share_too(tmp_path: Path) -> None:
    """A consortium configured for the classical KEM works the same way."""

    async def story(sn: SharingNet) -> None:
        consent = await sn.grant("beta")
        shared = await sharing(sn, "beta").fetch("alpha", consent, observation(sn))
        assert shared.provenance["kem"] == "X25519"

    run(tmp_path, story, hpke_kem="X25519")


def test_members_publish_their_keys(tmp_path: Path) -> None:
    async def story(sn: SharingNet) -> None:
        member = sn.node("alpha").consortium
        assert member is not None
        published: dict[str, Member] = {m.id: m for m in member.state.members.members}
        for inst in sn.names:
            assert published[inst].hpke_key == sn.node(inst).config.hpke_key
            assert published[inst].peer_url.startswith("https://127.0.0.1:")
        with pytest.raises(InvalidInput):
            await sharing(sn, "beta").fetch("alpha", "zz", observation(sn))

    run(tmp_path, story)
