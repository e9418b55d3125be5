"""``medledger record`` and ``medledger keys``: FHIR records and key rotation on a node.

These commands unlock the node's keystore (``MEDLEDGER_PASSPHRASE`` or a
prompt). Input is a JSON file or ``-`` for standard input; invalid FHIR is
refused with one line naming where the problem is, and nothing is written.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from medledger.cli.common import dir_option, emit, fail, read_passphrase
from medledger.core.errors import InvalidInput

if TYPE_CHECKING:
    # Imported where used: `import medledger.cli` and `--help` must not pay for the node
    # (aiohttp, FHIR models); only the command that runs does.
    from medledger.node import Node
    from medledger.services.records.model import StoredResource

__all__ = ["keys", "record", "searchset"]

T = TypeVar("T")


def _run(root: Path, action: Callable[[Node], Awaitable[T]]) -> T:
    from medledger.node import open_node

    passphrase = read_passphrase(confirm=False)

    async def go() -> T:
        node = open_node(root, passphrase)
        try:
            return await action(node)
        finally:
            await node.close()

    return asyncio.run(go())


def _read_input(source: str) -> Any:
    from medledger.services.fhir import MAX_BODY_BYTES, load_json

    if source == "-":
        data = sys.stdin.buffer.read(MAX_BODY_BYTES + 1)
    else:
        try:
            with Path(source).open("rb") as f:
                data = f.read(MAX_BODY_BYTES + 1)
        except OSError as exc:
            fail(f"cannot read {source}: {exc.strerror}")
    return load_json(data)


def _reference(text: str) -> tuple[str, str]:
    rtype, sep, rid = text.partition("/")
    if not sep or not rtype or not rid or "/" in rid:
        raise InvalidInput(f"expected TYPE/ID (e.g. Patient/123), got {text!r}")
    return rtype, rid


def _summary(stored: StoredResource) -> dict[str, Any]:
    return {
        "resourceType": stored.resource_type,
        "id": stored.id,
        "versionId": str(stored.version),
        "lastUpdated": stored.last_updated,
        "tx_hash": stored.tx_hash.hex(),
    }


def searchset(found: list[StoredResource]) -> dict[str, Any]:
    """A FHIR searchset Bundle of ``found``."""
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(found),
        "entry": [
            {
                "fullUrl": f"{s.resource_type}/{s.id}",
                "resource": s.resource(),
                "search": {"mode": "match"},
            }
            for s in found
        ],
    }


@click.group()
def record() -> None:
    """Write, read, search and erase FHIR R4 records (encrypted, on the private chain)."""


@record.command("put")
@dir_option
@click.argument("source", default="-")
def record_put(root: Path, source: str) -> None:
    """Store a resource from SOURCE (a file, or - for stdin).

    A resource with an ``id`` updates (or creates) that id; without one a new id
    is assigned. A ``transaction`` Bundle is applied all-or-nothing.
    """
    resource = _read_input(source)

    async def put(node: Node) -> dict[str, Any]:
        if isinstance(resource, dict) and resource.get("resourceType") == "Bundle":
            return await node.records.transaction(resource)
        if isinstance(resource, dict) and "id" in resource:
            stored, _ = await node.records.update(
                str(resource.get("resourceType")), str(resource["id"]), resource
            )
            return _summary(stored)
        return _summary(await node.records.create(resource))

    emit(_run(root, put))


@record.command("get")
@dir_option
@click.argument("reference")
@click.option("--version", type=click.IntRange(min=1), default=None, help="A specific version.")
def record_get(root: Path, reference: str, version: int | None) -> None:
    """Print the resource REFERENCE (TYPE/ID) exactly as stored."""
    rtype, rid = _reference(reference)

    async def get(node: Node) -> bytes:
        if version is None:
            return (await node.records.read(rtype, rid)).data
        return (await node.records.vread(rtype, rid, version)).data

    sys.stdout.buffer.write(_run(root, get) + b"\n")


@record.command("history")
@dir_option
@click.argument("reference")
def record_history(root: Path, reference: str) -> None:
    """List every version of REFERENCE (TYPE/ID), newest first."""
    rtype, rid = _reference(reference)

    async def history(node: Node) -> list[dict[str, Any]]:
        return [
            {
                "versionId": str(v.version),
                "lastUpdated": v.last_updated,
                "status": "erased" if v.stored is None else "stored",
            }
            for v in await node.records.history(rtype, rid)
        ]

    emit(_run(root, history))


@record.command("search")
@dir_option
@click.argument("resource_type")
@click.argument("params", nargs=-1)
def record_search(root: Path, resource_type: str, params: tuple[str, ...]) -> None:
    """Search RESOURCE_TYPE with FHIR parameters, e.g. ``patient=123 date=ge2020-01-01``."""
    query: dict[str, list[str]] = {}
    for p in params:
        name, sep, value = p.partition("=")
        if not sep or not name:
            raise InvalidInput(f"search parameters are name=value, got {p!r}")
        query.setdefault(name, []).append(value)

    async def search(node: Node) -> dict[str, Any]:
        return searchset(await node.records.search(resource_type, query))

    emit(_run(root, search))


@record.command("reindex")
@dir_option
def record_reindex(root: Path) -> None:
    """Rebuild every record's search tokens with this release's search terms.

    Needed once after an upgrade whose search terms changed (a running node
    does it by itself at start; ``/readyz`` shows ``search_index``). The node
    must be stopped. Resumes where a stopped re-index left off; prints how
    many records were re-indexed and the terms version now recorded.
    """

    async def reindex(node: Node) -> dict[str, Any]:
        report = await node.records.reindex()
        return {
            "reindexed": report.reindexed,
            "damaged": report.damaged,
            "terms_version": report.terms_version,
        }

    emit(_run(root, reindex))


@record.command("erase")
@dir_option
@click.argument("reference", required=False)
@click.option("--patient", default=None, help="Erase this patient and every record about them.")
def record_erase(root: Path, reference: str | None, patient: str | None) -> None:
    """Crypto-shred REFERENCE (TYPE/ID), or everything of --patient ID."""
    if (reference is None) == (patient is None):
        fail("give exactly one of REFERENCE or --patient", 2)

    async def erase(node: Node) -> dict[str, Any]:
        if patient is not None:
            return {"erased_resources": await node.records.erase_patient(patient)}
        rtype, rid = _reference(str(reference))
        return {"erased_versions": await node.records.erase(rtype, rid)}

    emit(_run(root, erase))


@click.group()
def keys() -> None:
    """Manage the node's keys."""


@keys.command("rotate")
@dir_option
def keys_rotate(root: Path) -> None:
    """Create a new key-encryption key, re-wrap every data key, destroy the old key."""

    async def rotate(node: Node) -> dict[str, Any]:
        return await node.records.rotate_kek()

    emit(_run(root, rotate))
