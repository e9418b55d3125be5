"""The link between API worker processes and the node's sequencer (decision 0035).

With ``node start --workers N`` the parent process is the **sequencer**: the
one writer of the private chain and of the record index. API workers seal
versions (encryption, blob writes) and hand them over, with their access
entries, through a Unix socket in the node's owner-only directory:

* a frame is a 4-byte big-endian length and one JSON object; a frame
  longer than :data:`MAX_FRAME_BYTES` closes the connection;
* the sequencer accepts a connection only from a process of its own user
  (``SO_PEERCRED``) or, on TCP between the hosts of one institution
  (:meth:`SequencerServer.start_tcp`, decision 0050), only over mutual TLS
  from a peer presenting the institution's own certificate; and only four
  requests: ``submit_groups`` (groups of ``access`` transactions, each group
  atomic and answered on its own: what a worker queued while its previous frame
  was in flight, decision 0059), ``submit`` (one such group), ``commit``
  (``record.put`` transactions with their index rows, checked by
  ``RecordWriter.commit_sealed``) and ``spend`` (one failed authentication
  charged to the node's budgets, ``api.auth``: the answer is the wait in
  milliseconds, 0 while there is budget left);
* every answer comes after the durable commit (or the failure): an
  acknowledgement still means durable. A connection that ends with requests in
  flight fails them with :class:`SequencerUnavailable` (HTTP 503) — their
  outcome is unknown to the worker, and recovery is the sequencer's business.

:class:`SequencerClient` is the worker's side: it stands in for the private
chain (``RecordChain``: reads come straight from the chain store) and for the
record commit (``VersionCommitter``), and reconnects on the next request once
the sequencer is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from medledger.core.errors import (
    Conflict,
    DamagedStore,
    Deposed,
    InvalidInput,
    MedledgerError,
    NotFound,
    PreconditionFailed,
    RetryableStorageError,
    SequencerUnavailable,
    StaleKeys,
    StorageError,
    StorageFull,
    WriteRaced,
)
from medledger.core.models import BlockHeader, Receipt, Transaction
from medledger.core.transactions import ACCESS
from medledger.ledger.private import PrivateChain
from medledger.services.access import AccessEntry
from medledger.services.records.model import SealedCommit, SealedWrite
from medledger.services.records.service import RecordsService
from medledger.storage.ports import ChainStore, VersionRow

__all__ = [
    "MAX_FRAME_BYTES",
    "SOCKET_NAME",
    "SequencerClient",
    "SequencerServer",
    "peer_uid",
    "tcp_dialer",
    "read_frame",
    "write_frame",
]

log = logging.getLogger(__name__)

#: The sequencer's socket, inside the node directory (0700).
SOCKET_NAME = "sequencer.sock"
#: The largest frame either side reads; a longer one ends the connection.
MAX_FRAME_BYTES = 8 * 1024 * 1024
_LENGTH = struct.Struct(">I")
#: The most transactions a worker puts in one ``submit_groups`` frame (a group larger
#: than this goes alone): ~700 bytes per access entry keeps a frame far below the cap.
MAX_FRAME_TXS = 4096
#: Errors that cross the link, by the name the answer carries (anything else: StorageError).
_ERRORS: dict[str, type[MedledgerError]] = {
    cls.__name__: cls
    for cls in (
        InvalidInput,
        NotFound,
        Conflict,
        PreconditionFailed,
        WriteRaced,
        StaleKeys,
        StorageError,
        StorageFull,
        RetryableStorageError,
        SequencerUnavailable,
        Deposed,
        DamagedStore,
    )
}
#: What a worker or standby calls to open its connection to the sequencer.
Dial = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class FrameError(MedledgerError):
    """A frame that is too long or not a JSON object: the connection is ended."""


# -- frames --------------------------------------------------------------------------------


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next frame's object, or None at the end of the stream (between frames).

    Raises :class:`FrameError` for an oversized or malformed frame and
    ``asyncio.IncompleteReadError`` for a stream cut inside one.
    """
    try:
        head = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    (size,) = _LENGTH.unpack(head)
    if size > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {size} bytes; the limit is {MAX_FRAME_BYTES}")
    try:
        value = orjson.loads(await reader.readexactly(size))
    except orjson.JSONDecodeError:
        raise FrameError("a frame is not JSON") from None
    if not isinstance(value, dict):
        raise FrameError("a frame is not a JSON object")
    return value


