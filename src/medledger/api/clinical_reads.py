"""What every clinical read shares: the patient-token gate, the access entry, paging values.

A read, a search, ``$everything`` and a bulk export all go through
:func:`patient_gate` / :func:`patient_may_see` for patient tokens and
:func:`audited` for the ``access`` entry every resource shown is recorded as.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from fastapi import Request

from medledger.api.deps import services_of
from medledger.api.errors import Forbidden
from medledger.core.errors import InvalidInput, NotFound
from medledger.node import Node
from medledger.services.access import AccessEntry, refusal_reason
from medledger.services.fhir import is_resource_type
from medledger.services.oauth.scopes import parse_scopes
from medledger.services.records.model import StoredResource
from medledger.services.records.service import RecordsService
from medledger.services.search import patient_reference
from medledger.storage.ports import TokenInfo

__all__ = [
    "ABSENT",
    "AuditedRead",
    "NotYours",
    "as_absent_for_patients",
    "audited",
    "digits",
    "fhir_base",
    "int_value",
    "lenient",
    "patient_gate",
    "patient_may_see",
    "readable_types",
    "within_read_scopes",
]


#: What a patient token hears about any record it may not see, existing or not.
ABSENT = "no such resource for this patient"


def digits(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts '²', which ``int`` refuses."""
    return text.isascii() and text.isdigit() and len(text) <= 18


class NotYours(NotFound):
    """A patient token asked for another patient's record: refused, and audited as such.

    ``patient`` is the pseudonym of the patient whose record it was, so the
    refusal is in *that* patient's trail.
    """

    def __init__(self, message: str, *, patient: str | None) -> None:
        super().__init__(message)
        self.patient = patient


def patient_gate(
    records: RecordsService,
    who: TokenInfo,
    resource_type: str,
    rid: str,
    *,
    version: int | None = None,
    whole_history: bool = False,
) -> None:
    """For a patient token: refuse, before anything is decrypted, what is not its own.

    Another patient's record, an erased one and an id never used take the same
    path — one index look-up, a refused ``access`` entry, the same 404 body —
    so a patient cannot tell them apart, by the answer or by its time.
    """
    if who.role != "patient":
        return
    allowed, owner = records.patient_may_read(
        resource_type, rid, str(who.patient), version=version, whole_history=whole_history
    )
    if not allowed:
        # Audited under the patient the record is about (their trail shows the attempt).
        raise NotYours(ABSENT, patient=owner)


def patient_may_see(who: TokenInfo, stored: StoredResource) -> None:
    """Second line behind :func:`patient_gate`: the decrypted resource is the patient's."""
    if who.role != "patient":
        return
    if patient_reference(stored.resource()) != f"Patient/{who.patient}":
        raise NotYours(ABSENT, patient=stored.patient)


def audited(node: Node, who: TokenInfo, resource_type: str, rid: str = "*") -> AuditedRead:
    """``async with audited(node, who, resource_type, rid) as shown:`` (:class:`AuditedRead`)."""
    return AuditedRead(node, who, resource_type, rid)


