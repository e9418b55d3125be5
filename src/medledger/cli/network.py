"""``medledger network up|status|down``: a consortium on this machine, one process per node."""

from __future__ import annotations

from pathlib import Path

import click

from medledger.cli.common import emit, read_passphrase

__all__ = ["network"]

_dir_option = click.option(
    "--dir",
    "base",
    default=Path("medledger-network"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The network directory (one sub-directory per institution).",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.group()
def network() -> None:
    """Run a consortium on this machine: one node process per institution."""


@network.command("up")
@_dir_option
@click.option(
    "--institutions",
    type=click.IntRange(1, 32),
    default=None,
    help="How many institutions (new network; default 3).",
)
@click.option("--ordering", type=click.Choice(["solo", "jetstream"]), default=None)
@click.option("--store", type=click.Choice(["sqlite", "postgres"]), default=None)
@click.option(
    "--replicas",
    type=click.IntRange(1, 5),
    default=None,
    help="JetStream stream replicas (default: min(3, NATS servers)).",
)
@click.option("--timeout", type=click.FloatRange(min=1), default=120.0, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="API worker processes per node (node start --workers). 1 by default, unlike "
    "node start (one per core): every node of the network shares this one machine.",
)
@_json_option
def network_up(
    base: Path,
    institutions: int | None,
    ordering: str | None,
    store: str | None,
    replicas: int | None,
    timeout: float,
    workers: int,
    as_json: bool,
) -> None:
    """Create the network (keys, genesis, ordering, tokens) if absent; start what is not running.

    On an existing directory it resumes the network with all its data. Prints
    each node's URL and API tokens (also in DIR/network.json, mode 0600). The
    passphrase (MEDLEDGER_PASSPHRASE or a prompt) protects every node's keystore.
    """
    from medledger.localnet import netproc

    passphrase = read_passphrase(confirm=not (base / netproc.NETWORK_FILE).exists())
    spec = netproc.up(
        base,
        passphrase=passphrase,
        institutions=institutions,
        ordering=ordering,
        store=store,
        replicas=replicas,
        timeout=timeout,
        workers=workers,
    )
    if as_json:
        emit(spec.to_json())
        return
    click.echo(
        f"network {base.resolve()}: {len(spec.nodes)} institutions,"
        f" ordering {spec.ordering}, store {spec.store} — all ready"
    )
    for node in spec.nodes:
        click.echo(f"  {node.institution:<14} {node.url}")
        click.echo(f"      {'admin':<10} {node.tokens.admin}")
        click.echo(f"      {'clinician':<10} {node.tokens.clinician}")
    click.echo(f"(also in {base.resolve() / netproc.NETWORK_FILE})")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


@network.command("status")
@_dir_option
@_json_option
def network_status(base: Path, as_json: bool) -> None:
    """Each process: running?, URL, ready?, private and consortium heights."""
    from medledger.localnet import netproc

    report = netproc.status(base)
    if as_json:
        emit(report.to_json())
        return
    click.echo(f"network {report.dir}: ordering {report.ordering}, store {report.store}")
    for n in report.nodes:
        click.echo(
            f"  {n.institution:<14} {n.url:<24} pid {n.pid or '-':<8}"
            f" running {_yes(n.running):<4} ready {_yes(n.ready):<4}"
            f" private {_or_dash(n.private_height):<6}"
            f" consortium {_or_dash(n.consortium_height)}"
        )
    for s in report.nats:
        click.echo(
            f"  nats {s.name:<9} {s.url:<24} pid {s.pid or '-':<8} running {_yes(s.running)}"
        )
    if report.postgres is not None:
        pg = report.postgres
        click.echo(
            f"  postgres       port {pg.port:<19} pid {pg.pid or '-':<8} running {_yes(pg.running)}"
        )


def _or_dash(height: int | None) -> str:
    return "-" if height is None else str(height)


@network.command("down")
@_dir_option
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds to wait after SIGTERM before SIGKILL.",
)
@_json_option
def network_down(base: Path, timeout: float, as_json: bool) -> None:
    """Stop the processes this network started (by PID): nodes, NATS, PostgreSQL."""
    from medledger.localnet import netproc

    stopped = netproc.down(base, timeout=timeout)
    if as_json:
        emit(stopped.to_json())
        return
    click.echo(
        f"stopped {len(stopped.nodes)} node(s), {len(stopped.nats)} nats-server(s)"
        + (", PostgreSQL" if stopped.postgres else "")
    )
