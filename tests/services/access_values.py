"""A valid access entry's fields, for the tests of the access log."""

from __future__ import annotations

from medledger.services.access import REFUSED

HEX = "ab" * 32
VALID: dict[str, str] = {
    "reader": "hospital-2",
    "holder": "hospital-1",
    "patient": HEX,
    "consent": "cd" * 32,
    "resource": f"Observation:{'ef' * 32}",
    "outcome": REFUSED,
    "reason": "the consent has expired",
    "actor": "clinician:0123456789ab",
    "request": "01" * 32,
}
