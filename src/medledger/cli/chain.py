"""``medledger node``, ``chain`` and ``verify``: identity, reading the chain, verification."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from medledger.cli.common import dir_option, emit, fail, progress, read_passphrase
from medledger.cli.lazy import LazyGroup
from medledger.config import load_config
from medledger.core.errors import RecordDamaged
from medledger.core.hashing import hash_from_hex
from medledger.ledger.export import (
    block_json,
    consistency_proof_json,
    head_json,
    inclusion_proof_json,
)
from medledger.ledger.proofs import head_header
from medledger.ledger.verify import Checkpoint, parse_checkpoint, verify_chain
from medledger.storage.ports import ChainStore, StoredBlock

__all__ = ["chain", "node", "stored_block_json", "verify"]


@contextmanager
def _chain(root: Path) -> Iterator[tuple[Any, ChainStore]]:
    from medledger.stores import open_chain

    config, store = open_chain(root)
    try:
        yield config, store
    finally:
        store.close()


def stored_block_json(block: StoredBlock) -> dict[str, Any]:
    """The export JSON of a stored block (see ``ledger.export``)."""
    return block_json(block)


# -- node ---------------------------------------------------------------------------


@click.group(
    cls=LazyGroup,
    lazy_commands={
        "oauth-client": "medledger.cli.oauth:oauth_client",
        "start": "medledger.cli.service:start",
    },
)
def node() -> None:
    """Create and inspect an institution node."""


@node.command("init")
@dir_option
@click.option("--name", required=True, help="Institution display name, e.g. 'St. Mary Hospital'.")
@click.option(
    "--id", "institution", default=None, help="Institution id (default: derived from the name)."
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="A host name or IP address others reach this node at (repeat; its TLS certificate "
    "names them; default: localhost, 127.0.0.1, ::1).",
)
@click.option(
    "--advertise",
    default="",
    metavar="URL",
    help="The URL other members reach this node at, e.g. https://st-mary.example.org:8700: "
    "recorded in the genesis as its peer URL, named by its TLS certificate, the address "
    "'node start' listens on by default, and the URL its sign-in service (SMART on FHIR) "
    "names itself by.",
)
def node_init(
    root: Path, name: str, institution: str | None, hosts: tuple[str, ...], advertise: str
) -> None:
    """Create keys, a TLS certificate, configuration and the private chain's genesis in DIR."""
    from medledger.node import init_node
    from medledger.services.tls import DEFAULT_HOSTS

    passphrase = read_passphrase(confirm=True)
    config = init_node(
        root,
        name=name,
        passphrase=passphrase,
        institution=institution,
        tls_hosts=hosts or DEFAULT_HOSTS,
        advertise=advertise,
    )
    from medledger.config import NodePaths
    from medledger.services.tls import load_certificate

    cert = load_certificate(NodePaths(root=root).tls_cert)
    click.echo(f"created node {config.institution!r} ({config.name}) in {root}")
    click.echo(f"chain:   {config.chain}")
    click.echo(f"TLS certificate fingerprint: {cert.fingerprint} ({', '.join(cert.hosts)})")
    # Last: scripts read the signing key's fingerprint from the final line.
    click.echo(f"signing key fingerprint: {config.signing_key.fingerprint}")


@node.command("member-info")
@dir_option
def node_member_info(root: Path) -> None:
    """Print this node's public member entry (JSON) for the consortium's genesis.

    Everything other institutions need and nothing secret: id, name, signing
    and HPKE public keys, the advertised peer URL and the TLS certificate.
    Send it to whoever runs ``consortium init --member-info``.
    """
    from medledger.node import member_entry

    emit(member_entry(root).to_json())


