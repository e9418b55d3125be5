"""The ``medledger`` command line.

Every command reports a failure as one line on stderr (``error: …``) and a
non-zero exit status, never a traceback: 1 for errors, 2 for usage errors,
3 when verification finds tampering.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

from medledger.core.errors import MedledgerError, VerificationError
from medledger.core.hashing import hash_from_hex
from medledger.core.merkle import leaf_hash
from medledger.core.models import Block, BlockHeader, Transaction
from medledger.ledger.proofs import consistency_proof, head_header, inclusion_proof, root_at
from medledger.ledger.verify import parse_checkpoint, verify_chain
from medledger.node import init_node, open_chain
from medledger.storage.ports import ChainStore, StoredBlock

__all__ = ["main", "cli"]

EXIT_ERROR = 1
EXIT_TAMPERED = 3
PASSPHRASE_ENV = "MEDLEDGER_PASSPHRASE"  # noqa: S105 - the variable name, not a secret

_dir_option = click.option(
    "--dir",
    "root",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The node directory.",
)


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def read_passphrase(*, confirm: bool) -> bytes:
    """The keystore passphrase from ``MEDLEDGER_PASSPHRASE`` or an interactive prompt."""
    value = os.environ.get(PASSPHRASE_ENV)
    if value is None:
        if not sys.stdin.isatty():
            _fail(f"no passphrase: set {PASSPHRASE_ENV} or run in a terminal")
        value = click.prompt("Keystore passphrase", hide_input=True, confirmation_prompt=confirm)
    if not value:
        _fail("the passphrase must not be empty")
    return value.encode("utf-8")


@contextmanager
def _chain(root: Path) -> Iterator[tuple[Any, ChainStore]]:
    config, store = open_chain(root)
    try:
        yield config, store
    finally:
        store.close()


def stored_block_json(block: StoredBlock) -> dict[str, Any]:
    """The export JSON of a stored block (the same shape as :meth:`Block.to_json`)."""
    return Block(
        header=BlockHeader.decode(block.header_bytes),
        signatures=block.signatures,
        txs=tuple(Transaction.decode(d) for d in block.tx_data),
    ).to_json()


def _emit(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="medledger")
def cli() -> None:
    """medledger: secure health-information storage on a hybrid blockchain."""


# -- node ---------------------------------------------------------------------------


@cli.group()
def node() -> None:
    """Create and inspect an institution node."""


@node.command("init")
@_dir_option
@click.option("--name", required=True, help="Institution display name, e.g. 'St. Mary Hospital'.")
@click.option(
    "--id", "institution", default=None, help="Institution id (default: derived from the name)."
)
def node_init(root: Path, name: str, institution: str | None) -> None:
    """Create keys, configuration and the private chain's genesis block in DIR."""
    passphrase = read_passphrase(confirm=True)
    config = init_node(root, name=name, passphrase=passphrase, institution=institution)
    click.echo(f"created node {config.institution!r} ({config.name}) in {root}")
    click.echo(f"chain:   {config.chain}")
    click.echo(f"signing key fingerprint: {config.signing_key.fingerprint}")


