"""FHIR views of consent and access: valid R4 resources, and faithful both ways."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.consent import Consent

from medledger.core.consent import ConsentGrant, ConsentRecord, grant_tx, revoke_tx
from medledger.core.errors import InvalidInput
from medledger.core.keys import SigningKey
from medledger.services.consent_fhir import (
    CONSENT_TX_EXTENSION,
    REVOKE_TX_EXTENSION,
    audit_event,
    consent_for_grant,
    consent_resource,
    grant_from_consent,
    identity_audit_event,
    revocation_for,
    signed_tx_from,
)

PATIENT = SigningKey.generate()
CHAIN = "consortium:test"
T0 = 1_760_000_000_000


def _grant(scope: list[str] | None = None, **changes: Any) -> Any:
    fields: dict[str, Any] = {
        "chain": CHAIN,
        "grantee": "beta",
        "scope": scope or ["Observation", "Condition"],
        "purpose": "TREAT",
        "expires_ms": T0 + 86_400_000,
        "time_ms": T0,
    }
    fields.update(changes)
    return grant_tx(PATIENT, **fields)


@pytest.mark.parametrize("scope", [["Observation", "Condition"], ["*"]])
def test_a_consent_is_a_valid_r4_resource_and_maps_back(scope: list[str]) -> None:
    tx = _grant(scope)
    resource = consent_for_grant(tx)
    Consent.model_validate(resource)  # fhir.resources R4 validation
    assert resource["id"] == tx.hash().hex()
    assert resource["patient"]["identifier"]["value"] == PATIENT.fingerprint
    assert resource["provision"]["actor"][0]["reference"]["identifier"]["value"] == "beta"
    assert ("class" in resource["provision"]) == (scope != ["*"])
    assert grant_from_consent(resource) == tx


def test_a_scope_of_free_text_shaped_like_a_type_is_refused() -> None:
    """The scope goes on the consortium chain: only real FHIR type names may."""
    resource = consent_for_grant(_grant(["Observation", "JaneRoeHasCarcinoma"]))
    with pytest.raises(InvalidInput, match="not a FHIR resource type"):
        grant_from_consent(resource)


def test_status_follows_revocation_and_expiry() -> None:
    tx = _grant()
    record = ConsentRecord(tx_hash=tx.hash(), grant=ConsentGrant.from_tx(tx), height=3)
    assert consent_resource(record, tx, now_ms=T0 + 1)["status"] == "active"
    assert consent_resource(record, tx, now_ms=T0 + 86_400_000)["status"] == "inactive"
    revoked = ConsentRecord(tx_hash=tx.hash(), grant=record.grant, height=3, revoked_height=5)
    assert consent_resource(revoked, tx, now_ms=T0 + 1)["status"] == "inactive"


def _edit(resource: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(resource)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["patient", "identifier", "value"], "ab" * 32),
        (["provision", "actor", 0, "reference", "identifier", "value"], "gamma"),
        (["provision", "purpose", 0, "code"], "HRESCH"),
        (["provision", "class"], [{"system": "x", "code": "Observation"}]),
        (["status"], "inactive"),
    ],
    ids=["patient", "grantee", "purpose", "scope", "status"],
)
def test_a_consent_that_says_something_else_than_its_signed_tx_is_refused(
    path: list[Any], value: Any
) -> None:
    altered = _edit(consent_for_grant(_grant()), path, value)
    with pytest.raises(InvalidInput, match="does not say what"):
        grant_from_consent(altered)


def test_a_consent_without_or_with_a_broken_signed_tx_is_refused() -> None:
    resource = consent_for_grant(_grant())
    with pytest.raises(InvalidInput, match="carries no patient-signed"):
        grant_from_consent({**resource, "extension": []})
    with pytest.raises(InvalidInput, match="not a transaction"):
        grant_from_consent(
            {**resource, "extension": [{"url": CONSENT_TX_EXTENSION, "valueString": "{oops"}]}
        )
    with pytest.raises(InvalidInput, match="expected a FHIR Consent"):
        grant_from_consent({**resource, "resourceType": "Patient"})
    other = SigningKey.generate()
    forged = grant_tx(
        other,
        chain=CHAIN,
        grantee="beta",
        scope=["Observation", "Condition"],
        purpose="TREAT",
        expires_ms=T0 + 86_400_000,
        time_ms=T0,
    )
    swapped = _edit(
        resource,
        ["extension"],
        consent_for_grant(forged)["extension"],
    )
    with pytest.raises(InvalidInput, match="does not say what"):
        grant_from_consent(swapped)


@pytest.mark.parametrize("depth", [50, 100_000])
def test_a_deeply_nested_signed_tx_string_is_invalid_input(depth: int) -> None:
    """The extension's string is request text: nesting past the body's depth limit is a
    clear InvalidInput (400), never a RecursionError (500) from the JSON parser."""
    resource = consent_for_grant(_grant())
    nested = "[" * depth + "]" * depth
    for text in (nested, '{"type":' + nested + "}"):
        with pytest.raises(InvalidInput, match="not a transaction"):
            grant_from_consent(
                {**resource, "extension": [{"url": CONSENT_TX_EXTENSION, "valueString": text}]}
            )


def test_a_revocation_carries_its_signed_tx() -> None:
    tx = _grant()
    revoke = revoke_tx(PATIENT, chain=CHAIN, grant=tx.hash(), time_ms=T0 + 5)
    resource = revocation_for(revoke)
    Consent.model_validate(resource)
    assert resource["status"] == "inactive" and resource["id"] == tx.hash().hex()
    assert signed_tx_from(resource, REVOKE_TX_EXTENSION) == revoke


@pytest.mark.parametrize("outcome", ["allowed", "refused"])
def test_an_access_entry_is_a_valid_audit_event(outcome: str) -> None:
    entry = {
        "reader": "beta",
        "holder": "alpha",
        "patient": PATIENT.fingerprint,
        "consent": "cd" * 32,
        "resource": "Observation:" + "ef" * 32,
        "outcome": outcome,
        "reason": "" if outcome == "allowed" else "the consent was revoked by the patient",
        "actor": "",
        "request": "01" * 32,
    }
    event = audit_event(entry, tx_hash="12" * 32, time_ms=T0, chain="private:alpha")
    AuditEvent.model_validate(event)
    assert event["outcome"] == ("0" if outcome == "allowed" else "4")
    assert ("outcomeDesc" in event) == (outcome == "refused")
    values = [e["what"].get("identifier", {}).get("value") for e in event["entity"]]
    assert PATIENT.fingerprint in values and entry["resource"] in values


@pytest.mark.parametrize(
    ("item", "break_glass"),
    [
        ({"event": "enrollment", "patient": "aa" * 32, "chain": "private:alpha"}, False),
        (
            {
                "event": "key rotation",
                "patient": "aa" * 32,
                "previous": "bb" * 32,
                "chain": "private:alpha",
            },
            False,
        ),
        (
            {
                "event": "break-glass re-binding",
                "patient": "aa" * 32,
                "previous": "bb" * 32,
                "actor": "admin:0a1b2c3d4e5f",
                "institution": "alpha",
                "chain": "consortium:demo",
            },
            True,
        ),
    ],
)
def test_an_identity_event_is_a_valid_audit_event(item: dict[str, Any], break_glass: bool) -> None:
    event = identity_audit_event(item, tx_hash="12" * 32, time_ms=T0)
    AuditEvent.model_validate(event)
    assert event["subtype"][0]["code"] == item["event"]
    assert event["agent"][0]["who"]["identifier"]["value"] == "alpha"
    keys = {e["name"]: e["what"]["identifier"]["value"] for e in event["entity"]}
    assert keys.get("bound key") == "aa" * 32 and keys.get("replaced key") == item.get("previous")
    assert ("purposeOfEvent" in event) == break_glass
    assert event["agent"][0].get("altId") == item.get("actor")
