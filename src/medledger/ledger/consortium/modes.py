"""Which rules a consortium applies: chosen by its genesis's ``params.mode``.

A ``hybrid`` consortium (the product) applies :class:`ConsortiumState`. A
``consortium-only`` consortium exists **for benchmarks only** (``medledger
bench hybrid``; decision 0011): it also orders the private chain's
record transactions, so the hybrid design can be measured against a design
that commits every record on the consortium. The mode is in the genesis, so
every member and every auditor applies the same rules:
:class:`ConsortiumOnlyState` additionally accepts ``record.put``,
``record.erase`` and ``key.rotate`` with exactly the bodies of
docs/formats.md, each signed by exactly one current member — the institution
that wrote it (on a private chain the institution's block signature says
that; consortium blocks are signed by a quorum instead). A hybrid consortium
still refuses them, and ``verify --consortium`` re-checks them with the same
rules. The commit path that writes them (``benchmarks.consortium_only``)
lives with the benchmark.
"""

from __future__ import annotations

from medledger.core.consortium import CONSORTIUM_ONLY, Genesis, MemberSet
from medledger.core.errors import InvalidInput
from medledger.core.hashing import hash_from_hex
from medledger.core.models import Transaction
from medledger.core.transactions import KEY_ROTATE, RECORD_ERASE, RECORD_PUT
from medledger.ledger.consortium.rules import ConsortiumState

__all__ = ["RECORD_TX_TYPES", "ConsortiumOnlyState", "initial_state"]

#: The private chain's record transaction types a consortium-only consortium orders.
RECORD_TX_TYPES = frozenset({RECORD_PUT, RECORD_ERASE, KEY_ROTATE})

_RECORD_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    RECORD_PUT: {
        "resource_type": (str,),
        "ref": (str,),
        "version": (int,),
        "blob": (str,),
        "patient": (str, type(None)),
    },
    RECORD_ERASE: {
        "resource_type": (str,),
        "ref": (str,),
        "versions": (int,),
        "patient": (str, type(None)),
    },
    KEY_ROTATE: {"purpose": (str,), "old": (str,), "new": (str,), "rewrapped": (int,)},
}


def initial_state(genesis: Genesis) -> ConsortiumState:
    """The empty state of the consortium ``genesis`` founds, with the rules its mode names."""
    state_cls = ConsortiumOnlyState if genesis.params.mode == CONSORTIUM_ONLY else ConsortiumState
    return state_cls(chain_id=genesis.chain_id, members=MemberSet(genesis.members))


class ConsortiumOnlyState(ConsortiumState):
    """The consortium rules plus record transactions (consortium-only mode; see module doc)."""

    def _check_other(self, tx: Transaction) -> None:
        fields = _RECORD_FIELDS.get(tx.type)
        if fields is None:
            super()._check_other(tx)
            return
        self._signer(tx)  # exactly one signature, by a current member (the writer)
        body = tx.body
        if set(body) != set(fields):
            raise InvalidInput(f"{tx.type} must have exactly {', '.join(sorted(fields))}")
        for name, types in fields.items():
            value = body[name]
            if isinstance(value, bool) or not isinstance(value, types):
                raise InvalidInput(f"{tx.type} {name} has the wrong type")
            if isinstance(value, int) and value < 0:
                raise InvalidInput(f"{tx.type} {name} must not be negative")
        if tx.type == RECORD_PUT:
            if body["version"] < 1:
                raise InvalidInput("record.put version must be at least 1")
            hash_from_hex(body["blob"], "record.put blob")
        if tx.type != KEY_ROTATE:
            hash_from_hex(body["ref"], f"{tx.type} ref")
