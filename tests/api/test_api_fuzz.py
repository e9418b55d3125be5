"""The OpenAPI document, and property-based fuzzing of the FHIR and chain endpoints.

Three generators send well over 1,000 requests with a valid clinician token:
schemathesis (from ``/openapi.json``), hypothesis strategies over the same route
table with hostile path segments, query parameters and headers, and hypothesis
strategies of invalid FHIR bodies (truncated JSON, wrong types, unknown fields,
deep nesting, mismatched types, poisoned transaction Bundles). Every answer
must be below 500, every error an OperationOutcome, nothing may leak a
traceback, and — since no request carries a valid write — the private chain
must not grow and must still verify.
"""

from __future__ import annotations

import copy
import json
import re
import string
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
import schemathesis
from api_helpers import LiveServer, seed_patients
from fuzz_support import Tally, fuzz_settings
from hypothesis import given
from hypothesis import strategies as st
from schemathesis.core.result import Ok

from medledger.synthetic import PatientBundle

Resource = dict[str, Any]
WRITES = ("POST", "PUT", "DELETE", "PATCH")


@dataclass(repr=False)
class World:
    patients: list[PatientBundle]
    ids: dict[str, list[str]]
    paths: dict[str, list[str]]
    log_size: int
    record_writes: int

    def __repr__(self) -> str:  # hypothesis prints strategies with their arguments
        return f"World({len(self.patients)} patients, log size {self.log_size})"


@pytest.fixture(scope="module")
def tally() -> Tally:
    return Tally()


@pytest.fixture(scope="module")
def world(live: LiveServer) -> World:
    patients = seed_patients(live, 2, per_patient=15)
    ids: dict[str, list[str]] = {}
    for p in patients:
        for r in p.all_resources():
            ids.setdefault(r["resourceType"], []).append(r["id"])
    with live.client() as client:
        doc = client.get("/openapi.json").json()
    paths = {p: [m.upper() for m in ops] for p, ops in doc["paths"].items()}
    return World(
        patients=patients,
        ids=ids,
        paths=paths,
        log_size=live.log_size(),
        record_writes=live.record_writes(),
    )


# -- the document ------------------------------------------------------------------------


def test_openapi_document_is_valid(live: LiveServer) -> None:
    with live.client() as client:
        r = client.get("/openapi.json")
        assert r.status_code == 200
        docs = client.get("/docs")
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    schema = schemathesis.openapi.from_dict(doc)
    schema.validate()  # against the OpenAPI meta-schema; raises if invalid
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"an operation of the document does not load: {result!r}"
        operations.append(result.ok())
    labels = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {
        "POST /fhir",
        "POST /fhir/{resource_type}",
        "GET /fhir/{resource_type}",
        "GET /fhir/{resource_type}/{rid}",
        "PUT /fhir/{resource_type}/{rid}",
        "DELETE /fhir/{resource_type}/{rid}",
        "GET /fhir/{resource_type}/{rid}/_history/{vid}",
        "GET /chain/{which}/blocks/{height}",
        "GET /chain/{which}/proof/inclusion",
    } <= labels
    assert docs.status_code == 200
    assert "openapi.json" in docs.text


def test_openapi_documents_the_statuses_the_api_answers_with(live: LiveServer) -> None:
    """The document must not promise 422 HTTPValidationError (the API answers 400
    OperationOutcome) and must say that create answers 201."""
    with live.client() as client:
        doc = client.get("/openapi.json").json()
    wrong = [
        f"{method.upper()} {path}"
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
        if "422" in op.get("responses", {})
    ]
    assert not wrong, f"documented 422 responses the API never sends: {wrong}"
    create = doc["paths"]["/fhir/{resource_type}"]["post"]["responses"]
    assert "201" in create, f"create is documented as {sorted(create)}"


# -- schemathesis ---------------------------------------------------------------------------


@pytest.mark.timeout(960)
def test_schemathesis_fuzz(live: LiveServer, world: World, tally: Tally) -> None:
    """Schemathesis runs in its own process: generating cases patches hypothesis globally
    (its printer and buffer size), which must not leak into the other tests of the session."""
    params = {
        "url": live.url,
        "token": live.clinician,
        # Examples per operation and mode: the document grows with every endpoint, and
        # the total, not the per-operation depth, is what the tally asks for (>= 200).
        "examples": 5,
        "protected": sorted({i for ids in world.ids.values() for i in ids}),
    }
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("schemathesis_fuzz.py"))],
        input=json.dumps(params),
        capture_output=True,
        text=True,
        # A guard against a hang, not a speed check: each operation of the API costs
        # hypothesis' generation time, ~5 s each on the loaded shared machine.
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    tally.sent["schemathesis"] += result["sent"]
    tally.statuses.update({int(k): v for k, v in result["statuses"].items()})
    tally.problems.setdefault("schemathesis", []).extend(result["problems"])
    assert tally.sent["schemathesis"] >= 200, result
    assert not tally.problems.get("schemathesis"), tally.report("schemathesis")


