"""The record store check (``verify --records``, the background scrub) and the orphan sweep.

``check_store`` compares the three places a record version lives and reports
every disagreement as a :class:`StoreProblem`:

* every index row ↔ its committed ``record.put``: the transaction exists and
  names the row's type, keyed ref, version, blob hash and patient pseudonym;
* every unerased row's blob is present and hashes to its name, its wrapped
  data key unwraps under the KEK (AES-GCM authenticates the wrapping, bound
  to the blob hash) and the ciphertext authenticates under that key (the
  plaintext is dropped unread);
* every ``record.put`` on the chain has its index row — an acknowledged
  write whose row is gone (a truncated ``records.db-wal``) is data loss.

``collect_orphan_blobs`` removes blobs that neither an index row nor any
committed ``record.put`` references and that were written before this
process started (so never a write in flight): such a blob belongs to a write
that was never acknowledged.

Problems name records by type, keyed ref (already on the chain) and version:
no resource id, no PHI. Nothing here writes, except the sweep's deletions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from medledger.core.envelope import RecordContext, open_record, unwrap_key
from medledger.core.errors import IntegrityError, MedledgerError, NotFound
from medledger.core.hashing import sha256
from medledger.core.models import BlockHeader
from medledger.services.health import StoreHealth
from medledger.services.keys import InstitutionKeys
from medledger.storage.blobs import PROCESS_STARTED, FileBlobStore
from medledger.storage.ports import BlobStore, ChainStore, RecordIndex, VersionRow

__all__ = [
    "StoreProblem",
    "StoreReport",
    "StoreScrub",
    "check_store",
    "collect_orphan_blobs",
    "committed_record_puts",
    "settle_writes",
]

log = logging.getLogger("medledger.store")

RECORD_PUT = "record.put"
#: The longest a check waits for writes in flight on rows that looked wrong.
SETTLE_TIMEOUT_S = 30.0
#: A check stops collecting (but keeps counting) problems beyond this many.
MAX_PROBLEMS = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreProblem:
    """One thing wrong in the store, named without PHI."""

    kind: str
    resource_type: str
    ref: str
    version: int
    detail: str

    def describe(self) -> str:
        return f"{self.resource_type} record {self.ref[:16]}… version {self.version}: {self.detail}"


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreReport:
    """What a store check covered and found."""

    versions: int
    erased: int
    record_txs: int
    orphan_blobs: int
    problem_count: int
    problems: tuple[StoreProblem, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.problem_count == 0


@dataclass(frozen=True, slots=True, kw_only=True)
class CommittedPut:
    """A ``record.put`` as committed on the chain."""

    height: int
    tx_hash: bytes
    resource_type: str
    ref: str
    version: int
    blob: str
    patient: Any


def committed_record_puts(store: ChainStore, end: int | None = None) -> Iterator[CommittedPut]:
    """Every ``record.put`` on ``store``'s chain below height ``end``, in chain order.

    A transaction that does not parse raises :class:`IntegrityError`: a caller
    about to delete what the chain does not reference must not guess.
    """
    for block in store.iter_blocks(0, end):
        for data in block.tx_data:
            if b'"record.put"' not in data:
                continue  # cheap pre-filter; the parse below decides
            try:
                tx = json.loads(data)
            except ValueError:
                raise IntegrityError(
                    f"block {block.height}: a transaction is not JSON (run 'medledger verify')"
                ) from None
            if not isinstance(tx, dict) or tx.get("type") != RECORD_PUT:
                continue
            body = tx.get("body")
            if not isinstance(body, dict):
                raise IntegrityError(f"block {block.height}: a record.put has no body")
            version = body.get("version")
            yield CommittedPut(
                height=block.height,
                tx_hash=sha256(data),
                resource_type=str(body.get("resource_type")),
                ref=str(body.get("ref")),
                version=version if isinstance(version, int) else -1,
                blob=str(body.get("blob")),
                patient=body.get("patient"),
            )


class _Findings:
    def __init__(self) -> None:
        self.problems: list[StoreProblem] = []
        self.count = 0

    def add(self, kind: str, rtype: str, ref: str, version: int, detail: str) -> None:
        self.count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(
                StoreProblem(
                    kind=kind, resource_type=rtype, ref=ref, version=version, detail=detail
                )
            )


def check_store(
    *,
    institution: str,
    index: RecordIndex,
    blobs: BlobStore,
    chain: ChainStore,
    keys: InstitutionKeys,
    pace: Callable[[], None] | None = None,
    settle: Callable[[Sequence[VersionRow]], None] | None = None,
) -> StoreReport:
    """Check every index row, blob and wrapped key against the chain (see the module doc).

    ``pace`` is called once per version checked (the scrub sleeps in it to
    bound its rate). Blocking: run it off the event loop.

    Safe on a node that is serving: the chain is read only up to the height it
    had before the index was read (every ``record.put`` up to there had its
    row before it was committed), blobs written during the pass are not
    counted as unreferenced, and a row that looked wrong is read and checked
    again at the end, after ``settle`` (a write in flight between its index
    row and its commit, an erasure between its key and its blob, a key
    rotation: each looks wrong for a moment). ``settle(rows)`` returns once no
    write or erasure of those rows' resources is in progress.
    """
    started = time.time()
    head = chain.head_header_bytes()
    end = BlockHeader.decode(head).height + 1 if head is not None else 0
    found = _Findings()
    suspects: list[VersionRow] = []
    row_txs: set[bytes] = set()
    referenced: set[bytes] = set()
    versions = erased = 0
    for row in index.iter_versions():
        if pace is not None:
            pace()
        versions += 1
        erased += row.erased
        row_txs.add(row.tx_hash)
        referenced.add(row.blob_hash)
        first_look = _Findings()
        _check_row(row, institution, blobs, chain, keys, first_look)
        if first_look.count:
            suspects.append(row)
    if suspects and settle is not None:
        settle(suspects)
    for row in suspects:
        again = index.get_version(row.resource_type, row.id, row.version)
        if again is not None:  # else: an uncommitted write, taken back meanwhile
            _check_row(again, institution, blobs, chain, keys, found)
    record_txs = 0
    for put in committed_record_puts(chain, end=end):
        record_txs += 1
        referenced.add(bytes.fromhex(put.blob) if _is_hash(put.blob) else b"")
        if put.tx_hash not in row_txs:
            found.add(
                "index-row-missing",
                put.resource_type,
                put.ref,
                put.version,
                f"committed at height {put.height} but has no index row "
                "(an acknowledged write is lost from the record index)",
            )
    orphans = sum(1 for h in blobs.iter_hashes(older_than=started) if h not in referenced)
    return StoreReport(
        versions=versions,
        erased=erased,
        record_txs=record_txs,
        orphan_blobs=orphans,
        problem_count=found.count,
        problems=tuple(found.problems),
    )


def _is_hash(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _check_row(
    row: VersionRow,
    institution: str,
    blobs: BlobStore,
    chain: ChainStore,
    keys: InstitutionKeys,
    found: _Findings,
) -> None:
    ref = keys.record_ref(row.resource_type, row.id)

    def problem(kind: str, detail: str) -> None:
        found.add(kind, row.resource_type, ref, row.version, detail)

    try:
        log_index, data = chain.tx_by_hash(row.tx_hash)
    except NotFound:
        problem("tx-missing", "its record.put is not on the chain")
        return
    try:
        tx = json.loads(data)
    except ValueError:
        problem("index-mismatch", f"its chain transaction (log index {log_index}) is not JSON")
        return
    body = tx.get("body") if isinstance(tx, dict) else None
    expected = {
        "resource_type": row.resource_type,
        "ref": ref,
        "version": row.version,
        "blob": row.blob_hash.hex(),
        "patient": row.patient,
    }
    wrong = (
        ["type"]
        if not isinstance(tx, dict) or tx.get("type") != RECORD_PUT or not isinstance(body, dict)
        else [k for k, v in expected.items() if body.get(k) != v]
    )
    if wrong:
        problem("index-mismatch", f"the index row and its record.put differ in {', '.join(wrong)}")
        return
    if row.erased or row.wrapped_dek is None or row.kek_id is None:
        return  # crypto-shredded: no key and no blob to check
    try:
        blob = blobs.get(row.blob_hash)
    except NotFound:
        problem("blob-missing", "its blob is missing")
        return
    except IntegrityError:
        problem("blob-altered", "its blob does not match its hash")
        return
    except MedledgerError as exc:
        problem("blob-unreadable", f"its blob cannot be read ({exc})")
        return
    try:
        dek = unwrap_key(keys.kek(row.kek_id), row.wrapped_dek, row.blob_hash)
    except IntegrityError:
        problem("key-does-not-unwrap", "its wrapped data key does not unwrap under its KEK")
        return
    except MedledgerError:
        problem("kek-missing", f"its KEK {row.kek_id} is not in the keystore")
        return
    context = RecordContext(
        institution=institution, resource_type=row.resource_type, id=row.id, version=row.version
    )
    try:
        open_record(dek, blob, context)
    except IntegrityError:
        problem("ciphertext", "its ciphertext does not authenticate under its data key")


def collect_orphan_blobs(
    *, index: RecordIndex, blobs: BlobStore, chain: ChainStore, older_than: float
) -> int:
    """Delete blobs written before ``older_than`` that nothing references; returns how many.

    A blob no index row and no committed ``record.put`` names belongs to a
    write that was never acknowledged (the blob is written first, the index
    row next, the chain last). The chain is consulted only when there are
    candidates, and a chain that cannot be read aborts the sweep — so a
    blob a committed transaction references is never deleted.
    """
    indexed = {row.blob_hash for row in index.iter_versions()}
    candidates = [h for h in blobs.iter_hashes(older_than=older_than) if h not in indexed]
    if not candidates:
        return 0
    committed = {put.blob for put in committed_record_puts(chain)}
    removed = 0
    for blob_hash in candidates:
        if blob_hash.hex() in committed:
            continue
        blobs.delete(blob_hash)
        removed += 1
    if removed:
        log.warning("removed %d orphan blobs of writes that were never acknowledged", removed)
    return removed


def settle_writes(writing: Callable[[str, str], bool]) -> Callable[[Sequence[VersionRow]], None]:
    """A ``settle`` for :func:`check_store`: wait (bounded) while ``writing(type, id)``
    says a write or erasure of one of the rows' resources is in progress."""

    def settle(rows: Sequence[VersionRow]) -> None:
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        keys = {(r.resource_type, r.id) for r in rows}
        while any(writing(*k) for k in keys) and time.monotonic() < deadline:
            time.sleep(0.01)

    return settle