def write_frame(writer: asyncio.StreamWriter, value: dict[str, Any]) -> None:
    """Queue ``value`` as one frame (the caller drains).

    Plain JSON (orjson), not the canonical encoding: a frame is never hashed or
    signed, and the receiver checks what it carries (a transaction is re-encoded
    canonically before it reaches a chain); canonical encoding in Python cost a
    worker ~4 % of a read's CPU. :class:`InvalidInput` for a value JSON cannot hold.
    """
    try:
        data = orjson.dumps(value)
    except TypeError as exc:  # orjson.JSONEncodeError: a huge int, a lone surrogate, ...
        raise InvalidInput(f"a frame cannot be encoded as JSON ({exc})") from None
    if len(data) > MAX_FRAME_BYTES:
        raise InvalidInput(f"a frame of {len(data)} bytes is over the link's limit")
    writer.write(_LENGTH.pack(len(data)) + data)


def peer_uid(sock: Any) -> int:
    """The user id of the process at the other end of a Unix socket (``SO_PEERCRED``)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


# -- what crosses the link -----------------------------------------------------------------


def _row_json(row: VersionRow) -> dict[str, Any]:
    return {
        "resource_type": row.resource_type,
        "id": row.id,
        "version": row.version,
        "blob_hash": row.blob_hash.hex(),
        "wrapped_dek": row.wrapped_dek.hex() if row.wrapped_dek is not None else None,
        "kek_id": row.kek_id,
        "patient": row.patient,
        "updated_ms": row.updated_ms,
        "tx_hash": row.tx_hash.hex(),
        "deleted": row.deleted,
    }


def _row_from_json(value: Any) -> VersionRow:
    if not isinstance(value, dict):
        raise InvalidInput("a version row is not an object")
    try:
        wrapped = value["wrapped_dek"]
        return VersionRow(
            resource_type=_text(value["resource_type"]),
            id=_text(value["id"]),
            version=_int(value["version"]),
            blob_hash=bytes.fromhex(_text(value["blob_hash"])),
            wrapped_dek=bytes.fromhex(_text(wrapped)) if wrapped is not None else None,
            kek_id=_text(value["kek_id"]),
            patient=None if value["patient"] is None else _text(value["patient"]),
            updated_ms=_int(value["updated_ms"]),
            tx_hash=bytes.fromhex(_text(value["tx_hash"])),
            deleted=value["deleted"] is True,
        )
    except (KeyError, ValueError) as exc:
        raise InvalidInput(f"a version row is malformed ({type(exc).__name__})") from None


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidInput("expected a string")
    return value


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput("expected an integer")
    return value


def _commit_from_json(value: Any) -> SealedCommit:
    if not isinstance(value, dict):
        raise InvalidInput("a sealed version is not an object")
    tokens = value.get("tokens")
    if not isinstance(tokens, list):
        raise InvalidInput("a sealed version's tokens are not a list")
    try:
        token_set = {bytes.fromhex(_text(t)) for t in tokens}
    except ValueError:
        raise InvalidInput("a search token is not hex") from None
    return SealedCommit(
        row=_row_from_json(value.get("row")),
        tokens=token_set,
        tx=Transaction.from_json(value.get("tx")),
    )


def _receipt_from_json(value: Any) -> Receipt:
    if not isinstance(value, dict):
        raise StorageError("the sequencer's receipt is malformed")
    return Receipt(
        height=_int(value.get("height")),
        index=_int(value.get("index")),
        tx_hash=bytes.fromhex(_text(value.get("tx_hash"))),
    )


def _error_json(exc: MedledgerError) -> dict[str, str]:
    name = next((c.__name__ for c in type(exc).__mro__ if c.__name__ in _ERRORS), "StorageError")
    return {"type": name, "message": str(exc)}


def _error_from_json(value: Any) -> MedledgerError:
    if not isinstance(value, dict):
        return StorageError("the sequencer refused the request")
    cls = _ERRORS.get(str(value.get("type")), StorageError)
    return cls(str(value.get("message", "")))


def _check_access_body(body: dict[str, Any]) -> None:
    """An access entry's body as the node derives it (``AccessEntry``): its fields, each
    of the shape of a derived value. A worker cannot put free text (a name, a request's
    words) on the chain, whatever it sends."""
    if set(body) != _ACCESS_FIELDS or not all(isinstance(v, str) for v in body.values()):
        raise InvalidInput("an access entry's body is not one this node derives")
    AccessEntry(**body)


_ACCESS_FIELDS = frozenset(field.name for field in dataclasses.fields(AccessEntry))


def _access_group(txs: object) -> list[Transaction]:
    """One atomic group a worker submits: access entries only, each as the node derives it."""
    if not isinstance(txs, list) or not txs:
        raise InvalidInput("submit names no transactions")
    parsed = [Transaction.from_json(tx) for tx in txs]
    if any(tx.type != ACCESS or tx.signatures for tx in parsed):
        # Workers write access entries this way; records only through ``commit``.
        raise InvalidInput("a worker submits only access entries")
    for tx in parsed:
        _check_access_body(tx.body)
    return parsed


def _receipts_from_json(value: Any, count: int) -> list[Receipt]:
    """One group's answer in ``submit_groups``: its ``count`` receipts, or its error raised."""
    if not isinstance(value, dict):
        raise StorageError("the sequencer's answer does not match the request")
    if "error" in value:
        raise _error_from_json(value["error"])
    receipts = value.get("receipts")
    if not isinstance(receipts, list) or len(receipts) != count:
        raise StorageError("the sequencer's answer does not match the request")
    return [_receipt_from_json(r) for r in receipts]


