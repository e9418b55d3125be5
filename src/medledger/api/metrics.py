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
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
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


class Metrics:
    """What the middleware counts (one instance per app, on ``app.state.metrics``)."""

    def __init__(self) -> None:
        self.buckets = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.latency_sum = 0.0
        self.latency_count = 0
        self.refusals: Counter[str] = Counter()
        self.answers: Counter[str] = Counter()

    def observe_commit(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def observe_answer(self, status: int) -> None:
        self.answers[f"{status // 100}xx"] += 1
        if 400 <= status < 500:
            self.refusals[REASONS.get(status, "other")] += 1


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
    metrics: Metrics = app.state.metrics
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
    out.append(_line("medledger_integrity_errors_total", health.integrity_errors))
    family("medledger_store_problems", "gauge", "Problems found by the last store scrub pass")
    out.append(_line("medledger_store_problems", len(health.damage)))
    family("medledger_store_ready", "gauge", "1 while the store can serve")
    out.append(_line("medledger_store_ready", int(not health.problems(probe=False))))

    family("medledger_refusals_total", "counter", "Requests refused with a 4xx status, by reason")
    for reason in sorted({*REASONS.values(), "other"}):
        out.append(_line("medledger_refusals_total", metrics.refusals[reason], {"reason": reason}))
    family("medledger_requests_total", "counter", "HTTP answers by status class")
    for status_class in ("2xx", "3xx", "4xx", "5xx"):
        out.append(
            _line(
                "medledger_requests_total", metrics.answers[status_class], {"class": status_class}
            )
        )
    return "\n".join(out) + "\n"


def install_metrics(app: FastAPI) -> None:
    """Count requests on ``app`` and serve ``GET /metrics`` (no token: no PHI in it)."""
    app.state.metrics = Metrics()
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)

    @app.get("/metrics", tags=["operations"], include_in_schema=True)
    async def metrics(request: Request) -> Response:
        return Response(exposition(request.app), media_type=CONTENT_TYPE)