@node.command("status")
@click.option(
    "--node",
    "node_urls",
    multiple=True,
    required=True,
    metavar="URL",
    help="A node's URL, e.g. https://st-mary.example.org:8700 (repeat for every member).",
)
@click.option(
    "--genesis",
    "genesis_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="The consortium's genesis: trust exactly its members' pinned TLS certificates "
    "(without it, an https node must present a certificate the system trusts).",
)
@click.option(
    "--members-of",
    "members_of",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="A node directory: trust its current members' certificates (its final consortium "
    "state: renewed certificates included), instead of the genesis's.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def node_status(
    node_urls: tuple[str, ...], genesis_path: Path | None, members_of: Path | None, as_json: bool
) -> None:
    """Ask running nodes, here or on other machines, whether they are ready (GET /readyz).

    One line (or JSON object) per node: institution, ready or why not, private
    and consortium heights, and a search re-index in progress. Exit 0 only if every node answered ready; a node
    that cannot be reached is reported as such (the others are still asked).
    """
    from medledger.config import parse_advertise

    verify: Any = True
    if genesis_path is not None and members_of is not None:
        fail("--genesis or --members-of, not both", 2)
    if members_of is not None:
        from medledger.cli.nats import current_members
        from medledger.services.tls import client_context

        verify = client_context(current_members(members_of).tls_certificates())
    elif genesis_path is not None:
        from medledger.core.consortium import MemberSet
        from medledger.services.tls import client_context
        from medledger.stores import load_genesis

        members = MemberSet(load_genesis(genesis_path).members)
        verify = client_context(members.tls_certificates())
    report = []
    for url in node_urls:
        parse_advertise(url)  # a clear error for a mistyped URL, before any request
        report.append(_remote_status(url, verify))
    if as_json:
        emit(report)
    else:
        for entry in report:
            click.echo(
                f"{entry['url']:<32} {entry.get('institution') or '-':<20} {entry['status']:<12}"
                f" private {_dash(entry.get('private_height'))}"
                f" consortium {_dash(entry.get('consortium_height'))}"
                + (
                    f" search index {entry['search_index']}"
                    if entry.get("search_index", "current") != "current"
                    else ""
                )
            )
    if not all(entry["status"] == "ready" for entry in report):
        sys.exit(1)


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _remote_status(url: str, verify: Any = True) -> dict[str, Any]:
    """What ``url``'s ``/readyz`` says, reduced to the fields we show (the body is not trusted).

    ``verify``: what the TLS client trusts (an ``ssl.SSLContext``, or the system's CAs).
    """
    import httpx

    entry: dict[str, Any] = {"url": url}
    try:
        answer = httpx.get(url.rstrip("/") + "/readyz", timeout=10, verify=verify)
        body = answer.json()
    except (httpx.HTTPError, ValueError) as exc:
        return {**entry, "status": "unreachable", "error": type(exc).__name__}
    if not isinstance(body, dict):
        return {**entry, "status": f"HTTP {answer.status_code}"}
    status = body.get("status")
    entry["status"] = (
        status if answer.status_code in (200, 503) and isinstance(status, str) else "unknown"
    )[:64]
    if answer.status_code != 200 and entry["status"] == "ready":
        entry["status"] = "not ready"
    for key in ("institution", "consortium", "search_index"):
        if isinstance(body.get(key), str):
            entry[key] = body[key][:128]
    for key in ("private_height", "consortium_height"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            entry[key] = value
    problems = body.get("problems")
    if isinstance(problems, dict):
        entry["problems"] = {str(k)[:64]: str(v)[:200] for k, v in list(problems.items())[:32]}
    return entry


@node.command("nats-key")
@dir_option
def node_nats_key(root: Path) -> None:
    """Create the node's NATS credential (an NKey seed, DIR/nats.nk, owner-only).

    Prints the public key (``U…``) to list in every member's NATS server
    ``authorization`` block (docs/deploy.md); the seed never leaves this
    machine. Refuses to replace an existing seed.
    """
    from medledger.cli.nats import write_new_seed

    load_config(root)  # a clear error if DIR is not a node
    click.echo(write_new_seed(root / "nats.nk"))


@node.command("tls-cert")
@dir_option
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="A host name or IP address others reach this node at (repeat; with --renew, "
    "default: the names of the current certificate).",
)
@click.option(
    "--days", type=click.IntRange(1, 3650), default=825, show_default=True, help="Validity."
)
@click.option(
    "--renew",
    is_flag=True,
    help="Renew without downtime: once the node is in a consortium, write the new pair "
    "beside the current one (tls.next.crt, tls.next.key) to propose with "
    "'consortium propose-tls'; the running node switches to it once that change is final.",
)
def node_tls_cert(root: Path, hosts: tuple[str, ...], days: int, renew: bool) -> None:
    """Make a new TLS key and self-signed certificate (tls.key, tls.crt).

    Members pin the certificate: once the consortium is formed, a new one is
    accepted only after a ``member.tls`` carrying it is final, so ``--renew``
    writes it as ``tls.next.*`` and the node keeps the current pair until
    then. Without a consortium (no genesis.json) the pair is replaced at once;
    a running node uses it for its next handshakes.
    """
    from medledger.config import NodePaths
    from medledger.ledger.clock import SystemClock
    from medledger.services.tls import load_certificate, write_certificate

    config = load_config(root)
    paths = NodePaths(root=root)
    if not hosts:
        if not renew or not paths.tls_cert.exists():
            fail("name the host names or addresses with --host", 2)
        hosts = load_certificate(paths.tls_cert).hosts
    pending = renew and paths.genesis.exists()
    if pending and paths.tls_next_cert.exists():
        waiting = load_certificate(paths.tls_next_cert).fingerprint
        fail(
            f"a renewed certificate is already waiting for its member.tls ({waiting}); "
            f"remove {paths.tls_next_cert.name} and {paths.tls_next_key.name} to make another"
        )
    cert = write_certificate(
        paths.tls_next_cert if pending else paths.tls_cert,
        paths.tls_next_key if pending else paths.tls_key,
        config.institution,
        hosts,
        now_ms=SystemClock().now_ms(),
        valid_days=days,
    )
    click.echo(f"TLS certificate fingerprint: {cert.fingerprint} ({', '.join(cert.hosts)})")
    if pending:
        click.echo(
            "written as tls.next.crt: propose it with 'medledger consortium propose-tls'; "
            "the node keeps its current certificate until that change is final"
        )


