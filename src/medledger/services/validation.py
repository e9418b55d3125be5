"""Where FHIR validation runs: inline, or in worker processes beside the event loop.

``fhir.resources`` validation is pure-Python-heavy (hundreds of µs per
resource) and holds the GIL, so on a multi-core machine the records service
can hand it to a small process pool and keep encrypting and committing other
writes meanwhile. The result is the same either way: the resource is
accepted unchanged, or :class:`~medledger.services.fhir.FhirInvalid` is raised.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from medledger.services.fhir import FhirInvalid, validate_resource

__all__ = ["Validator"]


def _warm() -> None:
    # Import the models once per worker, before the first real request.
    validate_resource({"resourceType": "Patient"})


class Validator:
    """Validates resources inline (``workers=0``) or in ``workers`` processes."""

    def __init__(self, workers: int = 0) -> None:
        self._workers = workers
        self._pool: ProcessPoolExecutor | None = None

    async def validate(self, resource: Any, expected_type: str | None = None) -> None:
        """Return if ``resource`` is a valid FHIR R4 resource; raise ``FhirInvalid`` otherwise."""
        if self._workers <= 0:
            validate_resource(resource, expected_type=expected_type)
            return
        if self._pool is None:
            # forkserver: never fork a process that already runs threads.
            self._pool = ProcessPoolExecutor(
                max_workers=self._workers,
                mp_context=multiprocessing.get_context("forkserver"),
                initializer=_warm,
            )
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, _check, resource, expected_type)

    async def validate_many(self, resources: Sequence[Any]) -> list[FhirInvalid | None]:
        """For each resource, ``None`` if valid, else why not (for Bundles of thousands).

        Inline, the whole list is checked on a worker thread, so a large Bundle
        does not stall the event loop (the thread yields the GIL every few ms);
        with workers, the resources are spread over the pool.
        """
        if self._workers <= 0:
            return await asyncio.to_thread(_check_all, list(resources))
        return list(await asyncio.gather(*(self._check_one(resource) for resource in resources)))

    async def _check_one(self, resource: Any) -> FhirInvalid | None:
        try:
            await self.validate(resource)
        except FhirInvalid as exc:
            return exc
        return None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _check_all(resources: list[Any]) -> list[FhirInvalid | None]:
    found: list[FhirInvalid | None] = []
    for resource in resources:
        try:
            validate_resource(resource)
        except FhirInvalid as exc:
            found.append(exc)
        else:
            found.append(None)
    return found


def _check(resource: Any, expected_type: str | None) -> None:
    validate_resource(resource, expected_type=expected_type)
