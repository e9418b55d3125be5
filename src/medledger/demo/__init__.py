"""``medledger demo``: the whole story through the HTTP API of a real multi-process network.

Three hospitals (``network up``: one node process each, solo ordering) —
records written concurrently, search without a plaintext index, anchoring,
a patient's consent granted, used across institutions and revoked, the
patient's audit trail, erasure, key rotation, a Byzantine member caught
equivocating — then, with the network stopped, an attacker editing the stored
chain and ``medledger verify`` catching it. Narrated with ``rich``; works
without a terminal.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from medledger.demo.client import DemoFailed
from medledger.demo.story import Story, prepare_directory
from medledger.storage.keystore import KdfParams

__all__ = ["DEFAULT_DIR", "DemoFailed", "run_demo"]

DEFAULT_DIR = Path("medledger-demo")


def run_demo(
    base: Path = DEFAULT_DIR,
    *,
    keep_running: bool = False,
    console: Console | None = None,
    kdf: KdfParams | None = None,
) -> None:
    """Create a fresh demo network in ``base`` and tell the story; stop it unless ``keep_running``.

    A previous demo's network in ``base`` is stopped and replaced; any other
    non-empty ``base`` is refused (:class:`DemoFailed`).
    """
    console = console or Console()
    base = base.resolve()
    if prepare_directory(base):
        console.print(f"[dim]Replaced the previous demo network in {base}.[/]")
    Story(console=console, base=base, kdf=kdf).run(keep_running=keep_running)
