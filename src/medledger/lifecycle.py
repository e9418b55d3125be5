"""A serving node's lifecycle: open in order, tell readiness, supervise, stop in order.

:func:`run_node` is the one place a node that serves is started and stopped
(``node start`` and the API tests' servers go through it):

1. open the node (keystore, start-up check of the chain store, record index,
   blob store) and its API token store;
2. with a ``[consortium]`` section and a ``genesis.json``: connect to the
   ordering service, join the consortium, and once the member has replayed
   the order that existed at start, check the private chain against the
   node's own final anchor learnt from it (a chain behind it is refused);
   anchoring starts only after that check;
3. start re-indexing the search tokens if the index was made with older
   search terms (``services.records.reindex``; ``/readyz`` shows its progress
   as ``search_index``);
4. start the store scrub (``RunSettings.scrub_interval_s``).

Readiness (:meth:`NodeRuntime.not_ready`) is false until all of that is done,
and false again from the moment the shutdown begins. The shutdown, once the
HTTP server has stopped accepting and its in-flight requests have completed:
cancel the anchor check, stop the background tasks and commit every queued
write (:meth:`Node.stop`), close the ordering connection, close the stores
(:meth:`Node.close_stores`), close the token store. A failure while opening
closes, in the same order, whatever was already open, and is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from medledger.core.errors import DamagedStore, MedledgerError
from medledger.heap import ready_heap_for_serving
from medledger.ledger.clock import Clock
from medledger.ledger.integrity import check_against_anchor
from medledger.ledger.ordering.observed import ObservedOrderer
from medledger.node import Node, open_node, open_oauth_store, open_orderer, open_token_store
from medledger.services.bulk_export import DEFAULT_TTL_S as DEFAULT_EXPORT_TTL_S
from medledger.storage.ports import OAuthStore, TokenStore

__all__ = ["ANCHOR_CHECK", "NodeRuntime", "RunSettings", "run_node"]

log = logging.getLogger("medledger.node")

#: The name of the anchor check in ``Node.health`` (``/readyz``), once the node joined.
ANCHOR_CHECK = "anchor-check"
#: How often the anchor check looks whether the member has caught up.
_CATCH_UP_POLL_S = 0.05


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSettings:
    """How :func:`run_node` opens and runs the node.

    ``scrub_interval_s``: seconds between store scrub passes, ``0`` for none
    (``node start`` takes it from ``MEDLEDGER_SCRUB_INTERVAL_S``, see
    :func:`medledger.node.scrub_settings`); ``scrub_rate``: versions a second.
    """

    full_check: bool = False
    #: Seconds a finished bulk export's files are kept; how often the expiry sweep runs.
    export_ttl_s: float = DEFAULT_EXPORT_TTL_S
    export_sweep_s: float = 60.0
    scrub_interval_s: float = 0.0
    scrub_rate: float = 500.0
    clock: Clock | None = None
    validation_workers: int | None = None
    #: The sequencer lease's epoch this process holds (``Node`` fenced with it), if elected.
    fence_epoch: int | None = None


class NodeRuntime:
    """An opened node while it runs: its token store, ordering, readiness and shutdown.

    Made by :func:`run_node`, which also closes it; everything here runs on the
    event loop the node was opened on.
    """

    def __init__(self, node: Node, tokens: TokenStore, oauth: OAuthStore | None = None) -> None:
        self.node = node
        self.tokens = tokens
        #: The SMART on FHIR authorization server's store (``api.oauth``).
        self.oauth = oauth
        #: The ordering connection, once the node joined a consortium.
        self.ordering: ObservedOrderer | None = None
        #: Why the node stopped serving after it started (its chain is behind its anchor).
        self.refused: DamagedStore | None = None
        self._stopping = False
        self._catching_up: Callable[[], bool] = lambda: False
        self._anchor_checked = True
        self._anchor_check: asyncio.Task[None] | None = None
        #: Why the anchor check could not run to its end (the ``anchor-check`` health check).
        self._anchor_check_problem: str | None = None
        self._on_stop: list[Callable[[], None]] = []

    def not_ready(self) -> str | None:
        """Why the node is not ready to serve (``/readyz``'s status), or None when it is.

        ``stopping`` once the shutdown began, ``refused`` once the node found its
        chain behind its anchor, ``catching up`` until the consortium member has
        replayed the order found at start and the chain passed the anchor check.
        The health of the background tasks is :attr:`Node.health`'s business.
        """
        if self._stopping:
            return "stopping"
        if self.refused is not None:
            return "refused"
        if self._catching_up() or not self._anchor_checked:
            return "catching up"
        return None

    def ready(self) -> bool:
        return self.not_ready() is None

    @property
    def stopping(self) -> bool:
        return self._stopping

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the node must stop serving (a refusal, or :meth:`stop`)."""
        self._on_stop.append(callback)

    def stop(self) -> None:
        """Begin the shutdown: readiness turns false at once, then the server is asked to exit.

        Idempotent. The rest of the shutdown happens when :func:`run_node`'s block ends.
        """
        if self._stopping:
            return
        self._stopping = True
        log.info("shutting down: committing queued writes")
        for callback in self._on_stop:
            callback()

    def refuse(self, exc: DamagedStore) -> None:
        """Stop serving for good: no more writes, the server exits, ``run_node`` raises ``exc``."""
        log.error("refusing to serve: %s", exc)
        self.refused = exc
        self.node.records.refuse_writes(str(exc))
        self.stop()

    async def _join_consortium(self, root: Path) -> None:
        node = self.node
        settings = node.config.consortium
        if settings is None:
            return
        if not node.paths.genesis.exists():
            log.warning("no genesis.json: serving without joining the consortium")
            return
        tls = node.nats_tls_context() if settings.nats_seed else None
        self.ordering = ordering = ObservedOrderer(await open_orderer(node.config, root, tls=tls))
        target = await ordering.last_seq()
        # Anchoring starts once caught up: before, the member does not know its own
        # last anchor and would submit anchors every member refuses.
        self._catching_up = lambda: ordering.read_seq < target
        self._anchor_checked = False
        await node.join_consortium(ordering, anchor=False)
        node.health.add(ANCHOR_CHECK, lambda: self._anchor_check_problem)
        self._anchor_check = asyncio.create_task(self._check_own_anchor())
        if settings.anchor:
            # Anchoring starts once ready: caught up, and the chain holds the node's own
            # last anchor (see Anchorer's ``when``); not while the node is stopping.
            node.start_anchoring(when=self.ready)
        log.info(
            "joined the consortium",
            extra={
                "fields": {
                    "ordering": settings.ordering,
                    "replay_to": target,
                    "anchor": settings.anchor,
                }
            },
        )

    async def _check_own_anchor(self) -> None:
        """Once the member has caught up, check the chain against the node's own final anchor.

        The check at open used the node's copy of the consortium chain, which may itself
        have been behind (lost or rebuilt); the ordered stream has the last word. A chain
        behind it lost acknowledged blocks: the node stops before it extends a history
        the consortium would never accept.
        """
        while self._catching_up():
            await asyncio.sleep(_CATCH_UP_POLL_S)
        member = self.node.consortium
        own = member.state.anchors.get(self.node.config.institution) if member else None
        if own is not None:
            try:
                await asyncio.to_thread(check_against_anchor, self.node.store, own)
            except DamagedStore as exc:
                self.refuse(exc)
                return
            except MedledgerError as exc:
                # Not checked (e.g. the store could not be read): the node stays unready,
                # and /readyz says why (the type only: the text may name paths).
                log.error(
                    "could not check the chain against the node's own anchor",
                    extra={"fields": {"exception": type(exc).__name__}},
                )
                self._anchor_check_problem = (
                    f"failed ({type(exc).__name__}): the chain was not checked against "
                    "the node's own final anchor; restart the node"
                )
                return
        self._anchor_checked = True

    async def _close(self) -> None:
        """The shutdown order (module docstring); every step runs even if one before failed."""
        self._stopping = True
        try:
            if self._anchor_check is not None:
                self._anchor_check.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._anchor_check
            await self.node.stop()
        finally:
            try:
                if self.ordering is not None:
                    await self.ordering.close()
            finally:
                try:
                    await self.node.close_stores()
                finally:
                    self.tokens.close()
                    if self.oauth is not None:
                        self.oauth.close()
                    log.info("stopped")


@contextlib.asynccontextmanager
async def run_node(
    root: Path, passphrase: bytes, settings: RunSettings | None = None
) -> AsyncIterator[NodeRuntime]:
    """Open and start the node in ``root`` (module docstring); stop it when the block ends.

    Raises what opening raised (after closing what was open), or, after a
    complete shutdown, the :class:`DamagedStore` the node refused to serve with.
    """
    settings = settings or RunSettings()
    node = open_node(
        root,
        passphrase,
        clock=settings.clock,
        validation_workers=settings.validation_workers,
        full_check=settings.full_check,
        fence_epoch=settings.fence_epoch,
    )
    try:
        tokens = open_token_store(root, node.config)
    except BaseException:
        await node.close()
        raise
    try:
        oauth = open_oauth_store(root, node.config)
    except BaseException:
        tokens.close()
        await node.close()
        raise
    runtime = NodeRuntime(node, tokens, oauth)
    try:
        # Before the consortium: once joined, readiness is the anchor check's to tell.
        await node.start_exports(
            ttl_s=settings.export_ttl_s, sweep_interval_s=settings.export_sweep_s
        )
        await runtime._join_consortium(root)
        # Records stored under older search terms answer the new ones once re-indexed.
        node.records.start_reindex()
        if settings.scrub_interval_s > 0:
            # Also removes temporary blob files and orphan blobs earlier processes left.
            node.start_store_scrub(
                interval_s=settings.scrub_interval_s, rows_per_s=settings.scrub_rate
            )
        ready_heap_for_serving()
        yield runtime
    finally:
        await runtime._close()
    if runtime.refused is not None:
        raise runtime.refused
