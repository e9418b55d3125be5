"""The API workers' counters, in one shared-memory region the parent reads (decision 0047).

``node start --workers N``: each worker counts its answers, refusals and
commit latencies (``api.metrics.Metrics``) in its **slot** of one region of
shared memory, a ``memfd`` the parent creates before the first worker
starts::

    region = slot 0 | slot 1 | ... | slot N-1      one slot = CELLS float64 cells

* A slot has one writer at a time: the worker of that slot. A worker that
  dies is replaced only once it has ended (``WorkerPool``), and the
  replacement goes on adding to the same cells: what the dead worker counted
  stays counted, and no counter goes backwards.
* The parent adds every slot to its own counts when ``/metrics`` is scraped
  (on whichever worker the scrape arrives, it is forwarded to the parent).
  It reads while workers write; each cell is one aligned 8-byte value, so a
  reading is at worst a moment old, never torn.
* The region lives in memory only (no file in the node directory, nothing to
  clean up) and starts at zero with the node, as a process's counters do.

The workers get the region's file descriptor: a forked worker inherits it, a
restarted one receives it as an inherited descriptor (``pass_fds``).
"""

from __future__ import annotations

import contextlib
import mmap
import os

from medledger.api.metrics import CELLS, Counts, Metrics

__all__ = ["SLOT_BYTES", "WorkerCounters"]

#: Bytes of one worker's slot.
SLOT_BYTES = 8 * CELLS


class WorkerCounters:
    """The shared counter region of ``slots`` API workers (module docstring).

    :meth:`create` makes a new one (the parent); :meth:`attach` maps the one
    behind an inherited descriptor (a worker).
    """

    def __init__(self, fd: int, slots: int) -> None:
        if slots < 1:
            raise ValueError("a counter region needs at least one slot")
        if os.fstat(fd).st_size != slots * SLOT_BYTES:
            raise ValueError("the counter region does not have the size of its slots")
        self.fd = fd
        self.slots = slots
        self._map = mmap.mmap(fd, slots * SLOT_BYTES)
        self._cells: memoryview[float] | None = memoryview(self._map).cast("d")

    @classmethod
    def create(cls, slots: int) -> WorkerCounters:
        """A new region of ``slots`` zeroed slots."""
        # Close-on-exec: a worker that is started anew gets it through ``pass_fds``, a
        # forked one by the fork; no other program the node runs sees it.
        fd = os.memfd_create("medledger-worker-metrics")
        try:
            os.ftruncate(fd, slots * SLOT_BYTES)
            return cls(fd, slots)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, slots: int) -> WorkerCounters:
        """The region behind ``fd`` (a worker: the descriptor its parent gave it)."""
        return cls(fd, slots)

    def _region(self) -> memoryview[float]:
        if self._cells is None:
            raise ValueError("the counter region is closed")
        return self._cells

    def metrics(self, slot: int) -> Metrics:
        """The counters of worker ``slot``: a :class:`Metrics` writing into its cells."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"no worker slot {slot}")
        return Metrics(self._region()[slot * CELLS : (slot + 1) * CELLS])

    def slot_counts(self, slot: int) -> Counts:
        """What worker ``slot`` (and every worker before it in that slot) counted."""
        return self.metrics(slot).counts()

    def counts(self) -> Counts:
        """Every worker's counts, added up."""
        total = self.slot_counts(0)
        for slot in range(1, self.slots):
            total += self.slot_counts(slot)
        return total

    def close(self) -> None:
        """Close the region's descriptor and let go of the mapping.

        A :class:`Metrics` of a slot still in use keeps the mapping alive until it
        is dropped (the memory is the kernel's to free once nobody maps it).
        """
        if self._cells is None:
            return
        self._cells.release()
        self._cells = None
        with contextlib.suppress(BufferError):
            self._map.close()
        os.close(self.fd)
