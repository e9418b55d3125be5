"""``medledger consortium``: create a consortium's genesis and inspect a member's view."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from medledger.cli.common import dir_option, emit, fail
from medledger.core.consortium import quorum
from medledger.ledger.clock import SystemClock
from medledger.ledger.consortium.verify import ConsortiumPolicy
from medledger.ledger.export import ExportedChain
from medledger.ledger.verify import VerifyReport, verify_chain

if TYPE_CHECKING:
    from medledger.core.consortium import Member
    from medledger.ledger.consortium.evidence import Evidence

__all__ = [
    "consortium",
    "verified_evidence",
    "verify_consortium_export",
    "verify_consortium_store",
]


@click.group()
def consortium() -> None:
    """Create a consortium and inspect its chain."""


#: A member entry is a few KiB (keys and a certificate); anything this large is not one.
MAX_MEMBER_INFO_BYTES = 64 * 1024


@consortium.command("init")
@click.option("--id", "consortium_id", required=True, help="Consortium id, e.g. 'city-health'.")
@click.option(
    "--member",
    "members",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="A member's node directory on this machine (repeat for each founding member).",
)
@click.option(
    "--member-info",
    "member_infos",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A member's public entry from 'node member-info' (repeat; members on other machines).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the genesis here (to send to the members on other machines).",
)
def consortium_init(
    consortium_id: str,
    members: tuple[Path, ...],
    member_infos: tuple[Path, ...],
    out: Path | None,
) -> None:
    """Write the genesis document (members' public keys) into every member's directory.

    Founding members are node directories on this machine (``--member``) and
    entries sent by members on other machines (``--member-info``, checked like
    any genesis member: keys, certificate, peer URL); ``--out`` writes the
    genesis to a file for them, to copy into their node directory as
    ``genesis.json``.
    """
    from medledger.core.consortium import ConsortiumParams, Genesis
    from medledger.node import member_entry, save_genesis

    if not members and not member_infos:
        fail("name the founding members with --member or --member-info", 2)
    if member_infos and out is None and not members:
        fail("--member-info without --member needs --out (where to write the genesis)", 2)
    entries = [member_entry(root) for root in members]
    entries += [_read_member_info(path) for path in member_infos]
    genesis = Genesis(
        consortium=consortium_id,
        time_ms=SystemClock().now_ms(),
        members=tuple(entries),
        params=ConsortiumParams(),
    )
    for root in members:
        save_genesis(genesis, root / "genesis.json")
    if out is not None:
        save_genesis(genesis, out)
    n = len(genesis.members)
    click.echo(f"consortium {consortium_id!r}: {n} members, finality quorum {quorum(n)}")
    where = f"{len(members)} node directories" + (f" and {out}" if out is not None else "")
    click.echo(f"genesis hash {genesis.hash().hex()} written to {where}")


@consortium.command("adopt")
@dir_option
@click.option(
    "--genesis",
    "genesis_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The genesis file the founding member wrote with 'consortium init --out'.",
)
def consortium_adopt(root: Path, genesis_path: Path) -> None:
    """Install a genesis written on another machine as this node's genesis.json.

    The file is checked first: a well-formed genesis (``load_genesis``) that
    lists this node with exactly its own entry (keys, advertised URL, TLS
    certificate). Print its hash, to compare with the other members out of band.
    """
    from medledger.config import NodePaths
    from medledger.core.errors import Conflict, InvalidInput
    from medledger.node import member_entry, save_genesis
    from medledger.stores import load_genesis

    own = member_entry(root)
    if genesis_path.is_file() and genesis_path.stat().st_size > MAX_GENESIS_BYTES:
        raise InvalidInput(f"{genesis_path}: larger than {MAX_GENESIS_BYTES} bytes")
    genesis = load_genesis(genesis_path)
    listed = next((m for m in genesis.members if m.id == own.id), None)
    if listed is None:
        raise InvalidInput(f"{genesis_path}: the genesis does not list {own.id!r}")
    if listed != own:
        raise InvalidInput(
            f"{genesis_path}: the genesis lists {own.id!r} with other keys, URL or certificate "
            "than this node has (see 'node member-info')"
        )
    target = NodePaths(root=root).genesis
    if target.exists() and load_genesis(target).hash() != genesis.hash():
        raise Conflict(f"{target} already holds a different genesis")
    save_genesis(genesis, target)
    click.echo(f"genesis hash {genesis.hash().hex()} installed in {root}")


#: A genesis of a few hundred members is well under this.
MAX_GENESIS_BYTES = 4 * 1024 * 1024


def _read_member_info(path: Path) -> Member:
    """A member entry from a file another institution sent: hostile until checked."""
    from medledger.config import parse_advertise
    from medledger.core.consortium import Member
    from medledger.core.errors import InvalidInput

    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_MEMBER_INFO_BYTES + 1)
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) > MAX_MEMBER_INFO_BYTES:
        raise InvalidInput(f"{path}: larger than {MAX_MEMBER_INFO_BYTES} bytes")
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
        member = Member.from_json(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path}: not a member entry ({exc})") from None
    except InvalidInput as exc:
        raise InvalidInput(f"{path}: {exc}") from None
    if member.peer_url:
        try:
            parse_advertise(member.peer_url)
        except InvalidInput as exc:
            raise InvalidInput(f"{path}: peer_url: {exc}") from None
    return member


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def verify_consortium_store(root: Path) -> tuple[VerifyReport, ConsortiumPolicy]:
    """Re-verify a node's copy of the consortium chain from genesis (no passphrase)."""
    from medledger.stores import open_consortium_chain

    genesis, store = open_consortium_chain(root)
    try:
        policy = ConsortiumPolicy(genesis)
        return verify_chain(store, policy=policy), policy
    finally:
        store.close()


def verify_consortium_export(
    path: Path, genesis_path: Path | None = None
) -> tuple[VerifyReport, ConsortiumPolicy, ExportedChain]:
    """Verify a consortium chain from its export alone (``consortium export``).

    The consortium's genesis is block 0's only transaction; with ``genesis_path``
    (the auditor's own copy, compared out of band) block 0 must be exactly that
    genesis. Otherwise the genesis in the export is the trust anchor: its hash is
    in the report for the auditor to compare with the members'.
    """
    from medledger.core.consortium import Genesis
    from medledger.core.errors import IntegrityError, InvalidInput, NotFound
    from medledger.core.models import Transaction
    from medledger.stores import load_genesis

    try:
        with path.open("rb") as handle:
            exported = ExportedChain(handle, label=f"consortium export {path.name}")
    except FileNotFoundError:
        raise NotFound(f"no consortium export at {path}") from None
    except IsADirectoryError:
        raise InvalidInput(f"{path} is a directory, not a consortium export") from None
    if genesis_path is not None:
        genesis = load_genesis(genesis_path)
    else:
        first = next(exported.iter_blocks(0, 1), None)
        if first is None or not first.tx_data:
            raise IntegrityError("consortium chain, block 0: missing from the export")
        try:
            genesis = Genesis.from_json(Transaction.decode(first.tx_data[0]).body)
        except InvalidInput as exc:
            raise IntegrityError(
                f"consortium chain, block 0: not a consortium genesis ({exc})"
            ) from None
    policy = ConsortiumPolicy(genesis)
    return verify_chain(exported, policy=policy), policy, exported


def verified_evidence(root: Path, policy: ConsortiumPolicy) -> list[Evidence]:
    """The node's equivocation evidence (``evidence.jsonl``), every record checked.

    ``policy`` has verified the consortium chain (it knows each height's voters).
    A record that is not valid evidence raises :class:`IntegrityError` (tampering).
    """
    from medledger.ledger.consortium.evidence import EVIDENCE_FILE, read_evidence

    return read_evidence(
        root / EVIDENCE_FILE, chain_id=policy.genesis.chain_id, voters_at=policy.voters_at
    )


@consortium.command("export")
@dir_option
@click.option("--from", "start", type=click.IntRange(min=0), default=0, help="First height.")
@click.option(
    "--to", "end", type=click.IntRange(min=0), default=None, help="Last height (inclusive)."
)
def consortium_export(root: Path, start: int, end: int | None) -> None:
    """Print this node's copy of the consortium chain as JSON lines: {header, hash, signatures, txs}.

    The export form of ``chain export`` (docs/formats.md); the signatures are the
    finality certificate. ``medledger verify --consortium-export FILE`` verifies a
    whole export (from height 0) without a node.
    """
    import sys

    from medledger.ledger.export import block_line
    from medledger.stores import open_consortium_chain

    if end is not None and end < start:
        fail(f"--to {end} is before --from {start}", 2)
    _, store = open_consortium_chain(root)
    try:
        out = sys.stdout.buffer
        for block in store.iter_blocks(start, None if end is None else end + 1):
            out.write(block_line(block))
        out.flush()
    finally:
        store.close()


@consortium.command("status")
@dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def consortium_status(root: Path, as_json: bool) -> None:
    """Height, members, each institution's last final anchor, and equivocation evidence.

    The chain is verified first, and every evidence record is checked (both signed
    headers) before it is shown: a record that is not evidence fails the command
    as tampering.
    """
    report, policy = verify_consortium_store(root)
    state = policy.state
    evidence = [e.to_json() for e in verified_evidence(root, policy)]
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


# -- membership changes: propose, sign, submit --------------------------------------------
#
# A membership transaction needs a quorum of current members' signatures. It
# travels between institutions as a file (public: ids, keys, certificates);
# each member checks it against its own view of the consortium and adds its
# signature; any member then submits it to the ordering service.

#: A membership transaction is a few KiB (a certificate, a few signatures).
MAX_MEMBERSHIP_TX_BYTES = 64 * 1024

_tx_option = click.option(
    "--tx",
    "tx_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The membership transaction file (JSON).",
)


def _signing_key(root: Path) -> Any:
    from medledger.cli.common import read_passphrase
    from medledger.config import NodePaths
    from medledger.storage.keystore import FileKeyStore

    passphrase = read_passphrase(confirm=False)
    return FileKeyStore.open(NodePaths(root=root).keystore, passphrase).signing_key()


def _read_membership_tx(path: Path) -> Any:
    """The membership transaction in ``path``, read as hostile input."""
    from medledger.core.errors import InvalidInput
    from medledger.core.models import Transaction
    from medledger.core.transactions import CONSORTIUM_BODIES, MEMBER_TYPES

    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_MEMBERSHIP_TX_BYTES + 1)
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_MEMBERSHIP_TX_BYTES:
        raise InvalidInput(f"{path}: larger than {MAX_MEMBERSHIP_TX_BYTES} bytes")
    try:
        document = json.loads(data, parse_constant=_no_constant)
        tx = Transaction.from_json(document)
    except (ValueError, InvalidInput) as exc:
        raise InvalidInput(f"{path}: not a transaction ({exc})") from None
    if tx.type not in MEMBER_TYPES:
        raise InvalidInput(f"{path}: a {tx.type!r} transaction is not a membership change")
    if not CONSORTIUM_BODIES[tx.type].allows(set(tx.body)):
        raise InvalidInput(f"{path}: the {tx.type} body has other fields than its type allows")
    return tx


