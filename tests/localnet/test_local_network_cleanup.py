"""``LocalNetwork.open`` that fails halfway leaves nothing running.

With ``jetstream`` ordering, opening a network starts three ``nats-server``
processes and connects one orderer per node before it opens the nodes. A node
that then fails to open (here: the wrong passphrase) must not leave those
servers running, or their connections open, behind the error.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from medledger.core.errors import KeyStoreError
from medledger.localnet.network import LocalNetwork
from medledger.storage.keystore import KdfParams

PASSPHRASE = b"local network cleanup passphrase"


def _nats_servers_under(base: Path) -> list[int]:
    """PIDs of the nats-server processes whose command line names a file under ``base``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # ended meanwhile
        if argv and argv[0].endswith(b"nats-server") and str(base).encode() in b" ".join(argv):
            found.append(int(proc.name))
    return found


def test_a_network_whose_node_fails_to_open_stops_its_nats_servers(tmp_path: Path) -> None:
    base = tmp_path / "net"

    async def main() -> list[int]:
        made = await LocalNetwork.create(
            base, ["Cleanup Hospital"], passphrase=PASSPHRASE, kdf=KdfParams(n=2**12)
        )
        await made.close()
        with pytest.raises(KeyStoreError) as failed:
            await LocalNetwork.open(base, passphrase=b"not the passphrase", ordering="jetstream")
        # Looked at while the error (and so its traceback's frames) is still held, as by a
        # caller handling it: the servers' finalizers are a last resort of the garbage
        # collector, not the clean-up.
        running = _nats_servers_under(base)
        del failed
        return running

    assert asyncio.run(main()) == []
