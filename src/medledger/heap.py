"""The garbage collector in a long-running node process: start-up's objects frozen.

A node allocates most of its objects once, at start-up: the FHIR models, the
cryptography bindings, the stores, the web app, the consortium state. CPython's
cyclic collector rescans all of them in every full (oldest-generation)
collection, which a busy node triggers every few thousand writes: measured, one
such collection stopped an institution's event loop for 144 ms on a loaded
2-core machine, and it showed as the p99 of writes and reads. Freezing the
start-up heap (``gc.freeze``, the standard library's answer to exactly this)
moves those objects out of the collector's reach: full collections then scan
only what was allocated since, about a tenth as many objects.

A serving node then raises the youngest generation's threshold
(:data:`YOUNG_THRESHOLD`, CPython's default is 700): a FHIR read holds its
objects (the request, the decrypted resource, the answer) until its access
entry's block is durable, so 64 reads in flight hold a few thousand objects at
once. At 700 the collector ran a young collection every ~14 reads and
promoted what those waiting reads held into the older generations, whose
collections followed: measured, about 50 µs of collector CPU per read over
HTTP against about 5 µs per ``GET /healthz`` (decision 0064). Short-lived
objects are freed by reference counting either way; the threshold only says
how many may be alive before the cyclic collector looks.
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "freeze_startup_heap", "ready_heap_for_serving"]

#: Net new tracked objects before a young collection (CPython's default: 700).
YOUNG_THRESHOLD = 10_000


def freeze_startup_heap() -> int:
    """Collect start-up's garbage, then freeze every surviving object; how many are frozen.

    Call once, when the process has opened everything it will keep and before it
    serves. Frozen objects are never collected, so the garbage is collected first:
    only start-up's reachable objects stay, as they would anyway.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def ready_heap_for_serving() -> int:
    """:func:`freeze_startup_heap`, then the young generation's threshold raised; frozen count.

    Call once per serving process, where :func:`freeze_startup_heap` would be
    called. The older generations keep their thresholds (a full collection
    still follows ten of the middle one's), so garbage cycles are still found;
    they only wait until :data:`YOUNG_THRESHOLD` objects are new, not 700.
    """
    frozen = freeze_startup_heap()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
    return frozen