def _checked_against_state(root: Path, tx: Any) -> Any:
    """``tx`` checked against this node's final view of the consortium; returns that state."""
    from medledger.core.errors import InvalidInput

    report, policy = verify_consortium_store(root)
    if tx.chain != report.chain:
        raise InvalidInput(f"the transaction is for {tx.chain!r}, this node is in {report.chain!r}")
    # Everything but the signatures: what every member would refuse, refused here too.
    policy.state.copy().check(tx, verify_signatures=False)
    return policy.state


def _write_tx(path: Path, tx: Any) -> None:
    from medledger.core.encoding import canonical_bytes
    from medledger.storage.keystore import atomic_write

    atomic_write(path, canonical_bytes(tx.to_json()) + b"\n", mode=0o644)


def _describe(tx: Any, state: Any) -> str:
    signers = state.members.quorum_signers(tx.signing_bytes(), tx.signatures)
    body = tx.body
    what = {
        "member.tls": lambda: f"new TLS certificate for {body['id']}",
        "member.remove": lambda: f"remove {body['id']}",
        "member.add": lambda: f"add {body['member'].get('id')!r}",
        "member.rotate": lambda: f"new keys for {body['id']}",
    }[tx.type]()
    return (
        f"{tx.type} ({what}): {len(signers)} of {state.members.quorum} signatures needed"
        f" ({', '.join(sorted(signers)) or 'none'}); tx {tx.hash().hex()}"
    )


