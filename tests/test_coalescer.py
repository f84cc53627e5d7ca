"""Group commit on the hot path: concurrent ``track`` calls share transactions, and every caller
still gets its own exact, exactly-once result."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from creditflow.ledger import accounts, limits, metering
from creditflow.ledger.coalescer import TrackCoalescer
from creditflow.ledger.metering import UsageEvent
from creditflow.ledger.models import TrackResult
from tests.support.ledger import assert_invariants


def counting_group(sizes: list[int]) -> Any:
    """``metering.track_grouped`` that also notes the size of every group it writes."""
    async def group(conn: AsyncConnection[Any], events: Sequence[object]) -> list[TrackResult]:
        sizes.append(len(events))
        return await metering.track_grouped(conn, events)  # type: ignore[arg-type]
    return group


@pytest.mark.parametrize("batch", [False, True], ids=["grouped", "batch"])
async def test_concurrent_tracks_are_coalesced_and_exact(pool: AsyncConnectionPool, batch: bool) -> None:
    calls: list[int] = []

    async def batch_group(conn: AsyncConnection[Any], events: Sequence[object]) -> list[TrackResult]:
        calls.append(len(events))  # cf_track_batch, for the same decisions
        return await metering.track_batch(pool, events)  # type: ignore[arg-type]

    group = batch_group if batch else counting_group(calls)
    coalescer = TrackCoalescer(pool, metering.track_one, group, writers=1)  # type: ignore[arg-type]
    ids = [(await accounts.create_account(pool, name="C", billing_email="c@x.co", welcome_bonus_credits=100)).id
           for _ in range(3)]
    # The third account is under spend control: a daily limit of 80 credits stops it at 8 of its 10 affordable
    # minutes (batches holding it are decided event by event, as cf_track does).
    await limits.update_limits(pool, ids[2], {"daily_limit_micros": 80_000_000})
    # 3 accounts x 12 voice minutes of 10 credits: 10 affordable per account; plus duplicate keys.
    events = [UsageEvent.build(ids[i % 3], "voice_minute", 1, f"e{i // 3}") for i in range(36)]
    events += [UsageEvent.build(ids[0], "voice_minute", 1, "e0")] * 3
    results = await asyncio.gather(*(coalescer.track(e) for e in events))
    assert calls and max(calls) > 1, calls  # events shared transactions
    by_account = {acc: [r for e, r in zip(events, results, strict=True) if e.account_id == acc] for acc in ids}
    for acc, expected, refusal in ((ids[0], 10, "insufficient_credits"), (ids[1], 10, "insufficient_credits"),
                                   (ids[2], 8, "daily_limit_reached")):
        rs = by_account[acc]
        fresh = [r for r in rs if r.allowed and not r.replayed]
        assert len(fresh) == expected, acc
        assert {r.code for r in rs if not r.allowed} == {refusal}
    replays = [r for e, r in zip(events, results, strict=True) if e.account_id == ids[0] and e.idempotency_key == "e0"]
    assert len({r.transaction_id for r in replays}) == 1 and sum(not r.replayed for r in replays) == 1
    for acc, left in ((ids[0], 0), (ids[1], 0), (ids[2], 20)):
        assert (await metering.check(pool, acc, "chat_message")).balances.balance == left  # type: ignore[union-attr]
    await assert_invariants(pool)


async def test_a_failing_group_falls_back_to_one_by_one(pool: AsyncConnectionPool) -> None:
    async def broken_group(conn: AsyncConnection[Any], events: Sequence[object]) -> list[TrackResult]:
        await conn.close()  # the writer's connection is gone: the fallback takes a fresh one from the pool
        raise psycopg.OperationalError("connection lost mid-group")

    coalescer = TrackCoalescer(pool, metering.track_one, broken_group, writers=1)  # type: ignore[arg-type]
    acc = (await accounts.create_account(pool, name="F", billing_email="f@x.co")).id
    events = [UsageEvent.build(acc, "chat_message", 1, f"f{i}") for i in range(6)]
    results = await asyncio.gather(*(coalescer.track(e) for e in events))
    assert all(r.allowed and r.credits_charged == 1 for r in results)
    assert (await metering.check(pool, acc, "chat_message")).balances.balance == 4994  # type: ignore[union-attr]


async def test_replay_after_the_balance_dropped_is_still_a_replay(pool: AsyncConnectionPool) -> None:
    acc = (await accounts.create_account(pool, name="R", billing_email="r@x.co", welcome_bonus_credits=100)).id
    first = await metering.track(pool, UsageEvent.build(acc, "voice_minute", 3, "call-1"))
    await metering.track(pool, UsageEvent.build(acc, "voice_minute", 7, "call-2"))  # balance now 0
    for coalesce in (True, False):
        again = await metering.track(pool, UsageEvent.build(acc, "voice_minute", 3, "call-1"), coalesce=coalesce)
        assert again.allowed and again.replayed and again.transaction_id == first.transaction_id
        conflict = await metering.track(pool, UsageEvent.build(acc, "voice_minute", 4, "call-1"), coalesce=coalesce)
        assert conflict.code == "idempotency_conflict"


async def test_waiting_calls_are_split_evenly_among_the_writers(pool: AsyncConnectionPool) -> None:
    groups: list[int] = []
    alone: list[object] = []

    async def counting_alone(conn: AsyncConnection[Any], event: object) -> TrackResult:
        alone.append(event)
        return await metering.track_one(conn, event)  # type: ignore[arg-type]

    coalescer = TrackCoalescer(pool, counting_alone, counting_group(groups), writers=2)  # type: ignore[arg-type]
    acc = (await accounts.create_account(pool, name="S", billing_email="s@x.co")).id
    # Nothing else waiting: a lone call is written at once, alone, through cf_track.
    assert (await coalescer.track(UsageEvent.build(acc, "chat_message", 1, "s-alone"))).allowed
    assert len(alone) == 1 and groups == []
    # Eight calls in one turn of the event loop: two writers, four events each, one transaction per writer.
    results = await asyncio.gather(*(coalescer.track(UsageEvent.build(acc, "chat_message", 1, f"s{i}"))
                                     for i in range(8)))
    assert groups == [4, 4] and len(alone) == 1
    for _ in range(3):  # each writer lingers one turn, finds the queue empty and hands its connection back
        await asyncio.sleep(0)
    stats = pool.get_stats()
    assert stats["pool_size"] == stats["pool_available"], stats
    assert {r.balance for r in results} == set(range(4991, 4999))
    with pytest.raises(ValueError):
        TrackCoalescer(pool, counting_alone, counting_group(groups), writers=0)  # type: ignore[arg-type]


async def test_the_number_of_writers_is_configurable_per_pool(pool: AsyncConnectionPool) -> None:
    from creditflow.ledger.coalescer import DEFAULT_WRITERS, coalescer_for

    default = coalescer_for(pool, metering.track_one, metering.track_grouped)  # type: ignore[arg-type]
    assert default.writers == DEFAULT_WRITERS
    metering.configure_track(pool, writers=5)
    configured = coalescer_for(pool, metering.track_one, metering.track_grouped)  # type: ignore[arg-type]
    assert configured.writers == 5 and configured is not default
    acc = (await accounts.create_account(pool, name="W", billing_email="w@x.co")).id
    results = await asyncio.gather(*(metering.track(pool, UsageEvent.build(acc, "chat_message", 1, f"w{i}"))
                                     for i in range(12)))
    assert sorted(r.balance for r in results) == list(range(4988, 5000))
    metering.configure_track(pool, writers=DEFAULT_WRITERS)


async def test_callers_get_the_error_when_no_connection_can_be_had(database_url: str) -> None:
    from creditflow.ledger.db import open_pool

    closed = open_pool(database_url, 1, 2)
    await closed.open()
    acc = (await accounts.create_account(closed, name="P", billing_email="p@x.co")).id
    await closed.close()
    coalescer = TrackCoalescer(closed, metering.track_one, metering.track_grouped)  # type: ignore[arg-type]
    results = await asyncio.wait_for(asyncio.gather(
        *(coalescer.track(UsageEvent.build(acc, "chat_message", 1, f"p{i}")) for i in range(5)),
        return_exceptions=True), timeout=10)
    assert all(isinstance(r, Exception) for r in results), results


async def test_a_busy_writer_hands_its_connection_back_now_and_then(pool: AsyncConnectionPool,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from creditflow.ledger import coalescer as coalescer_module

    checkouts: list[int] = []
    writes: list[int] = []
    getconn = pool.getconn

    async def counting_getconn(*args: Any, **kwargs: Any) -> AsyncConnection[Any]:
        checkouts.append(1)
        return await getconn(*args, **kwargs)

    monkeypatch.setattr(pool, "getconn", counting_getconn)
    coalescer = TrackCoalescer(pool, metering.track_one, counting_group(writes), writers=1)  # type: ignore[arg-type]
    acc = (await accounts.create_account(pool, name="H", billing_email="h@x.co")).id

    async def run(tag: str) -> None:  # three callers, each sending its next event once the last one is answered
        async def caller(c: int) -> None:
            for i in range(6):
                assert (await coalescer.track(UsageEvent.build(acc, "chat_message", 1, f"{tag}{c}-{i}"))).allowed
        checkouts.clear()
        writes.clear()
        await asyncio.gather(*(caller(c) for c in range(3)))

    await run("a")  # the writer keeps one connection for all six groups of three
    assert writes == [3] * 6 and len(checkouts) == 1
    monkeypatch.setattr(coalescer_module, "WRITES_PER_CHECKOUT", 2)
    await run("b")  # ... or hands it back every second group
    assert writes == [3] * 6 and len(checkouts) == 3
    assert (await metering.check(pool, acc, "chat_message")).balances.balance == 5000 - 36  # type: ignore[union-attr]
