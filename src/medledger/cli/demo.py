"""``medledger demo``: the guided story on a real network of node processes."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["demo"]


@click.command()
@click.option(
    "--dir",
    "base",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("medledger-demo"),
    show_default=True,
    help="The demo network's directory (a previous demo there is replaced).",
)
@click.option(
    "--keep-running",
    is_flag=True,
    help="Leave the network running at the end (stop it with 'medledger network down').",
)
def demo(base: Path, keep_running: bool) -> None:
    """Start three hospitals on this machine and tell the whole story through their HTTP APIs:
    records, search, consent and sharing, revocation, audit, erasure, key rotation, and
    tampering caught by verify."""
    from medledger.demo import run_demo

    run_demo(base, keep_running=keep_running)
