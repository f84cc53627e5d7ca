"""Ledger invariants on the real database, under random operation sequences and concurrency.

After anything: every journal transaction sums to zero; all entries sum to zero; each stored
balance equals the sum of its wallet entries; no balance is below its floor; held credits equal
the active holds; lots hold exactly the positive part of the balance; a key has one effect."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool

from creditflow.domain.lots import Lot, LotSource, plan_burn
from creditflow.domain.money import MICROS_PER_CREDIT, usage_charge_micros
from creditflow.ledger import accounts, metering, postings
from creditflow.ledger.metering import UsageEvent
from tests.support.ledger import assert_invariants

RATES = {"chat_message": Decimal(1), "llm_tokens": Decimal("0.1"), "voice_minute": Decimal(10)}
# CF_HYPOTHESIS_EXAMPLES=500 searches harder locally; CI runs the default.
PROPERTY = settings(max_examples=int(os.environ.get("CF_HYPOTHESIS_EXAMPLES", "25")), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@dataclass
class Model:
    """What the ledger must say, computed independently with the domain rules."""

    balance: int
    floor: int = 0
    holds: dict[str, int] = field(default_factory=dict)
    seen: dict[str, object] = field(default_factory=dict)

    @property
    def held(self) -> int:
        return sum(self.holds.values())


quantities = {
    "chat_message": st.integers(min_value=1, max_value=40).map(Decimal),
    "llm_tokens": st.integers(min_value=1, max_value=5000).map(Decimal),
    "voice_minute": st.decimals(min_value=Decimal("0.01"), max_value=Decimal(60), places=2),
}
track_op = st.sampled_from(sorted(RATES)).flatmap(lambda f: st.tuples(st.just("track"), st.just(f), quantities[f]))
operations = st.lists(st.one_of(
    track_op,
    st.tuples(st.just("adjust"), st.integers(min_value=-3000, max_value=3000).filter(bool)),
    st.tuples(st.just("hold"), st.decimals(min_value=Decimal(1), max_value=Decimal(200), places=1)),
    st.tuples(st.just("settle"), st.decimals(min_value=Decimal("0.1"), max_value=Decimal(100), places=1)),
    st.tuples(st.just("release")),
    st.tuples(st.just("replay")),
), min_size=1, max_size=25)


@PROPERTY
@given(ops=operations, line=st.sampled_from([0, 0, 500]), bonus=st.sampled_from([0, 100, 5000]))
async def test_random_operations_keep_every_invariant(pool: AsyncConnectionPool, ops: list[tuple], line: int,
                                                      bonus: int) -> None:
    acc = (await accounts.create_account(pool, name="P", billing_email="p@x.co", welcome_bonus_credits=bonus,
                                         overage_credit_line=line)).id
    model = Model(balance=bonus * MICROS_PER_CREDIT, floor=-line * MICROS_PER_CREDIT)
    keys: list[tuple[str, UsageEvent, object]] = []
    for n, op in enumerate(ops):
        kind = op[0]
        if kind == "track":
            event = UsageEvent.build(acc, op[1], op[2], f"t{n}")
            charge = usage_charge_micros(op[2], RATES[op[1]])
            result = await metering.track(pool, event)
            affordable = model.balance - model.held - charge >= model.floor
            assert result.allowed is affordable and result.code == ("ok" if affordable else "insufficient_credits")
            if affordable:
                model.balance -= charge
                keys.append((f"t{n}", event, result.transaction_id))
        elif kind == "adjust":
            amount = op[1] * MICROS_PER_CREDIT
            ok = amount > 0 or model.balance + amount - model.held >= model.floor
            try:
                await postings.adjust(pool, account_id=acc, amount_credits=op[1], reason="prop",
                                      idempotency_key=f"a{n}")
                assert ok
                model.balance += amount
            except Exception as exc:  # noqa: BLE001 - the refusal must be the floor
                assert not ok and getattr(exc, "code", None) == "insufficient_credits"
        elif kind == "hold":
            amount = usage_charge_micros(op[1], RATES["voice_minute"])
            result = await metering.create_hold(pool, UsageEvent.build(acc, "voice_minute", op[1], f"h{n}"), 3600)
            assert result.allowed is (model.balance - model.held - amount >= model.floor)
            if result.allowed:
                model.holds[result.hold_id or ""] = amount
        elif kind == "settle" and model.holds:
            hold_id, amount = next(iter(model.holds.items()))
            charge = usage_charge_micros(op[1], RATES["voice_minute"])
            result = await metering.settle_hold(pool, acc, hold_id, op[1])
            affordable = model.balance - (model.held - amount) - charge >= model.floor
            assert result.allowed is affordable
            if affordable:
                del model.holds[hold_id]
                model.balance -= charge
        elif kind == "release" and model.holds:
            hold_id = next(iter(model.holds))
            assert (await metering.release_hold(pool, acc, hold_id)).allowed
            del model.holds[hold_id]
        elif kind == "replay" and keys:
            key, event, txn = keys[0]
            again = await metering.track(pool, event)
            assert again.replayed and again.transaction_id == txn
        balance = (await metering.check(pool, acc, "chat_message")).balances
        assert balance is not None
        assert balance.balance * MICROS_PER_CREDIT == model.balance
        assert balance.pending_charges * MICROS_PER_CREDIT == model.held
    await assert_invariants(pool)


# coalesce=True: the default, two writers with groups; False: one transaction per event, each on its own connection.
@pytest.mark.parametrize("coalesce", [True, False], ids=["grouped", "one-connection-each"])
async def test_concurrent_debits_on_one_account_admit_exactly_the_affordable(pool: AsyncConnectionPool,
                                                                             coalesce: bool) -> None:
    acc = (await accounts.create_account(pool, name="C", billing_email="c@x.co", welcome_bonus_credits=250)).id
    events = [UsageEvent.build(acc, "voice_minute", 1, f"c{i}") for i in range(40)]
    results = await asyncio.gather(*(metering.track(pool, e, coalesce=coalesce) for e in events))
    assert sum(r.allowed for r in results) == 25
    assert {r.code for r in results if not r.allowed} == {"insufficient_credits"}
    assert (await metering.check(pool, acc, "chat_message")).balances.balance == 0  # type: ignore[union-attr]
    await assert_invariants(pool)


async def test_concurrent_batches_across_accounts_do_not_deadlock(pool: AsyncConnectionPool) -> None:
    ids = [(await accounts.create_account(pool, name=f"B{i}", billing_email="b@x.co")).id for i in range(4)]
    batches = [[UsageEvent.build(ids[(b + i) % 4], "chat_message", 1, f"b{b}-{i}") for i in range(20)]
               for b in range(6)]
    results = await asyncio.gather(*(metering.track_batch(pool, batch) for batch in batches))
    assert all(r.allowed for batch in results for r in batch)
    for acc in ids:
        assert (await metering.check(pool, acc, "chat_message")).balances.balance == 5000 - 30  # type: ignore[union-attr]
    await assert_invariants(pool)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(quantity=st.decimals(min_value=Decimal("0.000001"), max_value=Decimal(10**6), places=6),
       rate=st.decimals(min_value=Decimal(0), max_value=Decimal(1000), places=6))
async def test_sql_and_domain_round_the_same_way(pool: AsyncConnectionPool, quantity: Decimal, rate: Decimal) -> None:
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT cf_charge_micros(%s, %s) AS m", (quantity, rate))).fetchone()
    assert row["m"] == usage_charge_micros(quantity, rate)


GRANT_SOURCES = [LotSource.PLAN, LotSource.WELCOME_BONUS, LotSource.GOODWILL, LotSource.PURCHASE,
                 LotSource.AUTO_RECHARGE]


@PROPERTY
@given(grants=st.lists(st.tuples(st.sampled_from(GRANT_SOURCES), st.integers(min_value=1, max_value=500),
                                 st.one_of(st.none(), st.integers(min_value=1, max_value=90))),
                       min_size=1, max_size=6),
       debit=st.integers(min_value=1, max_value=3000))
async def test_sql_burn_order_matches_the_domain(pool: AsyncConnectionPool, grants: list[tuple], debit: int) -> None:
    acc = (await accounts.create_account(pool, name="L", billing_email="l@x.co", welcome_bonus_credits=0,
                                         overage_credit_line=3000)).id
    base = datetime.now(UTC)
    for i, (source, amount, expiry_days) in enumerate(grants):
        await postings.post(pool, account_id=acc, type="grant", amount_micros=amount * MICROS_PER_CREDIT,
                            counter_book="system:promotions", description="g", idempotency_key=f"g{i}",
                            lot_source=source,
                            lot_expires_at=None if expiry_days is None else base + timedelta(days=expiry_days))
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT id, source, remaining_micros, created_at, expires_at FROM credit_lots WHERE account_id = %s",
            (acc,))).fetchall()
    lots = [Lot(id=r["id"], source=LotSource(r["source"]), remaining_micros=r["remaining_micros"],
                created_at=r["created_at"], expires_at=r["expires_at"]) for r in rows]
    takes, _ = plan_burn(lots, debit * MICROS_PER_CREDIT)
    expected = {lot.id: lot.remaining_micros for lot in lots}
    for lot_id, take in takes:
        expected[lot_id] -= take
    await postings.adjust(pool, account_id=acc, amount_credits=-debit, reason="burn", idempotency_key="d")
    async with pool.connection() as conn:
        after = {r["id"]: r["remaining_micros"] for r in await (await conn.execute(
            "SELECT id, remaining_micros FROM credit_lots WHERE account_id = %s", (acc,))).fetchall()}
    assert after == expected
    await assert_invariants(pool)


async def test_journal_is_append_only(pool: AsyncConnectionPool) -> None:
    await accounts.create_account(pool, name="A", billing_email="a@x.co")
    async with pool.connection() as conn:
        for sql in ("UPDATE journal SET amount_micros = 0", "DELETE FROM journal", "TRUNCATE journal"):
            try:
                await conn.execute(sql)
            except psycopg.Error as exc:
                assert "append-only" in str(exc)
            else:
                raise AssertionError(f"{sql} was allowed")


async def test_journal_rows_must_name_a_system_counter_book(pool: AsyncConnectionPool) -> None:
    acc = (await accounts.create_account(pool, name="A", billing_email="a@x.co")).id
    async with pool.connection() as conn:
        try:
            await conn.execute(
                "INSERT INTO journal (account_id, type, amount_micros, counter_book, balance_after_micros,"
                " idempotency_key) VALUES (%s, 'x', 5, 'wallet', 5, 'k')", (acc,))
        except psycopg.errors.CheckViolation:
            pass
        else:
            raise AssertionError("a journal row without a system counter book was accepted")


batch_events = st.lists(st.tuples(
    st.integers(min_value=0, max_value=2),                      # which account
    st.sampled_from(["chat_message", "llm_tokens", "voice_minute", "teleportation"]),
    st.sampled_from([Decimal(1), Decimal(7), Decimal("2.5"), Decimal(400), Decimal(2000)]),
    st.integers(min_value=0, max_value=12),                     # key (repeats are duplicates)
), min_size=1, max_size=30)


@PROPERTY
@given(events=batch_events)
async def test_batch_decides_exactly_like_one_by_one(pool: AsyncConnectionPool, events: list[tuple]) -> None:
    """The same events through ``track_batch`` and through ``track`` one at a time (on twin
    accounts) give the same decisions, charges and balances."""

    async def twins() -> list[str]:
        return [(await accounts.create_account(pool, name="T", billing_email="t@x.co", welcome_bonus_credits=100,
                                               overage_credit_line=50 if i == 2 else 0)).id for i in range(3)]

    batch_ids, single_ids = await twins(), await twins()

    def build(ids: list[str]) -> list[UsageEvent]:
        return [UsageEvent.build(ids[a], f, v, f"k{k}") for a, f, v, k in events]

    batched = await metering.track_batch(pool, build(batch_ids))
    single = [await metering.track(pool, e) for e in build(single_ids)]
    assert len(batched) == len(single) == len(events)
    for b, s in zip(batched, single, strict=True):
        assert (b.allowed, b.code, b.credits_charged, b.replayed, b.credits_required) == (
            s.allowed, s.code, s.credits_charged, s.replayed, s.credits_required)
        if s.code in ("ok", "insufficient_credits"):
            assert (b.balance, b.credits_per_unit) == (s.balance, s.credits_per_unit)
    for b_id, s_id in zip(batch_ids, single_ids, strict=True):
        b_bal = (await metering.check(pool, b_id, "chat_message")).balances
        s_bal = (await metering.check(pool, s_id, "chat_message")).balances
        assert b_bal == s_bal
    await assert_invariants(pool)


@PROPERTY
@given(steps=st.lists(st.one_of(
    st.tuples(st.just("grant"), st.sampled_from(GRANT_SOURCES), st.integers(min_value=1, max_value=300),
              st.one_of(st.none(), st.integers(min_value=1, max_value=90))),
    st.tuples(st.just("use"), st.integers(min_value=1, max_value=400)),
), min_size=1, max_size=12))
async def test_deferred_burns_equal_burning_each_event_at_once(pool: AsyncConnectionPool, steps: list[tuple]) -> None:
    """The hot path defers lot burns; settling them later must leave every lot exactly as burning
    each usage event immediately (domain.plan_burn) would, whatever grants came in between."""
    acc = (await accounts.create_account(pool, name="D", billing_email="d@x.co", welcome_bonus_credits=0,
                                         overage_credit_line=1000)).id
    base = datetime.now(UTC)
    model: dict[str, Lot] = {}
    balance = 0
    for n, step in enumerate(steps):
        if step[0] == "grant":
            _, source, amount, expiry_days = step
            result = await postings.post(
                pool, account_id=acc, type="grant", amount_micros=amount * MICROS_PER_CREDIT,
                counter_book="system:promotions", description="g", idempotency_key=f"g{n}", lot_source=source,
                lot_expires_at=None if expiry_days is None else base + timedelta(days=expiry_days))
            async with pool.connection() as conn:
                row = await (await conn.execute("SELECT * FROM credit_lots WHERE id = %s", (result.lot_id,))).fetchone()
            model[row["id"]] = Lot(id=row["id"], source=LotSource(row["source"]),
                                   remaining_micros=row["remaining_micros"], created_at=row["created_at"],
                                   expires_at=row["expires_at"])
            balance += amount * MICROS_PER_CREDIT
        else:
            charge = step[1] * MICROS_PER_CREDIT
            result = await metering.track(pool, UsageEvent.build(acc, "chat_message", step[1], f"u{n}"))
            if not result.allowed:
                continue
            takes, _ = plan_burn(list(model.values()), min(charge, max(balance, 0)))
            for lot_id, take in takes:
                lot = model[lot_id]
                model[lot_id] = Lot(id=lot.id, source=lot.source, remaining_micros=lot.remaining_micros - take,
                                    created_at=lot.created_at, expires_at=lot.expires_at)
            balance -= charge
    async with pool.connection() as conn:
        await conn.execute("SELECT cf_settle_account_burns(%s)", (acc,))
        actual = {r["id"]: r["remaining_micros"] for r in await (await conn.execute(
            "SELECT id, remaining_micros FROM credit_lots WHERE account_id = %s", (acc,))).fetchall()}
    assert actual == {lot_id: lot.remaining_micros for lot_id, lot in model.items()}
    await assert_invariants(pool)


async def test_reading_lots_settles_pending_burns(pool: AsyncConnectionPool) -> None:
    from creditflow.ledger.lots import account_lots

    acc = (await accounts.create_account(pool, name="R", billing_email="r@x.co", welcome_bonus_credits=100)).id
    await postings.post(pool, account_id=acc, type="purchase", amount_micros=500 * MICROS_PER_CREDIT,
                        counter_book="system:payments_clearing", description="p", idempotency_key="p1",
                        lot_source=LotSource.PURCHASE)
    await metering.track(pool, UsageEvent.build(acc, "voice_minute", 15, "call"))  # 150 credits, deferred
    lots = await account_lots(pool, acc, include_depleted=True)
    assert [(lot.source, lot.remaining) for lot in lots] == [(LotSource.WELCOME_BONUS, 0), (LotSource.PURCHASE, 450)]
    await assert_invariants(pool)
