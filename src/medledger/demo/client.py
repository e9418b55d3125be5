"""The demo's HTTP client: one institution's API, as its clinical systems would call it.

Every call states the status it expects; anything else is a :class:`DemoFailed`
naming the request and the server's reason, so a broken step stops the story
with one clear line instead of telling a wrong one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from medledger.core.errors import MedledgerError
from medledger.localnet.netproc import node_tls
from medledger.localnet.spec import InstitutionEntry
from medledger.services.fhir import FHIR_JSON

__all__ = ["Answer", "DemoFailed", "NodeApi"]


class DemoFailed(MedledgerError):
    """A step of the demo did not get the answer the story depends on."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A response: status, JSON body (``None`` if none), and the refusal reason if any."""

    status: int
    body: Any

    @property
    def reason(self) -> str:
        """The OperationOutcome's diagnostics, or ``""``."""
        if isinstance(self.body, dict) and self.body.get("resourceType") == "OperationOutcome":
            issues = self.body.get("issue") or [{}]
            return str(issues[0].get("diagnostics", ""))
        return ""


class NodeApi:
    """One node's URL and tokens (``admin``, ``clinician``) from ``network.json``."""

    def __init__(self, entry: InstitutionEntry) -> None:
        self.institution = entry.institution
        self.url = entry.url
        self.tokens = {"admin": entry.tokens.admin, "clinician": entry.tokens.clinician}
        # HTTPS verified against the node's pinned certificate alone.
        self._verify = node_tls(entry)
        self._client = httpx.Client(base_url=self.url, timeout=60, verify=self._verify)

    def close(self) -> None:
        self._client.close()

    def _headers(self, role: str | None) -> dict[str, str]:
        headers = {"Content-Type": FHIR_JSON}
        if role is not None:
            headers["Authorization"] = f"Bearer {self.tokens[role]}"
        return headers

    def call(
        self,
        method: str,
        path: str,
        *,
        role: str | None = "clinician",
        body: Any = None,
        expect: int | Iterable[int] = 200,
        **params: Any,
    ) -> Answer:
        """``method path`` as ``role``; :class:`DemoFailed` unless the status is ``expect``."""
        try:
            response = self._client.request(
                method,
                path,
                headers=self._headers(role),
                content=None if body is None else _json(body),
                params={k: v for k, v in params.items() if v is not None},
            )
        except httpx.HTTPError as exc:
            raise DemoFailed(f"{method} {self.url}{path}: {type(exc).__name__}: {exc}") from None
        return _checked(method, f"{self.url}{path}", response, expect)

    def get(self, path: str, **kwargs: Any) -> Any:
        """GET ``path`` expecting 200; the JSON body."""
        return self.call("GET", path, **kwargs).body

    async def put_all(
        self, resources: Iterable[Mapping[str, Any]], *, writers: int, role: str = "clinician"
    ) -> int:
        """PUT every resource under its own id with ``writers`` concurrent requests."""
        todo = iter(list(resources))
        done = 0
        async with httpx.AsyncClient(base_url=self.url, timeout=60, verify=self._verify) as client:

            async def writer() -> None:
                nonlocal done
                for resource in todo:
                    path = f"/fhir/{resource['resourceType']}/{resource['id']}"
                    try:
                        response = await client.put(
                            path, headers=self._headers(role), content=_json(resource)
                        )
                    except httpx.HTTPError as exc:
                        raise DemoFailed(f"PUT {self.url}{path}: {type(exc).__name__}") from None
                    _checked("PUT", f"{self.url}{path}", response, (200, 201))
                    done += 1

            await asyncio.gather(*(writer() for _ in range(writers)))
        return done


def _json(body: Any) -> bytes:
    # FHIR decimals are floats here; the server keeps their text as sent.
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _checked(
    method: str, url: str, response: httpx.Response, expect: int | Iterable[int]
) -> Answer:
    try:
        body = response.json() if response.content else None
    except ValueError:
        body = None
    answer = Answer(response.status_code, body)
    wanted = {expect} if isinstance(expect, int) else set(expect)
    if answer.status not in wanted:
        why = answer.reason or response.text[:200]
        raise DemoFailed(f"{method} {url}: expected {sorted(wanted)}, got {answer.status}: {why}")
    return answer
