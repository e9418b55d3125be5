"""``medledger record`` and ``medledger keys`` on one node per module.

Commands run in this process through the CLI's entry point
(``cli_support.run_in_process``); ``node init``, the first ``record put`` and
``get`` and ``keys rotate`` run as the installed console script in a subprocess.

The node is created with ``medledger node init`` (default scrypt cost). Contract checked:
success prints JSON (or the stored bytes for ``get``) with exit 0; a failure is exactly one
``error: …`` line on stderr naming what and where, exit 1, no traceback, and the node
directory byte-for-byte unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cli_support import medledger_command, run_in_process
from medledger.node import open_node
from medledger.storage.keystore import FileKeyStore

PASSPHRASE = "cli records passphrase"


@dataclass(frozen=True, slots=True)
class Run:
    args: tuple[str, ...]
    code: int
    out: bytes
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def cli(
    *args: str | Path,
    stdin: bytes = b"",
    passphrase: str | None = PASSPHRASE,
    process: bool = False,
) -> Run:
    """``medledger ARGS`` in this process, or with ``process`` as the console script."""
    env = {"MEDLEDGER_PASSPHRASE": passphrase} if passphrase is not None else {}
    argv = tuple(str(a) for a in args)
    if process:
        proc = subprocess.run(
            [*medledger_command(), *argv],
            input=stdin,
            capture_output=True,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("MEDLEDGER_")}, **env},
            timeout=120,
            check=False,
        )
        run = Run(argv, proc.returncode, proc.stdout, proc.stderr.decode())
    else:
        done = run_in_process(argv, env=env, stdin=stdin)
        run = Run(argv, done.code, done.stdout, done.err)
    assert "Traceback" not in run.err and b"Traceback" not in run.out, run
    return run


def ok(*args: str | Path, stdin: bytes = b"", process: bool = False) -> Run:
    run = cli(*args, stdin=stdin, process=process)
    assert run.code == 0, run
    assert run.err == "", run
    return run


def error_line(run: Run, code: int = 1) -> str:
    assert run.code == code, run
    assert run.out == b"", run
    lines = run.err.splitlines()
    assert len(lines) == 1, run
    assert lines[0].startswith("error: "), run
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli-records") / "node"
    run = cli("node", "init", "--dir", root, "--name", "CLI Records Clinic", process=True)
    assert run.code == 0, run
    return root


def api_read(root: Path, rtype: str, rid: str, version: int | None = None) -> bytes:
    async def go() -> bytes:
        n = open_node(root, PASSPHRASE.encode())
        try:
            if version is None:
                return (await n.records.read(rtype, rid)).data
            return (await n.records.vread(rtype, rid, version)).data
        finally:
            await n.close()

    return asyncio.run(go())


PATIENT = (
    '{"resourceType": "Patient", "name": [{"family": "Müller", "given": ["Jürgen"]}],'
    ' "birthDate": "1961-04-03", "gender": "male"}'
)
OBSERVATION = (
    '{"resourceType": "Observation", "id": "obs-cli", "status": "final",'
    ' "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},'
    ' "subject": {"reference": "Patient/pat-file"},'
    ' "effectiveDateTime": "2021-03-04", "valueQuantity": {"value": 6.50, "unit": "%"}}'
)


# -- put / get / history / search -------------------------------------------------------


def test_put_from_stdin_creates_and_get_returns_exact_bytes(node: Path) -> None:
    summary = ok("record", "put", "--dir", node, stdin=PATIENT.encode(), process=True).json()
    assert summary["resourceType"] == "Patient"
    assert summary["versionId"] == "1"
    assert len(summary["tx_hash"]) == 64
    rid = summary["id"]
    got = ok("record", "get", "--dir", node, f"Patient/{rid}", process=True)
    stored = api_read(node, "Patient", rid)
    assert got.out == stored + b"\n"
    data = json.loads(got.out)
    assert data["id"] == rid
    assert data["meta"] == {"versionId": "1", "lastUpdated": summary["lastUpdated"]}
    assert {k: v for k, v in data.items() if k not in ("id", "meta")} == json.loads(PATIENT)
    assert "Müller".encode() in got.out  # UTF-8, not \u-escaped
    # "-" names stdin explicitly.
    again = ok("record", "put", "--dir", node, "-", stdin=PATIENT.encode()).json()
    assert again["id"] != rid and again["versionId"] == "1"


def test_put_from_file_update_get_version_history(node: Path, tmp_path: Path) -> None:
    patient = tmp_path / "patient.json"
    patient.write_text(
        '{"resourceType": "Patient", "id": "pat-file", "gender": "female",'
        ' "name": [{"family": "Fileson"}]}'
    )
    first = ok("record", "put", "--dir", node, patient).json()
    assert (first["id"], first["versionId"]) == ("pat-file", "1")
    patient.write_text(
        '{"resourceType": "Patient", "id": "pat-file", "gender": "other",'
        ' "name": [{"family": "Fileson"}]}'
    )
    second = ok("record", "put", "--dir", node, patient).json()
    assert (second["id"], second["versionId"]) == ("pat-file", "2")
    assert second["tx_hash"] != first["tx_hash"]

    latest = ok("record", "get", "--dir", node, "Patient/pat-file")
    assert json.loads(latest.out)["gender"] == "other"
    assert latest.out == api_read(node, "Patient", "pat-file") + b"\n"
    v1 = ok("record", "get", "--dir", node, "Patient/pat-file", "--version", "1")
    assert json.loads(v1.out)["gender"] == "female"
    assert json.loads(v1.out)["meta"]["versionId"] == "1"
    assert v1.out == api_read(node, "Patient", "pat-file", 1) + b"\n"

    history = ok("record", "history", "--dir", node, "Patient/pat-file").json()
    assert [h["versionId"] for h in history] == ["2", "1"]
    assert [h["status"] for h in history] == ["stored", "stored"]
    assert history[0]["lastUpdated"] == second["lastUpdated"]

    obs = tmp_path / "obs.json"
    obs.write_text(OBSERVATION)
    ok("record", "put", "--dir", node, obs)
    got = ok("record", "get", "--dir", node, "Observation/obs-cli")
    assert b'"value":6.50' in got.out  # the decimal keeps its text


def test_search(node: Path) -> None:
    ok("record", "put", "--dir", node, stdin=PATIENT.replace("Müller", "Müllerson").encode())
    found = ok("record", "search", "--dir", node, "Patient", "name=mull").json()
    assert found["resourceType"] == "Bundle" and found["type"] == "searchset"
    families = sorted(e["resource"]["name"][0]["family"] for e in found["entry"])
    assert "Müllerson" in families and "Müller" in families
    assert found["total"] == len(found["entry"])
    for e in found["entry"]:
        assert e["fullUrl"] == f"Patient/{e['resource']['id']}"
        assert e["search"] == {"mode": "match"}
    only = ok("record", "search", "--dir", node, "Patient", "family=MÜLLERS").json()
    assert [e["resource"]["name"][0]["family"] for e in only["entry"]] == ["Müllerson"]
    none = ok("record", "search", "--dir", node, "Patient", "name=zzz").json()
    assert none["total"] == 0 and none["entry"] == []
    both = ok(
        "record", "search", "--dir", node, "Patient", "name=mull", "birthdate=ge1961-04-03"
    ).json()
    assert both["total"] == found["total"]


# -- erase and keys ------------------------------------------------------------------------


def test_erase_reference_and_patient(node: Path, tmp_path: Path) -> None:
    for body in (
        '{"resourceType": "Patient", "id": "pat-erase", "name": [{"family": "Eraseme"}]}',
        '{"resourceType": "Patient", "id": "pat-erase", "name": [{"family": "Eraseme2"}]}',
        OBSERVATION.replace("obs-cli", "obs-erase").replace("pat-file", "pat-erase"),
        OBSERVATION.replace("obs-cli", "obs-one").replace("pat-file", "pat-erase"),
    ):
        ok("record", "put", "--dir", node, stdin=body.encode())

    assert ok("record", "erase", "--dir", node, "Observation/obs-one").json() == {
        "erased_versions": 1
    }
    line = error_line(cli("record", "get", "--dir", node, "Observation/obs-one"))
    assert "Observation/obs-one" in line and "erased" in line
    assert ok("record", "erase", "--dir", node, "--patient", "pat-erase").json() == {
        "erased_resources": 2
    }
    for ref in ("Patient/pat-erase", "Observation/obs-erase"):
        line = error_line(cli("record", "get", "--dir", node, ref))
        assert "erased" in line
    history = ok("record", "history", "--dir", node, "Patient/pat-erase").json()
    assert [h["status"] for h in history] == ["erased", "erased"]
    found = ok("record", "search", "--dir", node, "Patient", "name=eraseme").json()
    assert found["total"] == 0
    # Erasing again, or something unknown, is an error.
    line = error_line(cli("record", "erase", "--dir", node, "Observation/obs-one"))
    assert "already erased" in line
    line = error_line(cli("record", "erase", "--dir", node, "Observation/never-was"))
    assert "Observation/never-was" in line
    line = error_line(cli("record", "erase", "--dir", node, "--patient", "never-was"))
    assert "never-was" in line
    run = cli("record", "erase", "--dir", node)
    assert run.code == 2 and "exactly one" in run.err


def test_keys_rotate(node: Path) -> None:
    before = FileKeyStore.open(node / "keystore.json", PASSPHRASE.encode())
    old = before.secret("kek_current").decode()
    result = ok("keys", "rotate", "--dir", node, process=True).json()
    assert result["old"] == old
    assert result["new"] != old
    assert result["rewrapped"] >= 5
    after = FileKeyStore.open(node / "keystore.json", PASSPHRASE.encode())
    assert after.secret("kek_current").decode() == result["new"]
    assert f"kek:{old}" not in after.names()
    got = ok("record", "get", "--dir", node, "Patient/pat-file", "--version", "1")
    assert json.loads(got.out)["gender"] == "female"


# -- bad input: one line, exit 1, nothing written -----------------------------------------------

BAD_PUTS = {
    "invalid-json": (b'{"resourceType": "Patient",\n "gender": }', "line 2, column"),
    "not-utf8": (b'{"resourceType": "Patient", "gender": "\xff"}', "UTF-8"),
    "wrong-type": (b'{"resourceType": "Patient", "birthDate": "03/04/1961"}', "Patient.birthDate"),
    "unknown-type": (b'{"resourceType": "Foo"}', "resourceType"),
    "missing-code": (b'{"resourceType": "Observation", "status": "final"}', "Observation.code"),
    "unknown-field": (b'{"resourceType": "Patient", "nmae": []}', "Patient.nmae"),
    "bad-id": (b'{"resourceType": "Patient", "id": "a b"}', " id"),
    "not-an-object": (b"[1, 2, 3]", "JSON object"),
    "a-string": (b'"Patient"', "JSON object"),
    "too-deep": (b"[" * 10_000, "deeper than"),
    "too-large": (b'{"resourceType": "Patient", "text": "' + b"x" * (5 * 2**20) + b'"}', "limit"),
    "bundle-invalid-entry": (
        json.dumps(
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {
                        "resource": {"resourceType": "Patient"},
                        "request": {"method": "POST", "url": "Patient"},
                    },
                    {
                        "resource": {"resourceType": "Observation", "status": "final"},
                        "request": {"method": "POST", "url": "Observation"},
                    },
                ],
            }
        ).encode(),
        "Bundle.entry[1]",
    ),
    "bundle-unknown-entry-type": (
        json.dumps(
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {
                        "resource": {"resourceType": "Patient"},
                        "request": {"method": "POST", "url": "Patient"},
                    },
                    {
                        "resource": {"resourceType": "Foo"},
                        "request": {"method": "POST", "url": "Foo"},
                    },
                ],
            }
        ).encode(),
        "Bundle.entry[1]",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PUTS))
def test_bad_put_is_one_error_line_and_writes_nothing(node: Path, case: str) -> None:
    body, where = BAD_PUTS[case]
    before = snapshot(node)
    line = error_line(cli("record", "put", "--dir", node, stdin=body))
    assert where in line, line
    assert snapshot(node) == before


@pytest.mark.parametrize(
    ("args", "where"),
    [
        (("record", "get", "Patient"), "TYPE/ID"),
        (("record", "get", "Patient/a/b"), "TYPE/ID"),
        (("record", "get", "Patient/no-such-id"), "Patient/no-such-id"),
        (("record", "get", "Patient/pat-file", "--version", "9"), "version 9"),
        (("record", "history", "Patient/no-such-id"), "Patient/no-such-id"),
        (("record", "search", "Patient", "shoesize=9"), "shoesize"),
        (("record", "search", "Patient", "name"), "name=value"),
        (("record", "search", "Binary"), "Binary"),
        (("record", "search", "Observation", "date=2021-02-30"), "2021-02-30"),
        (("record", "put", "/nonexistent/file.json"), "/nonexistent/file.json"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else v,
)
def test_bad_arguments(node: Path, args: tuple[str, ...], where: str) -> None:
    before = snapshot(node)
    line = error_line(cli(*args[:2], "--dir", node, *args[2:]))
    assert where in line, line
    assert snapshot(node) == before


def test_passphrase_errors(node: Path) -> None:
    before = snapshot(node)
    line = error_line(
        cli("record", "put", "--dir", node, stdin=PATIENT.encode(), passphrase="wrong")
    )
    assert "passphrase" in line
    line = error_line(cli("record", "get", "--dir", node, "Patient/pat-file", passphrase=None))
    assert "MEDLEDGER_PASSPHRASE" in line
    line = error_line(cli("keys", "rotate", "--dir", node, passphrase=""))
    assert "empty" in line
    assert snapshot(node) == before


def test_verify_after_everything(node: Path) -> None:
    # Runs last in this module: the chain holds puts, erase tombstones and a key rotation.
    run = ok("verify", "--dir", node)
    assert run.out.startswith(b"OK: private:cli-records-clinic: ")
    export = ok("chain", "export", "--dir", node)
    types = [tx["type"] for line in export.out.splitlines() for tx in json.loads(line)["txs"]]
    assert "record.put" in types
    assert "record.erase" in types
    assert "key.rotate" in types
    assert b"M\xc3\xbcller" not in export.out and b"Eraseme" not in export.out
