"""``medledger consortium``: create a consortium's genesis and inspect a member's view."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from medledger.cli.common import dir_option, emit
from medledger.core.consortium import quorum
from medledger.ledger.clock import SystemClock
from medledger.ledger.consortium.verify import ConsortiumPolicy
from medledger.ledger.verify import VerifyReport, verify_chain

__all__ = ["consortium", "verify_consortium_store"]


@click.group()
def consortium() -> None:
    """Create a consortium and inspect its chain."""


@consortium.command("init")
@click.option("--id", "consortium_id", required=True, help="Consortium id, e.g. 'city-health'.")
@click.option(
    "--member",
    "members",
    multiple=True,
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="A member's node directory (repeat for each founding member).",
)
def consortium_init(consortium_id: str, members: tuple[Path, ...]) -> None:
    """Write the genesis document (members' public keys) into every member's directory."""
    from medledger.node import write_genesis

    genesis = write_genesis(consortium_id, list(members), time_ms=SystemClock().now_ms())
    n = len(genesis.members)
    click.echo(f"consortium {consortium_id!r}: {n} members, finality quorum {quorum(n)}")
    click.echo(f"genesis hash {genesis.hash().hex()} written to {len(members)} node directories")


def verify_consortium_store(root: Path) -> tuple[VerifyReport, ConsortiumPolicy]:
    """Re-verify a node's copy of the consortium chain from genesis (no passphrase)."""
    from medledger.node import open_consortium_chain

    genesis, store = open_consortium_chain(root)
    try:
        policy = ConsortiumPolicy(genesis)
        return verify_chain(store, policy=policy), policy
    finally:
        store.close()


@consortium.command("status")
@dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def consortium_status(root: Path, as_json: bool) -> None:
    """Height, members, each institution's last final anchor, and equivocation evidence."""
    report, policy = verify_consortium_store(root)
    state = policy.state
    evidence_file = root / "evidence.jsonl"
    evidence: list[Any] = []
    if evidence_file.exists():
        evidence = [json.loads(line) for line in evidence_file.read_text().splitlines() if line]
    info: dict[str, Any] = {
        "consortium": report.chain,
        "final_height": report.blocks - 1,
        "members": [m.id for m in state.members.members],
        "quorum": state.members.quorum,
        "anchors": {k: a.to_json() for k, a in sorted(state.anchors.items())},
        "evidence": evidence,
    }
    if as_json:
        emit(info)
        return
    click.echo(
        f"{info['consortium']}: final height {info['final_height']}, "
        f"{len(info['members'])} members, quorum {info['quorum']}"
    )
    for inst, a in info["anchors"].items():
        click.echo(
            f"  {inst:<20} anchored private height {a['height']}, log size {a['log_size']}, "
            f"root {a['log_root'][:16]}…"
        )
    if evidence:
        for e in evidence:
            click.echo(f"  EQUIVOCATION by {e['member']} at height {e['height']}")
    else:
        click.echo("  no equivocation evidence")
