"""Bulk Data export over HTTP: kick-off, poll, download, files gone; encryption at rest;
owner-only status and files; cancel; expiry; the concurrent-job bound; resume after restart."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import LiveServer, assert_outcome, put_json, start_server, stop_server

from medledger.lifecycle import RunSettings
from medledger.services.bulk_export import MAX_JOBS_PER_NODE, MAX_JOBS_PER_TOKEN
from medledger.synthetic import generate_patients

Resource = dict[str, Any]
ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}
#: A family name that exists only in this module's data: PHI whose plaintext is searched for.
SECRET_NAME = "Quixotebulkexportovna"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """This module's own node: its expiry sweep runs every 0.2 s."""
    server = start_server(
        tmp_path_factory.mktemp("bulk") / "node", settings=RunSettings(export_sweep_s=0.2)
    )
    try:
        yield server
    finally:
        stop_server(server)


class Data:
    def __init__(self) -> None:
        self.people = generate_patients(2, seed=77, start_index=80, resources_per_patient=12)
        self.people[0].patient["name"] = [{"family": SECRET_NAME, "given": ["Ana"]}]
        self.doctor = {"resourceType": "Practitioner", "id": "bx-doc", "name": [{"family": "D"}]}
        self.group = {
            "resourceType": "Group",
            "id": "bx-group",
            "type": "person",
            "actual": True,
            "member": [{"entity": {"reference": f"Patient/{self.people[1].patient_id}"}}],
        }
        self.loaded = [self.doctor, *(r for p in self.people for r in p.all_resources())]
        self.loaded.append(self.group)

    def of_patient(self, index: int) -> dict[str, set[str]]:
        """Oracle: type -> ids of the resources about that patient (it, and what names it)."""
        person = self.people[index]
        ref = f"Patient/{person.patient_id}"
        out: dict[str, set[str]] = {}
        for r in person.all_resources():
            named = r["resourceType"] == "Patient" or ref in json.dumps(r)
            if named:
                out.setdefault(r["resourceType"], set()).add(r["id"])
        return out


@pytest.fixture(scope="module")
def data(live: LiveServer) -> Data:
    d = Data()
    with live.client(live.clinician) as client:
        for r in d.loaded:
            response = put_json(client, f"/fhir/{r['resourceType']}/{r['id']}", r)
            assert response.status_code in (200, 201), response.text
    return d


def _kick_off(client: httpx.Client, path: str, **params: str) -> str:
    response = client.get(path, params=params, headers=ASYNC)
    assert response.status_code == 202, response.text
    status_url = response.headers["Content-Location"]
    assert status_url.startswith("http://127.0.0.1:")
    return status_url


