"""Which FHIRPath evaluator indexes faster: ``fhirpathpy`` or the compiled subset (decision 0034).

Evaluates every search parameter's expression of every resource of a
synthetic patient with both, checks they select the same values, and prints
the time per resource of each (best of ``--rounds``, the two interleaved so a
busy machine slows both alike). Run: ``python bench/fhirpath_evaluators.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from fhirpathpy import compile as fhirpath_compile
from fhirpathpy.models import models

from medledger.services.search_registry import registry
from medledger.synthetic import generate_patient


def _canonical(values: list[Any]) -> list[str]:
    return sorted(json.dumps(v, sort_keys=True, default=str) for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resources", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    resources = list(
        generate_patient(1, seed=3, resources_per_patient=args.resources).all_resources()
    )
    reg = registry()
    compiled_py = {}
    for r in resources:
        rtype = r["resourceType"]
        for code, p in reg.parameters(rtype).items():
            if (rtype, code) not in compiled_py:
                compiled_py[(rtype, code)] = fhirpath_compile(p.expression, models["r4"])
    mismatches = 0
    failing: set[tuple[str, str]] = set()
    for r in resources:
        for code, p in reg.parameters(r["resourceType"]).items():
            ours = _canonical([v for v, _ in p.path.evaluate(r)])
            try:
                theirs = _canonical(compiled_py[(r["resourceType"], code)](r))
            except Exception as exc:  # fhirpathpy has no resolve()
                failing.add((r["resourceType"], code))
                if len(failing) <= 3:
                    print("fhirpathpy fails:", r["resourceType"], code, exc)
                continue
            if ours != theirs:
                mismatches += 1
                if mismatches <= 400 and code not in (
                    "_id",
                    "_lastUpdated",
                    "_profile",
                    "_security",
                    "_tag",
                    "_source",
                ):
                    print("differs:", r["resourceType"], code, ours[:2], theirs[:2])
    best_ours = best_py = float("inf")
    for _ in range(args.rounds):
        t = time.perf_counter()
        for r in resources:
            for p in reg.parameters(r["resourceType"]).values():
                p.path.evaluate(r)
        best_ours = min(best_ours, time.perf_counter() - t)
        t = time.perf_counter()
        for r in resources:
            for code in reg.parameters(r["resourceType"]):
                if (r["resourceType"], code) not in failing:
                    compiled_py[(r["resourceType"], code)](r)
        best_py = min(best_py, time.perf_counter() - t)
    n = len(resources)
    print(
        f"{n} resources, {mismatches} parameter values differ, {len(failing)} parameters "
        "fhirpathpy cannot evaluate (not timed)"
    )
    print(f"compiled subset: {best_ours / n * 1e6:.0f} us per resource (every parameter)")
    print(f"fhirpathpy 2.2.4: {best_py / n * 1e6:.0f} us per resource (every parameter)")


if __name__ == "__main__":
    main()
