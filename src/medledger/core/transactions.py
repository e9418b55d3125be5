"""Every transaction type of medledger's chains and the fields of its body.

The one place the fixed format (docs/formats.md, "Transaction") names its
types: the private chain of each institution and the consortium chain. The
modules that build or check a type (``ledger.private``, ``services.records``,
``core.enrollment``, ``core.consent``, ``ledger.consortium.rules``, ...) take
its name and body fields from here, and ``tests/core/test_transactions.py``
holds these sets to the field lists in docs/formats.md, so the code and the
document cannot drift apart silently.

A body's *required* fields are all present in every transaction of that type;
*optional* fields were added later and are absent from transactions written
before (a verifier must accept both). The consortium genesis body is the
genesis document itself (``core.consortium.Genesis``), so it has no field
set here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = [
    "ACCESS",
    "ACCESS_BATCH",
    "ACCESS_BATCH_ENTRY",
    "ANCHOR",
    "CHAIN_GENESIS",
    "CONSENT_GRANT",
    "CONSENT_REVOKE",
    "CONSENT_TYPES",
    "CONSORTIUM_BODIES",
    "CONSORTIUM_GENESIS",
    "CONSORTIUM_TYPES",
    "IDENTITY_TYPES",
    "KEY_ROTATE",
    "MEMBER_ADD",
    "MEMBER_REMOVE",
    "MEMBER_ROTATE",
    "MEMBER_TLS",
    "MEMBER_TYPES",
    "PATIENT_ENROLL",
    "PATIENT_REBIND",
    "PATIENT_ROTATE",
    "PRIVATE_BODIES",
    "PRIVATE_TYPES",
    "RECORD_ERASE",
    "RECORD_PUT",
    "BodyFields",
]

# -- private chain (one per institution) -------------------------------------
#: First transaction of every private chain: names the institution's key.
CHAIN_GENESIS = "chain.genesis"
RECORD_PUT = "record.put"
RECORD_ERASE = "record.erase"
KEY_ROTATE = "key.rotate"
PATIENT_ENROLL = "patient.enroll"
PATIENT_ROTATE = "patient.rotate"
#: Break-glass re-binding: a private-chain tx, and the consortium tx reporting it.
PATIENT_REBIND = "patient.rebind"
#: One read: on the private chain in full, on the consortium as a summary.
ACCESS = "access"

# -- consortium chain ----------------------------------------------------------
CONSORTIUM_GENESIS = "consortium.genesis"
ANCHOR = "anchor"
ACCESS_BATCH = "access.batch"
CONSENT_GRANT = "consent.grant"
CONSENT_REVOKE = "consent.revoke"
MEMBER_ADD = "member.add"
MEMBER_REMOVE = "member.remove"
MEMBER_ROTATE = "member.rotate"
#: A member's new TLS certificate alone (renewal); its keys stay as they are.
MEMBER_TLS = "member.tls"

IDENTITY_TYPES = frozenset({PATIENT_ENROLL, PATIENT_ROTATE, PATIENT_REBIND})
CONSENT_TYPES = frozenset({CONSENT_GRANT, CONSENT_REVOKE})
MEMBER_TYPES = frozenset({MEMBER_ADD, MEMBER_REMOVE, MEMBER_ROTATE, MEMBER_TLS})


@dataclass(frozen=True, slots=True)
class BodyFields:
    """The fields of one transaction type's body: always present, and optional."""

    required: frozenset[str]
    optional: frozenset[str] = frozenset()

    def allows(self, keys: frozenset[str] | set[str]) -> bool:
        """Whether a body with exactly ``keys`` has this type's shape."""
        return self.required <= keys <= self.required | self.optional


def _fields(*names: str, optional: tuple[str, ...] = ()) -> BodyFields:
    return BodyFields(frozenset(names), frozenset(optional))


_ENROLL = ("patient", "pseudonym", "patient_key", "signature")
_CONSORTIUM_ACCESS = ("reader", "holder", "patient", "consent", "resource", "outcome")

#: Body fields of every private-chain transaction type.
PRIVATE_BODIES: Mapping[str, BodyFields] = MappingProxyType(
    {
        CHAIN_GENESIS: _fields("institution", "name", "signing_key", "signing_fingerprint"),
        RECORD_PUT: _fields("resource_type", "ref", "version", "blob", "patient"),
        RECORD_ERASE: _fields("resource_type", "ref", "versions", "patient"),
        KEY_ROTATE: _fields("purpose", "old", "new", "rewrapped"),
        PATIENT_ENROLL: _fields(*_ENROLL),
        PATIENT_ROTATE: _fields(*_ENROLL, "previous", "previous_key", "previous_signature"),
        PATIENT_REBIND: _fields(*_ENROLL, "previous", "actor", "report"),
        ACCESS: _fields(*_CONSORTIUM_ACCESS, "reason", "actor", "request"),
    }
)

#: One entry of an ``access.batch``: a consortium ``access`` body without the holder
#: (the batch names it once).
ACCESS_BATCH_ENTRY = _fields(*(f for f in _CONSORTIUM_ACCESS if f != "holder"))

#: Body fields of every consortium transaction type but the genesis (whose body
#: is the genesis document).
CONSORTIUM_BODIES: Mapping[str, BodyFields] = MappingProxyType(
    {
        ANCHOR: _fields(
            "institution", "height", "log_size", "log_root", "block_hash", "prev_size", "proof"
        ),
        ACCESS: _fields(*_CONSORTIUM_ACCESS),
        ACCESS_BATCH: _fields("holder", "entries"),
        CONSENT_GRANT: _fields(
            "patient",
            "patient_key",
            "grantee",
            "scope",
            "purpose",
            "expires_ms",
            optional=("starts_ms",),
        ),
        CONSENT_REVOKE: _fields("patient", "patient_key", "grant"),
        MEMBER_ADD: _fields("member"),
        MEMBER_REMOVE: _fields("id"),
        MEMBER_ROTATE: _fields("id", "signing_key", "hpke_key", optional=("tls_cert",)),
        MEMBER_TLS: _fields("id", "tls_cert"),
        PATIENT_REBIND: _fields("institution", "patient", "previous", "actor"),
    }
)

PRIVATE_TYPES = frozenset(PRIVATE_BODIES)
CONSORTIUM_TYPES = frozenset(CONSORTIUM_BODIES) | {CONSORTIUM_GENESIS}
