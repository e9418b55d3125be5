"""What the API fuzzers share: a tally of responses checked against the error contract,
and deterministic hypothesis settings. Used in-process and by ``schemathesis_fuzz.py``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from api_helpers import LEAK_PATTERNS
from hypothesis import HealthCheck, Phase, settings


@dataclass
class Tally:
    """What the fuzzers sent and every response that broke the contract."""

    sent: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    problems: dict[str, list[str]] = field(default_factory=dict)

    def problem(self, source: str, text: str) -> None:
        self.problems.setdefault(source, []).append(text)

    def check(
        self, source: str, method: str, url: str, status: int, headers: Any, text: str
    ) -> None:
        self.sent[source] += 1
        self.statuses[status] += 1
        where = f"{method} {url[:160]} -> {status}"
        if status >= 500:
            self.problem(source, f"{where}: server error {text[:200]}")
        for marker in LEAK_PATTERNS:
            if marker in text:
                self.problem(source, f"{where}: body leaks {marker!r}")
        if status >= 400:
            ctype = headers.get("content-type", "")
            try:
                body = json.loads(text)
            except ValueError:
                body = None
            if not ctype.startswith("application/fhir+json") or not (
                isinstance(body, dict)
                and body.get("resourceType") == "OperationOutcome"
                and body.get("issue")
            ):
                self.problem(source, f"{where}: error is not an OperationOutcome: {text[:200]}")

    def report(self, source: str) -> str:
        problems = self.problems.get(source, [])
        unique = list(dict.fromkeys(problems))
        return f"{len(problems)} problems from {source}, e.g.:\n" + "\n".join(unique[:15])


def fuzz_settings(examples: int) -> settings:
    """Deterministic (same inputs every run), no shrinking: problems are collected, not raised."""
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