def _fresh(exc: MedledgerError) -> MedledgerError:
    """A copy of ``exc`` for one more waiter (one exception object raised in many tasks
    would gather all their tracebacks)."""
    try:
        return type(exc)(str(exc))
    except TypeError:
        return exc


# -- the sequencer's side ------------------------------------------------------------------


class SequencerServer:
    """Serves ``submit`` and ``commit`` to the API workers on ``path`` (module docstring).

    Runs on the event loop of the node it writes for; :meth:`close` stops
    accepting and waits for the requests in flight to be answered.
    """

    def __init__(
        self,
        path: Path,
        *,
        chain: PrivateChain,
        records: RecordsService,
        spend_failures: Callable[[Sequence[str]], int] | None = None,
    ) -> None:
        """``spend_failures``: the node's failed-authentication budgets
        (``api.auth.AuthFailures.spend``); without it ``spend`` is refused."""
        self.path = path
        self._chain = chain
        self._records = records
        self._spend_failures = spend_failures
        self._server: asyncio.Server | None = None
        self._tcp: asyncio.Server | None = None
        #: The one certificate (DER) a TCP peer must present (:meth:`start_tcp`).
        self._peer_certificate: bytes | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._requests: set[asyncio.Task[None]] = set()
        #: Connections refused (another user, or a bad frame): for tests and logs.
        self.refused = 0

    async def start(self) -> None:
        # A socket left by a process that died is only a name: replace it.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.path), limit=MAX_FRAME_BYTES
        )
        self.path.chmod(0o600)

    async def start_tcp(
        self, host: str, port: int, tls: ssl.SSLContext, peer_certificate: bytes
    ) -> tuple[str, int]:
        """Also serve the standby hosts on TCP ``host``:``port`` (0: any free port).

        ``tls`` must require a client certificate (``services.tls.link_contexts``);
        a connection is then served only if that certificate is exactly
        ``peer_certificate`` (DER: the institution's own). Returns the address bound.
        """
        self._peer_certificate = peer_certificate
        self._tcp = await asyncio.start_server(
            self._serve,
            host,
            port,
            ssl=tls,
            ssl_handshake_timeout=10.0,
            limit=MAX_FRAME_BYTES,
        )
        bound = self._tcp.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    def _authentic(self, writer: asyncio.StreamWriter) -> bool:
        """A process of this user on the Unix socket, or this institution over mutual TLS."""
        tls = writer.get_extra_info("ssl_object")
        if tls is not None:
            der = tls.getpeercert(binary_form=True)
            return der is not None and der == self._peer_certificate
        sock = writer.get_extra_info("socket")
        return sock is not None and sock.family == socket.AF_UNIX and peer_uid(sock) == os.getuid()

    async def close(self) -> None:
        """Stop accepting, answer what is in flight, end every connection."""
        if self._tcp is not None:
            self._tcp.close()
        if self._server is not None:
            self._server.close()
        if self._requests:
            await asyncio.gather(*self._requests, return_exceptions=True)
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        if self._tcp is not None:
            await self._tcp.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if not self._authentic(writer):
                self.refused += 1
                log.warning("refused a sequencer connection from another user or host")
                return
            while True:
                try:
                    request = await read_frame(reader)
                except (FrameError, asyncio.IncompleteReadError) as exc:
                    self.refused += 1
                    log.warning("ended a worker connection: %s", type(exc).__name__)
                    return
                if request is None:
                    return
                handler = asyncio.ensure_future(self._answer(request, writer))
                self._requests.add(handler)
                handler.add_done_callback(self._requests.discard)
        except (ConnectionError, OSError):
            return
        finally:
            self._connections.discard(task)
            writer.close()

    async def _answer(self, request: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        rid = request.get("id")
        answer: dict[str, Any] = {"id": rid}
        try:
            answer.update(await self._handle(request))
            answer["ok"] = True
        except MedledgerError as exc:
            answer["ok"] = False
            answer["error"] = _error_json(exc)
        except Exception as exc:  # a bug: the worker must still get its answer
            log.exception("sequencer request failed")
            answer["ok"] = False
            answer["error"] = {"type": "StorageError", "message": type(exc).__name__}
        if writer.is_closing():
            return
        with contextlib.suppress(ConnectionError, OSError):
            write_frame(writer, answer)
            await writer.drain()

    async def _handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """The answer's fields (besides ``id`` and ``ok``) for ``request``."""
        op = request.get("op")
        if op == "spend":
            keys = request.get("keys")
            if self._spend_failures is None or not isinstance(keys, list):
                raise InvalidInput("spend names no budget keys")
            # Checked by the budget itself (AuthFailures.spend): key kinds and lengths.
            return {"wait_ms": self._spend_failures(keys)}
        if op == "submit_groups":
            return {"results": await self._submit_groups(request.get("groups"))}
        receipts = await self._write(op, request)
        return {"receipts": [r.to_json() for r in receipts]}

    async def _submit_groups(self, groups: object) -> list[dict[str, Any]]:
        """Each group of access entries checked and appended on its own (one group's
        refusal or error is its answer alone), all queued together so they share a block."""
        if not isinstance(groups, list) or not groups:
            raise InvalidInput("submit_groups names no groups")
        checked: list[list[Transaction] | MedledgerError] = []
        for group in groups:
            try:
                checked.append(_access_group(group))
            except MedledgerError as exc:
                checked.append(exc)
        valid = [c for c in checked if isinstance(c, list)]
        outcomes = iter(await self._chain.submit_groups(valid) if valid else [])
        answers: list[dict[str, Any]] = []
        for entry in checked:
            outcome = next(outcomes) if isinstance(entry, list) else entry
            if isinstance(outcome, list):
                answers.append({"receipts": [r.to_json() for r in outcome]})
            else:
                answers.append({"error": _error_json(outcome)})
        return answers

    async def _write(self, op: object, request: dict[str, Any]) -> list[Receipt]:
        if op == "submit":
            return await self._chain.submit_many(_access_group(request.get("txs")))
        if op == "commit":
            versions = request.get("versions")
            if not isinstance(versions, list) or not versions:
                raise InvalidInput("commit names no versions")
            sealed = [_commit_from_json(v) for v in versions]
            await self._records.commit_sealed(sealed)
            return []
        raise InvalidInput("unknown request")


# -- the worker's side ---------------------------------------------------------------------


class SequencerClient:
    """The private chain and the record commit, as an API worker sees them.

    ``store`` is the chain store opened for reading; writes go to the
    sequencer at ``path``, or wherever ``dial`` connects (a standby host:
    :func:`tcp_dialer`). :meth:`problem` (a health check) says when the
    sequencer cannot be reached. ``on_stale_keys`` is called when the
    sequencer refused a version sealed under a rotated key.
    """

    def __init__(
        self,
        path: Path,
        *,
        chain_id: str,
        store: ChainStore,
        clock_ms: Callable[[], int],
        on_stale_keys: Callable[[], None] = lambda: None,
        dial: Dial | None = None,
    ) -> None:
        self.path = path
        self._dial = dial
        self._chain_id = chain_id
        self._store = store
        self._clock_ms = clock_ms
        self._on_stale_keys = on_stale_keys
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0
        self._connecting: asyncio.Lock | None = None
        self._listener: asyncio.Task[None] | None = None
        self._problem: str | None = None
        self._closed = False
        #: Access groups waiting for the next ``submit_groups`` frame, and the task that
        #: sends them: one frame in flight at a time (group commit, decision 0059).
        self._outbox: list[tuple[list[dict[str, Any]], asyncio.Future[list[Receipt]]]] = []
        self._sender: asyncio.Task[None] | None = None

    # -- RecordChain -----------------------------------------------------------------------

    @property
    def chain_id(self) -> str:
        return self._chain_id

    @property
    def store(self) -> ChainStore:
        return self._store

    @property
    def head(self) -> BlockHeader:
        """The newest durable block's header, read from the store."""
        head = self._store.head()
        if head is None:
            raise StorageError("the private chain has no blocks")
        return BlockHeader.decode(head.header_bytes)

    @property
    def durable_height(self) -> int:
        return self.head.height

    async def submit(self, tx_type: str, body: dict[str, Any]) -> Receipt:
        tx = Transaction(type=tx_type, chain=self._chain_id, body=body, time_ms=self._clock_ms())
        return (await self.submit_many([tx]))[0]

    async def submit_many(self, txs: Sequence[Transaction]) -> list[Receipt]:
        """Append ``txs`` (access entries) atomically; return once their block is durable.

        Groups submitted while an earlier frame is in flight wait and go together in
        the next ``submit_groups`` frame: one frame, one answer and (usually) one
        block for all of them, instead of one per group. Each group still succeeds or
        fails on its own, and only after the sequencer's durable commit.
        """
        if not txs:
            return []
        if self._closed:
            raise SequencerUnavailable("the worker is stopping")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Receipt]] = loop.create_future()
        self._outbox.append(([tx.to_json() for tx in txs], future))
        if self._sender is None or self._sender.done():
            # Started on the next turn of the loop: every group queued on this turn joins.
            self._sender = loop.create_task(self._send_groups(), name="medledger-access-link")
        return await future

    async def _send_groups(self) -> None:
        """Send what the outbox holds, one frame at a time, until it is empty."""
        batch: list[tuple[list[dict[str, Any]], asyncio.Future[list[Receipt]]]] = []
        try:
            while self._outbox:
                batch, count, taken = [], 0, 0
                for group, future in self._outbox:
                    if batch and count + len(group) > MAX_FRAME_TXS:
                        break
                    taken += 1
                    if future.done():
                        continue  # its request was cancelled: no answer waits for it
                    batch.append((group, future))
                    count += len(group)
                del self._outbox[:taken]
                if not batch:
                    continue
                try:
                    answer = await self._request(
                        {"op": "submit_groups", "groups": [group for group, _ in batch]}
                    )
                    results = answer.get("results")
                    if not isinstance(results, list) or len(results) != len(batch):
                        raise StorageError("the sequencer's answer does not match the request")
                except MedledgerError as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(_fresh(exc))
                    continue
                for (group, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    try:
                        future.set_result(_receipts_from_json(result, len(group)))
                    except MedledgerError as exc:
                        future.set_exception(exc)
        finally:
            # Cancelled (the worker stops) or a bug: nobody may wait for an answer forever.
            for _, future in [*batch, *self._outbox]:
                if not future.done():
                    future.set_exception(
                        SequencerUnavailable("the access entry was not sent; retry the request")
                    )
            if self._closed:
                self._outbox.clear()

    # -- VersionCommitter ------------------------------------------------------------------

    async def commit_versions(self, sealed: Sequence[SealedWrite]) -> None:
        versions = [
            {
                "row": _row_json(v.row),
                "tokens": sorted(t.hex() for t in v.tokens),
                "tx": v.tx.to_json(),
            }
            for v in sealed
        ]
        try:
            await self._request({"op": "commit", "versions": versions})
        except StaleKeys:
            self._on_stale_keys()
            raise

    # -- the node's failure budgets (api.auth.SharedAuthFailures) --------------------------

    async def spend_failures(self, keys: Sequence[str]) -> int:
        """Charge one failed authentication to the node's budgets ``keys``: the wait in
        milliseconds once one is spent, else 0. ``SequencerUnavailable`` if unreachable."""
        answer = await self._request({"op": "spend", "keys": list(keys)})
        wait_ms = answer.get("wait_ms")
        if not isinstance(wait_ms, int) or isinstance(wait_ms, bool) or wait_ms < 0:
            raise StorageError("the sequencer's answer does not match the request")
        return wait_ms

    # -- the connection --------------------------------------------------------------------

    def problem(self) -> str | None:
        """Why writes fail now (the sequencer is unreachable), or None."""
        return self._problem

    async def probe(self) -> None:
        """Connect now if not connected, so that :meth:`problem` tells the truth before the
        next write (a standby's ``/readyz``); a failure only sets the problem."""
        if self._closed:
            return
        with contextlib.suppress(SequencerUnavailable):
            await self._connect()

    async def _request(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._closed:
            raise SequencerUnavailable("the worker is stopping")
        writer = await self._connect()
        self._next_id += 1
        rid = self._next_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            write_frame(writer, {**request, "id": rid})
            await writer.drain()
        except (ConnectionError, OSError):
            self._pending.pop(rid, None)
            self._lost("the connection to the sequencer broke")
            raise SequencerUnavailable(
                "the node's sequencer is unavailable; retry the request"
            ) from None
        try:
            answer = await future
        finally:
            self._pending.pop(rid, None)
        if answer.get("ok") is True:
            return answer
        raise _error_from_json(answer.get("error"))

    async def _connect(self) -> asyncio.StreamWriter:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            try:
                if self._dial is not None:
                    reader, writer = await self._dial()
                else:
                    reader, writer = await asyncio.open_unix_connection(
                        str(self.path), limit=MAX_FRAME_BYTES
                    )
            except (OSError, TimeoutError, SequencerUnavailable):
                self._problem = "the node's sequencer cannot be reached"
                raise SequencerUnavailable(
                    "the node's sequencer is unavailable; retry the request"
                ) from None
            self._reader, self._writer = reader, writer
            self._problem = None
            self._listener = asyncio.ensure_future(self._listen(reader))
            return writer

    async def _listen(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                answer = await read_frame(reader)
                if answer is None:
                    break
                future = self._pending.get(answer.get("id"))  # type: ignore[arg-type]
                if future is not None and not future.done():
                    future.set_result(answer)
        except (FrameError, asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        self._lost("the sequencer closed the connection")

    def _lost(self, why: str) -> None:
        """Fail every request in flight: whether it was committed is not known here."""
        if self._writer is not None:
            self._writer.close()
        self._writer = self._reader = None
        if not self._closed:
            self._problem = "the node's sequencer cannot be reached"
        if self._pending:
            log.warning("%s with %d requests in flight", why, len(self._pending))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(
                    SequencerUnavailable(
                        "the node's sequencer went away during the write; it may or may not"
                        " have been committed"
                    )
                )
        self._pending.clear()

    async def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.close()
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener


def tcp_dialer(
    address: Callable[[], str | None],
    tls: ssl.SSLContext,
    peer_certificate: bytes,
    *,
    timeout_s: float = 5.0,
) -> Dial:
    """Connect to the active sequencer at ``address()`` (``host:port``) over mutual TLS.

    ``tls`` trusts the institution's own certificate alone (``link_contexts``) and the
    answer must come from exactly ``peer_certificate``; otherwise, or when no address
    is published, or the connection takes over ``timeout_s``: :class:`SequencerUnavailable`.
    """

    async def dial() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        where = address()
        if not where:
            raise SequencerUnavailable("no active sequencer has published its address yet")
        host, _, port = where.rpartition(":")
        if not port.isdigit():
            raise SequencerUnavailable("the published sequencer address is not host:port")
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port), ssl=tls, limit=MAX_FRAME_BYTES),
            timeout_s,
        )
        tls_object = writer.get_extra_info("ssl_object")
        der = tls_object.getpeercert(binary_form=True) if tls_object is not None else None
        if der != peer_certificate:
            # Not this institution: no orderly TLS shutdown, which would wait on the peer's
            # answer (up to asyncio's 30 s) and outlive this call. The socket is closed
            # before the refusal is raised, so a refused dial leaves nothing open.
            writer.transport.abort()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
            raise SequencerUnavailable("the sequencer link's peer is not this institution")
        return reader, writer

    return dial
