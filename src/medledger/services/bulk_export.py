"""FHIR Bulk Data export (Bulk Data Access IG v2): jobs, encrypted NDJSON files, expiry.

A kick-off makes a *job*: a directory ``exports/<job id>/`` in the node's
directory holding ``job.json`` (its state; no PHI) and, once it ran, one
encrypted NDJSON file per resource type. Jobs run one after another on a
supervised background task; every chunk of resources is selected, decrypted
and re-encrypted in a worker thread, so the event loop stays free.

Encryption at rest: each job has a fresh 256-bit key, wrapped under the
institution's current KEK exactly as a record's data key is
(``core.envelope.wrap_key``, bound to a hash of the job id). A file is a
sequence of frames ``length (4, big endian) || nonce (12) || AES-256-GCM``
whose associated data binds the job, the file name, the frame's index and
whether it is the last: frames cannot be moved between files or jobs,
reordered, or dropped at the end without the download failing. The job's
parameters (the request URL, the patient a patient token is bound to, the
Group) are sealed under the same key. Files are decrypted only while a
download streams them.

Files go away when every one was downloaded, when the job expires
(``ttl_ms`` after it finished; the sweep runs at start and on a supervised
task), or when the client cancels (DELETE). A job found unfinished at start
(the node stopped meanwhile) runs again from the beginning; one whose key
cannot be unwrapped any more (the KEK was rotated away) completes with an
error file saying so: its status URL never fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import struct
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medledger.core.encoding import canonical_bytes
from medledger.core.envelope import unwrap_key, wrap_key
from medledger.core.errors import (
    Gone,
    IntegrityError,
    InvalidInput,
    KeyStoreError,
    NotFound,
    RateLimited,
)
from medledger.ledger.clock import Clock
from medledger.ledger.supervision import Health, SupervisedTask
from medledger.services.access import AccessEntry, AccessLog
from medledger.services.fhir import dump_resource
from medledger.services.keys import InstitutionKeys
from medledger.services.records.model import StoredResource, instant
from medledger.services.records.service import RecordsService
from medledger.storage.durable_files import fsync_dir, write_all
from medledger.storage.keystore import atomic_write
from medledger.storage.ports import VersionRow

__all__ = [
    "DEFAULT_TTL_S",
    "MAX_JOBS_PER_NODE",
    "MAX_JOBS_PER_TOKEN",
    "BulkExports",
    "ExportFile",
    "ExportJob",
    "ExportFileWriter",
    "ExportSpec",
    "read_export_file",
]

log = logging.getLogger(__name__)

#: How long a finished job's files are kept when not all were downloaded.
DEFAULT_TTL_S = 3600.0
#: Unfinished (queued or running) jobs one token may have, and the node as a whole.
MAX_JOBS_PER_TOKEN = 2
MAX_JOBS_PER_NODE = 4
#: Resources decrypted and re-encrypted per worker-thread step (and per file frame).
CHUNK = 200
_QUEUED, _RUNNING, _COMPLETE, _CANCELLED = "queued", "running", "complete", "cancelled"
_JOB_FILE = "job.json"
_JOB_ID_BYTES = 16
_FRAME_HEADER = struct.Struct(">I")
#: A frame holds one chunk: at most CHUNK resources of at most a few MB each.
_MAX_FRAME = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportSpec:
    """What a kick-off asked for (sealed in ``job.json``: ids may be PHI).

    ``level``: ``system``, ``patient`` or ``group``. ``patient``: the one
    patient a patient token may export (only resources about that patient).
    ``group``: the Group whose member Patients are exported.
    """

    level: str
    request: str
    types: tuple[str, ...] | None = None
    since_ms: int | None = None
    group: str | None = None
    patient: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "request": self.request,
            "types": None if self.types is None else list(self.types),
            "since_ms": self.since_ms,
            "group": self.group,
            "patient": self.patient,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportSpec:
        types = data.get("types")
        return cls(
            level=str(data["level"]),
            request=str(data["request"]),
            types=None if types is None else tuple(str(t) for t in types),
            since_ms=data.get("since_ms"),
            group=data.get("group"),
            patient=data.get("patient"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportFile:
    """One NDJSON file of a finished job: its resource type, name and line count."""

    type: str
    name: str
    count: int


@dataclass(slots=True, kw_only=True)
class ExportJob:
    """A job's state as kept in ``job.json`` (no PHI: ids, times, counts, sealed bytes)."""

    id: str
    owner: str
    actor: str
    state: str
    created_ms: int
    kek_id: str
    #: The kick-off URL (path and query: types, a date, a Group id; never a patient's).
    request: str
    wrapped_key: bytes = field(repr=False)
    sealed_spec: bytes = field(repr=False)
    transaction_ms: int | None = None
    finished_ms: int | None = None
    outputs: list[ExportFile] = field(default_factory=list)
    errors: list[ExportFile] = field(default_factory=list)
    downloaded: list[str] = field(default_factory=list)
    done: int = 0
    total: int = 0

    @property
    def unfinished(self) -> bool:
        return self.state in (_QUEUED, _RUNNING)

    @property
    def complete(self) -> bool:
        return self.state == _COMPLETE

    def progress(self) -> str:
        """``X-Progress``: where a running job is (counts only)."""
        if self.state == _QUEUED:
            return "queued"
        return f"exported {self.done} of {self.total} resources"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": 1,
            "id": self.id,
            "owner": self.owner,
            "actor": self.actor,
            "state": self.state,
            "created_ms": self.created_ms,
            "kek_id": self.kek_id,
            "request": self.request,
            "wrapped_key": self.wrapped_key.hex(),
            "sealed_spec": self.sealed_spec.hex(),
            "transaction_ms": self.transaction_ms,
            "finished_ms": self.finished_ms,
            "outputs": [_file_json(f) for f in self.outputs],
            "errors": [_file_json(f) for f in self.errors],
            "downloaded": list(self.downloaded),
            "done": self.done,
            "total": self.total,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportJob:
        return cls(
            id=str(data["id"]),
            owner=str(data["owner"]),
            actor=str(data["actor"]),
            state=str(data["state"]),
            created_ms=int(data["created_ms"]),
            kek_id=str(data["kek_id"]),
            request=str(data["request"]),
            wrapped_key=bytes.fromhex(data["wrapped_key"]),
            sealed_spec=bytes.fromhex(data["sealed_spec"]),
            transaction_ms=data.get("transaction_ms"),
            finished_ms=data.get("finished_ms"),
            outputs=[ExportFile(**f) for f in data.get("outputs", [])],
            errors=[ExportFile(**f) for f in data.get("errors", [])],
            downloaded=[str(n) for n in data.get("downloaded", [])],
            done=int(data.get("done", 0)),
            total=int(data.get("total", 0)),
        )


