""":contains over the blind index: 3-character pieces find candidates, decryption decides."""

from __future__ import annotations

import asyncio
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from medledger.core.errors import InvalidInput
from medledger.node import init_node, open_node
from medledger.services.records import queries
from medledger.services.search import resource_terms
from medledger.services.search_terms import CONTAINS_CHARS, MARK
from medledger.storage.keystore import KdfParams

PW = b"contains test passphrase"
LONG = "Wolkenstein-" + "Abcdefghij" * 7 + "-Trostberg"  # longer than CONTAINS_CHARS
FAMILIES = ["Müller", "Mulligan", "Smith", "de la Cruz", "Ng", LONG, "Ó Súilleabháin"]


def plain(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return " ".join("".join(c for c in decomposed if not unicodedata.combining(c)).lower().split())


def patient(n: int, family: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": f"p{n}",
        "name": [{"family": family, "given": ["Ann" if n % 2 else "Bo"]}],
        "meta": {"profile": [f"http://example.org/fhir/StructureDefinition/profile-{n}"]},
    }


PATIENTS = [patient(n, f) for n, f in enumerate(FAMILIES)]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    node_root = tmp_path_factory.mktemp("contains") / "node"
    init_node(node_root, name="Contains Test", passphrase=PW, kdf=KdfParams(n=2**12))

    async def fill() -> None:
        node = open_node(node_root, PW)
        try:
            for r in PATIENTS:
                await node.records.update("Patient", r["id"], r)
        finally:
            await node.close()

    asyncio.run(fill())
    return node_root


def search(root: Path, params: dict[str, list[str]]) -> set[str]:
    async def go() -> set[str]:
        node = open_node(root, PW)
        try:
            return set(await node.records.search_ids("Patient", params))
        finally:
            await node.close()

    return asyncio.run(go())


NEEDLES = ["ll", "M", "ULL", "uller", "e la c", "sUILLE", "trostberg", "ghij-tro", "zz", "nn"]


@pytest.mark.parametrize("needle", NEEDLES)
def test_contains_finds_the_substring_anywhere(root: Path, needle: str) -> None:
    expected = {
        r["id"]
        for r in PATIENTS
        if any(plain(needle) in plain(t) for t in [r["name"][0]["family"], *r["name"][0]["given"]])
    }
    assert search(root, {"name:contains": [needle]}) == expected
    family_only = {r["id"] for r in PATIENTS if plain(needle) in plain(r["name"][0]["family"])}
    assert search(root, {"family:contains": [needle]}) == family_only


def test_uri_contains_is_case_sensitive(root: Path) -> None:
    assert search(root, {"_profile:contains": ["profile-3"]}) == {"p3"}
    assert search(root, {"_profile:contains": ["StructureDefinition"]}) == {
        r["id"] for r in PATIENTS
    }
    assert search(root, {"_profile:contains": ["structuredefinition"]}) == set()


def test_a_long_value_is_a_candidate_for_every_needle() -> None:
    terms = {t for p, t in resource_terms(PATIENTS[5]) if p == "family"}
    assert f"{MARK}C" in terms  # marked long: its tail has no pieces in the index
    assert f"{MARK}c{plain(LONG)[CONTAINS_CHARS - 3 : CONTAINS_CHARS]}" in terms
    assert f"{MARK}ctro" not in terms and f"{MARK}crost" not in terms
    short = {t for p, t in resource_terms(PATIENTS[2]) if p == "family"}
    assert f"{MARK}C" not in short and {f"{MARK}csmi", f"{MARK}cmit", f"{MARK}cith"} <= short


def test_decryption_is_bounded(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A needle too short to narrow the candidates is refused past the bound."""
    monkeypatch.setattr(queries, "MAX_CHECKED", 2)
    with pytest.raises(InvalidInput, match="open"):
        search(root, {"name:contains": ["n"]})
    # A needle whose pieces narrow the candidates to the bound still answers.
    assert search(root, {"name:contains": ["smit"]}) == {"p2"}


def test_no_piece_of_a_name_is_stored_in_plaintext(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes().lower()
            for piece in (b"wolkenstein", b"trostberg", b"mulligan", b"suilleab"):
                assert piece not in data, (path, piece)
