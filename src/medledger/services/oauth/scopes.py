"""SMART on FHIR scopes: parsing (v1 and v2 syntax) and what a granted set allows.

Pure: no I/O. A resource scope reads ``<context>/<type>.<permissions>``:
``context`` is ``patient``, ``user`` or ``system``; ``type`` a FHIR resource
type or ``*``; permissions either v1 ``read`` (= v2 ``rs``), ``write`` (=
``cud``) and ``*`` (= ``cruds``), or v2 letters from ``cruds`` in that order
(``c`` create, ``r`` read, ``u`` update, ``d`` delete, ``s`` search).

What the node does not understand it does not grant: v2 scopes with a query
(``patient/Observation.rs?category=…``) would *narrow* access in a way this
node cannot enforce, so they are dropped rather than granted wider; unknown
words are dropped too. The granted set is returned to the client
(``scope`` in the token response), as RFC 6749 §3.3 asks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

__all__ = [
    "CONTEXTS",
    "EXTRA_SCOPES",
    "ResourceScope",
    "ScopeSet",
    "narrowed_scope",
    "parse_scopes",
    "request_access",
]

CONTEXTS: Final = ("patient", "user", "system")
#: The non-resource scopes this node understands (and so grants when asked for).
EXTRA_SCOPES: Final = frozenset({"launch/patient", "offline_access", "online_access"})
_RESOURCE = re.compile(
    r"^(patient|user|system)/(\*|[A-Z][A-Za-z]{0,63})\.(read|write|\*|c?r?u?d?s?)$"
)
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_ALL = frozenset("cruds")


@dataclass(frozen=True, slots=True)
class ResourceScope:
    """One granted resource scope: which context, which type (``*``: any), which actions."""

    context: str
    resource_type: str
    actions: frozenset[str]

    def allows(self, resource_type: str | None, action: str) -> bool:
        """``action`` (one of ``cruds``) on ``resource_type`` (``None``: not one FHIR type)."""
        if action not in self.actions:
            return False
        return self.resource_type == "*" or self.resource_type == resource_type

    def covers(self, other: ResourceScope) -> bool:
        """Whether everything ``other`` allows, this allows too (same context)."""
        return (
            self.context == other.context
            and self.resource_type in ("*", other.resource_type)
            and other.actions <= self.actions
        )


@dataclass(frozen=True, slots=True)
class ScopeSet:
    """The scopes of one request or grant, as understood here (see module docstring)."""

    resources: tuple[ResourceScope, ...]
    extras: frozenset[str]
    #: The understood scopes as text, in the order given, without repeats.
    granted: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.granted)

    def contexts(self) -> frozenset[str]:
        return frozenset(s.context for s in self.resources)

    def only(self, context: str) -> ScopeSet:
        """The resource scopes of one context (plus the extras that make sense with it)."""
        kept = [t for t in self.granted if t in self.extras or t.startswith(f"{context}/")]
        if context != "patient":
            kept = [t for t in kept if t != "launch/patient"]
        return parse_scopes(" ".join(kept))

    def allows(self, resource_type: str | None, action: str) -> bool:
        return any(s.allows(resource_type, action) for s in self.resources)


@lru_cache(maxsize=1024)
def parse_scopes(text: str) -> ScopeSet:
    """The understood part of a space-separated scope string (never raises)."""
    resources: list[ResourceScope] = []
    extras: set[str] = set()
    granted: list[str] = []
    for word in text.split():
        if word in granted:
            continue
        if word in EXTRA_SCOPES:
            extras.add(word)
            granted.append(word)
            continue
        match = _RESOURCE.match(word)
        if match is None or not match.group(3):
            continue
        letters = _V1.get(match.group(3), match.group(3))
        resources.append(ResourceScope(match.group(1), match.group(2), frozenset(letters) & _ALL))
        granted.append(word)
    return ScopeSet(tuple(resources), frozenset(extras), tuple(granted))


def narrowed_scope(asked: str, granted: str) -> str | None:
    """The scope a refresh asked for (RFC 6749 §6), if it asks for nothing ``granted`` lacks.

    Its text (understood words, in the order given) when every word is a scope
    the grant covers — an extra scope it holds, or a resource scope within one
    of its resource scopes (``patient/Observation.rs`` within ``patient/*.read``);
    ``None`` when any word is not (wider, another context, or a word this node
    does not understand: dropping it silently would answer something else than
    asked) or nothing is asked.
    """
    have = parse_scopes(granted)
    words = asked.split()
    if not words:
        return None
    for word in words:
        if word in EXTRA_SCOPES:
            if word not in have.extras:
                return None
            continue
        wanted = parse_scopes(word).resources
        if not wanted or not any(mine.covers(wanted[0]) for mine in have.resources):
            return None
    return parse_scopes(asked).text


#: Operations that only read, whether asked with GET or POST (their handlers narrow what
#: they show to the types the scopes allow: ``api.clinical_reads.readable_types``).
_READING_OPERATIONS = frozenset({"$everything", "$export"})


def request_access(method: str, path: str) -> tuple[str | None, str]:
    """Which FHIR resource type (``None``: not one type) and which action an HTTP request is.

    ``GET``/``HEAD`` of a type (search, type history) is ``s``, of an instance
    ``r``, of anything else ``r``; ``POST …/_search`` is ``s``, any other ``POST`` ``c``; ``PUT`` and
    ``PATCH`` ``u``; ``DELETE`` ``d``; ``POST`` of ``$everything`` or ``$export`` ``r``. Only ``/fhir/<Type>…`` names a type:
    everything else (chains, cross-institution fetches, whole-system
    history, batch Bundles) needs a ``*`` scope for the action.
    """
    parts = [p for p in path.split("/") if p]
    resource_type: str | None = None
    if len(parts) >= 2 and parts[0] == "fhir" and parts[1][:1].isupper():
        resource_type = parts[1]
    method = method.upper()
    if method in ("GET", "HEAD"):
        if resource_type is None:
            return None, "r"
        instance = len(parts) >= 3 and parts[2] != "_history"
        return resource_type, "r" if instance else "s"
    if method == "POST":
        if parts and parts[-1] in _READING_OPERATIONS:
            return resource_type, "r"  # an operation that reads, its parameters in a body
        return resource_type, "s" if parts and parts[-1] == "_search" else "c"
    if method in ("PUT", "PATCH"):
        return resource_type, "u"
    return resource_type, "d"