@node.command("show")
@dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def node_show(root: Path, as_json: bool) -> None:
    """Show the node's identity and public keys (no passphrase needed)."""

    config = load_config(root)
    info: dict[str, Any] = {
        "name": config.name,
        "institution": config.institution,
        "chain": config.chain,
        "keys": {
            "signing": {
                "alg": "ecdsa-p256-sha256",
                "fingerprint": config.signing_key.fingerprint,
                "public_key_pem": config.signing_key.pem(),
            }
        },
    }
    from medledger.config import NodePaths
    from medledger.services.tls import load_certificate

    cert_path = NodePaths(root=root).tls_cert
    if cert_path.exists():
        cert = load_certificate(cert_path)
        info["tls"] = {"fingerprint": cert.fingerprint, "hosts": list(cert.hosts)}
    if as_json:
        emit(info)
        return
    click.echo(f"name:        {config.name}")
    click.echo(f"institution: {config.institution}")
    click.echo(f"chain:       {config.chain}")
    click.echo(f"signing key: ecdsa-p256-sha256, fingerprint {config.signing_key.fingerprint}")
    click.echo(config.signing_key.pem().rstrip())
    if "tls" in info:
        click.echo(f"TLS certificate: fingerprint {info['tls']['fingerprint']}")


# -- chain ----------------------------------------------------------------------------


@click.group()
def chain() -> None:
    """Read the private chain: head, blocks, proofs."""


@chain.command("show")
@dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def chain_show(root: Path, as_json: bool) -> None:
    """Show the chain head."""
    with _chain(root) as (_, store):
        info = head_json(store)
    if as_json:
        emit(info)
        return
    for k in ("chain", "height", "hash", "log_size", "log_root", "time_ms", "proposer"):
        click.echo(f"{k + ':':<10}{info[k]}")


@chain.command("export")
@dir_option
@click.option("--from", "start", type=click.IntRange(min=0), default=0, help="First height.")
@click.option(
    "--to", "end", type=click.IntRange(min=0), default=None, help="Last height (inclusive)."
)
def chain_export(root: Path, start: int, end: int | None) -> None:
    """Print blocks as JSON lines: {header, hash, signatures, txs}."""
    if end is not None and end < start:
        fail(f"--to {end} is before --from {start}", 2)
    with _chain(root) as (_, store):
        stop = None if end is None else end + 1
        out = sys.stdout
        for block in store.iter_blocks(start, stop):
            out.write(
                json.dumps(stored_block_json(block), separators=(",", ":"), ensure_ascii=False)
            )
            out.write("\n")


@chain.group("proof")
def chain_proof() -> None:
    """RFC 6962 inclusion and consistency proofs, as JSON."""


@chain_proof.command("inclusion")
@dir_option
@click.option(
    "--index", type=click.IntRange(min=0), default=None, help="Log index of the transaction."
)
@click.option("--tx", "tx_hash", default=None, help="Transaction hash (hex) instead of --index.")
@click.option("--size", type=click.IntRange(min=1), default=None, help="Log size (default: head).")
def proof_inclusion(root: Path, index: int | None, tx_hash: str | None, size: int | None) -> None:
    """Prove a transaction is in the log of SIZE."""
    if (index is None) == (tx_hash is None):
        fail("give exactly one of --index or --tx", 2)
    with _chain(root) as (_, store):
        if tx_hash is not None:
            _, index = store.tx_location(hash_from_hex(tx_hash, "--tx"))
        assert index is not None
        emit(inclusion_proof_json(store, index, size))


@chain_proof.command("consistency")
@dir_option
@click.option(
    "--old", "old_size", type=click.IntRange(min=0), required=True, help="Earlier log size."
)
@click.option(
    "--new",
    "new_size",
    type=click.IntRange(min=0),
    default=None,
    help="Later size (default: head).",
)
def proof_consistency(root: Path, old_size: int, new_size: int | None) -> None:
    """Prove the log of NEW extends the log of OLD."""
    with _chain(root) as (_, store):
        emit(consistency_proof_json(store, old_size, new_size))


# -- verify ---------------------------------------------------------------------------


