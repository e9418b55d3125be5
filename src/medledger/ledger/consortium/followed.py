"""The consortium's members as a process that does not run the member sees them.

API worker processes (``node start --workers N``, decision 0035) do not join
the consortium: the parent's :class:`~medledger.ledger.consortium.member.ConsortiumMember`
writes the node's copy of the final consortium chain. A worker still needs the
current members for its TLS handshakes (a member removed by the consortium must
stop being trusted at once, as it does in the parent). :class:`StoredMembership`
replays that stored chain, read-only and incrementally, to the membership after
its newest stored block.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from medledger.core.consortium import Genesis, MemberSet
from medledger.core.errors import NotFound
from medledger.core.hashing import sha256
from medledger.core.models import BlockHeader, Transaction
from medledger.ledger.consortium.modes import initial_state
from medledger.storage.ports import ChainStore

__all__ = ["StoredMembership"]


class StoredMembership:
    """The members after the newest block of a consortium chain store another process writes.

    The store holds only final blocks, each checked by the member that stored
    it (the node's own parent process: trusted like the rest of the node's
    stores). :meth:`members` reads the store's head and applies the blocks
    stored since the last call; safe to call from any thread.
    """

    def __init__(self, genesis: Genesis, open_store: Callable[[], ChainStore]) -> None:
        """``open_store`` opens the stored chain for reading, or raises :class:`NotFound`
        while there is none yet (the genesis's members are the members until then)."""
        self._open_store = open_store
        self._store: ChainStore | None = None
        self._state = initial_state(genesis)
        #: Blocks 1..height are applied (block 0 is the genesis ``initial_state`` read).
        self._height = 0
        self._lock = threading.Lock()

    @property
    def height(self) -> int:
        """The newest stored block applied."""
        return self._height

    def members(self) -> MemberSet:
        """The members after the newest stored block (reads the blocks stored since last time)."""
        with self._lock:
            if self._store is None:
                try:
                    self._store = self._open_store()
                except NotFound:
                    return self._state.members
            head = self._store.head_header_bytes()
            height = BlockHeader.decode(head).height if head is not None else 0
            if height > self._height:
                for block in self._store.iter_blocks(self._height + 1, height + 1):
                    for data in block.tx_data:
                        self._state.apply(Transaction.decode(data), sha256(data), block.height)
                    self._height = block.height
            return self._state.members

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None
