"""What a node knows about the health of its own store, for ``/readyz``, ``/metrics`` and logs.

Three things make a node unable to serve even though it is running:

* its data directory's file system is (nearly) full — checked on every
  readiness query from the free space, and remembered from the last write
  that failed for lack of space until a probe write (data and directory
  flushed) succeeds again or a real write does;
* the store scrub found damage (a missing or altered blob, a key that does
  not unwrap, an index row that disagrees with the chain, an acknowledged
  record with no index row) — until a later scrub pass finds none;
* (counted, not a state) reads that hit damaged data.

Messages name no resource id and no PHI: only record types, keyed record refs
(already on the chain) and versions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from medledger.core.errors import RecordDamaged, StorageError, StorageFull

__all__ = ["DEFAULT_MIN_FREE_BYTES", "StoreHealth"]

log = logging.getLogger("medledger.store")

#: Below this many free bytes in the data directory the node reports itself unready.
DEFAULT_MIN_FREE_BYTES = 16 * 1024 * 1024
#: A failed write is re-probed at most this often (seconds) while readiness is polled.
_PROBE_EVERY_S = 1.0
_PROBE_BYTES = 64 * 1024


class StoreHealth:
    """Store health of one node (thread-safe: the scrub reports from a worker thread)."""

    def __init__(
        self,
        data_dir: Path | None,
        *,
        min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dir = data_dir
        self.min_free_bytes = min_free_bytes
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._write_failure: str | None = None
        self._last_probe = float("-inf")
        self._damage: tuple[str, ...] = ()
        self.integrity_errors = 0
        self._integrity_observers: list[Callable[[], None]] = []
        self.scrub_passes = 0

    # -- what the write and read paths report --------------------------------------------

    def write_failed(self, exc: StorageError) -> None:
        """A write failed; a full disk makes the node unready until a write succeeds."""
        if isinstance(exc, StorageFull):
            with self._lock:
                first = self._write_failure is None
                self._write_failure = str(exc)
            if first:
                log.error("store write failed, node unready until space is freed: %s", exc)

    def write_succeeded(self) -> None:
        with self._lock:
            was = self._write_failure
            self._write_failure = None
        if was is not None:
            log.warning("store writes succeed again")

    def integrity_error(self, exc: RecordDamaged) -> None:
        """A read found acknowledged data missing or altered (the message carries no PHI)."""
        with self._lock:
            self.integrity_errors += 1
            for observer in self._integrity_observers:
                observer()
        log.error("%s", exc)

    def count_integrity_errors_in(self, observer: Callable[[], None]) -> None:
        """Call ``observer`` on each integrity error too (an API worker's shared counters:
        its ``/metrics`` is answered by the parent, whose own store health never saw it)."""
        with self._lock:
            self._integrity_observers.append(observer)

    # -- what the scrub reports --------------------------------------------------------

    def scrub_finished(self, problems: Sequence[str]) -> None:
        """A full scrub pass ended; ``problems`` (descriptions without PHI) is what it found."""
        with self._lock:
            self.scrub_passes += 1
            before = self._damage
            self._damage = tuple(problems)
        for problem in problems:
            if problem not in before:
                log.error("store scrub: %s", problem)
        if before and not problems:
            log.warning("store scrub found no damage any more")

    @property
    def damage(self) -> tuple[str, ...]:
        """What the last scrub pass found wrong (empty: nothing)."""
        return self._damage

    # -- readiness ----------------------------------------------------------------------

    def space_problem(self) -> str | None:
        """The node's ``disk`` health check: ``None``, or why writes cannot succeed now.

        Cheap (no I/O but ``statvfs``); :meth:`probe` first to notice space came back.
        """
        return "; ".join(self.problems(damage=False, probe=False)) or None

    def probe(self) -> None:
        """After a write failed for lack of space: try (at most once a second) whether a
        small file can be written and flushed again; if so, writes count as working."""
        with self._lock:
            failure = self._write_failure
        if failure is not None:
            self._probe()

    def damage_problem(self) -> str | None:
        """The node's ``record-store`` health check: ``None``, or what the scrub found."""
        return "; ".join(self.problems(space=False)) or None

    def problems(self, *, probe: bool = True, space: bool = True, damage: bool = True) -> list[str]:
        """Why the node cannot serve now (empty: it can).

        After a write failed for lack of space, ``probe`` tries (at most once a
        second) whether a small file can be written and flushed again.
        """
        out: list[str] = []
        if space:
            out += self._space_problems(probe)
        if damage and self._damage:
            out.append(
                f"the store is damaged: {len(self._damage)} problem(s) found by the scrub, "
                f"first: {self._damage[0]} (run 'medledger verify --records')"
            )
        return out

    def _space_problems(self, probe: bool) -> list[str]:
        out: list[str] = []
        free = self.free_bytes()
        if free is not None and free < self.min_free_bytes:
            out.append(
                f"the data directory's disk is full ({free} bytes free, {self.min_free_bytes} needed)"
            )
        with self._lock:
            failure = self._write_failure
        if failure is not None and not (probe and self._probe()):
            out.append(f"writes fail for lack of space ({failure})")
        return out

    def free_bytes(self) -> int | None:
        """Bytes available to this process in the data directory (``None``: not a file store)."""
        if self._dir is None:
            return None
        try:
            st = os.statvfs(self._dir)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def _probe(self) -> bool:
        """After a failed write: can a small file be written and flushed again? (rate-limited)"""
        if self._dir is None:
            return False
        now = self._monotonic()
        if now - self._last_probe < _PROBE_EVERY_S:
            return False
        self._last_probe = now
        path = self._dir / f".probe-{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(bytes(_PROBE_BYTES))
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        self.write_succeeded()
        return True
