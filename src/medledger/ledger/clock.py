"""Injected time: the ledger asks a :class:`Clock`, tests pass their own."""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    def now_ms(self) -> int:
        """Milliseconds since the Unix epoch."""
        ...


class SystemClock:
    """Wall-clock time from the operating system."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000