@consortium.command("propose-tls")
@dir_option
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the proposed transaction (to pass to the other members).",
)
def consortium_propose_tls(root: Path, out: Path) -> None:
    """Propose this node's renewed TLS certificate (``node tls-cert --renew``) to the consortium.

    Writes a ``member.tls`` transaction carrying the new certificate, signed by
    this member. The other members check and sign it (``consortium sign``);
    once it has a quorum, one submits it (``consortium submit``). The node
    keeps its current certificate until the change is final, then switches to
    the new one without a restart.
    """
    from dataclasses import replace

    from medledger.config import NodePaths, load_config
    from medledger.core.models import Transaction
    from medledger.core.transactions import MEMBER_TLS
    from medledger.services.tls import load_certificate

    paths = NodePaths(root=root)
    if not paths.tls_next_cert.exists() or not paths.tls_next_key.exists():
        fail(f"{root} has no renewed certificate: run 'medledger node tls-cert --renew' first")
    cert = load_certificate(paths.tls_next_cert)
    institution = load_config(root).institution
    report, _ = verify_consortium_store(root)
    tx = Transaction(
        type=MEMBER_TLS,
        chain=report.chain,
        body={"id": institution, "tls_cert": cert.hex()},
        time_ms=SystemClock().now_ms(),
    )
    tx = replace(tx, signatures=(_signing_key(root).sign(tx.signing_bytes()),))
    state = _checked_against_state(root, tx)
    _write_tx(out, tx)
    click.echo(f"new certificate fingerprint {cert.fingerprint}")
    click.echo(_describe(tx, state))


