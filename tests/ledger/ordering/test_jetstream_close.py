"""Closing a JetStream orderer's connection after its server died.

nats-py can raise the dead socket's cancelled close-waiter out of
``Client.close()``; closing must treat that as a failed close, while a real
cancellation of the closing task must still propagate.
"""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
from nats.aio.client import Client

from medledger.ledger.ordering import jetstream


class _DeadSocketClient:
    """Stands in for the one behaviour under test: close() raising CancelledError."""

    def __init__(self) -> None:
        self.close_calls = 0

    async def close(self) -> None:
        self.close_calls += 1
        raise asyncio.CancelledError


class _SlowClient:
    async def close(self) -> None:
        await asyncio.sleep(10)


def test_a_cancelled_close_waiter_is_a_failed_close_not_a_cancellation() -> None:
    client = _DeadSocketClient()

    async def main() -> str:
        await jetstream._close_quietly(cast(Client, client))
        return "went on"

    assert asyncio.run(main()) == "went on"
    assert client.close_calls == 1


def test_cancelling_the_closing_task_still_cancels_it() -> None:
    async def main() -> None:
        task = asyncio.create_task(jetstream._close_quietly(cast(Client, _SlowClient())))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()

    asyncio.run(main())