class AuditedRead:
    """Every clinical read is an ``access`` entry on the private chain, allowed or refused.

    ``async with audited(node, who, resource_type, rid) as shown:`` — the body
    appends what it shows to ``shown``; the entries are durable before the
    ``async with`` is left, so before the response leaves. Keyed record references
    only: no ids, no PHI. A *refused* read is one the caller was not allowed to
    make: a patient token reaching for a record that is not its own — another
    patient's, an erased one, or an id never used, which a patient must not be
    able to tell apart. Malformed requests, and a clinician's reads of records
    that do not exist, touch no record and write nothing.

    A class rather than an ``asynccontextmanager`` generator: every read enters
    one, and an async generator costs the event loop's bookkeeping of it besides.
    """

    __slots__ = ("_node", "_rid", "_type", "_who", "shown")

    def __init__(self, node: Node, who: TokenInfo, resource_type: str, rid: str = "*") -> None:
        self._node, self._who, self._type, self._rid = node, who, resource_type, rid
        self.shown: list[StoredResource] = []

    def _entry(
        self, rtype: str, ident: str, patient: str | None, outcome: str, reason: str = ""
    ) -> AccessEntry:
        node, who = self._node, self._who
        inst = node.config.institution
        return AccessEntry(
            reader=inst,
            holder=inst,
            patient=patient or "",
            consent="",
            resource=f"{rtype}:{node.records.record_ref(rtype, ident)}",
            outcome=outcome,
            reason=reason,
            actor=f"{who.role}:{who.id}",
        )

    async def __aenter__(self) -> list[StoredResource]:
        return self.shown

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Write the entries; an error propagates as it came (after its entry, if any)."""
        if exc is None:
            await self._node.access.record_many(
                [self._entry(s.resource_type, s.id, s.patient, "allowed") for s in self.shown]
            )
        elif isinstance(exc, NotYours) and is_resource_type(self._type):
            # The type is URL text: only a real FHIR type name may reach the chain. Any
            # other word names no record, and that a word is no type is no secret.
            await self._node.access.record(
                self._entry(self._type, self._rid, exc.patient, "refused", refusal_reason(exc))
            )


@contextmanager
def as_absent_for_patients(who: TokenInfo) -> Iterator[None]:
    """For a patient token, 'erased' is reported as 'absent' too (no existence oracle)."""
    try:
        yield
    except NotFound:  # Gone included
        if who.role == "patient":
            raise NotFound(ABSENT) from None
        raise


def lenient(request: Request) -> bool:
    """``Prefer: handling=lenient`` (FHIR R4 §3.1.1.5.7): unknown parameters are ignored."""
    prefer = request.headers.get("prefer", "")
    return any(p.strip().lower() == "handling=lenient" for p in prefer.split(","))


def int_value(text: str | None, name: str, default: int, lo: int, hi: int) -> int:
    if text is None:
        return default
    if not digits(text) or not lo <= int(text) <= hi:
        raise InvalidInput(f"{name} must be an integer from {lo} to {hi}")
    return int(text)


def fhir_base(request: Request) -> str:
    """This node's FHIR base for the links it writes (no trailing slash): the configured
    public URL (``config.public_base_url``, decision 0049) followed by ``/fhir``.

    Never the request's ``Host`` header: whoever sends the request chooses it, and a
    link built from it would point a client (or a cached or forwarded answer) wherever
    the sender liked. A node that does not know its public URL (no ``advertise`` and a
    wildcard listening address) writes ``/fhir``: an absolute path, which a client
    resolves against the origin it used itself (RFC 3986 §5).
    """
    return f"{services_of(request.app).public_url or ''}/fhir"


def readable_types(who: TokenInfo, asked: frozenset[str] | None) -> frozenset[str] | None:
    """The resource types an operation that reads many (``$everything``, ``$export``) may
    show: ``asked`` (``_type``; ``None``: every type), narrowed to what an access token's
    scopes let it read. ``None``: no limit. A type asked for but not in the scopes is 403.

    The scope check of the request path sees only its first type (``Patient``); the
    operation's answer holds every type of the compartment, so it is narrowed here.
    """
    if who.scopes is None:
        return asked
    scopes = parse_scopes(" ".join(who.scopes)).resources
    granted = {s.resource_type for s in scopes if "r" in s.actions}
    if "*" in granted:
        return asked
    if asked is None:
        return frozenset(granted)
    refused = sorted(asked - granted)
    if refused:
        raise Forbidden(f"the token's scopes do not allow reading {', '.join(refused)}")
    return asked


def within_read_scopes(who: TokenInfo, found: list[StoredResource]) -> list[StoredResource]:
    """Of ``found`` (e.g. what ``_include``/``_revinclude`` added), what an access token's
    scopes let it read; all of it for a plain API token.

    The path's scope check sees only the searched type; an included resource is of any
    type its references name, so a ``user/Observation.read`` token would otherwise read
    the Patients and Practitioners its Observations point to.
    """
    if who.scopes is None:
        return found
    scopes = parse_scopes(" ".join(who.scopes))
    return [s for s in found if scopes.allows(s.resource_type, "r")]
