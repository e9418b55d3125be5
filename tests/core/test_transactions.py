"""Tests for :mod:`medledger.core.transactions`: the one list of transaction types.

The type names and body fields are held to docs/formats.md (parsed from its
"Transaction" section, where every type is written ``name`` ``{fields}``),
to the golden fixture's transactions, and to the validators that enforce them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from medledger.core import transactions as t
from medledger.core.transactions import BodyFields

ROOT = Path(__file__).resolve().parents[2]
FORMATS_MD = (ROOT / "docs" / "formats.md").read_text(encoding="utf-8")
GOLDEN = json.loads((ROOT / "tests" / "golden" / "format.json").read_text(encoding="utf-8"))

_TYPE_AND_BODY = re.compile(
    r"`([a-z]+(?:\.[a-z]+)?)`\s*(?:\(first [^`]*?body\s*)?`\{(.*?)\}`", re.S
)


def _top_level_names(fields: str) -> frozenset[str]:
    """``a, b: x, c: [{d, e}, ...]`` -> ``{a, b, c}``: names before any ``:``, outside brackets."""
    names, depth, current = [], 0, ""
    for ch in fields + ",":
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            names.append(current.split(":")[0].strip())
            current = ""
        else:
            current += ch
    return frozenset(n for n in names if n)


def _documented(part: str) -> dict[str, frozenset[str]]:
    """First ``type`` ``{fields}`` of each type in one part of the Transaction section."""
    out: dict[str, frozenset[str]] = {}
    for name, fields in _TYPE_AND_BODY.findall(part):
        out.setdefault(name, _top_level_names(fields))
    return out


_SECTION = FORMATS_MD.split("## Transaction", 1)[1].split("\n## ", 1)[0]
_PRIVATE_PART, _CONSORTIUM_PART = _SECTION.split("Consortium types", 1)
DOC_PRIVATE = _documented(_PRIVATE_PART.split("Private-chain types", 1)[1])
DOC_CONSORTIUM = _documented(_CONSORTIUM_PART)


def test_the_doc_parser_finds_every_documented_type() -> None:
    assert set(DOC_PRIVATE) == t.PRIVATE_TYPES
    # The consortium genesis body is the genesis document, written without braces.
    assert set(DOC_CONSORTIUM) == t.CONSORTIUM_TYPES - {t.CONSORTIUM_GENESIS}
    assert "`consortium.genesis` (block 0; body = the genesis document)" in _CONSORTIUM_PART


@pytest.mark.parametrize("tx_type", sorted(t.PRIVATE_TYPES))
def test_private_body_fields_are_the_documented_ones(tx_type: str) -> None:
    assert t.PRIVATE_BODIES[tx_type].required == DOC_PRIVATE[tx_type]
    assert not t.PRIVATE_BODIES[tx_type].optional


@pytest.mark.parametrize("tx_type", sorted(t.CONSORTIUM_BODIES))
def test_consortium_body_fields_are_the_documented_ones(tx_type: str) -> None:
    fields = t.CONSORTIUM_BODIES[tx_type]
    assert fields.required == DOC_CONSORTIUM[tx_type]
    for name in fields.optional:  # optional fields are named in the doc, outside the braces
        assert f"optionally `{name}`" in _CONSORTIUM_PART


def test_access_batch_entries_are_documented() -> None:
    match = re.search(
        r"`access\.batch` `\{holder, entries: \[\{(.*?)\}, \.\.\.\]\}`", FORMATS_MD, re.S
    )
    assert match is not None
    assert _top_level_names(match.group(1)) == t.ACCESS_BATCH_ENTRY.required


def test_type_names_are_distinct_constants_in_the_documented_groups() -> None:
    assert t.IDENTITY_TYPES <= t.PRIVATE_TYPES
    assert t.CONSENT_TYPES | t.MEMBER_TYPES | {t.ANCHOR, t.ACCESS_BATCH} <= t.CONSORTIUM_TYPES
    # Types shared by both chains carry different bodies on each.
    assert {t.ACCESS, t.PATIENT_REBIND} == t.PRIVATE_TYPES & t.CONSORTIUM_TYPES
    assert t.PRIVATE_BODIES[t.ACCESS] != t.CONSORTIUM_BODIES[t.ACCESS]


def test_golden_fixture_transactions_have_their_types_shape() -> None:
    for part, bodies in (
        ("private_chain", t.PRIVATE_BODIES),
        ("consortium_chain", t.CONSORTIUM_BODIES),
    ):
        for block in GOLDEN[part]["blocks"]:
            for entry in block["txs"]:
                tx = json.loads(bytes.fromhex(entry["canonical_hex"]))
                if tx["type"] == t.CONSORTIUM_GENESIS:
                    continue
                assert bodies[tx["type"]].allows(set(tx["body"])), tx["type"]


def test_body_fields_allow_exactly_required_plus_optional() -> None:
    grant = t.CONSORTIUM_BODIES[t.CONSENT_GRANT]
    assert grant.allows(set(grant.required))
    assert grant.allows(set(grant.required | {"starts_ms"}))
    assert not grant.allows(set(grant.required - {"scope"}))
    assert not grant.allows(set(grant.required | {"note"}))
    assert BodyFields(frozenset({"a"})).allows({"a"})
