"""The sequencer lease and the fence of chain appends (``storage.postgres.lease``), on a real
PostgreSQL: one holder at a time, a takeover once the holder's session ended, and a deposed
sequencer that still runs cannot append — no fork, whatever it believes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import psycopg
import pytest
from pg_server import unique

from medledger.core.errors import Deposed, RetryableStorageError
from medledger.core.keys import SigningKey
from medledger.ledger.private import PrivateChain
from medledger.storage.postgres.chain import PostgresChainStore
from medledger.storage.postgres.lease import SequencerLease
from medledger.storage.postgres.migrations import drop_schema

CHAIN = "private:lease-test"


@pytest.fixture
def schema(pg_dsn: str) -> Iterator[str]:
    name = unique("lease")
    store = PostgresChainStore.create(pg_dsn, CHAIN, schema=name)
    PrivateChain.create(
        store, SigningKey.generate(), chain_id=CHAIN, institution="lease-test", name="Lease"
    )
    store.close()
    yield name
    drop_schema(pg_dsn, name)


def _heights(dsn: str, schema: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(f'SELECT height FROM "{schema}".blocks ORDER BY height').fetchall()
    return [int(r[0]) for r in rows]


def test_one_holder_at_a_time_and_a_takeover_once_its_session_ends(
    pg_dsn: str, schema: str
) -> None:
    first, second = SequencerLease(pg_dsn, schema), SequencerLease(pg_dsn, schema)
    try:
        epoch = first.try_acquire()
        assert epoch is not None
        assert second.try_acquire() is None, "two holders of the sequencer lease"
        first.publish("10.0.0.1:8701")
        active = second.active()
        assert active is not None
        assert (active.epoch, active.address) == (epoch, "10.0.0.1:8701")
        first.check()  # still the holder

        first.close()  # the active host died: PostgreSQL ends its session
        taken = _take(second)
        assert taken == epoch + 1
        after = second.active()
        assert after is not None
        # The new holder has not published yet: nobody is sent to the dead address.
        assert (after.epoch, after.address) == (epoch + 1, None)
        with pytest.raises(Deposed):
            first.check()
        with pytest.raises(Deposed):
            first.publish("10.0.0.1:8701")
    finally:
        first.close()
        second.close()


def _end_session_of(dsn: str, lease: SequencerLease) -> None:
    """End the PostgreSQL session holding ``lease``'s advisory lock, from another session."""
    key = "medledger:sequencer:" + lease.schema
    with psycopg.connect(dsn, autocommit=True) as admin:
        ended = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
            " AND granted AND objsubid = 1 AND objid::bigint = (hashtext(%s)::bigint & 4294967295)",
            (key,),
        ).fetchall()
    assert ended == [(True,)]


def _take(lease: SequencerLease) -> int | None:
    """``lease.try_acquire()`` until it succeeds or 10 s passed: the server ends a session
    (and releases its lock) a moment after its connection closed."""
    deadline = time.monotonic() + 10
    while True:
        taken = lease.try_acquire()
        if taken is not None or time.monotonic() > deadline:
            return taken
        time.sleep(0.05)


def _settled_check(lease: SequencerLease) -> None:
    """``lease.check()`` once it is past a broken connection (the first call after a
    session ended may only find the connection broken: retryable)."""
    for _ in range(100):
        try:
            lease.check()
            return
        except RetryableStorageError:
            time.sleep(0.05)
    lease.check()


def test_the_holder_takes_its_lease_again_after_its_session_ended_if_nobody_took_over(
    pg_dsn: str, schema: str
) -> None:
    """A PostgreSQL restart ends every session: the active host keeps its role (same epoch)
    when no standby took it meanwhile, and loses it otherwise."""
    lease, other = SequencerLease(pg_dsn, schema), SequencerLease(pg_dsn, schema)
    try:
        epoch = lease.try_acquire()
        assert epoch is not None
        _end_session_of(pg_dsn, lease)
        _settled_check(lease)  # held again
        active = other.active()
        assert active is not None and active.epoch == epoch
        assert other.try_acquire() is None, "the lease is held again"

        _end_session_of(pg_dsn, lease)
        assert _take(other) == epoch + 1
        with pytest.raises(Deposed):
            _settled_check(lease)
    finally:
        lease.close()
        other.close()


def test_a_deposed_sequencer_cannot_append(pg_dsn: str, schema: str) -> None:
    """Split brain: the old holder's lease session is ended under it (as by a network cut)
    while its process and its chain keep running; its next block is refused, the new
    holder's is appended, and the chain has one block per height."""
    key = SigningKey.generate()
    old_lease, new_lease = SequencerLease(pg_dsn, schema), SequencerLease(pg_dsn, schema)
    old_store = PostgresChainStore.open(pg_dsn, CHAIN, schema=schema)
    new_store = PostgresChainStore.open(pg_dsn, CHAIN, schema=schema)

    async def scenario() -> None:
        old_epoch = old_lease.try_acquire()
        assert old_epoch is not None
        old_store.fence(old_epoch)
        old_chain = PrivateChain(old_store, key, proposer="lease-test")
        await old_chain.submit("access", {"n": 1})  # the holder appends
        assert _heights(pg_dsn, schema) == [0, 1]

        _end_session_of(pg_dsn, old_lease)
        new_epoch = _take(new_lease)
        assert new_epoch == old_epoch + 1
        new_store.fence(new_epoch)
        new_chain = PrivateChain(new_store, key, proposer="lease-test")

        # The deposed chain still believes it is the writer (its tip is height 1).
        with pytest.raises(Deposed):
            await old_chain.submit("access", {"n": 2})
        assert _heights(pg_dsn, schema) == [0, 1]
        await new_chain.submit("access", {"n": 3})
        assert _heights(pg_dsn, schema) == [0, 1, 2]
        # Refused at the next height as well: its blocks never join the chain.
        with pytest.raises(Deposed):
            await old_chain.submit("access", {"n": 4})
        assert _heights(pg_dsn, schema) == [0, 1, 2]
        assert b'"n":3' in new_store.block(2).tx_data[0]
        with pytest.raises(Deposed):
            _settled_check(old_lease)
        await old_chain.close()
        await new_chain.close()

    try:
        asyncio.run(scenario())
    finally:
        old_lease.close()
        new_lease.close()
        old_store.close()
        new_store.close()


def test_an_unfenced_store_appends_as_before(pg_dsn: str, schema: str) -> None:
    """The consortium chain and single-host tools open the store without a fence."""
    store = PostgresChainStore.open(pg_dsn, CHAIN, schema=schema)

    async def scenario() -> None:
        chain = PrivateChain(store, SigningKey.generate(), proposer="lease-test")
        await chain.submit("access", {"n": 1})
        await chain.close()

    try:
        asyncio.run(scenario())
        assert _heights(pg_dsn, schema) == [0, 1]
    finally:
        store.close()
