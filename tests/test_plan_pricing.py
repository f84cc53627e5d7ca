"""Plan pricing on the hot path (migration 0013): plan rates while plan credits last, overage rates after,
plan credits spent before the wallet, ``stop`` agents refused with ``plan_credits_exhausted``, and
``balances.plan_left_micros`` kept equal to max(0, plan lots remaining - unburned) by every writer. Real PostgreSQL
through the real app (its lifespan syncs the catalog's plan rates); accounts are put on a plan the way the
``start_subscription`` activity does it (grant, then save the subscription), without Temporal.
"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool

from creditflow.domain.lots import LotSource
from creditflow.domain.money import MICROS_PER_CREDIT, usage_charge_micros
from creditflow.domain.periods import next_period, period_containing
from creditflow.domain.plans import CardRate
from creditflow.errors import CreditflowError
from creditflow.ledger import accounts, metering, postings, subscriptions
from creditflow.ledger.lots import account_lots
from creditflow.ledger.metering import UsageEvent
from creditflow.ledger.plan_pricing import sync_plan_rates
from creditflow.ledger.ratecard import DEFAULT_RATECARD, read_ratecard
from tests.support.api import balance, new_account, track
from tests.support.ledger import assert_invariants
from tests.support.plans import CATALOG, GROWTH, plan_left, subscribe

CARD = {spec.id: CardRate(credits_per_unit=spec.credits_per_unit, base_feature_id=spec.base_feature_id)
        for spec in read_ratecard(DEFAULT_RATECARD)}
D = Decimal


async def usage_rates(api: httpx.AsyncClient, account: str) -> list[tuple[str, Any, Any, Any]]:
    """(feature, quantity, rate recorded, amount) of the account's usage rows, oldest first."""
    txns = (await api.get("/api/v1/billing/transactions",
                          params={"account_id": account, "type": "usage", "limit": 100})).json()["items"]
    return [(t["metadata"]["feature_id"], t["metadata"]["quantity"], t["metadata"]["credits_per_unit"], t["amount"])
            for t in reversed(txns)]


async def check(api: httpx.AsyncClient, account: str, feature: str, value: object = None,
                agent_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"account_id": account, "feature_id": feature}
    if value is not None:
        body["value"] = value
    if agent_id is not None:
        body["agent_id"] = agent_id
    resp = await api.post("/api/v1/billing/check", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


async def test_plan_rates_are_the_catalogs_resolution(api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT feature_id, credits_per_unit, overage_credits_per_unit FROM plan_rates WHERE plan_id = 'growth'"
            " ORDER BY feature_id")).fetchall()
        count = await (await conn.execute("SELECT count(*) AS n FROM plan_rates")).fetchone()
    assert [(r["feature_id"], r["credits_per_unit"], r["overage_credits_per_unit"]) for r in rows] == [
        ("chat_message", D("0.8"), D(1)), ("llm_tokens", D("0.1"), D("0.1")), ("phone_number", D(150), D(150)),
        ("transfer_minute", D(4), D(5)), ("voice_minute", D(8), D(9)),
        ("voice_minute_tollfree", D(10), D(11))]  # plan voice + the card's 2/min surcharge
    assert count["n"] == 3 * 6
    assert await sync_plan_rates(pool, CATALOG) == 0  # idempotent: nothing to change
    # Re-pricing the card moves what follows it: growth has no own LLM rate, every plan's toll-free surcharge.
    for feature, rate in (("llm_tokens", "0.2"), ("voice_minute_tollfree", 3)):
        channel, unit = ("llm", "token") if feature == "llm_tokens" else ("voice", "minute")
        put = await api.put(f"/api/v1/features/{feature}", json={
            "channel": channel, "unit": unit, "integer_only": feature == "llm_tokens", "credits_per_unit": rate,
            **({"base_feature_id": "voice_minute"} if feature == "voice_minute_tollfree" else {})})
        assert put.status_code == 200, put.text
    async with pool.connection() as conn:
        moved = await (await conn.execute(
            "SELECT plan_id, feature_id, credits_per_unit, overage_credits_per_unit FROM plan_rates"
            " WHERE feature_id IN ('llm_tokens', 'voice_minute_tollfree') ORDER BY plan_id, feature_id")).fetchall()
    assert [tuple(r.values()) for r in moved] == [
        ("growth", "llm_tokens", D("0.2"), D("0.2")), ("growth", "voice_minute_tollfree", D(11), D(12)),
        ("scale", "llm_tokens", D("0.08"), D("0.1")), ("scale", "voice_minute_tollfree", D(10), D(11)),
        ("starter", "llm_tokens", D("0.2"), D("0.2")), ("starter", "voice_minute_tollfree", D(12), D(13))]


