"""Ledger invariants on the real database, under random operation sequences and concurrency.

After anything: every journal transaction sums to zero; all entries sum to zero; each stored
balance equals the sum of its wallet entries; no balance is below its floor; held credits equal
the active holds; lots hold exactly the positive part of the balance; a key has one effect."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool

from creditflow.domain.lots import Lot, LotSource, plan_burn
from creditflow.domain.money import MICROS_PER_CREDIT, usage_charge_micros
from creditflow.ledger import accounts, metering, postings
from creditflow.ledger.metering import UsageEvent

RATES = {"chat_message": Decimal(1), "llm_tokens": Decimal("0.1"), "voice_minute": Decimal(10)}
PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


async def assert_invariants(pool: AsyncConnectionPool) -> None:
    async with pool.connection() as conn:
        unbalanced = await (await conn.execute(
            "SELECT txn_id FROM journal_entries GROUP BY txn_id HAVING sum(amount_micros) <> 0")).fetchall()
        assert unbalanced == []
        total = await (await conn.execute(
            "SELECT coalesce(sum(amount_micros), 0) AS s FROM journal_entries")).fetchone()
        assert total["s"] == 0
        drift = await (await conn.execute(
            "SELECT b.account_id FROM balances b LEFT JOIN (SELECT account_id, sum(amount_micros) AS s"
            " FROM journal_entries WHERE book = 'wallet' GROUP BY account_id) e USING (account_id)"
            " WHERE b.balance_micros <> coalesce(e.s, 0)")).fetchall()
        assert drift == []
        below = await (await conn.execute(
            "SELECT account_id FROM balances WHERE balance_micros - held_micros < floor_micros")).fetchall()
        assert below == []
        held = await (await conn.execute(
            "SELECT b.account_id FROM balances b LEFT JOIN (SELECT account_id, sum(amount_micros) AS s FROM holds"
            " WHERE status = 'active' GROUP BY account_id) h USING (account_id)"
            " WHERE b.held_micros <> coalesce(h.s, 0)")).fetchall()
        assert held == []
        lots = await (await conn.execute(
            "SELECT b.account_id FROM balances b LEFT JOIN (SELECT account_id, sum(remaining_micros) AS s"
            " FROM credit_lots GROUP BY account_id) l USING (account_id)"
            " WHERE greatest(b.balance_micros, 0) <> coalesce(l.s, 0)")).fetchall()
        assert lots == []
        header = await (await conn.execute(
            "SELECT t.id FROM journal_transactions t JOIN journal_entries e ON e.txn_id = t.id AND e.book = 'wallet'"
            " WHERE e.amount_micros <> t.amount_micros")).fetchall()
        assert header == []
        usage = await (await conn.execute(
            "SELECT u.id FROM usage_items u JOIN journal_transactions t ON t.id = u.txn_id"
            " WHERE t.amount_micros <> -u.credits_micros")).fetchall()
        assert usage == []


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


async def test_concurrent_debits_on_one_account_admit_exactly_the_affordable(pool: AsyncConnectionPool) -> None:
    acc = (await accounts.create_account(pool, name="C", billing_email="c@x.co", welcome_bonus_credits=250)).id
    events = [UsageEvent.build(acc, "voice_minute", 1, f"c{i}") for i in range(40)]
    results = await asyncio.gather(*(metering.track(pool, e) for e in events))
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
                            book="system:promotions", description="g", idempotency_key=f"g{i}", lot_source=source,
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
        for sql in ("UPDATE journal_entries SET amount_micros = 0", "DELETE FROM journal_transactions"):
            try:
                await conn.execute(sql)
            except psycopg.Error as exc:
                assert "append-only" in str(exc)
            else:
                raise AssertionError(f"{sql} was allowed")


async def test_unbalanced_transaction_is_rejected_at_commit(pool: AsyncConnectionPool) -> None:
    async with pool.connection() as conn:
        try:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO journal_transactions (id, type, amount_micros) VALUES ('txn_x', 'x', 5)")
                await conn.execute("INSERT INTO journal_entries (txn_id, book, amount_micros)"
                                   " VALUES ('txn_x', 'system:usage_revenue', 5)")
        except psycopg.Error as exc:
            assert "does not balance" in str(exc)
        else:
            raise AssertionError("an unbalanced journal transaction was committed")
