"""The end of the demo's consent section: the patient's audit trail at Hospital 1.

Every read of the patient's records, allowed or refused, and their consent,
as the patient's app lists them (``GET /fhir/AuditEvent`` and ``/fhir/Consent``
by key fingerprint) — one table row per event, like events counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medledger.demo.client import NodeApi
from medledger.demo.scene import Scene, short, titled_table, wait_until

__all__ = ["audit_trail"]


def audit_trail(scene: Scene, a: NodeApi, fingerprint: str) -> None:
    """Show the trail of the patient with key ``fingerprint`` at holder ``a``.

    Waits (up to 10 s) until the consortium lists its half of every
    cross-institution read; sets ``facts["audit_events"]``.
    """
    # A cross-institution read is on the holder's private chain at once and on the
    # consortium once final: wait until both halves of every such read are listed.
    events = wait_until(
        lambda: a.get("/fhir/AuditEvent", role="admin", patient=fingerprint),
        _both_chains_listed,
        "the consortium's access entries",
        timeout=10,
    )
    consents = a.get("/fhir/Consent", role="admin", patient=fingerprint)
    rows: list[_TrailRow] = []
    for entry in consents["entry"]:
        r = entry["resource"]
        rows.append(
            _TrailRow(
                time=r["dateTime"],
                who="the patient",
                what="consent granted to hospital-2",
                outcome=f"now {r['status']}",
                why="",
                chains={"consortium"},
            )
        )
    for entry in sorted(events["entry"], key=lambda e: str(e["resource"]["recorded"])):
        r = entry["resource"]
        reader = str(r["agent"][0]["who"]["identifier"]["value"])
        actor = str(r["agent"][0].get("altId", "")).split(":")[0]
        if r["type"]["code"] != "rest":  # an enrollment, key rotation or break-glass
            rows.append(
                _TrailRow(
                    time=r["recorded"],
                    who=f"{reader} {actor}".strip(),
                    what=f"{r['subtype'][0]['code']} of the patient's key",
                    outcome="[green]signed by the patient[/]"
                    if not actor
                    else "[red]break-glass[/]",
                    why="",
                    chains={str(r["source"]["site"]).split(":")[0]},
                )
            )
            continue
        what = str(r["entity"][0]["what"]["identifier"]["value"]).split(":")[0]
        row = _TrailRow(
            time=r["recorded"],
            who=f"{reader} {actor}".strip() if reader == a.institution else reader,
            what="read " + ("list" if what == "*" else what),
            outcome="[green]allowed[/]" if r["outcome"] == "0" else "[red]refused[/]",
            why=str(r.get("outcomeDesc", "")),
            chains={str(r["source"]["site"]).split(":")[0]},
        )
        if not rows or not rows[-1].absorb(row):
            rows.append(row)
    rows.sort(key=lambda row: row.time)
    table = titled_table(
        f"the patient's trail at Hospital 1 (GET /fhir/AuditEvent and /fhir/Consent "
        f"?patient={short(fingerprint, 8)})",
        "time",
        "who",
        "event",
        "why",
        "on chain",
    )
    for row in rows:
        table.add_row(
            row.time[11:19],
            row.who,
            row.what.strip() + (f" ({row.count})" if row.count > 1 else "") + ": " + row.outcome,
            row.why,
            ", ".join(sorted(row.chains, reverse=True)),
        )
    scene.say(table)
    scene.facts["audit_events"] = events["total"]
    scene.why(
        "every read of the patient's records — allowed or refused, by Hospital 1's own "
        "staff or across institutions — is an `access` entry on a chain (cross-institution "
        "ones on both the holder's private chain and the consortium), and so is the "
        "enrollment that bound the patient's key; the patient can list them all."
    )


@dataclass
class _TrailRow:
    """One line of the trail table: consecutive like entries are counted, not repeated."""

    time: str
    who: str
    what: str
    outcome: str
    why: str
    chains: set[str]
    count: int = 1

    def absorb(self, other: _TrailRow) -> bool:
        """Take ``other`` into this row if it is the same event (True) or a repeat of it."""
        if (self.who, self.what, self.outcome) != (other.who, other.what, other.outcome):
            return False
        if self.count == 1 and not other.chains <= self.chains:
            # One cross-institution read, logged on the private chain and the consortium.
            self.chains |= other.chains
            self.why = self.why or other.why
            return True
        if self.chains == other.chains and self.why == other.why:
            self.count += 1
            return True
        return False


def _both_chains_listed(events: Mapping[str, Any]) -> bool:
    """True once the cross-institution reads have as many consortium entries as private ones."""
    sites = [
        str(e["resource"]["source"]["site"]).split(":")[0]
        for e in events["entry"]
        if e["resource"]["agent"][0]["who"] != e["resource"]["source"]["observer"]
    ]
    return sites.count("private") == sites.count("consortium")
