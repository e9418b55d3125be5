"""``/metrics``: the node's figures in the Prometheus text exposition format (0.0.4).

Series (no labels carry identifiers, paths or queries — nothing about patients):

=====================================  =========  ===============================================
``medledger_commit_latency_seconds``   histogram  a FHIR write, from request to durable answer
``medledger_private_height``           gauge      height of this institution's private chain
``medledger_consortium_height``        gauge      final height of the consortium chain here
``medledger_anchored_height``          gauge      private height covered by this node's last
                                                  final anchor
``medledger_anchors_submitted_total``  counter    anchor transactions sent to the ordering service
``medledger_consortium_ready``         gauge      1 once the consortium member has caught up
``medledger_task_up``                  gauge      1 while a background task runs, by ``task``
``medledger_refusals_total``           counter    4xx answers, by ``reason``
``medledger_requests_total``           counter    answers, by status ``class`` (2xx, 4xx, 5xx)
``medledger_integrity_errors_total``   counter    reads that found acknowledged data missing or
                                                  altered in the store (answered 500)
``medledger_store_problems``           gauge      problems the last store scrub pass found
``medledger_store_ready``              gauge      1 while the store can serve (disk not full, no
                                                  damage found)
=====================================  =========  ===============================================

The consortium series appear once the node has joined a consortium. Counting
happens in a plain ASGI middleware (:class:`MetricsMiddleware`); gauges are
read from the node when scraped.

With API worker processes (``node start --workers N``) every counter is the
whole node's: each worker counts in its slot of a shared-memory region, the
parent (which answers every ``/metrics``, whichever worker receives it) counts
what it answers itself and adds every slot (``api.worker_metrics``, decision
0047). A request is counted once, by the process that answered it; a worker
that replaces a dead one goes on from the dead one's counts.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from medledger.api.deps import services_of
from medledger.node import STORE_HEALTH_CHECKS

__all__ = ["CONTENT_TYPE", "Metrics", "MetricsMiddleware", "install_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Upper bounds (seconds) of the commit latency histogram's buckets.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_WRITES = frozenset({"POST", "PUT", "DELETE"})
#: 4xx status → refusal reason (anything else 4xx: "other").
REASONS = {
    400: "invalid",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "timeout",
    409: "conflict",
    410: "gone",
    412: "precondition_failed",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    431: "headers_too_large",
    499: "client_closed",
}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


#: Answer classes counted (``medledger_requests_total``).
ANSWER_CLASSES = ("2xx", "3xx", "4xx", "5xx")
#: Refusal reasons counted (``medledger_refusals_total``), in exposition order.
REFUSAL_REASONS = tuple(sorted({*REASONS.values(), "other"}))

# Where each counter lives in a :class:`Metrics`'s cells (float64 each).
_SUM = len(BUCKETS) + 1
_COUNT = _SUM + 1
_ANSWERS = _COUNT + 1
_REFUSALS = _ANSWERS + len(ANSWER_CLASSES)
_INTEGRITY = _REFUSALS + len(REFUSAL_REASONS)
#: Cells of one :class:`Metrics` (one process's counters).
CELLS = _INTEGRITY + 1
_ANSWER_CELL = {name: _ANSWERS + i for i, name in enumerate(ANSWER_CLASSES)}
_REFUSAL_CELL = {name: _REFUSALS + i for i, name in enumerate(REFUSAL_REASONS)}


@dataclass(frozen=True, slots=True)
class Counts:
    """A reading of the counters of one or more processes (see :meth:`Metrics.counts`)."""

    values: tuple[float, ...]

    def __add__(self, other: Counts) -> Counts:
        return Counts(tuple(a + b for a, b in zip(self.values, other.values, strict=True)))

    @property
    def buckets(self) -> tuple[int, ...]:
        """Commit latencies per histogram bucket (not cumulative; the last is +Inf)."""
        return tuple(int(v) for v in self.values[:_SUM])

    @property
    def latency_sum(self) -> float:
        return self.values[_SUM]

    @property
    def latency_count(self) -> int:
        return int(self.values[_COUNT])

    @property
    def answers(self) -> dict[str, int]:
        """Answers by status class (``"2xx"``, ...)."""
        return {name: int(self.values[cell]) for name, cell in _ANSWER_CELL.items()}

    @property
    def refusals(self) -> dict[str, int]:
        """4xx answers by reason (:data:`REASONS`, ``"other"``)."""
        return {name: int(self.values[cell]) for name, cell in _REFUSAL_CELL.items()}

    @property
    def integrity_errors(self) -> int:
        """Reads an API worker found damaged (the serving process's own are in its node)."""
        return int(self.values[_INTEGRITY])


class Metrics:
    """What one process counts: :data:`CELLS` float64 cells, written by this process alone.

    Without ``cells`` they are this process's own memory. An API worker passes
    its slot of the node's shared counter region (``api.worker_metrics``): the
    parent reads every slot when scraped, and a worker that replaces a dead one
    goes on adding to the same cells, so no count is lost or goes backwards.
    Counts are whole numbers in float64 (exact up to 2**53).
    """

    def __init__(self, cells: memoryview[float] | None = None) -> None:
        if cells is None:
            cells = memoryview(bytearray(8 * CELLS)).cast("d")
        if cells.format != "d" or len(cells) != CELLS:
            raise ValueError(f"metrics need {CELLS} float64 cells")
        self._cells = cells

    def counts(self) -> Counts:
        """The counters now."""
        return Counts(tuple(self._cells.tolist()))

    @property
    def answers(self) -> dict[str, int]:
        return self.counts().answers

    @property
    def refusals(self) -> dict[str, int]:
        return self.counts().refusals

    def observe_commit(self, seconds: float) -> None:
        cells = self._cells
        cells[bisect.bisect_left(BUCKETS, seconds)] += 1
        cells[_SUM] += seconds
        cells[_COUNT] += 1

    def observe_answer(self, status: int) -> None:
        cell = _ANSWER_CELL.get(f"{status // 100}xx")
        if cell is not None:
            self._cells[cell] += 1
        if 400 <= status < 500:
            self._cells[_REFUSAL_CELL[REASONS.get(status, "other")]] += 1

    def observe_integrity_error(self) -> None:
        """A read found acknowledged data missing or altered (an API worker's store health)."""
        self._cells[_INTEGRITY] += 1


class MetricsMiddleware:
    """Counts every HTTP answer and times successful FHIR writes."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        is_write = scope.get("method") in _WRITES and str(scope.get("path", "")).startswith(
            "/fhir/"
        )
        status = 500
        counted = False

        async def counting_send(message: Message) -> None:
            nonlocal status, counted
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                counted = True
                self.metrics.observe_answer(status)
                if is_write and 200 <= status < 300:
                    self.metrics.observe_commit(time.perf_counter() - started)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            # An unexpected error passes through here on its way to Starlette's
            # outermost ServerErrorMiddleware, which answers 500 outside this
            # middleware: count that answer here, or 5xx would never be counted.
            if not counted:
                self.metrics.observe_answer(500)
            raise


def _line(name: str, value: float, labels: dict[str, str] | None = None) -> str:
    text = ",".join(f'{k}="{v}"' for k, v in sorted((labels or {}).items()))
    number = repr(float(value)) if isinstance(value, float) else str(value)
    return f"{name}{{{text}}} {number}" if text else f"{name} {number}"


def exposition(app: FastAPI) -> str:
    """The text exposition of every series (see the module docstring)."""
    own: Metrics = app.state.metrics
    metrics = own.counts()
    workers: Callable[[], Counts] | None = app.state.worker_counts
    if workers is not None:
        metrics += workers()
    services = services_of(app)
    node = services.node
    out: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")

    name = "medledger_commit_latency_seconds"
    family(name, "histogram", "FHIR writes from request to durable acknowledgement")
    running = 0
    for bound, count in zip((*BUCKETS, float("inf")), metrics.buckets, strict=True):
        running += count
        out.append(
            _line(
                f"{name}_bucket", running, {"le": "+Inf" if bound == float("inf") else repr(bound)}
            )
        )
    out.append(_line(f"{name}_sum", metrics.latency_sum))
    out.append(_line(f"{name}_count", metrics.latency_count))

    family("medledger_private_height", "gauge", "Height of this institution's private chain")
    out.append(_line("medledger_private_height", node.chain.head.height))

    member = node.consortium
    if member is not None:
        family("medledger_consortium_height", "gauge", "Final height of the consortium chain")
        out.append(_line("medledger_consortium_height", member.final_height))
        anchor = member.state.anchors.get(node.config.institution)
        family(
            "medledger_anchored_height",
            "gauge",
            "Private height covered by this institution's last final anchor",
        )
        out.append(_line("medledger_anchored_height", anchor.height if anchor is not None else 0))
        ordering = services.ordering
        family(
            "medledger_anchors_submitted_total",
            "counter",
            "Anchor transactions sent to the ordering service",
        )
        submitted = ordering.anchors_published if ordering is not None else 0
        out.append(_line("medledger_anchors_submitted_total", submitted))
        family("medledger_consortium_ready", "gauge", "1 once the consortium member caught up")
        out.append(_line("medledger_consortium_ready", int(services.not_ready() is None)))

    family("medledger_task_up", "gauge", "1 while the background task runs (see /readyz)")
    for task, problem in node.health.results().items():
        if task not in STORE_HEALTH_CHECKS:  # the store has series of its own below
            out.append(_line("medledger_task_up", int(problem is None), {"task": task}))
    health = node.store_health
    family(
        "medledger_integrity_errors_total",
        "counter",
        "Reads that found acknowledged data missing or altered in the store",
    )
    out.append(
        _line(
            "medledger_integrity_errors_total", health.integrity_errors + metrics.integrity_errors
        )
    )
    family("medledger_store_problems", "gauge", "Problems found by the last store scrub pass")
    out.append(_line("medledger_store_problems", len(health.damage)))
    family("medledger_store_ready", "gauge", "1 while the store can serve")
    out.append(_line("medledger_store_ready", int(not health.problems(probe=False))))

    family("medledger_refusals_total", "counter", "Requests refused with a 4xx status, by reason")
    refusals = metrics.refusals
    for reason in REFUSAL_REASONS:
        out.append(_line("medledger_refusals_total", refusals[reason], {"reason": reason}))
    family("medledger_requests_total", "counter", "HTTP answers by status class")
    answers = metrics.answers
    for status_class in ANSWER_CLASSES:
        out.append(
            _line("medledger_requests_total", answers[status_class], {"class": status_class})
        )
    return "\n".join(out) + "\n"


def install_metrics(
    app: FastAPI,
    own: Metrics | None = None,
    worker_counts: Callable[[], Counts] | None = None,
) -> None:
    """Count requests on ``app`` and serve ``GET /metrics`` (no token: no PHI in it).

    ``own``: where this process counts (default: its own memory);
    ``worker_counts``: the API workers' counters, added to this process's in
    every scrape (the parent of ``node start --workers N``).
    """
    app.state.metrics = own if own is not None else Metrics()
    app.state.worker_counts = worker_counts
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)

    @app.get("/metrics", tags=["operations"], include_in_schema=True)
    async def metrics(request: Request) -> Response:
        return Response(exposition(request.app), media_type=CONTENT_TYPE)
