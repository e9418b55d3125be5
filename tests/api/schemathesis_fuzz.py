"""Schemathesis against a live node, in a process of its own (run by ``test_api_fuzz``).

Reads ``{"url", "token", "examples", "protected"}`` as JSON on stdin; for every
operation of ``/openapi.json`` it sends ``examples`` positive and (where the
schema allows) negative cases with the token, never a DELETE of a ``protected``
id, checks each answer with :class:`fuzz_support.Tally`, and prints
``{"sent", "statuses", "problems"}`` as one JSON line on stdout.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import requests
import schemathesis
from fuzz_support import Tally, fuzz_settings
from hypothesis import given
from hypothesis.errors import Unsatisfiable
from schemathesis.core.result import Ok


def main() -> None:
    params = json.load(sys.stdin)
    url, examples = str(params["url"]), int(params["examples"])
    protected = set(params["protected"])
    auth = {"Authorization": f"Bearer {params['token']}"}
    tally = Tally()
    schema = schemathesis.openapi.from_dict(requests.get(f"{url}/openapi.json", timeout=30).json())
    session = requests.Session()
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @fuzz_settings(examples)
            @given(case=operation.as_strategy(mode, headers=auth))
            def run(case: schemathesis.Case[Any]) -> None:
                if case.method.upper() == "DELETE" and any(
                    str(v) in protected for v in (case.path_parameters or {}).values()
                ):
                    return  # deleting a real record would be a valid write
                try:
                    response = case.call(base_url=url, session=session, timeout=30)
                except requests.ConnectionError as exc:
                    tally.problem("schemathesis", f"{case.method} {case.formatted_path}: {exc}")
                    return
                tally.check(
                    "schemathesis",
                    case.method.upper(),
                    str(response.request.url),
                    response.status_code,
                    {k.lower(): v[0] for k, v in response.headers.items()},
                    response.content.decode("utf-8", "replace"),
                )

            try:
                run()
            except Unsatisfiable:
                # Nothing to negate (an operation whose only parameters are free strings).
                assert mode == schemathesis.GenerationMode.NEGATIVE
    session.close()
    print(
        json.dumps(
            {
                "sent": tally.sent["schemathesis"],
                "statuses": dict(tally.statuses),
                "problems": tally.problems.get("schemathesis", []),
            }
        )
    )


if __name__ == "__main__":
    main()
