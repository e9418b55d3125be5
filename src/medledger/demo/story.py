"""The story ``medledger demo`` tells, section by section, through the HTTP API of a real network.

Three hospitals run one ``medledger node start`` process each (``network up``,
solo ordering, SQLite). Everything goes over HTTP exactly as an EHR or a
patient's app would send it; only the attacker at the end touches files.
:class:`Story` runs the sections in order, each from its module:

- 1-3 the network starts, records and search, anchoring: :mod:`~medledger.demo.records`
- 4 consent and sharing: :mod:`~medledger.demo.consent`, the patient's trail
  :mod:`~medledger.demo.trail`
- 5-7 erasure, key rotation, equivocation: :mod:`~medledger.demo.operations`
- 8-9 the stopped network's files, tampering caught: :mod:`~medledger.demo.ending`
- 10 (with ``keep_running``) the network starts again; then what to try next
  (:mod:`~medledger.demo.ending`)
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.panel import Panel

from medledger.core.errors import MedledgerError
from medledger.demo.client import DemoFailed
from medledger.demo.consent import share_with_consent
from medledger.demo.ending import catch_tampering, next_steps, scan_disk
from medledger.demo.operations import catch_equivocation, erase_a_patient, rotate_keys
from medledger.demo.records import start_network, wait_anchored, write_records
from medledger.demo.scene import DEMO_CONSORTIUM, DEMO_PASSPHRASE, WALLET_PASSPHRASE, Scene
from medledger.localnet import netproc

__all__ = [
    "DEMO_CONSORTIUM",
    "DEMO_PASSPHRASE",
    "WALLET_PASSPHRASE",
    "Story",
    "prepare_directory",
]


class Story(Scene):
    """One run of the demo in ``base`` (a fresh network directory), told on ``console``."""

    def run(self, *, keep_running: bool) -> None:
        """Tell the story; the network is stopped at the end unless ``keep_running``."""
        self.intro()
        started = time.perf_counter()
        stopped = False
        try:
            with self._node_clients():
                start_network(self)
                write_records(self)
                wait_anchored(self)
                share_with_consent(self)
                erase_a_patient(self)
                rotate_keys(self)
                catch_equivocation(self)
            self.section(8, "The network stops; nothing identifies a patient on disk")
            netproc.down(self.base)
            stopped = True
            scan_disk(self)
            catch_tampering(self)
            if keep_running:
                self.section(10, "The network starts again, with all its data")
                spec = netproc.up(self.base, passphrase=DEMO_PASSPHRASE.encode())
                stopped = False
                self.step(
                    f"{len(spec.nodes)} node processes resumed from their directories "
                    "(`network up` on an existing directory keeps everything)."
                )
        finally:
            if not stopped and not keep_running:
                netproc.down(self.base)
        next_steps(self, keep_running=keep_running, elapsed=time.perf_counter() - started)

    def intro(self) -> None:
        self.console.print(
            Panel.fit(
                "[bold]medledger[/] keeps health records for collaborating institutions on a "
                "[bold]hybrid blockchain[/]: each institution writes to its own fast private "
                "chain; one consortium chain shared by all anchors those chains, carries "
                "patients' consent and records who read what. Records are FHIR R4, encrypted "
                "off-chain; chains hold only hashes, pseudonyms and signatures.\n"
                "This demo starts three hospitals as three processes on this machine and tells "
                "the story through their HTTP APIs, as clinical systems and a patient's app "
                f"would. Network directory: [bold]{self.base}[/]",
                title="medledger demo",
            )
        )

    @contextmanager
    def _node_clients(self) -> Iterator[None]:
        # The nodes' HTTP clients hold connections; close them before the network stops.
        try:
            yield
        finally:
            for api in self.nodes.values():
                api.close()
            self.nodes.clear()


def prepare_directory(base: Path) -> bool:
    """Make ``base`` ready for a fresh demo network; True if a previous demo was replaced.

    A previous demo's directory (its ``network.json`` names the demo consortium)
    is stopped and removed; any other non-empty directory is refused.
    """
    if not base.exists() or not any(base.iterdir()):
        return False
    try:
        consortium = netproc.load_network(base).consortium
    except MedledgerError:
        consortium = None
    if consortium != DEMO_CONSORTIUM:
        raise DemoFailed(
            f"{base} is not empty and holds no previous demo; give a new --dir for the demo"
        )
    netproc.down(base, timeout=10)
    shutil.rmtree(base)
    return True