# -- hypothesis: hostile routes, parameters and headers ----------------------------------------

ODD_NUMBERS = [
    "²",
    "¹",
    "٣",
    "\u06f7",
    "৫",
    "½",
    "Ⅻ",
    "\U0001d7d9",
    "0x10",
    "1e3",
    "1_000",
    "+1",
    "-0",
    "00",
    "1.5",
    " 7",
    "9" * 19,
    "9" * 25,
    "-" + "9" * 25,
    "NaN",
    "inf",
]
HUGE_INTS = st.one_of(
    st.integers(min_value=2**62, max_value=2**90),
    st.integers(min_value=-(2**90), max_value=-(2**62)),
)
NUMBERS = st.one_of(
    st.integers(-5, 3000).map(str),
    HUGE_INTS.map(str),
    st.sampled_from(ODD_NUMBERS),
    st.text(st.characters(categories=["Nd", "No", "Nl"]), min_size=1, max_size=4),
)
TEXT = st.text(max_size=24)
SEGMENT_TEXT = st.text(min_size=1, max_size=24)
DATES = st.from_regex(r"\A(eq|ge|le|gt|lt|ne|sa|ap)?\d{1,5}(-\d{1,3}(-\d{1,3})?)?\Z")
HEX = st.text(alphabet="0123456789abcdefABCDEFxyz", min_size=0, max_size=70)
TYPES = [
    "Patient",
    "Observation",
    "Encounter",
    "Condition",
    "MedicationRequest",
    "Bundle",
    "Consent",
    "AuditEvent",
    "Resource",
    "DomainResource",
    "patient",
    "Spaceship",
    "metadata",
    "_history",
    "Ärzte",
]
QUERY_KEYS = [
    "_count",
    "_offset",
    "patient",
    "code",
    "date",
    "birthdate",
    "name",
    "family",
    "given",
    "gender",
    "identifier",
    "index",
    "tx",
    "size",
    "old",
    "new",
    "_format",
    "_sort",
    "_id",
    "_summary",
    "subject",
]
HEADER_TEXT = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0xFF, exclude_characters="\x7f"),
    min_size=1,
    max_size=24,
)
CONTENT_TYPES = [
    "application/fhir+json",
    "application/json",
    "text/plain",
    "application/xml",
    "multipart/form-data; boundary=x",
    "application/x-www-form-urlencoded",
]


@st.composite
def hostile_requests(
    draw: st.DrawFn, world: World
) -> tuple[str, str, dict[bytes, bytes], bytes | None]:
    template = draw(st.sampled_from(sorted(world.paths)))
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
    else:
        method = draw(st.sampled_from(world.paths[template]))
    every_id = sorted({i for ids in world.ids.values() for i in ids})

    def segment(name: str) -> str:
        # Mostly values that get past the first checks, so the later code is reached too.
        if name == "resource_type":
            return draw(
                st.one_of(st.sampled_from(sorted(world.ids)), st.sampled_from(TYPES), SEGMENT_TEXT)
            )
        if name == "rid":
            if method == "DELETE":  # never a real record: deleting one would be a valid write
                return draw(SEGMENT_TEXT.filter(lambda s: s not in every_id))
            real = st.sampled_from(every_id)
            return draw(st.one_of(real, real, SEGMENT_TEXT, NUMBERS))
        if name == "which":
            return draw(
                st.one_of(
                    st.just("private"), st.sampled_from(["consortium", "public"]), SEGMENT_TEXT
                )
            )
        return draw(st.one_of(NUMBERS, NUMBERS, SEGMENT_TEXT))  # vid, height

    path = re.sub(r"\{(\w+)\}", lambda m: quote(segment(m.group(1)), safe=""), template)
    value = st.one_of(
        NUMBERS,
        TEXT,
        DATES,
        HEX,
        st.sampled_from(every_id),
        st.sampled_from(every_id).map(lambda i: f"Patient/{i}"),
        st.just("http://loinc.org|8867-4"),
    )
    query = draw(
        st.lists(st.tuples(st.one_of(st.sampled_from(QUERY_KEYS), TEXT), value), max_size=4)
    )
    headers: dict[bytes, bytes] = {}
    if draw(st.booleans()):
        if_match = draw(st.one_of(NUMBERS.map(lambda n: f'W/"{n}"'), HEADER_TEXT))
        headers[b"If-Match"] = if_match.encode("utf-8" if not if_match.isascii() else "ascii")
    headers[b"Content-Type"] = draw(st.sampled_from(CONTENT_TYPES)).encode()
    body = draw(st.one_of(st.none(), invalid_bodies(world))) if method in WRITES else None
    url = path + ("?" + urlencode(query) if query else "")
    return method, url, headers, body