@consortium.command("sign")
@dir_option
@_tx_option
def consortium_sign(root: Path, tx_path: Path) -> None:
    """Check a proposed membership transaction and add this member's signature to the file.

    It is checked against this node's final view of the consortium (chain,
    body, members) before anything is signed; compare the printed description
    and transaction hash with the proposer's over a second channel.
    """
    from dataclasses import replace

    tx = _read_membership_tx(tx_path)
    state = _checked_against_state(root, tx)
    key = _signing_key(root)
    if any(sig.signer == key.fingerprint for sig in tx.signatures):
        click.echo("already signed by this member")
    else:
        tx = replace(tx, signatures=(*tx.signatures, key.sign(tx.signing_bytes())))
        _write_tx(tx_path, tx)
    click.echo(_describe(tx, state))


@consortium.command("submit")
@dir_option
@_tx_option
def consortium_submit(root: Path, tx_path: Path) -> None:
    """Submit a membership transaction with a quorum of signatures to the ordering service.

    No passphrase: the transaction carries its signatures. Refused here (and by
    every member) without a quorum of current members' valid signatures. The
    change applies once final; ``consortium status`` shows the members.
    """
    import asyncio

    from medledger.config import load_config
    from medledger.core.encoding import canonical_bytes
    from medledger.core.errors import InvalidSignature
    from medledger.ledger.consortium.messages import MSG_TX
    from medledger.node import open_orderer

    tx = _read_membership_tx(tx_path)
    state = _checked_against_state(root, tx)
    signers = state.members.quorum_signers(tx.signing_bytes(), tx.signatures)
    if len(signers) < state.members.quorum:
        raise InvalidSignature(
            f"{tx.type} needs {state.members.quorum} member signatures, has {len(signers)}"
        )
    config = load_config(root)
    envelope = canonical_bytes({"kind": MSG_TX, "tx": tx.to_json()})

    async def publish() -> int:
        orderer = await open_orderer(config, root)
        try:
            return await orderer.publish(f"tx-{tx.hash().hex()}", envelope)
        finally:
            await orderer.close()

    sequence = asyncio.run(publish())
    click.echo(f"submitted {tx.type} as ordered message {sequence}; tx {tx.hash().hex()}")
