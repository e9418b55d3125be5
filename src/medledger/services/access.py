"""The access trail: every read of a record, allowed or refused, is an ``access`` tx.

* On the private chain of the institution that served or refused the read,
  and — for cross-institution reads — on the reader's private chain too.
* For cross-institution reads the holder also reports a summary to the
  consortium, so the patient's trail survives any one institution. Summaries
  go out as ``access.batch`` txs: whatever accumulated while the previous
  batch became final goes in the next one (group commit), so a busy holder
  costs the consortium one signed tx per batch rather than one per read.

Bodies hold only member ids, pseudonyms (patient key fingerprints or keyed
hashes), keyed record references and hashes: never a resource id, a name or
any other PHI. ``reason`` is one of medledger's own fixed sentences
(:data:`REASONS`, chosen by :func:`refusal_reason`), never an error message,
which could quote what a request said. :class:`AccessEntry` refuses to be
built from anything else, so no request text can reach a chain through it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from medledger.core.encoding import MAX_SAFE_INTEGER, canonical_text
from medledger.core.errors import (
    ConsentDenied,
    Gone,
    IntegrityError,
    InvalidInput,
    InvalidSignature,
    MedledgerError,
    NotFound,
    OrderingError,
    RateLimited,
    StorageError,
    VerificationError,
)
from medledger.core.models import Receipt, Transaction
from medledger.core.transactions import ACCESS, ACCESS_BATCH
from medledger.ledger.clock import Clock, SystemClock
from medledger.ledger.consortium.member import ConsortiumMember
from medledger.ledger.consortium.rules import MAX_ACCESS_BATCH
from medledger.services.fhir import is_resource_type
from medledger.services.records.model import RecordChain

__all__ = [
    "ALLOWED",
    "REASONS",
    "REFUSED",
    "AccessEntry",
    "AccessLog",
    "EncodedSubmit",
    "access_tx_bytes",
    "refusal_reason",
]

log = logging.getLogger(__name__)
ALLOWED, REFUSED = "allowed", "refused"

# Refusals whose message is already a fixed sentence: recorded verbatim.
_VERBATIM = (
    "the consent was revoked by the patient",
    "the consent was given by another patient",
    "the consent has expired",
    "the consent's period has not started yet",
    "no final consent with that hash on the consortium chain",
    "the consenting patient is not enrolled at this institution",
    "the consent's patient is not the subject of this record",
    "the reader has published no HPKE key",
    "the request is addressed to another member",
    "the request was sent to another operation's endpoint",
    "the request nonce was already used (replay)",
    "the record is not anchored on the consortium yet; retry",
    "no such resource for this patient",
)
# Our own messages that name a member or resource type: the fixed sentence recorded instead.
_BY_PREFIX = (
    ("the consent was granted to ", "the consent was granted to another member"),
    ("the consent does not cover ", "the consent does not cover this resource type"),
    ("the request timestamp is outside ", "the request timestamp is outside the allowed skew"),
)
# Anything else: a fixed sentence per kind of error, most specific first.
_BY_CLASS: tuple[tuple[type[MedledgerError], str], ...] = (
    (RateLimited, "too many refusals; the holder is throttling this member"),
    (Gone, "the record was erased"),
    (NotFound, "no such record"),
    (ConsentDenied, "no consent authorizes this read"),
    (InvalidSignature, "a signature or membership check failed"),
    (IntegrityError, "the holder's answer did not verify"),
    (VerificationError, "the holder's answer did not verify"),
    (InvalidInput, "the request was malformed"),
    (OrderingError, "the holder or the consortium was unavailable"),
    (StorageError, "a storage failure"),
    (MedledgerError, "the request failed"),
)
#: Every ``reason`` an access entry can carry.
REASONS = frozenset(
    {*_VERBATIM, *(fixed for _, fixed in _BY_PREFIX), *(fixed for _, fixed in _BY_CLASS)}
)
# What a holder's refusal looks like on the reader's side (``sharing._refusal``).
_HOLDER_REFUSED = re.compile(r"holder refused \(\d{3}\): ")


def refusal_reason(exc: MedledgerError) -> str:
    """The fixed sentence (one of :data:`REASONS`) that ``exc`` is recorded as.

    Never the message itself: messages may quote the request or the peer that
    caused them, and an access entry is signed, anchored and never erased.
    """
    message = _HOLDER_REFUSED.sub("", str(exc), count=1)
    if message in _VERBATIM:
        return message
    for prefix, fixed in _BY_PREFIX:
        if message.startswith(prefix):
            return fixed
    return next(fixed for cls, fixed in _BY_CLASS if isinstance(exc, cls))


#: Accepted values each shape check remembers, at most (then forgotten all at once).
_SEEN_MAX = 4096


class _Shape:
    """A field shape: a value passes if it fits ``pattern`` (and ``also``, if given).

    Every read builds an entry, mostly from values seen before (the institution,
    the token's actor, the patient pseudonym, the record reference): a value that
    passed is remembered, and the next one equal to it skips the regular
    expression. Only passing values are kept, so anything refused is refused by
    the full check, every time; and the check is a pure function of the text.
    """

    __slots__ = ("_also", "_pattern", "_seen")

    def __init__(self, pattern: str, also: Callable[[str], bool] | None = None) -> None:
        self._pattern = re.compile(pattern)
        self._also = also
        self._seen: set[str] = set()

    def fits(self, value: str) -> bool:
        if value in self._seen:
            return True
        if self._pattern.fullmatch(value) is None:
            return False
        if self._also is not None and not self._also(value):
            return False
        if len(self._seen) >= _SEEN_MAX:
            self._seen.clear()
        self._seen.add(value)
        return True


_MEMBER = _Shape(r"[a-z0-9][a-z0-9-]{0,62}")
_HASH = _Shape(r"[0-9a-f]{64}")
#: A keyed record reference of a real FHIR type: a word shaped like a type is no type.
_RESOURCE = _Shape(
    r"[A-Z][A-Za-z]{0,63}:[0-9a-f]{64}", lambda v: is_resource_type(v.split(":", 1)[0])
)
_ACTOR = _Shape(r"[a-z]{1,16}:[A-Za-z0-9-]{1,64}")


def _first_bad_field(e: AccessEntry) -> str | None:
    """The first field of ``e`` (in declaration order) that is not a value the node derives."""
    if not _MEMBER.fits(e.reader):
        return "reader"
    if e.holder != e.reader and not _MEMBER.fits(e.holder):
        return "holder"
    if e.patient and not _HASH.fits(e.patient):
        return "patient"
    if e.consent and not _HASH.fits(e.consent):
        return "consent"
    if e.request and not _HASH.fits(e.request):
        return "request"
    if e.resource not in ("", "list") and not _RESOURCE.fits(e.resource):
        return "resource"
    if e.outcome not in (ALLOWED, REFUSED):
        return "outcome"
    if e.reason and e.reason not in REASONS:
        return "reason"
    if e.actor and not _ACTOR.fits(e.actor):
        return "actor"
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessEntry:
    """One access as written on a chain."""

    reader: str
    holder: str
    patient: str
    consent: str
    resource: str
    outcome: str
    reason: str = ""
    actor: str = ""
    request: str = ""

    def __post_init__(self) -> None:
        """Every field has the shape of a value the node derived; free text is refused."""
        # One test after another, the cheap ones first: every read builds an entry.
        bad = _first_bad_field(self)
        if bad is not None:
            # The value itself stays out of the message: it may be the text refused.
            raise InvalidInput(f"access entry {bad} is not a value this node derived")

    def private_body(self) -> dict[str, Any]:
        return {
            "reader": self.reader,
            "holder": self.holder,
            "patient": self.patient,
            "consent": self.consent,
            "resource": self.resource,
            "outcome": self.outcome,
            "reason": self.reason,
            "actor": self.actor,
            "request": self.request,
        }

    def summary(self) -> dict[str, Any]:
        """One ``access.batch`` entry: no holder (the batch names it), reason, actor or request."""
        return {
            "reader": self.reader,
            "patient": self.patient,
            "consent": self.consent,
            "resource": self.resource,
            "outcome": self.outcome,
        }


#: An ``access`` transaction as canonical JSON writes it: ``{type, chain, body, time_ms}``
#: and the body's nine keys, each object's keys in sorted order, the values put in their
#: places (each string as :func:`~medledger.core.encoding.canonical_text` writes it).
_ACCESS_TX_LAYOUT = (
    b'{"body":{"actor":%b,"consent":%b,"holder":%b,"outcome":%b,"patient":%b,'
    b'"reader":%b,"reason":%b,"request":%b,"resource":%b},"chain":%b,"time_ms":%d,'
    b'"type":"access"}'
)
_EMPTY_TEXT = b'""'


def access_tx_bytes(entry: AccessEntry, *, chain: str, time_ms: int) -> bytes:
    """The canonical bytes of the unsigned ``access`` transaction of ``entry`` on ``chain``.

    Exactly ``Transaction(type=ACCESS, chain=chain, body=entry.private_body(),
    time_ms=time_ms).encode()`` (a property test holds the two together), without
    building the transaction and walking it: every read writes one. Refuses what that
    transaction refuses: an empty or non-string ``chain``, a ``time_ms`` that is not
    a non-negative integer or is beyond JSON's safe range (:class:`InvalidInput`).
    """
    if not isinstance(chain, str) or not chain:
        raise InvalidInput("transaction chain must be a non-empty string")
    if type(time_ms) is not int or not 0 <= time_ms <= MAX_SAFE_INTEGER:
        if not isinstance(time_ms, int) or isinstance(time_ms, bool) or time_ms < 0:
            raise InvalidInput("transaction time_ms must be a non-negative integer")
        if time_ms > MAX_SAFE_INTEGER:
            raise InvalidInput("canonical JSON: integer outside the safe range at $.time_ms")
        time_ms = int(time_ms)  # an int subclass: written as the int it is
    text = canonical_text
    return _ACCESS_TX_LAYOUT % (
        text(entry.actor) if entry.actor else _EMPTY_TEXT,
        text(entry.consent) if entry.consent else _EMPTY_TEXT,
        text(entry.holder),
        text(entry.outcome),
        text(entry.patient) if entry.patient else _EMPTY_TEXT,
        text(entry.reader),
        text(entry.reason) if entry.reason else _EMPTY_TEXT,
        text(entry.request) if entry.request else _EMPTY_TEXT,
        text(entry.resource),
        text(chain),
        time_ms,
    )


@runtime_checkable
class EncodedSubmit(Protocol):
    """A chain that appends transactions given as their canonical bytes (``PrivateChain``)."""

    async def submit_encoded(self, encoded: Sequence[bytes]) -> list[Receipt]:
        """Append ``encoded`` atomically; return once durable (see ``PrivateChain``)."""
        ...


class AccessLog:
    """Writes access entries of one institution (see module docstring)."""

    def __init__(
        self,
        *,
        institution: str,
        chain: RecordChain,
        member: ConsortiumMember | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._institution = institution
        self._chain = chain
        self._member = member
        self._clock: Clock = clock or SystemClock()
        self._unreported: list[AccessEntry] = []
        self._reporter: asyncio.Task[None] | None = None
        self._reporter_died: str | None = None
        # The institution's own chain takes an entry as its bytes, laid out directly
        # (``access_tx_bytes``); a chain reached otherwise (an API worker's link to the
        # sequencer) takes transaction objects.
        self._submit_encoded = chain.submit_encoded if isinstance(chain, EncodedSubmit) else None

    async def record(self, entry: AccessEntry, *, summarize: bool = False) -> None:
        """Append ``entry`` to the private chain (durable on return).

        With ``summarize`` (the holder of a cross-institution read) a summary
        is also reported to the consortium in the background, batched: a read
        must not wait for consortium finality. A batch the consortium does not
        accept is logged and retried.
        """
        await self._chain.submit(ACCESS, entry.private_body())
        if summarize and self._member is not None:
            self._unreported.append(entry)
            if self._reporter is None or self._reporter.done():
                self._reporter = asyncio.create_task(
                    self._report(), name="medledger-access-summaries"
                )
                self._reporter.add_done_callback(self._reporter_done)

    def _reporter_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self._reporter_died = None
            return
        # The next summarized read starts a new reporter; until one finishes,
        # the node is not ready (its consortium access trail is falling behind).
        self._reporter_died = f"died: {type(exc).__name__} ({len(self._unreported)} unreported)"
        log.error("access summary reporter %s: %s", self._reporter_died, exc, exc_info=exc)

    def problem(self) -> str | None:
        """Health check: why the last access-summary reporter died, until one succeeds."""
        return self._reporter_died

    async def record_many(self, entries: list[AccessEntry]) -> None:
        """Append several entries (one read of many resources) in one atomic commit."""
        if not entries:
            return
        if self._submit_encoded is not None:
            chain, now_ms = self._chain.chain_id, self._clock.now_ms
            await self._submit_encoded(
                [access_tx_bytes(e, chain=chain, time_ms=now_ms()) for e in entries]
            )
        else:
            await self._chain.submit_many(
                [
                    Transaction(
                        type=ACCESS,
                        chain=self._chain.chain_id,
                        body=e.private_body(),
                        time_ms=self._clock.now_ms(),
                    )
                    for e in entries
                ]
            )

    async def _report(self) -> None:
        """Submit the unreported summaries, a batch at a time, until none are left."""
        while self._unreported:
            batch = self._unreported[:MAX_ACCESS_BATCH]
            del self._unreported[:MAX_ACCESS_BATCH]
            await self._submit_batch(batch)

    async def _submit_batch(self, batch: list[AccessEntry]) -> None:
        assert self._member is not None
        unsigned = Transaction(
            type=ACCESS_BATCH,
            chain=self._member.chain_id,
            body={"holder": self._institution, "entries": [e.summary() for e in batch]},
            time_ms=self._clock.now_ms(),
        )
        tx = self._member.sign(unsigned)
        for attempt in range(3):
            try:
                await self._member.submit(tx, timeout=30)
                return
            except MedledgerError as exc:
                log.warning(
                    "consortium access summaries not accepted (try %d, %d entries): %s",
                    attempt + 1,
                    len(batch),
                    exc,
                )
                await asyncio.sleep(0.5 * (attempt + 1))

    async def drain(self) -> None:
        """Wait until every summary recorded so far has been submitted (before closing)."""
        while self._reporter is not None and not self._reporter.done():
            await asyncio.gather(self._reporter, return_exceptions=True)