def _send(
    client: httpx.Client,
    tally: Tally,
    source: str,
    method: str,
    url: str,
    headers: dict[bytes, bytes],
    body: bytes | None,
) -> httpx.Response | None:
    try:
        r = client.request(method, url, content=body, headers=headers)
    except httpx.TransportError as exc:
        # A dropped keep-alive connection (the server closes it after an unhandled error).
        tally.problem(source, f"{method} {url[:160]}: {type(exc).__name__} {exc}")
        return None
    tally.check(source, method, str(r.url), r.status_code, r.headers, r.text)
    return r


def test_hypothesis_fuzz_routes_parameters_headers(
    live: LiveServer, world: World, tally: Tally
) -> None:
    client = live.client(live.clinician)

    @fuzz_settings(700)
    @given(request=hostile_requests(world))
    def run(request: tuple[str, str, dict[bytes, bytes], bytes | None]) -> None:
        method, url, headers, body = request
        r = _send(client, tally, "routes", method, url, headers, body)
        # $validate answers 200 with an OperationOutcome for any resource, and a bare
        # POST /chain/verify with its report; neither writes anything (the chain is
        # checked at the end).
        is_write = (
            method in WRITES and "/$validate" not in url and url.split("?")[0] != "/chain/verify"
        )
        if r is not None and is_write and 200 <= r.status_code < 300:
            tally.problem("routes", f"{method} {url[:160]}: accepted an invalid write")

    try:
        run()
    finally:
        client.close()
    print(f"route fuzzing: {tally.sent['routes']} requests, statuses {dict(tally.statuses)}")
    assert tally.sent["routes"] >= 650
    assert not tally.problems.get("routes"), tally.report("routes")
    # Reads that succeeded left access entries; nothing else was written.
    assert live.record_writes() == world.record_writes


# -- hypothesis: invalid bodies -------------------------------------------------------------

JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12)
)
JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _dump(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _wrong_value(original: Any) -> st.SearchStrategy[Any]:
    """A value of a JSON type the field can never have."""
    if isinstance(original, (str, bool, int, float)):
        return st.dictionaries(st.text(min_size=1, max_size=6), JSON_LEAVES, min_size=1, max_size=3)
    return st.one_of(st.integers(), st.booleans())  # for an object or array field


@st.composite
def invalid_resources(draw: st.DrawFn, world: World) -> Resource:
    """A resource that is invalid FHIR however it is sent (always keeps ``resourceType``)."""
    source = draw(st.sampled_from([r for p in world.patients for r in p.all_resources()]))
    resource = copy.deepcopy(source)
    how = draw(st.sampled_from(["wrong-type", "unknown-field", "wrong-type-nested", "bad-id"]))
    if how == "wrong-type":
        key = draw(st.sampled_from(sorted(k for k in resource if k not in ("resourceType", "id"))))
        resource[key] = draw(_wrong_value(resource[key]))
    elif how == "unknown-field":
        resource["zz" + draw(st.text(alphabet=string.ascii_letters, max_size=8))] = draw(JSON)
    elif how == "wrong-type-nested":
        key = draw(
            st.sampled_from(
                sorted(
                    k
                    for k, v in resource.items()
                    if (isinstance(v, dict) and v)
                    or (isinstance(v, list) and v and isinstance(v[0], dict) and v[0])
                )
            )
        )
        inner = resource[key][0] if isinstance(resource[key], list) else resource[key]
        sub = draw(st.sampled_from(sorted(inner)))
        inner[sub] = draw(_wrong_value(inner[sub]))
    else:
        resource["id"] = draw(
            st.one_of(st.text(min_size=65, max_size=70), st.just(""), st.just("a b"), st.integers())
        )
    return resource


@st.composite
def invalid_bodies(draw: st.DrawFn, world: World) -> bytes:
    kind = draw(
        st.sampled_from(
            ["truncated", "not-object", "no-type", "invalid", "deep", "bytes", "bad-bundle"]
        )
    )
    if kind == "truncated":
        text = _dump(draw(st.sampled_from([r for p in world.patients for r in p.all_resources()])))
        return text[: draw(st.integers(0, len(text) - 1))]
    if kind == "not-object":
        return _dump(draw(JSON.filter(lambda v: not isinstance(v, dict))))
    if kind == "no-type":
        obj = draw(st.dictionaries(st.text(max_size=8), JSON, max_size=5))
        obj.pop("resourceType", None)
        if draw(st.booleans()):
            obj["resourceType"] = draw(
                st.one_of(st.integers(), st.none(), st.lists(st.text(), max_size=2))
            )
        return _dump(obj)
    if kind == "invalid":
        return _dump(draw(invalid_resources(world)))
    if kind == "deep":
        depth = draw(st.integers(41, 5000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return (
            b'{"resourceType":"Patient","extension":'
            + (opener * depth + "1" + closer * depth).encode()
            + b"}"
        )
    if kind == "bytes":
        return draw(st.binary(min_size=0, max_size=64))
    # A transaction Bundle whose entries are valid but one.
    patient = draw(st.sampled_from(world.patients))
    entries = [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in patient.all_resources()[: draw(st.integers(1, 6))]
    ]
    bad = draw(
        st.one_of(
            invalid_resources(world).map(
                lambda r: {"resource": r, "request": {"method": "POST", "url": r["resourceType"]}}
            ),
            st.sampled_from(["GET", "DELETE", "PATCH", "HEAD"]).map(
                lambda m: {"request": {"method": m, "url": "Patient/x"}}
            ),
            st.just(
                {
                    "resource": {"resourceType": "Patient"},
                    "request": {"method": "PUT", "url": "Observation/x"},
                }
            ),
        )
    )
    entries.insert(draw(st.integers(0, len(entries))), bad)
    # Not "batch": a batch applies its valid entries and answers each one (200).
    bundle_type = draw(st.sampled_from(["transaction", "transaction", "searchset", "collection"]))
    return _dump({"resourceType": "Bundle", "type": bundle_type, "entry": entries})


@st.composite
def invalid_writes(draw: st.DrawFn, world: World) -> tuple[str, str, bytes]:
    body = draw(invalid_bodies(world))
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        parsed = None
    rtype = parsed.get("resourceType") if isinstance(parsed, dict) else None
    rtype = (
        rtype if isinstance(rtype, str) and rtype.isalpha() else draw(st.sampled_from(TYPES[:5]))
    )
    if rtype == "Bundle" or draw(st.integers(0, 9)) == 0:
        return "POST", "/fhir", body
    if draw(st.booleans()):
        return "POST", f"/fhir/{rtype}", body
    rid = parsed.get("id") if isinstance(parsed, dict) else None
    if not isinstance(rid, str) or not rid or draw(st.integers(0, 4)) == 0:
        rid = draw(st.sampled_from(sorted({i for ids in world.ids.values() for i in ids})))
    return "PUT", f"/fhir/{rtype}/{quote(rid, safe='')}", body


def test_invalid_bodies_are_refused_and_write_nothing(
    live: LiveServer, world: World, tally: Tally
) -> None:
    before = live.log_size()
    client = live.client(live.clinician)
    refused: Counter[int] = Counter()

    @fuzz_settings(500)
    @given(request=invalid_writes(world))
    def run(request: tuple[str, str, bytes]) -> None:
        method, url, body = request
        headers = {b"Content-Type": b"application/fhir+json"}
        r = _send(client, tally, "bodies", method, url, headers, body)
        if r is None:
            return
        refused[r.status_code] += 1
        if not 400 <= r.status_code < 500:
            tally.problem("bodies", f"{method} {url}: {r.status_code} for {body[:200]!r}")

    try:
        run()
    finally:
        client.close()
    assert tally.sent["bodies"] >= 450
    assert not tally.problems.get("bodies"), tally.report("bodies")
    assert set(refused) <= {400, 404, 409, 412, 413}, refused
    assert live.log_size() == before, "a refused request wrote to the private chain"


def test_fuzzing_sent_enough_and_the_chain_still_verifies(
    live: LiveServer, world: World, tally: Tally
) -> None:
    total = sum(tally.sent.values())
    assert total >= 1000, tally.sent
    assert live.record_writes() == world.record_writes
    report = live.verify()
    assert report.log_size == live.log_size()
    # The server is still answering normally after all of it (within the client's 30 s
    # timeout: how fast is the benchmarks' to say, a loaded machine is no defect).
    with live.client(live.clinician) as client:
        pid = world.patients[0].patient_id
        assert client.get(f"/fhir/Patient/{pid}").status_code == 200
        assert client.get("/healthz").status_code == 200
