"""Re-index: rebuild every live resource's search tokens with this code's terms.

The index records which set of search terms its tokens were made with
(``TERMS_VERSION_KEY``; ``services.search.TERMS_VERSION``). A node upgraded
to code whose terms differ — new parameters, new modifiers, a new encoding of
numbers — answers the new searches only for resources written since, until
the old ones are re-indexed. A re-index decrypts each live resource's latest
version and replaces its tokens, in batches:

* under the same per-resource locks as writes (taken in sorted order, as
  writes take them), so a write landing meanwhile is never overwritten with
  the tokens of the version it replaced;
* resumable: after each batch the last ``Type/id`` done is kept
  (``REINDEX_CURSOR_KEY``), and a re-index started again goes on after it;
* bounded: one batch of resources decrypted at a time, in a worker thread.

Only when every resource is done is the new version recorded (and the
cursor forgotten). Erased and deleted resources hold no tokens and are
skipped. A version that cannot be opened (damaged) keeps its tokens, is
counted and reported to the store's health by the reader, and the re-index
goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from medledger.core.errors import MedledgerError, RecordDamaged
from medledger.services.keys import InstitutionKeys
from medledger.services.records.reading import RecordReader
from medledger.services.search import TERMS_VERSION, resource_tokens
from medledger.storage.ports import (
    REINDEX_CURSOR_KEY,
    TERMS_VERSION_KEY,
    RecordIndex,
)

__all__ = ["ReindexReport", "Reindexer"]

log = logging.getLogger(__name__)

#: Resources decrypted and re-tokenized per batch (and per durable cursor step).
BATCH = 100


@dataclass(frozen=True, slots=True, kw_only=True)
class ReindexReport:
    """What a re-index did: resources re-tokenized, skipped as damaged, and in all;
    the terms version recorded (``None``: stopped before the end)."""

    reindexed: int
    damaged: int
    total: int
    terms_version: int | None


class Reindexer:
    """Rebuilds the blind index's tokens of every live resource (module docstring)."""

    def __init__(
        self,
        *,
        index: RecordIndex,
        keys: InstitutionKeys,
        reader: RecordReader,
        lock: Callable[[str, str], asyncio.Lock],
        batch: int = BATCH,
    ) -> None:
        self._index = index
        self._keys = keys
        self._reader = reader
        self._lock = lock
        self._batch = batch
        #: ``(done, total)`` while a re-index runs, else ``None``.
        self.progress: tuple[int, int] | None = None
        #: Why the last re-index failed (it is retried on the next start), else ``None``.
        self.failure: str | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self, before: Callable[[], Awaitable[object]]) -> bool:
        """Re-index in the background if :meth:`needed` (after awaiting ``before``: crash
        recovery); ``False`` if the index is current. :meth:`close` stops it between
        batches (the next start resumes)."""
        if self._task is not None or not self.needed():
            return False

        async def background() -> None:
            try:
                await before()
                await self.run()
            except MedledgerError as exc:  # kept in ``failure`` (/readyz), retried next start
                log.error("search re-index failed: %s", exc)

        self._task = asyncio.get_running_loop().create_task(background(), name="search-reindex")
        return True

    async def close(self) -> None:
        """Stop a background re-index after its current batch (its cursor is kept)."""
        self._stopping = True
        if self._task is not None:
            await self._task
            self._task = None

    def needed(self) -> bool:
        """Whether the index's tokens were made with other terms than this code's."""
        return self._index.meta(TERMS_VERSION_KEY) != str(TERMS_VERSION)

    def status(self) -> str:
        """``current``, ``reindexing N of M resources``, or ``outdated`` (not running)."""
        if self.progress is not None:
            done, total = self.progress
            return f"reindexing {done} of {total} resources"
        return "outdated" if self.needed() else "current"

    def _pending(self, after: tuple[str, str]) -> list[tuple[str, str]]:
        """``(type, id)`` of every resource whose latest version is live, after ``after``."""
        latest: dict[tuple[str, str], bool] = {}
        for row in self._index.iter_versions():  # key order: each id's newest version last
            latest[(row.resource_type, row.id)] = not (row.erased or row.deleted)
        return sorted(k for k, live in latest.items() if live and k > after)

    def _tokens(self, keys: list[tuple[str, str]]) -> tuple[dict[tuple[str, str], set[bytes]], int]:
        """Tokens of the latest live version of each resource (blocking: decrypts)."""
        out: dict[tuple[str, str], set[bytes]] = {}
        damaged = 0
        for rtype, rid in keys:
            row = self._index.latest(rtype, rid)
            if row is None or row.erased or row.deleted:
                continue  # erased or deleted since it was listed: no tokens to make
            try:
                resource = self._reader.open(row).resource()
            except RecordDamaged:
                damaged += 1  # reported by the reader; its old tokens stay
                continue
            # Stored versions are indexed as they are, whatever the current bound.
            out[(rtype, rid)] = resource_tokens(self._keys.search_key, resource, limit=None)
        return out, damaged

    async def run(self) -> ReindexReport:
        """Re-index every live resource not yet done; record the terms version at the end.

        Resumes after the cursor a stopped re-index left. Raises what the index
        raises (the cursor keeps what was done).
        """
        cursor = self._index.meta(REINDEX_CURSOR_KEY)
        after = tuple(cursor.split("/", 1)) if cursor and "/" in cursor else ("", "")
        pending = await asyncio.to_thread(self._pending, (after[0], after[-1]))
        total, reindexed, damaged = len(pending), 0, 0
        self.progress, self.failure = (0, total), None
        if cursor:
            log.info("resuming the search re-index where it stopped: %d resources left", total)
        try:
            for start in range(0, total, self._batch):
                if self._stopping:
                    log.info("search re-index stopped; the next start resumes it")
                    return ReindexReport(
                        reindexed=reindexed, damaged=damaged, total=total, terms_version=None
                    )
                chunk = pending[start : start + self._batch]
                async with contextlib.AsyncExitStack() as stack:
                    for rtype, rid in chunk:  # sorted: the order writes lock in
                        await stack.enter_async_context(self._lock(rtype, rid))
                    tokens, bad = await asyncio.to_thread(self._tokens, chunk)
                    await asyncio.gather(
                        *(self._index.set_tokens(t, i, found) for (t, i), found in tokens.items())
                    )
                reindexed += len(tokens)
                damaged += bad
                last_type, last_id = chunk[-1]
                await self._index.set_meta(REINDEX_CURSOR_KEY, f"{last_type}/{last_id}")
                self.progress = (start + len(chunk), total)
            await self._index.set_meta(TERMS_VERSION_KEY, str(TERMS_VERSION))
            await self._index.set_meta(REINDEX_CURSOR_KEY, None)
        except MedledgerError as exc:
            self.failure = f"the search re-index stopped: {exc}"
            raise
        finally:
            self.progress = None
        if damaged:
            log.error("search re-index: %d damaged resources keep their old tokens", damaged)
        log.info("search re-index done: %d resources, terms version %d", reindexed, TERMS_VERSION)
        return ReindexReport(
            reindexed=reindexed, damaged=damaged, total=total, terms_version=TERMS_VERSION
        )
