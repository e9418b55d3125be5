"""``medledger node start`` (the HTTP node service) and ``medledger token`` (API tokens)."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from medledger.cli.common import dir_option, emit, number_option, read_passphrase
from medledger.core.errors import InvalidInput
from medledger.ledger.clock import SystemClock
from medledger.storage.ports import ROLES

if TYPE_CHECKING:
    from medledger.storage.ports import TokenStore

__all__ = ["JsonLogFormatter", "start", "token"]


def _tokens(root: Path) -> TokenStore:
    from medledger.stores import open_token_store

    return open_token_store(root)  # load_config: a clear error if ROOT is not a node


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message``, ``fields``.

    ``fields`` holds ``extra={"fields": {...}}`` of the call. No PHI: medledger
    logs no resource bodies, names or identifiers; as a second line of defence
    FHIR ids in paths and query strings are masked, and an exception is logged
    by its type only (its text could quote input).
    """

    _PATH_ID = re.compile(r"(/fhir/[A-Za-z]+)/[^\s/?\"']+")
    _QUERY = re.compile(r"\?[^\s\"']*")

    def format(self, record: logging.LogRecord) -> str:
        message = self._QUERY.sub("?…", self._PATH_ID.sub(r"\1/…", record.getMessage()))
        doc: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
            "fields": getattr(record, "fields", {}),
        }
        if record.exc_info and record.exc_info[0] is not None:
            doc["fields"] = {**doc["fields"], "exception": record.exc_info[0].__name__}
        return json.dumps(doc, ensure_ascii=False, default=str)


def _structured_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