@node.command("show")
@_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def node_show(root: Path, as_json: bool) -> None:
    """Show the node's identity and public keys (no passphrase needed)."""
    from medledger.config import load_config

    config = load_config(root)
    info = {
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
    if as_json:
        _emit(info)
        return
    click.echo(f"name:        {config.name}")
    click.echo(f"institution: {config.institution}")
    click.echo(f"chain:       {config.chain}")
    click.echo(f"signing key: ecdsa-p256-sha256, fingerprint {config.signing_key.fingerprint}")
    click.echo(config.signing_key.pem().rstrip())


# -- chain ----------------------------------------------------------------------------


@cli.group()
def chain() -> None:
    """Read the private chain: head, blocks, proofs."""


@chain.command("show")
@_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def chain_show(root: Path, as_json: bool) -> None:
    """Show the chain head."""
    with _chain(root) as (_, store):
        header = head_header(store)
        data = store.head_header_bytes()
        assert data is not None
        from medledger.core.hashing import sha256

        info = {**header.to_json(), "hash": sha256(data).hex()}
    if as_json:
        _emit(info)
        return
    for k in ("chain", "height", "hash", "log_size", "log_root", "time_ms", "proposer"):
        click.echo(f"{k + ':':<10}{info[k]}")


@chain.command("export")
@_dir_option
@click.option("--from", "start", type=click.IntRange(min=0), default=0, help="First height.")
@click.option(
    "--to", "end", type=click.IntRange(min=0), default=None, help="Last height (inclusive)."
)
def chain_export(root: Path, start: int, end: int | None) -> None:
    """Print blocks as JSON lines: {header, hash, signatures, txs}."""
    if end is not None and end < start:
        _fail(f"--to {end} is before --from {start}", 2)
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
@_dir_option
@click.option(
    "--index", type=click.IntRange(min=0), default=None, help="Log index of the transaction."
)
@click.option("--tx", "tx_hash", default=None, help="Transaction hash (hex) instead of --index.")
@click.option("--size", type=click.IntRange(min=1), default=None, help="Log size (default: head).")
def proof_inclusion(root: Path, index: int | None, tx_hash: str | None, size: int | None) -> None:
    """Prove a transaction is in the log of SIZE."""
    if (index is None) == (tx_hash is None):
        _fail("give exactly one of --index or --tx", 2)
    with _chain(root) as (_, store):
        if tx_hash is not None:
            _, index = store.tx_location(hash_from_hex(tx_hash, "--tx"))
        assert index is not None
        size = size if size is not None else head_header(store).log_size
        proof = inclusion_proof(store, index, size)
        data = store.tx_data(index)
        from medledger.core.hashing import sha256

        _emit(
            {
                "index": index,
                "size": size,
                "tx_hash": sha256(data).hex(),
                "leaf_hash": leaf_hash(data).hex(),
                "root": root_at(store, size).hex(),
                "proof": [h.hex() for h in proof],
            }
        )


@chain_proof.command("consistency")
@_dir_option
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
        new_size = new_size if new_size is not None else head_header(store).log_size
        proof = consistency_proof(store, old_size, new_size)
        _emit(
            {
                "old_size": old_size,
                "new_size": new_size,
                "old_root": root_at(store, old_size).hex(),
                "new_root": root_at(store, new_size).hex(),
                "proof": [h.hex() for h in proof],
            }
        )


# -- verify ---------------------------------------------------------------------------


@cli.command()
@_dir_option
@click.option(
    "--anchor",
    "anchors",
    multiple=True,
    metavar="SIZE:ROOT",
    help="A previously published log size and root the chain must be consistent with (repeatable).",
)
def verify(root: Path, anchors: tuple[str, ...]) -> None:
    """Re-derive and check every block, signature, root and proof node of the chain."""
    checkpoints = [parse_checkpoint(a) for a in anchors]
    with _chain(root) as (config, store):
        total = head_header(store).log_size
        with _progress("verifying", total) as advance:
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


@contextmanager
def _progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on an interactive stderr; silent otherwise."""
    if not sys.stderr.isatty():
        yield lambda _done: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done: bar.update(task, completed=done)


# -- bench & demo -----------------------------------------------------------------------


@cli.group()
def bench() -> None:
    """Benchmarks; results go to docs/benchmarks.md style tables and JSON."""


@bench.command("private")
@click.option(
    "--dir",
    "root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory for the benchmark chains (default: a temporary directory).",
)
@click.option(
    "--txs",
    type=click.IntRange(min=100),
    default=200_000,
    show_default=True,
    help="Transactions for the throughput run.",
)
@click.option("--writers", type=click.IntRange(min=1), default=256, show_default=True)
@click.option(
    "--rate",
    type=click.IntRange(min=1),
    default=2_000,
    show_default=True,
    help="Offered load (tx/s) for the latency run.",
)
@click.option(
    "--proof-log",
    type=click.IntRange(min=0),
    default=1_000_000,
    show_default=True,
    help="Log size for the proof and full-verify run (0 to skip).",
)
@click.option(
    "--json-out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write results as JSON here.",
)
@click.option("--quick", is_flag=True, help="Small sizes: a smoke run in seconds.")
def bench_private(
    root: Path | None,
    txs: int,
    writers: int,
    rate: int,
    proof_log: int,
    json_out: Path | None,
    quick: bool,
) -> None:
    """Private-chain throughput, latency, proofs and verify; group commit vs one fsync per tx."""
    from medledger.benchmarks.private import run_private_bench

    run_private_bench(
        root=root,
        txs=txs,
        writers=writers,
        rate=rate,
        proof_log=proof_log,
        json_out=json_out,
        quick=quick,
    )


@cli.command()
@click.option(
    "--dir",
    "root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the demo's node here (default: a temporary directory, removed after).",
)
def demo(root: Path | None) -> None:
    """Run the guided story: concurrent writes, proofs, and tampering caught by verify."""
    from medledger.demo import run_demo

    run_demo(root)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning every expected failure into one line and an exit code."""
    try:
        cli.main(args=argv, prog_name="medledger", standalone_mode=False)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except VerificationError as exc:
        _fail(f"verification FAILED: {exc}", EXIT_TAMPERED)
    except MedledgerError as exc:
        _fail(str(exc))
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except OSError as exc:
        _fail(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}")
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    sys.exit(0)


if __name__ == "__main__":
    main()