@click.command()
@click.option(
    "--dir",
    "root",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="The node directory (not needed to verify only a --consortium-export).",
)
@click.option(
    "--anchor",
    "anchors",
    multiple=True,
    metavar="SIZE:ROOT",
    help="A previously published log size and root the chain must be consistent with (repeatable).",
)
@click.option(
    "--consortium",
    "with_consortium",
    is_flag=True,
    help="Also verify the consortium chain and this chain against every final anchor of it.",
)
@click.option(
    "--consortium-export",
    "consortium_export",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Verify the consortium chain from this 'consortium export' file alone (and, with "
    "--dir, the node's chain against every final anchor in it).",
)
@click.option(
    "--genesis",
    "genesis_path",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --consortium-export: the consortium's genesis.json, which block 0 must be "
    "(default: the genesis in the export, whose hash is printed to compare).",
)
@click.option(
    "--records",
    "with_records",
    is_flag=True,
    help="Also check the record store: every index row against its record.put, every blob "
    "and wrapped data key, every record.put has its index row (needs the passphrase).",
)
def verify(
    root: Path | None,
    anchors: tuple[str, ...],
    with_consortium: bool,
    consortium_export: Path | None,
    genesis_path: Path | None,
    with_records: bool,
) -> None:
    """Re-derive and check every block, signature, root and proof node of the chain."""
    if with_consortium and consortium_export is not None:
        raise click.UsageError("give --consortium or --consortium-export, not both")
    if genesis_path is not None and consortium_export is None:
        raise click.UsageError("--genesis goes with --consortium-export")
    if root is None and (consortium_export is None or anchors or with_records):
        raise click.UsageError(
            "Missing option '--dir' (only --consortium-export alone needs no node)."
        )
    checkpoints = [parse_checkpoint(a) for a in anchors]
    if with_consortium or consortium_export is not None:
        checkpoints.extend(_verify_consortium(root, consortium_export, genesis_path))
    if root is None:
        return
    with _chain(root) as (config, store):
        total = head_header(store).log_size
        with progress("verifying", total) as advance:
            report = verify_chain(
                store, expected_key=config.signing_key, checkpoints=checkpoints, progress=advance
            )
    click.echo(
        f"OK: {report.chain}: {report.blocks} blocks, {report.log_size} transactions, "
        f"log root {report.log_root.hex()}, all signed by {report.signer[:16]}…"
        + (
            f", consistent with {report.checkpoints} published root(s)"
            if report.checkpoints
            else ""
        )
    )
    if with_records:
        _verify_records(root)


def _verify_consortium(
    root: Path | None, export: Path | None, genesis_path: Path | None
) -> list[Checkpoint]:
    """Verify the consortium chain (the node's copy, or an export); print what was checked.

    Returns the node's final anchors in it (none without a node directory), for the
    private chain's verification.
    """
    from medledger.cli.consortium import (
        verified_evidence,
        verify_consortium_export,
        verify_consortium_store,
    )
    from medledger.ledger.consortium.verify import anchored_checkpoints
    from medledger.stores import open_consortium_chain

    cstore: ChainStore
    if export is not None:
        creport, policy, cstore = verify_consortium_export(export, genesis_path)
    else:
        assert root is not None
        creport, policy = verify_consortium_store(root)
        _, cstore = open_consortium_chain(root)
    click.echo(
        f"OK: {creport.chain}: {creport.blocks} blocks, {creport.log_size} transactions, "
        f"every block final under a quorum certificate, every transaction re-validated"
    )
    if export is not None:
        click.echo(f"genesis hash {policy.genesis.hash().hex()} (compare with the members')")
    try:
        if root is None:
            return []
        evidence = verified_evidence(root, policy)
        if evidence:
            named = ", ".join(f"{e.member} at height {e.height}" for e in evidence)
            click.echo(f"OK: {len(evidence)} equivocation evidence record(s) verified: {named}")
        return anchored_checkpoints(cstore, load_config(root).institution)
    finally:
        cstore.close()


def _verify_records(root: Path) -> None:
    """``verify --records``: print each problem of the record store; exit 3 if there is one."""
    import asyncio

    from medledger.node import open_node

    node = open_node(root, read_passphrase(confirm=False))
    try:
        report = node.check_records()
    finally:
        asyncio.run(node.close())
    for problem in report.problems:
        click.echo(f"DAMAGED: {problem.describe()}")
    if report.problem_count > len(report.problems):
        click.echo(f"DAMAGED: … and {report.problem_count - len(report.problems)} more")
    if not report.ok:
        raise RecordDamaged(
            f"the record store is damaged: {report.problem_count} problem(s) "
            f"in {report.versions} record versions"
        )
    click.echo(
        f"OK: records: {report.versions} versions ({report.erased} erased), "
        f"{report.record_txs} record.put transactions, every index row matches the chain, "
        "every blob is intact and every data key unwraps"
        + (f"; {report.orphan_blobs} unreferenced blob(s)" if report.orphan_blobs else "")
    )
