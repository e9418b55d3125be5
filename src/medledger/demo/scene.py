"""What every section of the demo's story shares: the network, the narration, a few helpers.

A :class:`Scene` is one run of the story in the making — the console it is
told on, the network directory, a client per node, the synthetic patients and
the facts a later section refers back to. The section modules
(:mod:`~medledger.demo.records`, :mod:`~medledger.demo.consent`,
:mod:`~medledger.demo.operations`, :mod:`~medledger.demo.ending`) are functions
of a scene; :class:`~medledger.demo.story.Story` runs them in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, RenderableType
from rich.padding import Padding
from rich.table import Column, Table

from medledger.demo.client import DemoFailed, NodeApi
from medledger.ledger.clock import SystemClock
from medledger.storage.keystore import KdfParams
from medledger.synthetic import PatientBundle

__all__ = [
    "DEMO_CONSORTIUM",
    "DEMO_PASSPHRASE",
    "WALLET_PASSPHRASE",
    "Scene",
    "now_ms",
    "short",
    "titled_table",
    "wait_until",
]

DEMO_CONSORTIUM = "medledger-demo"
DEMO_PASSPHRASE = "demo-passphrase"  # noqa: S105 - the demo's published passphrase
WALLET_PASSPHRASE = "demo-wallet-passphrase"  # noqa: S105 - likewise


@dataclass
class Scene:
    """One run of the demo in ``base`` (a fresh network directory), told on ``console``.

    ``nodes`` maps each institution to its API client once the network is up;
    ``facts`` holds what a later section refers back to (the patient, their
    observation, wallet and consent, the verify exit codes).
    """

    console: Console
    base: Path
    kdf: KdfParams | None = None
    nodes: dict[str, NodeApi] = field(default_factory=dict)
    bundles: list[PatientBundle] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def say(self, text: RenderableType = "") -> None:
        self.console.print(text)

    def why(self, text: str) -> None:
        self.console.print(Padding(f"[dim italic]Why it matters: {text}[/]", (0, 0, 0, 3)))

    def section(self, number: int, title: str) -> None:
        self.console.print()
        self.console.rule(f"[bold]{number}. {title}", align="left")

    def step(self, text: str) -> None:
        self.console.print(Padding(f"• {text}", (0, 0, 0, 1)))


def titled_table(title: str, *columns: str | Column, show_lines: bool = False) -> Table:
    """A table of ``columns`` with ``title`` over its left edge, as the story's tables are."""
    return Table(*columns, title=title, title_justify="left", show_lines=show_lines)


def wait_until(
    probe: Callable[[], Any],
    done: Callable[[Any], bool],
    what: str,
    timeout: float = 30.0,
) -> Any:
    """Call ``probe`` until ``done`` holds for its value and return that value.

    Raises :class:`DemoFailed` naming ``what`` if ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise DemoFailed(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.05)


def now_ms() -> int:
    """Wall-clock time in milliseconds since the epoch."""
    return SystemClock().now_ms()


def short(text: str, n: int = 12) -> str:
    """``text`` cut to its first ``n`` characters and an ellipsis, if longer."""
    return text if len(text) <= n else text[:n] + "…"
