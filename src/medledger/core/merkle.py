"""RFC 6962 Merkle trees: hashing, proofs, verification and a compact range.

Exactly RFC 6962 §2.1 (also RFC 9162 §2.1)::

    leaf hash  = SHA-256(0x00 || data)
    node hash  = SHA-256(0x01 || left || right)
    empty root = SHA-256("")
    a tree of n > 1 leaves splits at k, the largest power of two < n.

Storage split (as in transparency-dev/merkle): this module never fetches.
It names the *ranges* of leaves whose subtree hashes a proof needs, and the
*perfect subtrees* (:class:`NodeID`) that make up each range; the caller
fetches those node hashes, and this module assembles and verifies. A perfect
subtree never changes once complete, so stored nodes serve proofs for every
later tree size.

A node id ``(level, index)`` covers leaves ``[index * 2**level, (index+1) * 2**level)``::

    level 2            (2,0)
                     /       \\
    level 1      (1,0)       (1,1)
                 /   \\       /   \\
    level 0   (0,0) (0,1) (0,2) (0,3)   (0,4)   <- tree of size 5: root = H(1 || (2,0) || (0,4))
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from medledger.core.errors import InconsistentLog, InvalidInput, RootMismatch

__all__ = [
    "EMPTY_ROOT",
    "CompactRange",
    "NodeID",
    "assemble_proof",
    "consistency_ranges",
    "hash_range",
    "inclusion_ranges",
    "leaf_hash",
    "node_hash",
    "proof_node_ids",
    "range_nodes",
    "root_from_leaf_hashes",
    "verify_consistency",
    "verify_inclusion",
]

EMPTY_ROOT = hashlib.sha256(b"").digest()
_LEAF = b"\x00"
_NODE = b"\x01"


def leaf_hash(data: bytes) -> bytes:
    """RFC 6962 leaf hash: SHA-256(0x00 || data)."""
    return hashlib.sha256(_LEAF + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(_NODE + left + right).digest()


class NodeID(NamedTuple):
    """A perfect subtree: ``2**level`` leaves starting at leaf ``index * 2**level``."""

    level: int
    index: int  # type: ignore[assignment]  # shadows tuple.index, as intended


def _largest_power_of_two_below(n: int) -> int:
    """Largest power of two strictly less than n; requires n > 1."""
    return 1 << ((n - 1).bit_length() - 1)


def range_nodes(begin: int, end: int) -> list[NodeID]:
    """Decompose leaves ``[begin, end)`` into maximal aligned perfect subtrees, left to right.

    Requires ``0 <= begin <= end``. For every range that is a subtree of an
    RFC 6962 tree (which is every range a proof names) the sizes strictly
    decrease, and :func:`hash_range` over their hashes gives the subtree hash.
    """
    if not 0 <= begin <= end:
        raise InvalidInput(f"bad leaf range [{begin}, {end})")
    nodes: list[NodeID] = []
    while begin < end:
        # Largest level allowed by begin's alignment and by the space left.
        level = (begin & -begin).bit_length() - 1 if begin else (end - begin).bit_length() - 1
        while begin + (1 << level) > end:
            level -= 1
        nodes.append(NodeID(level, begin >> level))
        begin += 1 << level
    return nodes


def hash_range(hashes: Sequence[bytes]) -> bytes:
    """Hash of a subtree given its perfect parts left to right (see :func:`range_nodes`).

    The parts of an RFC 6962 subtree have decreasing sizes, so the tree
    merges them right to left. An empty sequence is the empty tree.
    """
    if not hashes:
        return EMPTY_ROOT
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


def root_from_leaf_hashes(leaf_hashes: Iterable[bytes]) -> bytes:
    """RFC 6962 Merkle tree hash of the leaves with these leaf hashes."""
    cr = CompactRange()
    for h in leaf_hashes:
        cr.append(h)
    return cr.root()


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """Leaf ranges whose subtree hashes form the inclusion proof of ``index`` in a tree of ``size``.

    RFC 6962 §2.1.1 PATH(m, D[n]), in proof order (the leaf's sibling first).
    Requires ``0 <= index < size``.
    """
    if not 0 <= index < size:
        raise InvalidInput(
            f"inclusion proof needs 0 <= index < size, got index {index}, size {size}"
        )
    ranges: list[tuple[int, int]] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _largest_power_of_two_below(hi - lo)
        if index < lo + k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            lo += k
    ranges.reverse()
    return ranges


def consistency_ranges(old_size: int, new_size: int) -> list[tuple[int, int]]:
    """Leaf ranges whose subtree hashes form the consistency proof from ``old_size`` to ``new_size``.

    RFC 6962 §2.1.2 PROOF(m, D[n]) = SUBPROOF(m, D[n], true), in proof order.
    Requires ``0 <= old_size <= new_size``; the proof is empty when
    ``old_size`` is 0 or equals ``new_size``.
    """
    if not 0 <= old_size <= new_size:
        raise InvalidInput(
            f"consistency proof needs 0 <= old size <= new size, got {old_size}, {new_size}"
        )
    if old_size in (0, new_size):
        return []
    ranges: list[tuple[int, int]] = []
    lo, hi, whole = 0, new_size, True
    while True:
        if old_size == hi:
            if not whole:
                ranges.append((lo, hi))
            break
        k = _largest_power_of_two_below(hi - lo)
        if old_size <= lo + k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            lo += k
            whole = False
    ranges.reverse()
    return ranges


def proof_node_ids(ranges: Iterable[tuple[int, int]]) -> list[NodeID]:
    """All perfect-subtree ids a caller must fetch to assemble a proof over ``ranges``."""
    ids: list[NodeID] = []
    for begin, end in ranges:
        ids.extend(range_nodes(begin, end))
    return ids


def assemble_proof(ranges: Iterable[tuple[int, int]], nodes: Mapping[NodeID, bytes]) -> list[bytes]:
    """Build the proof hashes for ``ranges`` from fetched perfect-subtree hashes.

    Raises :class:`InvalidInput` if a needed node is missing from ``nodes``.
    """
    proof: list[bytes] = []
    for begin, end in ranges:
        try:
            proof.append(hash_range([nodes[n] for n in range_nodes(begin, end)]))
        except KeyError as exc:
            raise InvalidInput(f"proof needs node {exc.args[0]} which was not supplied") from None
    return proof


def _check_proof_hashes(proof: Sequence[bytes], *hashes: bytes) -> None:
    for h in (*hashes, *proof):
        if not isinstance(h, bytes) or len(h) != 32:
            raise InvalidInput("proof, leaf and root hashes must be 32 bytes each")


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that the leaf with hash ``leaf`` sits at ``index`` of the tree (``size``, ``root``).

    RFC 9162 §2.1.3.2. Returns ``None``; raises :class:`RootMismatch` (with
    both roots) or :class:`InvalidInput` for a malformed proof.
    """
    _check_proof_hashes(proof, leaf, root)
    if not 0 <= index < size:
        raise InvalidInput(f"index {index} is outside a tree of size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise InvalidInput("inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidInput("inclusion proof is too short")
    if r != root:
        raise RootMismatch("inclusion proof does not lead to the root", expected=root, calculated=r)


def verify_consistency(
    old_size: int, new_size: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes
) -> None:
    """Check that the tree (``new_size``, ``new_root``) extends (``old_size``, ``old_root``).

    RFC 9162 §2.1.4.2. Returns ``None``; raises :class:`InconsistentLog` when
    the proof shows the two trees disagree, :class:`InvalidInput` for a
    malformed proof.
    """
    _check_proof_hashes(proof, old_root, new_root)
    if not 0 <= old_size <= new_size:
        raise InvalidInput(f"bad sizes for a consistency proof: {old_size} -> {new_size}")
    if old_size == new_size:
        if proof:
            raise InvalidInput("consistency proof between equal sizes must be empty")
        if old_root != new_root:
            raise InconsistentLog(
                f"two different roots for size {old_size}: {old_root.hex()} != {new_root.hex()}"
            )
        return
    if old_size == 0:
        if proof:
            raise InvalidInput("consistency proof from the empty tree must be empty")
        return
    if not proof:
        raise InvalidInput("consistency proof is empty")
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise InvalidInput("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidInput("consistency proof is too short")
    if fr != old_root:
        raise InconsistentLog(
            f"log of size {new_size} does not extend the root at size {old_size}: "
            f"expected {old_root.hex()}, calculated {fr.hex()}"
        )
    if sr != new_root:
        raise RootMismatch(
            f"consistency proof does not lead to the root at size {new_size}",
            expected=new_root,
            calculated=sr,
        )


class CompactRange:
    """The perfect subtrees covering leaves ``[0, size)``: O(log n) state, O(1) amortized append.

    ``append`` returns every perfect subtree that the new leaf completes (the
    leaf itself first), which is exactly what a store must persist so that
    any later proof can be served by fetching O(log n) nodes.
    """

    __slots__ = ("_hashes", "_nodes", "_size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        """Resume from a tree of ``size`` leaves given the hashes of ``range_nodes(0, size)``."""
        nodes = range_nodes(0, size)
        if any(not isinstance(h, bytes) or len(h) != 32 for h in hashes):
            raise InvalidInput("compact range hashes must be 32 bytes each")
        if len(nodes) != len(hashes):
            raise InvalidInput(
                f"compact range of size {size} needs {len(nodes)} hashes, got {len(hashes)}"
            )
        self._size = size
        self._nodes: list[NodeID] = nodes
        self._hashes: list[bytes] = list(hashes)

    @property
    def size(self) -> int:
        return self._size

    def nodes(self) -> list[tuple[NodeID, bytes]]:
        """The current perfect subtrees, left to right."""
        return list(zip(self._nodes, self._hashes, strict=True))

    def append(self, leaf: bytes) -> list[tuple[NodeID, bytes]]:
        """Add the leaf with hash ``leaf``; return the perfect subtrees it completes."""
        if len(leaf) != 32:
            raise InvalidInput("a leaf hash must be 32 bytes")
        index = self._size
        node, h = NodeID(0, index), leaf
        created = [(node, h)]
        nodes, hashes = self._nodes, self._hashes
        while nodes and nodes[-1].level == node.level:
            nodes.pop()
            h = node_hash(hashes.pop(), h)
            node = NodeID(node.level + 1, node.index >> 1)
            created.append((node, h))
        nodes.append(node)
        hashes.append(h)
        self._size = index + 1
        return created

    def push(self, leaf: bytes) -> None:
        """Like :meth:`append` when the completed subtrees are not needed (cheaper)."""
        if len(leaf) != 32:
            raise InvalidInput("a leaf hash must be 32 bytes")
        size, hashes, h = self._size, self._hashes, leaf
        # The subtrees completed by leaf number `size` are its trailing one bits.
        merges = (size ^ (size + 1)).bit_length() - 1
        for _ in range(merges):
            h = node_hash(hashes.pop(), h)
            self._nodes.pop()
        level = merges
        self._nodes.append(NodeID(level, size >> level))
        hashes.append(h)
        self._size = size + 1

    def root(self) -> bytes:
        """The RFC 6962 root of the leaves appended so far."""
        return hash_range(self._hashes)

    def copy(self) -> CompactRange:
        return CompactRange(self._size, self._hashes)