@click.command("start")
@dir_option
@click.option(
    "--host",
    default=None,
    help="Address to listen on [default: the host of node.toml's advertise URL, else 127.0.0.1].",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Port to listen on [default: the port of node.toml's advertise URL, else 8700].",
)
@number_option(
    "--head-timeout",
    low=0.1,
    default=10.0,
    help="Seconds a client has to send a request's line and headers.",
)
@number_option(
    "--body-timeout",
    low=0.1,
    default=30.0,
    help="Seconds a client has to send a request's body after its headers.",
)
@number_option(
    "--idle-timeout", low=1, default=5, help="Seconds an idle keep-alive connection is kept open."
)
@number_option(
    "--max-head-bytes",
    low=1024,
    default=16 * 1024,
    help="Largest request line plus headers accepted (larger: 431).",
)
@click.option(
    "--plain-http",
    is_flag=True,
    help="Development only: serve plain HTTP instead of HTTPS. Refused unless --host is a "
    "loopback address; members with pinned certificates cannot share with such a node.",
)
@click.option(
    "--full-check",
    is_flag=True,
    help="Re-derive every block of the private chain at start (default: the newest ones).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="API worker processes sharing the listening socket [default: the cores this "
    "process may run on]; 1 serves everything in this process. See docs/decisions/0035.",
)
@click.option(
    "--sequencer-link",
    "sequencer_link",
    default=None,
    metavar="HOST:PORT",
    help="With a PostgreSQL store: where this host's sequencer link listens while it is the "
    "active host, an address the institution's other hosts reach [default: 127.0.0.1:0, "
    "one machine]. See docs/deploy.md, 'One institution on several hosts'.",
)
@click.option(
    "--passphrase-fd",
    "passphrase_fd",
    type=click.IntRange(min=0),
    default=None,
    help="Read the keystore passphrase from this open file descriptor (e.g. a pipe), "
    "instead of MEDLEDGER_PASSPHRASE or a prompt.",
)
def start(
    root: Path,
    host: str | None,
    port: int | None,
    head_timeout: float,
    body_timeout: float,
    idle_timeout: int,
    max_head_bytes: int,
    plain_http: bool,
    full_check: bool,
    workers: int | None,
    sequencer_link: str | None,
    passphrase_fd: int | None,
) -> None:
    """Serve the node's FHIR API (/fhir), chain API (/chain), OpenAPI (/docs), /metrics.

    With a genesis (genesis.json) and a [consortium] section in node.toml (or
    MEDLEDGER_ORDERING), the node joins the consortium and anchors its private
    chain; /readyz answers 503 until it has caught up with the ordered stream.
    Logs are JSON lines on stderr. Connections that do not send their request
    in time are closed (408); oversized request heads are refused (431).

    HTTPS with the node's certificate (tls.crt, tls.key; TLS 1.2 minimum, 1.3
    preferred); a client certificate is optional, but one that is not a current
    member's fails the handshake, and /peer/v1 requires the signer's own.
    ``--plain-http`` (development) serves plain HTTP on a loopback address only.

    By default one API worker process per core (``--workers N``; 1 serves
    everything in this process): this process binds the socket and writes the
    chains (the sequencer); the workers serve the requests, and one that dies
    is restarted (docs/decisions/0035). /metrics and the failed-authentication
    budget are the whole node's (docs/decisions/0047).

    With a PostgreSQL store, hosts sharing the institution's database elect one
    active sequencer through a PostgreSQL lease; the others serve as standbys
    (reads; writes through the active host's link) and one takes over when the
    active host dies (docs/decisions/0050).

    The node refuses to start (exit 1, one ``error:`` line) when its chain
    store fails the start-up check: damaged, or behind what the record index
    or its own final anchor saw committed (docs/reliability.md, "Repair").
    Once caught up with the consortium it checks the chain again against the
    anchor learnt from the ordered stream, and stops (exit 1) if it is behind.
    """
    import asyncio

    from medledger.api.failover import DEFAULT_LINK, parse_link_address
    from medledger.api.server import HttpLimits
    from medledger.api.serving import NodeServer
    from medledger.lifecycle import RunSettings
    from medledger.node import export_ttl, scrub_settings
    from medledger.services.tls import is_loopback

    host, port = _listen_address(root, host, port)
    if plain_http and not is_loopback(host):
        # Bearer tokens and FHIR bodies would cross the network in cleartext.
        raise InvalidInput(f"--plain-http is for loopback addresses only, not {host!r}")
    parse_link_address(sequencer_link or DEFAULT_LINK)  # a bad address: one error line now
    limits = HttpLimits(
        head_timeout_s=head_timeout,
        body_timeout_s=body_timeout,
        idle_timeout_s=idle_timeout,
        max_head_bytes=max_head_bytes,
    )

    # Read, then wiped from this process's environment: children (validation
    # workers) need no passphrase, and /proc/<pid>/environ must not show it.
    passphrase = read_passphrase(confirm=False, fd=passphrase_fd)
    # Request paths and queries can carry identifiers: uvicorn's access log stays off.
    _structured_logging()

    scrub_interval, scrub_rate = scrub_settings()
    server = NodeServer(
        root=root,
        passphrase=passphrase,
        settings=RunSettings(
            full_check=full_check,
            scrub_interval_s=scrub_interval,
            scrub_rate=scrub_rate,
            export_ttl_s=export_ttl(),
        ),
        host=host,
        port=port,
        limits=limits,
        plain_http=plain_http,
        workers=workers if workers is not None else machine_cores(),
        sequencer_link=sequencer_link or DEFAULT_LINK,
    )
    server.prefork()  # with workers: before any thread or event loop exists in this process
    try:
        import uvloop  # libuv's event loop: a faster HTTP service, same asyncio semantics
    except ImportError:  # e.g. Windows
        asyncio.run(server.serve())
    else:
        uvloop.run(server.serve())


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's), at least 1.

    ``node start``'s default number of API workers: one event loop per core. The
    affinity rather than ``os.cpu_count()``, so that a node confined to a few cores
    of a large machine (taskset, a container's cpuset) does not start a worker for
    each of the machine's cores.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _listen_address(root: Path, host: str | None, port: int | None) -> tuple[str, int]:
    """``--host``/``--port``, else the advertised address (``node init --advertise``), else loopback."""
    from medledger.config import load_config, parse_advertise

    advertise = load_config(root).advertise
    if advertise:
        _, advertised_host, advertised_port = parse_advertise(advertise)
        return host or advertised_host, port or advertised_port
    return host or "127.0.0.1", port or 8700


@click.group()
def token() -> None:
    """Create, list and revoke API bearer tokens."""


@token.command("create")
@dir_option
@click.option("--role", type=click.Choice(ROLES), required=True)
@click.option("--patient", default=None, help="The patient id a patient token is bound to.")
@click.option("--label", default="", help="Who or what the token is for.")
@click.option(
    "--ttl-hours",
    type=click.FloatRange(min=0.001),
    default=None,
    help="Expire after this many hours (default: never).",
)
def token_create(
    root: Path, role: str, patient: str | None, label: str, ttl_hours: float | None
) -> None:
    """Issue a token; it is printed once and stored only as a hash."""
    store = _tokens(root)
    try:
        text, info = store.create(
            role=role,
            patient=patient,
            label=label,
            now_ms=SystemClock().now_ms(),
            ttl_ms=None if ttl_hours is None else int(ttl_hours * 3.6e6),
        )
    finally:
        store.close()
    emit(
        {
            "token": text,
            "id": info.id,
            "role": info.role,
            "patient": info.patient,
            "expires_ms": info.expires_ms,
        }
    )


@token.command("list")
@dir_option
def token_list(root: Path) -> None:
    """List tokens (ids and roles, never the secrets)."""
    store = _tokens(root)
    try:
        emit(
            [
                {
                    "id": t.id,
                    "role": t.role,
                    "patient": t.patient,
                    "label": t.label,
                    "expires_ms": t.expires_ms,
                    "revoked": t.revoked,
                }
                for t in store.list()
            ]
        )
    finally:
        store.close()


@token.command("revoke")
@dir_option
@click.argument("token_id")
def token_revoke(root: Path, token_id: str) -> None:
    """Revoke a token by its id; requests with it are refused from now on."""
    store = _tokens(root)
    try:
        store.revoke(token_id)
    finally:
        store.close()
    emit({"revoked": token_id})