class _Stopped(Exception):
    """The scrub is closing: the pass in progress ends early."""


class StoreScrub:
    """A background task that runs :func:`check_store` again and again, slowly.

    Each pass checks at most ``rows_per_s`` versions a second (in a worker
    thread, so the event loop is never blocked), reports what it found to
    ``health`` (damage makes ``/readyz`` answer 503 and is logged without
    PHI) and, on a store without damage, removes temporary files and orphan
    blobs left by earlier processes. Then it waits ``interval_s``.
    """

    def __init__(
        self,
        *,
        institution: str,
        index: RecordIndex,
        blobs: BlobStore,
        chain: ChainStore,
        keys: InstitutionKeys,
        health: StoreHealth,
        interval_s: float,
        rows_per_s: float,
        writing: Callable[[str, str], bool] = lambda _type, _id: False,
        recovered: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """``recovered``: awaited before the first pass. A crash leaves index rows
        whose transaction never reached the chain until crash recovery takes them
        back; checked before that, they would read as damage."""
        if interval_s <= 0 or rows_per_s <= 0:
            raise ValueError("the scrub interval and rate must be positive")
        self._institution = institution
        self._index, self._blobs, self._chain, self._keys = index, blobs, chain, keys
        self._health = health
        self._settle = settle_writes(writing)
        self._recovered = recovered
        self._interval = interval_s
        self._rows_per_s = rows_per_s
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medledger-scrub")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="store-scrub")

    async def close(self) -> None:
        """Stop: the running pass ends at its next row, before the stores are closed."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        if self._recovered is not None:
            try:
                await self._recovered()
            except Exception as exc:  # a store recovery refused is checked all the same
                log.error("crash recovery before the store scrub failed: %s", type(exc).__name__)
        while not self._stopping:
            try:
                await loop.run_in_executor(self._executor, self.run_pass)
            except _Stopped:
                return
            except Exception as exc:  # a failing pass must not end the scrub for good
                log.error("store scrub pass failed: %s: %s", type(exc).__name__, exc)
                self._health.scrub_finished([f"the store scrub could not run: {exc}"])
            await asyncio.sleep(self._interval)

    def run_pass(self) -> StoreReport:
        """One pass (blocking): check, report to health, sweep if the store is sound."""
        batch = max(1, int(self._rows_per_s // 20))
        done = 0
        if isinstance(self._blobs, FileBlobStore):
            # Never acknowledged: a temporary file an earlier process left is garbage.
            stale = self._blobs.remove_stale_temporaries(older_than=PROCESS_STARTED)
            if stale:
                log.warning("removed %d temporary blob files left by a stopped process", stale)

        def pace() -> None:
            nonlocal done
            if self._stopping:
                raise _Stopped
            done += 1
            if done % batch == 0:
                time.sleep(batch / self._rows_per_s)

        report = check_store(
            institution=self._institution,
            index=self._index,
            blobs=self._blobs,
            chain=self._chain,
            keys=self._keys,
            pace=pace,
            settle=self._settle,
        )
        described = [p.describe() for p in report.problems]
        if report.problem_count > len(described):
            described.append(f"… and {report.problem_count - len(described)} more")
        self._health.scrub_finished(described)
        if report.ok:
            collect_orphan_blobs(
                index=self._index, blobs=self._blobs, chain=self._chain, older_than=PROCESS_STARTED
            )
        return report
