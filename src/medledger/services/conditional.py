"""Conditional writes (FHIR R4 §3.1.0.8, §3.1.0.4.3, §3.1.0.7.1): a write aimed by a search.

``If-None-Exist`` on create, ``PUT Type?criteria`` and ``DELETE Type?criteria``
first search for what the criteria match, then act on the number of matches:

========================  ===================  =====================  ==========
                          no match             one match              several
========================  ===================  =====================  ==========
create (If-None-Exist)    create               the existing (200)     412
update                    create               update that one        412
delete                    nothing (204)        delete that one        412
========================  ===================  =====================  ==========

The search and the write are one step for other conditional writes of the
same type: they hold the type's lock, so two identical conditional creates
sent at once make one resource, not two. A plain (unconditional) write is
not held back by it — FHIR makes no promise between the two — so a client
that relies on If-None-Exist must use it for every create of the kind.

The criteria are a search of ``services.search``: evaluated on the blind
index (no decryption), and empty criteria are refused, so a conditional write
never means "every resource of the type".
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import parse_qsl

from medledger.core.errors import InvalidInput, PreconditionFailed

__all__ = ["MAX_CRITERIA_CHARS", "ConditionalWrites", "Match", "Searcher", "parse_criteria"]

#: Result parameters mean nothing to a conditional write's search.
_IGNORED = frozenset({"_format", "_pretty", "_summary", "_elements", "_count", "_sort"})
#: Longest criteria text accepted (a header or a query string).
MAX_CRITERIA_CHARS = 2048


def parse_criteria(text: str, resource_type: str) -> dict[str, list[str]]:
    """Search parameters of a conditional write, from ``a=1&b=2`` or ``Type?a=1&b=2``.

    Raises :class:`InvalidInput` for empty or over-long criteria, or criteria
    for another resource type.
    """
    if len(text) > MAX_CRITERIA_CHARS:
        raise InvalidInput(f"the search criteria are longer than {MAX_CRITERIA_CHARS} characters")
    query = text.strip()
    if "?" in query:
        head, _, query = query.partition("?")
        if head.strip("/").rpartition("/")[2] not in ("", resource_type):
            raise InvalidInput(f"the search criteria are for {head!r}, not {resource_type}")
    params: dict[str, list[str]] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in _IGNORED:
            params.setdefault(key, []).append(value)
    return _criteria(params)


def _criteria(params: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    out = {k: list(v) for k, v in params.items() if k not in _IGNORED}
    if not out:
        raise InvalidInput("a conditional write needs search criteria (none were given)")
    return out


class Searcher(Protocol):
    """What conditional writes need of the records service."""

    async def search_ids(
        self, resource_type: str, params: Mapping[str, Sequence[str]]
    ) -> list[str]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Match:
    """What a conditional write's criteria found: the one id, or none."""

    outcome: Literal["none", "one"]
    id: str | None = None


class ConditionalWrites:
    """Serializes the search-then-write of conditional writes, per resource type.

    ``records.search_ids`` is the blind-index search (latest, undeleted
    versions only).
    """

    def __init__(self, records: Searcher) -> None:
        self._records = records
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, resource_type: str) -> asyncio.Lock:
        """The lock a conditional write of ``resource_type`` holds from search to write."""
        return self._locks.setdefault(resource_type, asyncio.Lock())

    async def search_ids(
        self, resource_type: str, params: Mapping[str, Sequence[str]]
    ) -> list[str]:
        """Every id the criteria match (refused if empty). Call with :meth:`lock` held."""
        return await self._records.search_ids(resource_type, _criteria(params))

    async def match(self, resource_type: str, params: Mapping[str, Sequence[str]]) -> Match:
        """The single match of ``params``, or none; several raise :class:`PreconditionFailed`.

        Call with :meth:`lock` held, and write before releasing it.
        """
        ids: list[str] = await self._records.search_ids(resource_type, _criteria(params))
        if len(ids) > 1:
            raise PreconditionFailed(
                f"the criteria match {len(ids)} {resource_type} resources; a conditional"
                " write needs at most one"
            )
        return Match(outcome="one", id=ids[0]) if ids else Match(outcome="none")
