"""Which wallet key speaks for which local Patient: bindings read from the private chain.

Enrollment is the only way a key becomes a Patient's (``core.enrollment``):
:meth:`EnrollmentService.enroll`, :meth:`~EnrollmentService.rotate` (signed by
the key bound now) and :meth:`~EnrollmentService.rebind` (an administrator's
break-glass, announced on the consortium before it takes effect). Each is a
transaction on the private chain carrying the wallet signatures that
justify it. The FHIR ``Patient`` resource plays no part: anyone who may
write FHIR could write an identifier.

The bindings are derived data held in memory. Every look-up first reads the
private-chain blocks added since the last one (identity transactions are
rare, so a block is skipped on a byte search without decoding), and each
identity transaction is checked again — signatures and rules — as it is
read: a chain whose identity transactions do not replay cleanly is damaged,
and every look-up refuses with :class:`IntegrityError` saying where.
``patient.enroll`` transactions written before enrollments were signed carry
no signature anyone could check; they bind nothing (the patient enrolls
again) and are logged once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from medledger.core.consortium import CONSORTIUM_ONLY
from medledger.core.enrollment import (
    IDENTITY_TYPES,
    PATIENT_ENROLL,
    PATIENT_REBIND,
    PATIENT_ROTATE,
    REBIND_ACTOR,
    Binding,
    EnrollmentEvent,
    EnrollmentTable,
)
from medledger.core.errors import IntegrityError, InvalidInput, MedledgerError, NotFound
from medledger.core.hashing import sha256
from medledger.core.keys import VerifyingKey
from medledger.core.models import Signature, Transaction
from medledger.ledger.clock import Clock, SystemClock
from medledger.ledger.consortium.member import ConsortiumMember
from medledger.services.records.model import RecordChain
from medledger.services.records.service import RecordsService

__all__ = ["EnrollmentService"]

log = logging.getLogger(__name__)
#: Cheap pre-filter: canonical JSON spells the type of every identity tx like this.
_MARK = b'"type":"patient.'
_LEGACY_ENROLL_FIELDS = {"patient", "pseudonym"}
#: Blocks read between two yields to the event loop while catching up.
_BLOCKS_PER_SLICE = 500


class EnrollmentService:
    """Bindings of one institution's Patients to wallet keys (see module docstring)."""

    def __init__(
        self,
        *,
        institution: str,
        chain: RecordChain,
        records: RecordsService,
        clock: Clock | None = None,
    ) -> None:
        self.institution = institution
        self._chain = chain
        self._records = records
        self._clock: Clock = clock or SystemClock()
        self._member: ConsortiumMember | None = None
        self._table = EnrollmentTable()
        self._next_height = 1  # block 0 is the genesis
        self._damage: str | None = None
        self._legacy = 0
        self._patient_ids: dict[str, str] = {}
        self._lock = asyncio.Lock()

    def attach_consortium(self, member: ConsortiumMember) -> None:
        """Break-glass re-bindings are reported on ``member``'s consortium from now on."""
        self._member = member

    # -- reading --------------------------------------------------------------------------

    def _catch_up(self, max_blocks: int | None = None) -> bool:
        """Replay identity txs of blocks not read yet; ``True`` once at the head."""
        store = self._chain.store
        budget = max_blocks
        for block in store.iter_blocks(self._next_height):
            for data in block.tx_data:
                if _MARK in data and self._damage is None:
                    self._replay(data, block.height)
            self._next_height = block.height + 1
            if budget is not None:
                budget -= 1
                if budget <= 0:
                    return False
        return True

    def _replay(self, data: bytes, height: int) -> None:
        tx = Transaction.decode(data)
        if tx.type not in IDENTITY_TYPES:
            return
        if tx.type == PATIENT_ENROLL and set(tx.body) == _LEGACY_ENROLL_FIELDS:
            self._legacy += 1
            if self._legacy == 1:
                log.warning(
                    "unsigned patient.enroll transactions from an earlier version bind no key; "
                    "those patients must enroll again"
                )
            return
        try:
            self._table.replay(tx, sha256(data), self.institution)
        except MedledgerError as exc:
            self._damage = f"private chain block {height}: {exc}"
            log.error("enrollments unusable: %s", self._damage)

    async def _current(self) -> EnrollmentTable:
        """The table as of the chain head (raising if the chain's enrollments are damaged)."""
        while not self._catch_up(_BLOCKS_PER_SLICE):
            await asyncio.sleep(0)
        if self._damage is not None:
            raise IntegrityError(f"patient enrollments do not verify: {self._damage}")
        return self._table

    async def binding_of(self, patient_id: str) -> Binding | None:
        """How ``Patient/<patient_id>`` is bound now, if it is."""
        table = await self._current()
        return table.of_pseudonym(self._records.patient_pseudonym(patient_id))

    async def fingerprint_of(self, patient_id: str) -> str | None:
        """The key fingerprint ``Patient/<patient_id>`` is bound to, if any."""
        binding = await self.binding_of(patient_id)
        return binding.fingerprint if binding is not None else None

    async def patient_id(self, fingerprint: str) -> str | None:
        """The local Patient bound to key ``fingerprint`` now, if any."""
        binding = (await self._current()).of_fingerprint(fingerprint)
        if binding is None:
            return None
        pseudonym = binding.pseudonym
        if pseudonym not in self._patient_ids:
            found = self._records.patient_of_pseudonym(pseudonym)
            if found is None:
                return None
            self._patient_ids[pseudonym] = found
        return self._patient_ids[pseudonym]

    # -- binding --------------------------------------------------------------------------

    async def _pseudonym(self, patient_id: str) -> str:
        """The Patient's pseudonym; it must exist here (unerased)."""
        await self._records.read("Patient", patient_id)  # NotFound / Gone
        return self._records.patient_pseudonym(patient_id)

    async def enroll(self, patient_id: str, patient_key: VerifyingKey, signature: Signature) -> str:
        """Bind a Patient that has no key yet to ``patient_key``; returns its fingerprint.

        ``signature`` by ``patient_key`` over ``enrollment_message(institution,
        pseudonym)`` proves the patient holds the key. Enrolling the key that is
        already bound again changes nothing. Raises :class:`Conflict` if the
        Patient is bound to another key or the key to another Patient.
        """
        pseudonym = await self._pseudonym(patient_id)
        body: dict[str, Any] = {
            "patient": patient_key.fingerprint,
            "pseudonym": pseudonym,
            "patient_key": patient_key.der().hex(),
            "signature": signature.to_json(),
        }
        # The signature is checked even when nothing would change: a key alone
        # proves nothing, so it must not be answered as if it were enrolled.
        EnrollmentEvent.from_tx(
            Transaction(type=PATIENT_ENROLL, chain=self._chain.chain_id, body=body, time_ms=0),
            self.institution,
        )
        async with self._lock:
            table = await self._current()
            bound = table.of_pseudonym(pseudonym)
            if bound is not None and bound.fingerprint == patient_key.fingerprint:
                return bound.fingerprint
            await self._commit(PATIENT_ENROLL, body, table)
        return patient_key.fingerprint

    async def rotate(
        self,
        patient_id: str,
        new_key: VerifyingKey,
        signature: Signature,
        previous_key: VerifyingKey,
        previous_signature: Signature,
    ) -> str:
        """The patient moves to ``new_key``, with the bound key's signature; returns it."""
        pseudonym = await self._pseudonym(patient_id)
        body: dict[str, Any] = {
            "patient": new_key.fingerprint,
            "pseudonym": pseudonym,
            "patient_key": new_key.der().hex(),
            "signature": signature.to_json(),
            "previous": previous_key.fingerprint,
            "previous_key": previous_key.der().hex(),
            "previous_signature": previous_signature.to_json(),
        }
        async with self._lock:
            await self._commit(PATIENT_ROTATE, body, await self._current())
        return new_key.fingerprint

    async def rebind(
        self, patient_id: str, new_key: VerifyingKey, signature: Signature, *, actor: str
    ) -> dict[str, str]:
        """Break-glass: bind the Patient to ``new_key`` without the bound key's consent.

        Only for an administrator (``actor`` = ``admin:<token id>``). The
        re-binding is reported on the consortium first and takes effect on the
        private chain after the report is final, so it is never silent: if the
        report fails nothing changes; if the private commit fails after it, the
        consortium shows an announced re-binding that did not happen (retry).
        Returns ``{"patient", "previous", "report", "tx"}``.
        """
        if not REBIND_ACTOR.fullmatch(actor):
            raise InvalidInput("a break-glass re-binding is made by an admin token")
        member = self._member
        if member is None or member.genesis.params.mode == CONSORTIUM_ONLY:
            raise NotFound("break-glass re-binding needs this node to be in a consortium")
        pseudonym = await self._pseudonym(patient_id)
        async with self._lock:
            table = await self._current()
            bound = table.of_pseudonym(pseudonym)
            if bound is None:
                raise NotFound("the patient is not enrolled here: enroll instead")
            body: dict[str, Any] = {
                "patient": new_key.fingerprint,
                "pseudonym": pseudonym,
                "patient_key": new_key.der().hex(),
                "signature": signature.to_json(),
                "previous": bound.fingerprint,
                "actor": actor,
                "report": "00" * 32,
            }
            # Every check the private tx will face, before anything is announced.
            self._check(PATIENT_REBIND, body, table)
            report = member.sign(
                Transaction(
                    type=PATIENT_REBIND,
                    chain=member.chain_id,
                    body={
                        "institution": self.institution,
                        "patient": new_key.fingerprint,
                        "previous": bound.fingerprint,
                        "actor": actor,
                    },
                    time_ms=self._clock.now_ms(),
                )
            )
            await member.submit(report)
            body["report"] = report.hash().hex()
            tx_hash = await self._commit(PATIENT_REBIND, body, table)
        return {
            "patient": new_key.fingerprint,
            "previous": bound.fingerprint,
            "report": body["report"],
            "tx": tx_hash.hex(),
        }

    def _check(self, kind: str, body: dict[str, Any], table: EnrollmentTable) -> EnrollmentEvent:
        tx = Transaction(type=kind, chain=self._chain.chain_id, body=body, time_ms=0)
        event = EnrollmentEvent.from_tx(tx, self.institution)
        table.check(event)
        return event

    async def _commit(self, kind: str, body: dict[str, Any], table: EnrollmentTable) -> bytes:
        """Check (signatures, rules) then append; durable and in the table on return."""
        self._check(kind, body, table)
        receipt = await self._chain.submit(kind, body)
        await self._current()  # reads the new block back, as a restarted node would
        return receipt.tx_hash