def _file_json(f: ExportFile) -> dict[str, Any]:
    return {"type": f.type, "name": f.name, "count": f.count}


def _key_binding(job_id: str) -> bytes:
    """What a job key's wrapping is bound to (``wrap_key``'s blob-hash slot)."""
    return hashlib.sha256(f"medledger-export:{job_id}".encode()).digest()


def _frame_aad(job_id: str, name: str, index: int, last: bool) -> bytes:
    return canonical_bytes({"job": job_id, "file": name, "frame": index, "last": last})


def _spec_aad(job_id: str) -> bytes:
    return canonical_bytes({"job": job_id, "spec": True})


def _valid_job_id(job_id: str) -> bool:
    return len(job_id) == 2 * _JOB_ID_BYTES and all(c in "0123456789abcdef" for c in job_id)


class ExportFileWriter:
    """Appends encrypted frames to one export file (blocking; a worker thread calls it)."""

    def __init__(self, path: Path, key: bytes, job_id: str) -> None:
        self._aead = AESGCM(key)
        self._job_id = job_id
        self._name = path.name
        self._index = 0
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def write(self, plaintext: bytes, *, last: bool = False) -> None:
        nonce = os.urandom(12)
        aad = _frame_aad(self._job_id, self._name, self._index, last)
        sealed = nonce + self._aead.encrypt(nonce, plaintext, aad)
        data = _FRAME_HEADER.pack(len(sealed)) + sealed
        write_all(self._fd, data)
        self._index += 1

    def close(self) -> None:
        """The final (empty) frame, then flushed to disk."""
        try:
            self.write(b"", last=True)
            os.fsync(self._fd)
        finally:
            os.close(self._fd)

    def abandon(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def read_export_file(path: Path, key: bytes, job_id: str) -> Iterator[bytes]:
    """The plaintext of each frame, in order; :class:`IntegrityError` on any alteration."""
    aead = AESGCM(key)
    with path.open("rb") as f:
        index = 0
        while True:
            header = f.read(_FRAME_HEADER.size)
            if len(header) != _FRAME_HEADER.size:
                raise IntegrityError("the export file is truncated")
            (size,) = _FRAME_HEADER.unpack(header)
            if not 28 <= size <= _MAX_FRAME:
                raise IntegrityError("the export file is damaged")
            sealed = f.read(size)
            if len(sealed) != size:
                raise IntegrityError("the export file is truncated")
            for last in (False, True):
                try:
                    plain = aead.decrypt(
                        sealed[:12], sealed[12:], _frame_aad(job_id, path.name, index, last)
                    )
                except InvalidTag:
                    continue
                if last:
                    if f.read(1):
                        raise IntegrityError("the export file has data after its end")
                    return
                yield plain
                break
            else:
                raise IntegrityError("the export file does not authenticate")
            index += 1


class BulkExports:
    """The node's bulk export jobs (see the module docstring).

    ``root``: the ``exports`` directory (created owner-only). ``ttl_ms``: how
    long a finished job's files are kept. ``sweep_interval_s``: how often the
    expiry sweep runs.
    """

    def __init__(
        self,
        *,
        root: Path,
        institution: str,
        records: RecordsService,
        keys: InstitutionKeys,
        access: AccessLog,
        clock: Clock,
        ttl_ms: int = int(DEFAULT_TTL_S * 1000),
        sweep_interval_s: float = 60.0,
    ) -> None:
        self._root = root
        self._institution = institution
        self._records = records
        self._keys = keys
        self._access = access
        self._clock = clock
        self.ttl_ms = ttl_ms
        self._sweep_interval_s = sweep_interval_s
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._jobs: dict[str, ExportJob] = {}
        self._cancelled: set[str] = set()
        self._downloading: dict[str, int] = {}
        self.worker = SupervisedTask("bulk-export", self._work)
        self.sweeper = SupervisedTask("bulk-export-sweep", self._sweep_forever)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, health: Health) -> None:
        """Load the jobs on disk (resuming unfinished ones), sweep, start the tasks."""
        await asyncio.to_thread(self._root.mkdir, mode=0o700, exist_ok=True)
        for job in await asyncio.to_thread(self._load_all):
            self._jobs[job.id] = job
            if job.unfinished:
                log.info("bulk export job resumes after a restart")
                job.state = _QUEUED
                self._queue.put_nowait(job.id)
        await self.sweep()
        health.watch(self.worker)
        health.watch(self.sweeper)
        self.worker.start()
        self.sweeper.start()

    async def close(self) -> None:
        """Stop the tasks; an unfinished job stays on disk and resumes at the next start."""
        await self.sweeper.close()
        await self.worker.close()

    def _load_all(self) -> list[ExportJob]:
        jobs = []
        for entry in sorted(self._root.iterdir()):
            if not entry.is_dir() or not _valid_job_id(entry.name):
                continue
            try:
                text = (entry / _JOB_FILE).read_text(encoding="utf-8")
            except FileNotFoundError:
                text = ""  # a job whose kick-off never finished: nothing was acknowledged
            except OSError:
                # A read error may pass (EIO, EMFILE): keep the job for the next start
                # rather than delete what was acknowledged.
                log.warning("a bulk export job directory could not be read; kept for later")
                continue
            try:
                job = ExportJob.from_json(json.loads(text))
                if job.id != entry.name:
                    raise ValueError("job id differs from its directory")
            except (ValueError, KeyError, TypeError):
                # Derived data only (the records stay in the store): a job whose state
                # cannot be read is removed rather than served half-known.
                log.warning("removing an unreadable bulk export job directory")
                shutil.rmtree(entry, ignore_errors=True)
                continue
            jobs.append(job)
        return jobs

    # -- kick-off, status, cancel -----------------------------------------------------------

    def submit(self, spec: ExportSpec, *, owner: str, actor: str) -> ExportJob:
        """Accept a job (queued); :class:`RateLimited` past the concurrent-job bounds."""
        unfinished = [j for j in self._jobs.values() if j.unfinished]
        if sum(j.owner == owner for j in unfinished) >= MAX_JOBS_PER_TOKEN:
            raise RateLimited(
                f"this token has {MAX_JOBS_PER_TOKEN} bulk exports in progress; "
                "wait for one to finish or cancel it",
                retry_after_ms=30_000,
            )
        if len(unfinished) >= MAX_JOBS_PER_NODE:
            raise RateLimited(
                f"the node runs {MAX_JOBS_PER_NODE} bulk exports already; retry later",
                retry_after_ms=60_000,
            )
        job_id = secrets.token_hex(_JOB_ID_BYTES)
        key = os.urandom(32)
        kek_id, kek = self._keys.current_kek()
        nonce = os.urandom(12)
        sealed = nonce + AESGCM(key).encrypt(
            nonce, canonical_bytes(spec.to_json()), _spec_aad(job_id)
        )
        job = ExportJob(
            id=job_id,
            owner=owner,
            actor=actor,
            state=_QUEUED,
            created_ms=self._clock.now_ms(),
            kek_id=kek_id,
            request=spec.request,
            wrapped_key=wrap_key(kek, os.urandom(12), key, _key_binding(job_id)),
            sealed_spec=sealed,
        )
        (self._root / job_id).mkdir(mode=0o700)
        self._save(job)
        # The 202 is an acknowledgement: the job directory's own entry must be on disk
        # too (``_save`` syncs the directory the job file is in, not the one above it).
        fsync_dir(self._root)
        self._jobs[job_id] = job
        self._queue.put_nowait(job_id)
        return job

    def job(self, job_id: str, owner: str) -> ExportJob:
        """The job, if ``owner`` started it; :class:`NotFound` otherwise (whether or not it
        exists: a job id is no oracle for another token)."""
        job = self._jobs.get(job_id)
        if job is None or not secrets.compare_digest(job.owner, owner):
            raise NotFound("no such bulk export job for this token")
        return job

    def spec(self, job: ExportJob) -> ExportSpec:
        """The job's parameters, unsealed."""
        key = self._job_key(job)
        try:
            plain = AESGCM(key).decrypt(
                job.sealed_spec[:12], job.sealed_spec[12:], _spec_aad(job.id)
            )
        except InvalidTag:
            raise IntegrityError("the export job's parameters do not authenticate") from None
        return ExportSpec.from_json(json.loads(plain))

    async def cancel(self, job_id: str, owner: str) -> None:
        """Cancel the job (a running one stops at its next chunk) and remove its files."""
        job = self.job(job_id, owner)
        self._cancelled.add(job.id)
        job.state = _CANCELLED
        await self._remove(job.id)

    # -- download ---------------------------------------------------------------------------

    async def download(self, job_id: str, owner: str, name: str) -> AsyncIterator[bytes]:
        """The plaintext NDJSON of one file, decrypted frame by frame in a worker thread.

        Checked before the first byte (owner, file, key); once every file of the
        job was downloaded to its end, the job's files are removed.
        """
        job = self.job(job_id, owner)
        files = {f.name: f for f in (*job.outputs, *job.errors)}
        if not job.complete or name not in files:
            raise NotFound("no such file in this bulk export")
        key = self._job_key(job)
        frames = read_export_file(self._root / job.id / name, key, job.id)
        # The first frame before any byte is sent: a damaged file is an error response.
        try:
            first = await asyncio.to_thread(_next_frame, frames)
        except FileNotFoundError:
            # Cancelled or expired between the look-up and the read.
            raise NotFound("no such file in this bulk export") from None
        self._downloading[job.id] = self._downloading.get(job.id, 0) + 1

        async def stream() -> AsyncIterator[bytes]:
            try:
                chunk = first
                while chunk is not None:
                    yield chunk
                    chunk = await asyncio.to_thread(_next_frame, frames)
                if name not in job.downloaded:
                    job.downloaded.append(name)
                    if set(job.downloaded) >= set(files):
                        await self._remove(job.id)
                    else:
                        await asyncio.to_thread(self._save, job)
            finally:
                self._downloading[job.id] -= 1

        return stream()

    def _job_key(self, job: ExportJob) -> bytes:
        try:
            kek = self._keys.kek(job.kek_id)
            return unwrap_key(kek, job.wrapped_key, _key_binding(job.id))
        except (KeyStoreError, IntegrityError):
            raise Gone(
                "this export's key is no longer available (the node's key was rotated); "
                "start a new export"
            ) from None

    # -- expiry -----------------------------------------------------------------------------

    async def sweep(self) -> int:
        """Remove every finished job older than the TTL and every cancelled one; returns how many."""
        now = self._clock.now_ms()
        expired = [
            j.id
            for j in self._jobs.values()
            if j.state == _CANCELLED
            or (j.finished_ms is not None and now - j.finished_ms >= self.ttl_ms)
        ]
        for job_id in expired:
            if not self._downloading.get(job_id):
                await self._remove(job_id)
        return len(expired)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            await self.sweep()

    async def _remove(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        await asyncio.to_thread(shutil.rmtree, self._root / job_id, True)

    def _save(self, job: ExportJob) -> None:
        atomic_write(self._root / job.id / _JOB_FILE, json.dumps(job.to_json()).encode())

    # -- running ----------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            job_id = await self._queue.get()
            job = self._jobs.get(job_id)
            if job is None or job_id in self._cancelled or not job.unfinished:
                continue
            try:
                await self._run(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if job_id in self._cancelled:
                    continue  # its directory went away under it: nothing to report
                # The job ends with an error file; the status URL reports it, never fails.
                log.warning("bulk export job failed: %s", type(exc).__name__)
                await self._fail(job, "the export failed: " + _reason(exc), self._key_or_none(job))

    async def _run(self, job: ExportJob) -> None:
        try:
            key = self._job_key(job)
            spec = self.spec(job)
        except (Gone, IntegrityError) as exc:
            await self._fail(job, str(exc), None)
            return
        folder = self._root / job.id
        await asyncio.to_thread(_clear_outputs, folder)
        job.state, job.done, job.outputs, job.errors = _RUNNING, 0, [], []
        job.transaction_ms = self._clock.now_ms()
        await asyncio.to_thread(self._save, job)
        rows = await self._select(spec)
        job.total = len(rows)
        by_type: dict[str, list[VersionRow]] = {}
        for row in rows:
            by_type.setdefault(row.resource_type, []).append(row)
        for rtype in sorted(by_type):
            name = f"{rtype}.ndjson"
            writer = await asyncio.to_thread(ExportFileWriter, folder / name, key, job.id)
            count, closed = 0, False
            try:
                typed = by_type[rtype]
                for at in range(0, len(typed), CHUNK):
                    if job.id in self._cancelled:
                        return
                    opened = await asyncio.to_thread(self._open, typed[at : at + CHUNK])
                    if opened:
                        lines = b"".join(s.data + b"\n" for s in opened)
                        await asyncio.to_thread(writer.write, lines)
                        await self._access.record_many([self._entry(job, s) for s in opened])
                    count += len(opened)
                    job.done += len(typed[at : at + CHUNK])
                await asyncio.to_thread(writer.close)
                closed = True
            finally:
                if not closed:
                    writer.abandon()
            job.outputs.append(ExportFile(type=rtype, name=name, count=count))
        if job.id in self._cancelled:
            return
        job.state, job.finished_ms = _COMPLETE, self._clock.now_ms()
        await asyncio.to_thread(self._save, job)

    def _key_or_none(self, job: ExportJob) -> bytes | None:
        try:
            return self._job_key(job)
        except Gone:
            return None

    async def _fail(self, job: ExportJob, reason: str, key: bytes | None) -> None:
        """Complete ``job`` with one error file holding an OperationOutcome (no PHI).

        ``key``: the job's key, or ``None`` when it is lost (a fresh one seals the
        error file, and the job's parameters, which nothing can open any more, go).
        """
        folder = self._root / job.id
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "fatal", "code": "exception", "diagnostics": reason}],
        }

        def write() -> None:
            _clear_outputs(folder)
            sealing = key
            if sealing is None:
                # The error file holds no PHI; it is sealed all the same, so that every
                # file of an export has one format.
                sealing = os.urandom(32)
                kek_id, kek = self._keys.current_kek()
                job.kek_id = kek_id
                job.wrapped_key = wrap_key(kek, os.urandom(12), sealing, _key_binding(job.id))
                job.sealed_spec = b""
            writer = ExportFileWriter(folder / "OperationOutcome.ndjson", sealing, job.id)
            writer.write(dump_resource(outcome) + b"\n")
            writer.close()
            job.outputs = []
            job.errors = [
                ExportFile(type="OperationOutcome", name="OperationOutcome.ndjson", count=1)
            ]
            job.state, job.finished_ms = _COMPLETE, self._clock.now_ms()
            job.transaction_ms = job.transaction_ms or job.created_ms
            self._save(job)

        await asyncio.to_thread(write)

    def _open(self, rows: Sequence[VersionRow]) -> list[StoredResource]:
        """Decrypt ``rows``; one erased or deleted since it was selected is left out."""
        out = []
        for row in rows:
            try:
                out.append(self._records.reader.open(row))
            except (NotFound, Gone):
                continue
        return out

    async def _select(self, spec: ExportSpec) -> list[VersionRow]:
        """The latest live rows the export holds, by type and id (index only)."""
        records = self._records
        if spec.level == "system":
            return await records.latest_rows(spec.types, spec.since_ms)
        if spec.patient is not None:
            patients = [spec.patient]
        elif spec.level == "group":
            assert spec.group is not None
            patients = await self._group_members(spec.group)
        else:
            patients = [r.id for r in await records.latest_rows(("Patient",))]
        rows = await records.compartment(patients, spec.types)
        if spec.patient is not None:
            # A patient token: only what is about its patient (the keyed pseudonym decides).
            own = records.patient_pseudonym(spec.patient)
            rows = [r for r in rows if r.patient == own]
        if spec.since_ms is not None:
            rows = [r for r in rows if r.updated_ms >= spec.since_ms]
        return sorted(rows, key=lambda r: (r.resource_type, r.id))

    async def _group_members(self, group_id: str) -> list[str]:
        """The ids of the Patients the Group's ``member.entity`` names (local references)."""
        group = (await self._records.read("Group", group_id)).resource()
        members: list[str] = []
        for member in group.get("member") or []:
            entity = member.get("entity") if isinstance(member, dict) else None
            ref = entity.get("reference") if isinstance(entity, dict) else None
            if isinstance(ref, str) and ref.startswith("Patient/") and ref.count("/") == 1:
                members.append(ref.removeprefix("Patient/"))
        return list(dict.fromkeys(members))

    def _entry(self, job: ExportJob, stored: StoredResource) -> AccessEntry:
        return AccessEntry(
            reader=self._institution,
            holder=self._institution,
            patient=stored.patient or "",
            consent="",
            resource=f"{stored.resource_type}:{self._records.record_ref(stored.resource_type, stored.id)}",
            outcome="allowed",
            actor=job.actor,
        )

    def manifest(self, job: ExportJob, base: str) -> dict[str, Any]:
        """The completion manifest (Bulk Data IG v2) with absolute file URLs under ``base``."""

        def item(f: ExportFile) -> dict[str, Any]:
            return {"type": f.type, "url": f"{base}/{job.id}/{f.name}", "count": f.count}

        return {
            "transactionTime": instant(job.transaction_ms or job.created_ms),
            "request": job.request,
            "requiresAccessToken": True,
            "output": [item(f) for f in job.outputs],
            "error": [item(f) for f in job.errors],
        }


def _next_frame(frames: Iterator[bytes]) -> bytes | None:
    return next(frames, None)


def _clear_outputs(folder: Path) -> None:
    """Remove a job's files (not its state): a job that runs again starts from nothing."""
    for path in folder.iterdir():
        if path.name != _JOB_FILE:
            path.unlink(missing_ok=True)


def _reason(exc: BaseException) -> str:
    """A fixed phrase per kind of failure (an error's text may quote stored data)."""
    if isinstance(exc, (NotFound, Gone)):
        return "a resource it names does not exist (any more)"
    if isinstance(exc, InvalidInput):
        return "the request could not be served"
    return type(exc).__name__