def _manifest(client: httpx.Client, status_url: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        response = client.get(status_url)
        if response.status_code == 200:
            assert response.headers["content-type"].startswith("application/json")
            assert "Expires" in response.headers
            manifest: dict[str, Any] = response.json()
            return manifest
        assert response.status_code == 202, response.text
        assert response.headers["X-Progress"] and response.headers["Retry-After"]
        assert time.monotonic() < deadline, "the export did not finish within 60 s"
        time.sleep(0.05)


def _download(client: httpx.Client, url: str) -> list[Resource]:
    response = client.get(url, headers={"Accept": "application/fhir+ndjson"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+ndjson")
    return [json.loads(line) for line in response.text.splitlines() if line]


def _job_dirs(live: LiveServer) -> list[Path]:
    root = live.root / "exports"
    return [p for p in root.iterdir() if p.is_dir()] if root.exists() else []


def _wait_gone(live: LiveServer, job_id: str) -> None:
    deadline = time.monotonic() + 30
    while (live.root / "exports" / job_id).exists():
        assert time.monotonic() < deadline, "the job's files were not removed"
        time.sleep(0.05)


def test_kick_off_poll_download_and_the_files_are_gone(live: LiveServer, data: Data) -> None:
    before = len(live.access_entries())
    with live.client(live.clinician) as client:
        status_url = _kick_off(
            client, "/fhir/Patient/$export", _outputFormat="application/fhir+ndjson"
        )
        manifest = _manifest(client, status_url)
        assert manifest["requiresAccessToken"] is True
        assert manifest["request"].endswith(
            "/fhir/Patient/$export?_outputFormat=application%2Ffhir%2Bndjson"
        )
        assert manifest["transactionTime"].endswith("Z") and manifest["error"] == []
        expected: dict[str, set[str]] = {}
        for index in range(2):
            for rtype, ids in data.of_patient(index).items():
                expected.setdefault(rtype, set()).update(ids)
        expected.setdefault("Group", set()).add("bx-group")  # its member is a patient
        assert {o["type"]: o["count"] for o in manifest["output"]} == {
            t: len(ids) for t, ids in expected.items()
        }
        job_id = status_url.rsplit("/", 1)[1]
        assert (live.root / "exports" / job_id).is_dir()
        by_id = {(r["resourceType"], r["id"]): r for r in data.loaded}
        for output in manifest["output"]:
            lines = _download(client, output["url"])
            assert {r["id"] for r in lines} == expected[output["type"]]
            for r in lines:
                assert r["resourceType"] == output["type"]
                source = by_id[(r["resourceType"], r["id"])]
                assert {k: v for k, v in r.items() if k != "meta"} == {
                    k: v for k, v in source.items() if k != "meta"
                }
        # Every file downloaded: the job and its files are gone.
        _wait_gone(live, job_id)
        assert_outcome(client.get(status_url), 404)
    # Each exported resource is an allowed access entry by this clinician.
    entries = [e for e in live.access_entries()[before:] if e["outcome"] == "allowed"]
    exported = {live.node.records.record_ref(t, i) for t, ids in expected.items() for i in ids}
    assert exported <= {e["resource"].split(":", 1)[1] for e in entries}
    assert {e["actor"] for e in entries} == {f"clinician:{_token_id(live.clinician)}"}
    patient_a = live.node.records.patient_pseudonym(data.people[0].patient_id)
    assert any(e["patient"] == patient_a for e in entries)


def _token_id(token: str) -> str:
    return token.split("_")[1]


def test_export_files_are_encrypted_at_rest(live: LiveServer, data: Data) -> None:
    token = live.token("patient", patient=data.people[0].patient_id)
    with live.client(token) as client:
        status_url = _kick_off(client, "/fhir/Patient/$export")
        manifest = _manifest(client, status_url)
        job_dir = live.root / "exports" / status_url.rsplit("/", 1)[1]
        assert len(list(job_dir.iterdir())) > 1  # job.json and the files
        secret = SECRET_NAME.encode()
        for path in live.root.rglob("*"):
            if path.is_file():
                assert secret not in path.read_bytes(), f"{path} holds the name in plaintext"
        # The patient token got its own records only, the name among them.
        own = data.of_patient(0)
        patient_file = next(o["url"] for o in manifest["output"] if o["type"] == "Patient")
        (patient,) = _download(client, patient_file)
        assert patient["name"][0]["family"] == SECRET_NAME
        for output in manifest["output"]:
            if output["type"] != "Patient":
                assert {r["id"] for r in _download(client, output["url"])} == own[output["type"]]
        assert {o["type"] for o in manifest["output"]} == set(own)


def test_only_the_token_that_started_a_job_sees_it(live: LiveServer, data: Data) -> None:
    with live.client(live.clinician) as client:
        status_url = _kick_off(client, "/fhir/Group/bx-group/$export", _type="Patient")
        manifest = _manifest(client, status_url)
    (output,) = manifest["output"]
    assert output["count"] == 1
    job_id = status_url.rsplit("/", 1)[1]
    other_clinician = live.token("clinician")
    for token in (other_clinician, live.token("patient", patient=data.people[1].patient_id)):
        with live.client(token) as other:
            assert_outcome(other.get(status_url), 404)
            assert_outcome(other.get(output["url"]), 404)
            assert_outcome(other.delete(status_url), 404)
    with live.client() as anonymous:
        assert_outcome(anonymous.get(output["url"]), 401)
    with live.client(live.auditor) as auditor:
        assert_outcome(auditor.get(status_url), 403)
    assert (live.root / "exports" / job_id).is_dir()  # untouched by the refusals
    with live.client(live.clinician) as client:
        (member,) = _download(client, output["url"])
        assert member["id"] == data.people[1].patient_id
    _wait_gone(live, job_id)


def test_kick_off_refusals(live: LiveServer, data: Data) -> None:
    with live.client(live.clinician) as client:
        assert_outcome(client.get("/fhir/Patient/$export"), 400)  # no Prefer: respond-async
        bad = {"_outputFormat": "text/csv"}
        assert_outcome(client.get("/fhir/Patient/$export", params=bad, headers=ASYNC), 400)
        assert_outcome(
            client.get("/fhir/Patient/$export", params={"_typeFilter": "x"}, headers=ASYNC), 400
        )
        assert_outcome(
            client.get("/fhir/Patient/$export", params={"_type": "Nope"}, headers=ASYNC), 400
        )
        assert_outcome(client.get("/fhir/$export", headers=ASYNC), 403)  # system: admin only
        assert_outcome(client.get("/fhir/Group/no-such/$export", headers=ASYNC), 404)
    token = live.token("patient", patient=data.people[0].patient_id)
    with live.client(token) as client:
        assert_outcome(client.get("/fhir/Group/bx-group/$export", headers=ASYNC), 403)
    assert _job_dirs(live) == []


def test_system_export_cancel_and_expiry(live: LiveServer, data: Data) -> None:
    exports = live.node.exports
    assert exports is not None
    with live.client(live.admin) as client:
        status_url = _kick_off(client, "/fhir/$export", _type="Practitioner,Group")
        manifest = _manifest(client, status_url)
        assert {(o["type"], o["count"]) for o in manifest["output"]} == {
            ("Practitioner", 1),
            ("Group", 1),
        }
        # Cancel: 202, the files are removed at once, and the job is unknown after.
        cancelled = client.delete(status_url)
        assert cancelled.status_code == 202, cancelled.text
        _wait_gone(live, status_url.rsplit("/", 1)[1])
        assert_outcome(client.get(status_url), 404)
        # Expiry: a finished job nobody downloads goes after the TTL (the sweep task).
        status_url = _kick_off(client, "/fhir/$export", _type="Practitioner")
        _manifest(client, status_url)
        saved = exports.ttl_ms
        exports.ttl_ms = 0
        try:
            _wait_gone(live, status_url.rsplit("/", 1)[1])
        finally:
            exports.ttl_ms = saved
        assert_outcome(client.get(status_url), 404)


def test_concurrent_jobs_are_bounded_and_survive_a_restart(live: LiveServer, data: Data) -> None:
    node = live.node
    exports = node.exports
    assert exports is not None
    live.run(exports.worker.close())  # hold the jobs queued
    token = live.token("clinician")
    with live.client(token) as client:
        urls = [_kick_off(client, "/fhir/Patient/$export") for _ in range(MAX_JOBS_PER_TOKEN)]
        refused = client.get("/fhir/Patient/$export", headers=ASYNC)
        assert_outcome(refused, 429)
        assert refused.headers["Retry-After"]
        queued = client.get(urls[0])
        assert queued.status_code == 202 and queued.headers["X-Progress"] == "queued"
    second = live.token("clinician")
    with live.client(second) as other:
        more = [
            _kick_off(other, "/fhir/Patient/$export")
            for _ in range(MAX_JOBS_PER_NODE - MAX_JOBS_PER_TOKEN)
        ]
    with live.client(live.token("clinician")) as third:
        # A token with no job of its own: the node's bound.
        full = assert_outcome(third.get("/fhir/Patient/$export", headers=ASYNC), 429)
        assert "the node runs" in full["issue"][0]["diagnostics"]
    with live.client(token) as client:
        # As if the node had stopped mid-run: one job on disk says it was running.
        job_file = live.root / "exports" / urls[0].rsplit("/", 1)[1] / "job.json"
        state = json.loads(job_file.read_text())
        job_file.write_text(json.dumps({**state, "state": "running", "done": 3, "total": 9}))

        async def restart() -> None:
            await exports.close()
            node.exports = None
            await node.start_exports(ttl_s=3600, sweep_interval_s=0.2)

        live.run(restart())
        assert node.exports is not exports
        for url in urls:
            manifest = _manifest(client, url)
            assert manifest["error"] == [] and manifest["output"]
            client.delete(url)
    with live.client(second) as other:
        for url in more:
            assert _manifest(other, url)["output"]
            other.delete(url)


def test_a_file_gone_under_a_download_is_404_not_a_server_error(
    live: LiveServer, data: Data
) -> None:
    with live.client(live.admin) as client:
        status_url = _kick_off(client, "/fhir/$export", _type="Practitioner")
        (output,) = _manifest(client, status_url)["output"]
        job_dir = live.root / "exports" / status_url.rsplit("/", 1)[1]
        (job_dir / "Practitioner.ndjson").unlink()  # as a cancel or the sweep would, meanwhile
        assert_outcome(client.get(output["url"]), 404)
        assert client.delete(status_url).status_code == 202


def test_a_job_whose_key_is_gone_reports_an_error_not_a_server_error(
    live: LiveServer, data: Data
) -> None:
    node = live.node
    exports = node.exports
    assert exports is not None
    live.run(exports.worker.close())  # hold the job queued
    with live.client(live.clinician) as client:
        status_url = _kick_off(client, "/fhir/Patient/$export")
        job_file = live.root / "exports" / status_url.rsplit("/", 1)[1] / "job.json"
        # As if the KEK that wrapped the job's key had been rotated away meanwhile.
        state = json.loads(job_file.read_text())
        job_file.write_text(json.dumps({**state, "kek_id": "0" * 16}))

        async def restart() -> None:
            await exports.close()
            node.exports = None
            await node.start_exports(ttl_s=3600, sweep_interval_s=0.2)

        live.run(restart())
        manifest = _manifest(client, status_url)
        assert manifest["output"] == []
        (error,) = manifest["error"]
        assert error["type"] == "OperationOutcome" and error["count"] == 1
        (outcome,) = _download(client, error["url"])
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["severity"] == "fatal"
        assert "key" in outcome["issue"][0]["diagnostics"]
        _wait_gone(live, status_url.rsplit("/", 1)[1])


def test_an_accepted_job_is_on_disk_before_its_202(
    live: LiveServer, data: Data, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kick-off's 202 is an acknowledgement: the job file and the directory entries
    leading to it are synced, so a crash right after it cannot lose the job."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    with live.client(live.clinician) as client:
        status_url = _kick_off(client, "/fhir/Patient/$export")
        job_dir = live.root / "exports" / status_url.rsplit("/", 1)[1]
        assert str(job_dir) in synced  # the job file's entry
        assert str(job_dir.parent) in synced  # the job directory's entry
        _manifest(client, status_url)
        assert client.delete(status_url).status_code == 202


def test_at_start_a_corrupt_job_is_removed_but_an_unreadable_one_is_kept(
    live: LiveServer, data: Data
) -> None:
    """A job.json that does not parse is derived data gone bad; one that cannot be read
    now (here: a directory in its place, read fails with EISDIR) may read next time."""
    node = live.node
    exports = node.exports
    assert exports is not None
    root = live.root / "exports"
    corrupt, unreadable = root / ("a" * 32), root / ("b" * 32)
    corrupt.mkdir()
    (corrupt / "job.json").write_text("{not json")
    (unreadable / "job.json").mkdir(parents=True)

    async def restart() -> None:
        await exports.close()
        node.exports = None
        await node.start_exports(ttl_s=3600, sweep_interval_s=0.2)

    live.run(restart())
    assert not corrupt.exists()
    assert (unreadable / "job.json").is_dir()
    (unreadable / "job.json").rmdir()
    unreadable.rmdir()
