"""Search over the blind index: the latest unerased versions matching every parameter."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, date, datetime
from typing import Any

from medledger.core.errors import InvalidInput
from medledger.ledger.clock import Clock
from medledger.services.compartments import local_references, patient_compartment
from medledger.services.fhirpath_subset import reference_type
from medledger.services.keys import InstitutionKeys
from medledger.services.records.model import StoredResource
from medledger.services.records.reading import RecordReader
from medledger.services.search import (
    AllOf,
    Match,
    Query,
    evaluate,
    is_chain,
    query_tokens,
    reference_match,
    split_parameter,
)
from medledger.services.search_dates import day_matches
from medledger.services.search_registry import registry
from medledger.services.search_sort import MAX_SORTED, parse_sort, sort_resources
from medledger.storage.ports import RecordIndex, VersionRow

__all__ = ["MAX_CHAINED", "MAX_CHECKED", "RecordSearch"]

#: A chained parameter or ``_has`` may find at most this many resources to refer through.
MAX_CHAINED = 1000
#: Patients whose compartments one index query per type looks up together.
COMPARTMENT_BATCH = 200
#: Chains and ``_has`` nest at most this deep.
MAX_DEPTH = 3
#: A search checked after decryption (``:contains``) opens at most this many candidates.
MAX_CHECKED = 5000


def _day_of(ms: int) -> date:
    return datetime.fromtimestamp(ms / 1000, UTC).date()


class RecordSearch:
    """Searches (blocking: index reads and decryption; callers run it in a worker thread)."""

    def __init__(
        self, *, index: RecordIndex, keys: InstitutionKeys, reader: RecordReader, clock: Clock
    ) -> None:
        self._clock = clock
        self._index = index
        self._keys = keys
        self._reader = reader

    def page(
        self,
        resource_type: str,
        params: Mapping[str, Sequence[str]],
        offset: int,
        count: int | None,
        sort: Sequence[str] = (),
    ) -> tuple[int, list[StoredResource]]:
        """How many match, and those in ``[offset, offset + count)`` opened.

        Unsorted, only the page is decrypted. Sorted (``_sort`` values), every
        match is decrypted and sorted in memory (``services.search_sort``): at
        most :data:`MAX_SORTED` of them, else :class:`InvalidInput`.
        """
        rows = self.matching(resource_type, params)
        end = None if count is None else offset + count
        fields = parse_sort(resource_type, list(sort))
        if not fields:
            return len(rows), self._reader.open_all(rows[offset:end])
        if len(rows) > MAX_SORTED:
            raise InvalidInput(
                f"the search matches {len(rows)} resources; _sort orders at most {MAX_SORTED} "
                "(narrow the search)"
            )
        opened = self._reader.open_all(rows)
        ordered = sort_resources(opened, fields, lambda s: s.resource())
        return len(ordered), ordered[offset:end]

    def matching(
        self, resource_type: str, params: Mapping[str, Sequence[str]], depth: int = 0
    ) -> list[VersionRow]:
        """The latest, unerased rows matching ``params`` (see ``services.search``).

        Chained parameters (``subject:Patient.name=x``) and ``_has`` search the
        other type first — each finding at most :data:`MAX_CHAINED` resources —
        and then match the references to or from what they found.
        """
        if depth > MAX_DEPTH:
            raise InvalidInput(f"chained parameters and _has nest at most {MAX_DEPTH} deep")
        plain = {k: v for k, v in params.items() if not is_chain(k) and not k.startswith("_has:")}
        # "Today" only sets the tolerance of a date search's ``ap`` prefix.
        today = datetime.fromtimestamp(self._clock.now_ms() / 1000, UTC).date()
        query: Query = query_tokens(self._keys.search_key, resource_type, plain, today=today)
        extra: list[Query] = []
        for key, values in params.items():
            if is_chain(key):
                extra.append(self._chain(resource_type, key, values, depth))
            elif key.startswith("_has:"):
                extra.append(self._has(resource_type, key, values, depth))
        if extra:
            assert isinstance(query, AllOf)
            query = AllOf((*query.parts, *extra))
        rows = self._rows(resource_type, query)
        for key, values in params.items():
            if split_parameter(key) == ("_lastUpdated", None):
                # Not in the blind index: the row's own time answers it.
                for value in values:
                    alternatives = [v for v in value.split(",") if v]
                    rows = [
                        r
                        for r in rows
                        if any(
                            day_matches(v, _day_of(r.updated_ms), today=today) for v in alternatives
                        )
                    ]
            elif split_parameter(key)[0] == "_lastUpdated":
                raise InvalidInput("_lastUpdated takes no modifier")
        return rows

    def _rows(self, resource_type: str, query: Query) -> list[VersionRow]:
        """The latest, live rows of ``resource_type`` matching ``query``, by id."""

        def every() -> set[str]:
            return {
                r.id
                for r in self._index.type_history(resource_type, 10**9)
                if not (r.erased or r.deleted)
            }

        def find(groups: list[frozenset[bytes]]) -> set[str]:
            return set(self._index.search(resource_type, [set(g) for g in groups]))

        def check(ids: set[str], accept: Callable[[Mapping[str, Any]], bool]) -> set[str]:
            if len(ids) > MAX_CHECKED:
                raise InvalidInput(
                    f"the search needs to open {len(ids)} resources to compare their text; "
                    f"at most {MAX_CHECKED} (use a longer :contains value or narrow the search)"
                )
            kept = set()
            for rid in ids:
                row = self._index.latest(resource_type, rid)
                live = row is not None and not row.erased and not row.deleted
                opened = self._reader.open_unless_failed(row) if live and row else None
                if opened is not None and accept(opened.resource()):
                    kept.add(rid)
            return kept

        ids = sorted(evaluate(query, find=find, every=every, check=check))
        latest = self._index.latest_of(resource_type, ids)
        return [
            row
            for row in (latest.get(rid) for rid in ids)
            if row is not None and not row.erased and not row.deleted
        ]

    def _chain(self, rtype: str, key: str, values: Sequence[str], depth: int) -> Query:
        """``subject:Patient.name=x``: references to the Patients whose name matches."""
        head, _, rest = key.partition(".")
        name, modifier = split_parameter(head)
        param = registry().get(rtype, name)
        if param is None or param.type != "reference":
            raise InvalidInput(f"{name!r} is not a reference parameter of {rtype}: cannot chain")
        targets = (modifier,) if modifier else param.targets
        if not targets:
            raise InvalidInput(f"chain through {name!r} needs a type: {name}:Type.{rest}")
        refs: list[str] = []
        searched = False
        for target in targets:
            if registry().get(target, split_parameter(rest.partition(".")[0])[0]) is None and not (
                rest.startswith("_has:")
            ):
                continue  # this target type has no such parameter
            searched = True
            found = self.matching(target, {rest: values}, depth + 1)
            refs.extend(f"{target}/{row.id}" for row in found)
            if len(refs) > MAX_CHAINED:
                raise InvalidInput(
                    f"the chained parameter {key!r} finds more than {MAX_CHAINED} resources "
                    "(narrow it)"
                )
        if not searched:
            raise InvalidInput(f"unknown chained parameter {key!r} for {rtype}")
        return reference_match(self._keys.search_key, rtype, name, refs)

    def _has(self, rtype: str, key: str, values: Sequence[str], depth: int) -> Query:
        """``_has:Observation:patient:code=x``: those an Observation with code x refers to.

        The index maps terms to resources, not back, so the referring resources
        are decrypted (at most :data:`MAX_CHAINED`) to read their references.
        """
        parts = key.split(":", 3)
        if len(parts) != 4 or not all(parts[1:]):
            raise InvalidInput(f"_has takes _has:Type:reference:parameter, got {key!r}")
        _, other, ref_code, rest = parts
        param = registry().get(other, ref_code)
        if param is None or param.type != "reference":
            raise InvalidInput(f"{ref_code!r} is not a reference parameter of {other}")
        rows = self.matching(other, {rest: values}, depth + 1)
        if len(rows) > MAX_CHAINED:
            raise InvalidInput(f"{key!r} finds more than {MAX_CHAINED} resources (narrow it)")
        ids: set[str] = set()
        for opened in self._reader.open_all(rows):
            for value, _ in param.path.evaluate(opened.resource()):
                ref = value.get("reference") if isinstance(value, dict) else None
                # Only local references: an absolute URL names another server's resource.
                if isinstance(ref, str) and "://" not in ref and reference_type(ref) == rtype:
                    ids.add(ref.rsplit("/", 1)[-1])
        return reference_match(self._keys.search_key, rtype, "_id", ids)

    def included(
        self,
        found: Sequence[StoredResource],
        include: Sequence[tuple[str, bool]],
        revinclude: Sequence[tuple[str, bool]],
    ) -> list[StoredResource]:
        """The resources ``_include`` and ``_revinclude`` add to ``found`` (FHIR R4 §3.1.1.5.4).

        ``_include=Type:param[:Target]`` adds what ``found``'s ``Type`` resources
        refer to through ``param``; ``_revinclude=Type:param[:Target]`` adds the
        ``Type`` resources that refer to any of ``found`` through ``param``. An
        ``iterate`` one applies again to what was added (at most
        :data:`MAX_DEPTH` rounds). At most :data:`MAX_CHAINED` are added.
        """
        seen = {(s.resource_type, s.id) for s in found}
        added: list[StoredResource] = []
        current = list(found)
        for depth in range(MAX_DEPTH):
            fresh: list[StoredResource] = []
            for value, iterate in include:
                if depth == 0 or iterate:
                    fresh.extend(self._forward(current, value))
            for value, iterate in revinclude:
                if depth == 0 or iterate:
                    fresh.extend(self._reverse(current, value))
            current = []
            for stored in fresh:
                if (stored.resource_type, stored.id) not in seen:
                    seen.add((stored.resource_type, stored.id))
                    current.append(stored)
            added.extend(current)
            if len(added) > MAX_CHAINED:
                raise InvalidInput(
                    f"_include and _revinclude would add more than {MAX_CHAINED} resources"
                )
            if not current:
                break
        return added

    @staticmethod
    def _include_spec(value: str) -> tuple[str, str, str | None]:
        parts = value.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidInput(
                f"_include and _revinclude take Type:parameter[:Target], got {value!r}"
            )
        rtype, code = parts[0], parts[1]
        param = registry().get(rtype, code)
        if param is None or param.type != "reference":
            raise InvalidInput(f"{code!r} is not a reference parameter of {rtype}")
        target = parts[2] if len(parts) == 3 else None
        if target is not None and param.targets and target not in param.targets:
            raise InvalidInput(f"{rtype}:{code} does not refer to {target}")
        return rtype, code, target

    def _forward(self, current: Sequence[StoredResource], value: str) -> list[StoredResource]:
        rtype, code, target = self._include_spec(value)
        param = registry().get(rtype, code)
        assert param is not None
        wanted: set[tuple[str, str]] = set()
        for stored in current:
            if stored.resource_type != rtype:
                continue
            for element, _ in param.path.evaluate(stored.resource()):
                ref = element.get("reference") if isinstance(element, dict) else None
                kind = reference_type(ref)
                # Local references only: an absolute URL names another server's resource.
                if isinstance(ref, str) and "://" not in ref and kind and kind == (target or kind):
                    wanted.add((kind, ref.rsplit("/", 1)[-1]))
        out = []
        for kind, rid in sorted(wanted):
            row = self._index.latest(kind, rid)
            if row is not None and not row.erased and not row.deleted:
                out.append(row)
        return self._reader.open_all(out)

    def _reverse(self, current: Sequence[StoredResource], value: str) -> list[StoredResource]:
        rtype, code, target = self._include_spec(value)
        refs = [
            f"{s.resource_type}/{s.id}"
            for s in current
            if target is None or s.resource_type == target
        ]
        if not refs:
            return []
        query = AllOf((reference_match(self._keys.search_key, rtype, code, refs),))
        rows = self._rows(rtype, query)
        if len(rows) > MAX_CHAINED:
            raise InvalidInput(f"_revinclude={value} would add more than {MAX_CHAINED} resources")
        return self._reader.open_all(rows)

    def compartment(
        self, patient_ids: Sequence[str], types: Collection[str] | None
    ) -> list[VersionRow]:
        """The latest, live rows in the compartments of ``Patient/<id>`` for ``patient_ids``.

        The Patients themselves first (in the order given), then by type and id:
        every resource a parameter of the Patient CompartmentDefinition links to
        one of the patients, found through the blind index (nothing decrypted),
        each once. ``types``: only these. The patients are looked up
        :data:`COMPARTMENT_BATCH` at a time, one index query per type each.
        """
        found: dict[tuple[str, str], VersionRow] = {}
        if types is None or "Patient" in types:
            for pid in patient_ids:
                row = self._index.latest("Patient", pid)
                if row is not None and not row.erased and not row.deleted:
                    found[("Patient", pid)] = row
        key = self._keys.search_key
        for at in range(0, len(patient_ids), COMPARTMENT_BATCH):
            refs = [f"Patient/{pid}" for pid in patient_ids[at : at + COMPARTMENT_BATCH]]
            for rtype, params in sorted(patient_compartment().items()):
                if types is not None and rtype not in types:
                    continue
                tokens = frozenset(
                    t for p in params for t in reference_match(key, rtype, p, refs).tokens
                )
                for row in self._rows(rtype, AllOf((Match(tokens),))):
                    found.setdefault((rtype, row.id), row)
        return list(found.values())

    def referenced(
        self,
        shown: Sequence[StoredResource],
        skip: Collection[tuple[str, str]],
        admit: Callable[[VersionRow], bool],
    ) -> list[StoredResource]:
        """The live resources ``shown`` refers to (local references), opened, by type and id.

        Those in ``skip`` (already shown elsewhere) and those ``admit`` refuses
        are left out; at most :data:`MAX_CHAINED` are opened, else
        :class:`InvalidInput` (ask for a smaller page).
        """
        wanted: set[tuple[str, str]] = set()
        for stored in shown:
            wanted |= local_references(stored.resource())
        wanted -= {(s.resource_type, s.id) for s in shown}
        out: list[StoredResource] = []
        for rtype, rid in sorted(wanted):
            if (rtype, rid) in skip:
                continue
            row = self._index.latest(rtype, rid)
            if row is None or row.erased or row.deleted or not admit(row):
                continue
            if len(out) >= MAX_CHAINED:
                raise InvalidInput(
                    f"the page refers to more than {MAX_CHAINED} resources (ask for a smaller _count)"
                )
            if (opened := self._reader.open_unless_failed(row)) is not None:
                out.append(opened)
        return out

    def open(self, rows: Sequence[VersionRow]) -> list[StoredResource]:
        """``rows`` decrypted, in order, without those whose write failed meanwhile."""
        return self._reader.open_all(rows)