async def test_plan_rate_then_overage_rate_exactly(api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    account = await new_account(api)  # 5000 welcome credits
    await subscribe(pool, account, credits=100)
    assert (await balance(api, account))["plan_credits_remaining"] == 100
    assert (await check(api, account, "voice_minute", 1))["credits_per_unit"] == 8

    first = (await track(api, account, "voice_minute", 10, "v-1")).json()
    assert (first["credits_per_unit"], first["credits_charged"], first["balance"]) == (8, 80, 5020)
    # 5 minutes with 20 plan credits left: priced at the rate in force when the event starts (the plan rate);
    # the 20 credits above what the plan had left come from the wallet.
    straddle = (await track(api, account, "voice_minute", 5, "v-2")).json()
    assert (straddle["credits_per_unit"], straddle["credits_charged"], straddle["balance"]) == (8, 40, 4980)
    assert await plan_left(pool, account) == 0
    over = [(await track(api, account, f, v, f"o-{f}")).json() for f, v in (
        ("voice_minute", 1), ("chat_message", 10), ("voice_minute_tollfree", 2), ("llm_tokens", 100),
        ("transfer_minute", 2))]
    assert [(o["credits_per_unit"], o["credits_charged"]) for o in over] == [
        (9, 9), (1, 10), (11, 22), (0.1, 10), (5, 10)]
    body = await balance(api, account)
    assert (body["balance"], body["plan_credits_remaining"], body["plan_id"]) == (4919, 0, "growth")
    assert await usage_rates(api, account) == [
        ("voice_minute", 10, 8, -80), ("voice_minute", 5, 8, -40), ("voice_minute", 1, 9, -9),
        ("chat_message", 10, 1, -10), ("voice_minute_tollfree", 2, 11, -22), ("llm_tokens", 100, 0.1, -10),
        ("transfer_minute", 2, 5, -10)]
    assert (await check(api, account, "voice_minute", 1))["credits_per_unit"] == 9
    # Replays report the rate recorded, not today's.
    again = (await track(api, account, "voice_minute", 10, "v-1")).json()
    assert (again["replayed"], again["credits_per_unit"], again["credits_charged"]) == (True, 8, 80)
    # A hold reserves at the rate in force (overage now); an account without a plan keeps the card.
    hold = await api.post("/api/v1/billing/holds", json={"account_id": account, "feature_id": "voice_minute",
                                                         "value": 3, "idempotency_key": "h-1"})
    assert hold.status_code == 201 and hold.json()["held_amount"] == 27
    plain = await new_account(api)
    assert (await track(api, plain, "voice_minute", 1, "p-1")).json()["credits_per_unit"] == 10
    await assert_invariants(pool)


async def test_plan_credits_go_before_bonus_and_purchased(api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    account = await new_account(api)
    await postings.post(pool, account_id=account, type="purchase", amount_micros=1000 * MICROS_PER_CREDIT,
                        counter_book="system:payments_clearing", description="Top-up", idempotency_key="p1",
                        lot_source=LotSource.PURCHASE)
    await subscribe(pool, account, credits=100)
    assert (await track(api, account, "chat_message", 100, "c-1")).json()["credits_charged"] == 80  # 0.8 each
    body = await balance(api, account)
    assert (body["balance"], body["plan_credits_remaining"]) == (6020, 20)
    # A negative adjustment burns plan credits first too.
    await postings.adjust(pool, account_id=account, amount_credits=-50, reason="correction", idempotency_key="adj-1")
    body = await balance(api, account)
    assert (body["balance"], body["plan_credits_remaining"]) == (5970, 0)
    lots = await account_lots(pool, account, include_depleted=True)
    assert sorted((lot.source, lot.remaining) for lot in lots) == [
        (LotSource.PLAN, 0), (LotSource.PURCHASE, 1000), (LotSource.WELCOME_BONUS, 4970)]
    # Overage: chat at 1 now, from the bonus before the purchase.
    assert (await track(api, account, "chat_message", 70, "c-2")).json()["credits_charged"] == 70
    lots = await account_lots(pool, account, include_depleted=True)
    assert sorted((lot.source, lot.remaining) for lot in lots) == [
        (LotSource.PLAN, 0), (LotSource.PURCHASE, 1000), (LotSource.WELCOME_BONUS, 4900)]
    assert (await balance(api, account))["balance"] == 5900
    await assert_invariants(pool)


async def test_stop_agents_are_refused_when_plan_credits_run_out(api: httpx.AsyncClient,
                                                                 pool: AsyncConnectionPool) -> None:
    account = await new_account(api)
    for agent, setting in (("stopper", "stop"), ("spender", "use_balance")):
        created = await api.post("/api/v1/agents", json={"account_id": account, "id": agent,
                                                         "on_plan_exhausted": setting})
        assert created.status_code == 201, created.text
    period = await subscribe(pool, account, credits=10)
    assert (await track(api, account, "voice_minute", 1, "s-1", agent_id="stopper")).json()["credits_charged"] == 8
    # 2 credits left: a stop agent's event that costs more (8) is refused, never paid from the wallet (0030_1).
    denied = await track(api, account, "voice_minute", 1, "s-2", agent_id="stopper")
    assert denied.status_code == 402
    assert {k: denied.json()[k] for k in ("allowed", "code", "credits_charged", "balance")} == {
        "allowed": False, "code": "plan_credits_exhausted", "credits_charged": 0, "balance": 5002}
    assert await plan_left(pool, account) == 2 * MICROS_PER_CREDIT
    seen = await check(api, account, "voice_minute", 1, agent_id="stopper")
    assert (seen["allowed"], seen["code"], seen["credits_per_unit"]) == (False, "plan_credits_exhausted", 8)
    # A hold is capped at what is left to it: 2 credits reserved of the 8 a minute costs.
    hold = await api.post("/api/v1/billing/holds", json={"account_id": account, "feature_id": "voice_minute",
                                                         "value": 1, "agent_id": "stopper", "idempotency_key": "h-s"})
    assert hold.status_code == 201, hold.text
    assert (hold.json()["held_amount"], hold.json()["credits_required"]) == (2, 8)
    released = await api.post(f"/api/v1/billing/holds/{hold.json()['hold_id']}/release", json={"account_id": account})
    assert released.status_code == 200, released.text
    # What fits in the plan credits left still goes: a chat message at Growth's 0.8.
    fits = await track(api, account, "chat_message", 1, "s-3", agent_id="stopper")
    assert (fits.status_code, fits.json()["credits_charged"]) == (200, 0.8)
    # use_balance goes past the plan credits into the wallet: 1.2 plan credits + 6.8 from the wallet, at the plan rate.
    straddle = await track(api, account, "voice_minute", 1, "s-4", agent_id="spender")
    assert (straddle.status_code, straddle.json()["credits_charged"]) == (200, 8)
    assert await plan_left(pool, account) == 0
    # use_balance, no agent and an agent not registered continue on the wallet, at the overage rate.
    for key, agent in (("b-1", "spender"), ("b-2", None), ("b-3", "someone-new")):
        extra = {"agent_id": agent} if agent else {}
        ok = await track(api, account, "voice_minute", 1, key, **extra)
        assert (ok.status_code, ok.json()["credits_charged"]) == (200, 9), ok.text
    assert (await check(api, account, "voice_minute", 1, agent_id="spender"))["allowed"] is True
    batch = await api.post("/api/v1/billing/track/batch", json={"events": [
        {"account_id": account, "feature_id": "chat_message", "value": 1, "idempotency_key": "bt-1",
         "agent_id": "stopper"},
        {"account_id": account, "feature_id": "chat_message", "value": 1, "idempotency_key": "bt-2",
         "agent_id": "spender"}]})
    assert [(r["code"], r["credits_charged"]) for r in batch.json()["results"]] == [
        ("plan_credits_exhausted", 0), ("ok", 1)]
    assert (await balance(api, account))["balance"] == 4965.2  # 5010 - 8 - 0.8 - 8 - 27 - 1

    # The next cycle's plan credits let the stop agent work again, at the plan rate.
    await subscribe(pool, account, credits=10, period=next_period(period))
    again = await track(api, account, "voice_minute", 1, "s-5", agent_id="stopper")
    assert (again.status_code, again.json()["credits_per_unit"]) == (200, 8)
    await assert_invariants(pool)


async def test_expiry_renewal_and_cancellation(api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    account = await new_account(api)
    period = await subscribe(pool, account, credits=100)
    assert (await track(api, account, "voice_minute", 2, "e-1")).json()["credits_charged"] == 16
    assert await plan_left(pool, account) == 84 * MICROS_PER_CREDIT
    expired = await subscriptions.expire_plan_credits(pool, account, period, GROWTH.name)
    assert expired == 84 * MICROS_PER_CREDIT
    assert await plan_left(pool, account) == 0
    body = await balance(api, account)
    assert (body["balance"], body["plan_credits_remaining"]) == (5000, 0)
    assert (await track(api, account, "voice_minute", 1, "e-2")).json()["credits_per_unit"] == 9  # overage
    # Renewal: new plan credits, plan rate again.
    await subscribe(pool, account, credits=100, period=next_period(period))
    assert await plan_left(pool, account) == 100 * MICROS_PER_CREDIT
    assert (await track(api, account, "voice_minute", 1, "e-3")).json()["credits_per_unit"] == 8
    # Cancellation: the plan is gone from the balances row at once; plan credits still left burn first, at the card.
    await subscriptions.save_subscription(pool, account, plan_id="growth", period=next_period(period),
                                          pending_plan_id=None, status="canceled")
    body = await balance(api, account)
    assert (body["plan_id"], body["plan_credits_remaining"]) == (None, None)
    card = (await track(api, account, "voice_minute", 1, "e-4")).json()
    assert (card["credits_per_unit"], card["credits_charged"]) == (10, 10)
    assert await plan_left(pool, account) == 82 * MICROS_PER_CREDIT
    with pytest.raises(CreditflowError) as refused:
        await subscriptions.save_subscription(pool, "acct_missing", plan_id="growth", period=period,
                                              pending_plan_id=None)
    assert refused.value.code == "unknown_account"
    await assert_invariants(pool)


async def test_twenty_concurrent_events_across_the_plan_boundary(api: httpx.AsyncClient,
                                                                pool: AsyncConnectionPool) -> None:
    """100 plan credits, 20 one-minute calls at once: 12 fit at 8, the 13th starts with 4 left (8, plan rate),
    the other 7 pay the overage rate: 13 x 8 + 7 x 9 = 167, whatever the order."""
    account = await new_account(api)
    await subscribe(pool, account, credits=100)
    responses = await asyncio.gather(*(track(api, account, "voice_minute", 1, f"c-{n}") for n in range(20)))
    assert all(r.status_code == 200 for r in responses)
    charged = sorted(r.json()["credits_charged"] for r in responses)
    assert charged == [8] * 13 + [9] * 7
    body = await balance(api, account)
    assert (body["balance"], body["plan_credits_remaining"]) == (5100 - 167, 0)

    # The same through batches on a twin account, two concurrent batches of 10.
    twin = await new_account(api)
    await subscribe(pool, twin, credits=100)
    batches = [[{"account_id": twin, "feature_id": "voice_minute", "value": 1, "idempotency_key": f"b{b}-{n}"}
                for n in range(10)] for b in range(2)]
    results = await asyncio.gather(*(api.post("/api/v1/billing/track/batch", json={"events": events})
                                     for events in batches))
    assert sorted(r["credits_charged"] for resp in results for r in resp.json()["results"]) == [8] * 13 + [9] * 7
    assert (await balance(api, twin))["balance"] == 5100 - 167
    await assert_invariants(pool)


# --- property: plan_left_micros and plan pricing against a model built from the domain rules ---------------------

PROPERTY = settings(max_examples=int(os.environ.get("CF_HYPOTHESIS_EXAMPLES", "25")), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
FEATURES = ["chat_message", "voice_minute", "voice_minute_tollfree", "llm_tokens"]
quantity = {"chat_message": st.integers(1, 200).map(D), "llm_tokens": st.integers(1, 3000).map(D),
            "voice_minute": st.decimals(D("0.1"), D(30), places=1),
            "voice_minute_tollfree": st.decimals(D("0.1"), D(30), places=1)}
steps = st.lists(st.one_of(
    st.sampled_from(FEATURES).flatmap(lambda f: st.tuples(st.just("use"), st.just(f), quantity[f],
                                                          st.sampled_from([None, "stopper", "spender"]))),
    st.tuples(st.just("grant"), st.sampled_from([LotSource.PLAN, LotSource.PROMOTIONAL, LotSource.PURCHASE]),
              st.integers(1, 400)),
    st.tuples(st.just("adjust"), st.integers(-400, 400).filter(bool)),
    st.tuples(st.just("expire")),
    st.tuples(st.just("cancel")),
    st.tuples(st.just("subscribe")),
), min_size=1, max_size=20)


def card_rate(feature: str) -> Decimal:
    entry = CARD[feature]
    return entry.credits_per_unit + (CARD[entry.base_feature_id].credits_per_unit if entry.base_feature_id else 0)


@PROPERTY
@given(ops=steps, line=st.sampled_from([0, 300]), bonus=st.sampled_from([0, 150]), plan_credits=st.integers(0, 300))
async def test_plan_left_and_prices_follow_the_domain(api: httpx.AsyncClient, pool: AsyncConnectionPool,
                                                      ops: list[tuple], line: int, bonus: int,
                                                      plan_credits: int) -> None:
    acc = (await accounts.create_account(pool, name="P", billing_email="p@x.co", welcome_bonus_credits=bonus,
                                         overage_credit_line=line)).id
    for agent, setting in (("stopper", "stop"), ("spender", "use_balance")):
        created = await api.post("/api/v1/agents", json={"account_id": acc, "id": agent, "on_plan_exhausted": setting})
        assert created.status_code == 201
    period = period_containing(datetime.now(UTC) - timedelta(days=1), datetime.now(UTC))
    balance_ = bonus * MICROS_PER_CREDIT
    floor = -line * MICROS_PER_CREDIT
    left = 0
    active = False

    def burn(amount: int) -> None:
        nonlocal left, balance_
        left -= min(left, min(amount, max(balance_, 0)))
        balance_ -= amount

    def grant(amount: int, plan: bool) -> None:
        nonlocal left, balance_
        balance_ += amount
        if plan:
            left += max(0, min(amount, balance_))

    async def save(status: str) -> None:
        nonlocal active
        await subscriptions.save_subscription(pool, acc, plan_id="growth", period=period, pending_plan_id=None,
                                              status=status)
        active = status == "active"

    if plan_credits:
        await subscriptions.grant_plan_credits(pool, acc, GROWTH, period, credits=plan_credits)
        grant(plan_credits * MICROS_PER_CREDIT, True)
    await save("active")
    for n, op in enumerate(ops):
        if op[0] == "use":
            _, feature, value, agent = op
            rate = GROWTH.rate_for(feature, CARD, plan_credits_left=left > 0) if active else card_rate(feature)
            charge = usage_charge_micros(value, rate)
            result = await metering.track(pool, UsageEvent.build(acc, feature, value, f"u{n}", agent_id=agent))
            if agent == "stopper" and active and charge > left:  # never the wallet (0030_1)
                assert (result.allowed, result.code) == (False, "plan_credits_exhausted")
            elif balance_ - charge < floor:
                assert (result.allowed, result.code) == (False, "insufficient_credits")
            else:
                assert (result.allowed, result.credits_per_unit) == (True, rate)
                assert result.credits_charged * MICROS_PER_CREDIT == charge
                burn(charge)
        elif op[0] == "grant":
            await postings.post(pool, account_id=acc, type="grant", amount_micros=op[2] * MICROS_PER_CREDIT,
                                counter_book="system:promotions", description="g", idempotency_key=f"g{n}",
                                lot_source=op[1], lot_expires_at=period.end if op[1] == LotSource.PLAN else None)
            grant(op[2] * MICROS_PER_CREDIT, op[1] == LotSource.PLAN)
        elif op[0] == "adjust":
            amount = op[1] * MICROS_PER_CREDIT
            try:
                await postings.adjust(pool, account_id=acc, amount_credits=op[1], reason="prop",
                                      idempotency_key=f"a{n}")
            except CreditflowError as exc:
                assert exc.code == "insufficient_credits" and balance_ + amount < floor
            else:
                if amount < 0:
                    burn(-amount)
                else:
                    grant(amount, False)
        elif op[0] == "expire":
            expired = await subscriptions.expire_plan_credits(pool, acc, period, "Growth", key_suffix=f":{n}")
            assert expired == left
            burn(left)
        else:
            await save("canceled" if op[0] == "cancel" else "active")
        assert await plan_left(pool, acc) == left
        async with pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT b.balance_micros, greatest(0, (SELECT coalesce(sum(remaining_micros), 0) FROM credit_lots"
                " WHERE account_id = b.account_id AND source = 'plan') - b.unburned_micros) AS from_lots"
                " FROM balances b WHERE account_id = %s", (acc,))).fetchone()
        assert (row["balance_micros"], row["from_lots"]) == (balance_, left)
    await assert_invariants(pool)


async def test_expiry_takes_held_plan_credits_and_settlements_go_to_the_floor(
        api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    """A call still running when the period closes: the plan credits expire in full whatever
    is held; the hold keeps reserving only what the account covers; its settlement is not refused: charged from the
    next source (here the overage line), down to the floor, the rest recorded as uncovered."""
    for line, reserved_after, charged, uncovered in ((0, 0, 0, 45), (1_000, 40, 45, 0)):
        account = (await accounts.create_account(pool, name="Holdco", billing_email="h@holdco.test",
                                                 welcome_bonus_credits=0, overage_credit_line=line)).id
        period = await subscribe(pool, account, credits=100)
        hold = await api.post("/api/v1/billing/holds", json={"account_id": account, "feature_id": "voice_minute",
                                                             "value": 5, "idempotency_key": "call-1"})
        assert hold.status_code == 201 and hold.json()["held_amount"] == 40  # 5 minutes at the plan rate, 8
        expired = await subscriptions.expire_plan_credits(pool, account, period, GROWTH.name)
        assert expired == 100 * MICROS_PER_CREDIT
        body = await balance(api, account)
        assert (body["balance"], body["pending_charges"]) == (0, reserved_after)
        settled = await api.post(f"/api/v1/billing/holds/{hold.json()['hold_id']}/settle",
                                 json={"account_id": account, "value": 5})
        assert settled.status_code == 200, settled.text
        assert (settled.json()["credits_charged"], settled.json()["balance"]) == (charged, -charged)  # overage rate 9
        async with pool.connection() as conn:
            row = await (await conn.execute("SELECT metadata FROM journal WHERE account_id = %s AND type = 'usage'",
                                            (account,))).fetchone()
        assert (row["metadata"] or {}).get("uncovered_micros", 0) == uncovered * MICROS_PER_CREDIT
        again = await api.post(f"/api/v1/billing/holds/{hold.json()['hold_id']}/settle",
                               json={"account_id": account, "value": 5})
        assert (again.status_code, again.json()["credits_charged"], again.json()["replayed"]) == (200, charged, True)
    await assert_invariants(pool)
