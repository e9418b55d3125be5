"""Several institution nodes on this machine, sharing one ordering service.

The embedded default network (``medledger demo``, the benchmarks, the
scenario tests): every node keeps its own directory — keys, private chain,
records, its copy of the consortium chain — and all of them join one
consortium whose genesis lists them. Ordering is ``solo`` (one in-process
order, persisted in ``<base>/order.db``) or ``jetstream`` (a NATS cluster
started by this module, one JetStream connection per member).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from medledger.config import CONFIG_FILE, institution_id
from medledger.core.consortium import ConsortiumParams
from medledger.core.errors import InvalidInput, OrderingError
from medledger.ledger.clock import SystemClock
from medledger.ledger.ordering.port import Orderer
from medledger.ledger.ordering.solo import SoloOrderer
from medledger.node import Node, init_node, open_node, write_genesis
from medledger.services.hpke import DEFAULT_KEM
from medledger.storage.keystore import KdfParams

if TYPE_CHECKING:  # started only for jetstream ordering
    from medledger.localnet.natsserver import NatsCluster

__all__ = ["LocalNetwork"]


class LocalNetwork:
    """Nodes in ``base/<institution>/`` joined in one consortium (see module docstring)."""

    def __init__(
        self,
        base: Path,
        nodes: dict[str, Node],
        orderers: list[Orderer],
        cluster: NatsCluster | None = None,
    ) -> None:
        self.base = base
        self.nodes = nodes
        self._orderers = orderers
        self._cluster = cluster

    @classmethod
    async def create(
        cls,
        base: Path,
        names: Sequence[str],
        *,
        passphrase: bytes,
        consortium: str = "local",
        ordering: str = "solo",
        params: ConsortiumParams | None = None,
        kdf: KdfParams | None = None,
        peer_urls: Mapping[str, str] | None = None,
        hpke_kem: str = DEFAULT_KEM,
    ) -> LocalNetwork:
        """Create the nodes and the genesis, then open the network.

        ``peer_urls`` (institution id → URL) is where members reach each other's
        ``/peer/v1`` endpoints for sharing.
        """
        base.mkdir(parents=True, exist_ok=True)
        roots = []
        for name in names:
            root = base / institution_id(name)
            init_node(root, name=name, passphrase=passphrase, kdf=kdf, hpke_kem=hpke_kem)
            roots.append(root)
        write_genesis(
            consortium,
            roots,
            time_ms=SystemClock().now_ms(),
            params=params,
            peer_urls=peer_urls,
        )
        return await cls.open(base, passphrase=passphrase, ordering=ordering)

    @classmethod
    async def open(
        cls, base: Path, *, passphrase: bytes, ordering: str = "solo", anchor: bool = True
    ) -> LocalNetwork:
        """Open every node under ``base`` and join it to the consortium."""
        roots = sorted(p.parent for p in base.glob(f"*/{CONFIG_FILE}"))
        if not roots:
            raise InvalidInput(f"no nodes under {base}")
        if ordering not in ("solo", "jetstream"):
            raise InvalidInput(f"unknown ordering {ordering!r} (solo or jetstream)")
        nodes: dict[str, Node] = {}
        opened = cls(base, nodes, [])
        try:
            if ordering == "solo":
                shared = SoloOrderer(base / "order.db")
                opened._orderers.append(shared)
                per_node: list[Orderer] = [shared] * len(roots)
            else:
                per_node = await opened._start_jetstream(len(roots))
            for root, orderer in zip(roots, per_node, strict=True):
                node = open_node(root, passphrase)
                nodes[node.config.institution] = node
                await node.join_consortium(orderer, anchor=anchor)
        except BaseException:
            # Nothing opened stays behind: no store open, no connection, no nats-server.
            await opened.close()
            raise
        return opened

    @property
    def orderers(self) -> list[Orderer]:
        return list(self._orderers)

    async def wait_anchored(self, timeout: float = 30.0) -> None:
        """Wait until every node's current private head is covered by a final anchor everywhere."""
        targets = {i: n.chain.head.log_size for i, n in self.nodes.items()}

        async def done() -> None:
            while True:
                if all(
                    (a := n.consortium.state.anchors.get(i)) is not None and a.log_size >= size
                    for n in self.nodes.values()
                    if n.consortium is not None
                    for i, size in targets.items()
                ):
                    return
                await asyncio.sleep(0.01)

        try:
            await asyncio.wait_for(done(), timeout)
        except TimeoutError:
            raise OrderingError(f"private heads were not anchored within {timeout} s") from None

    async def _start_jetstream(self, count: int) -> list[Orderer]:
        """Start a NATS cluster and connect ``count`` orderers, one per node; :meth:`close`
        closes whatever of it was opened, also when this failed halfway."""
        from medledger.ledger.ordering.jetstream import JetStreamOrderer
        from medledger.localnet.natsserver import NatsCluster

        self._cluster = cluster = NatsCluster(self.base / "nats", size=3)
        await asyncio.to_thread(cluster.start)
        urls = cluster.client_urls()
        for i in range(count):
            own = i % len(urls)  # each institution prefers a server of its own
            self._orderers.append(
                await JetStreamOrderer.connect(
                    urls[own:] + urls[:own],
                    stream="CONSORTIUM",
                    subject="consortium.order",
                    replicas=3,
                )
            )
        return list(self._orderers)

    async def close(self) -> None:
        """Close every node, then every ordering connection, then stop the NATS servers."""
        try:
            for node in self.nodes.values():
                await node.close()
            for orderer in {id(o): o for o in self._orderers}.values():
                await orderer.close()
        finally:
            if self._cluster is not None:
                await asyncio.to_thread(self._cluster.stop)
