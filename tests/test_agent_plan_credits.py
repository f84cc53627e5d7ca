"""Plan credits and agents (migration 0030_1; seed 001 "What happens when credits run out" and
"Spending limits per agent"), through the HTTP API on the real stack.

* Stop: an event that costs more than the plan credits left is refused (never paid from the wallet), the account
  workflow pauses the agent (``plan_credits_exhausted``, until the renewal) and a top-up resumes it on the wallet.
* The plan-credit limit per agent (``plan_credit_limit``, per billing period): a stop agent stops at it; a use_balance
  agent goes on from the wallet only, leaving the plan credits to the others. Seed 000's ``monthly_limit`` is apart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool

from creditflow.config import Settings
from creditflow.domain.money import MICROS_PER_CREDIT
from tests.conftest import ADMIN_KEY, STRIPE_KEY
from tests.support.api import app_client, balance, new_account, track
from tests.support.auto_recharge import relay  # noqa: F401 - the worker's outbox relay, on this module's settings
from tests.support.ledger import assert_invariants
from tests.support.payments import TOPUP, save_card
from tests.support.plans import plan_left, subscribe
from tests.support.temporal import eventually

AGENTS = "/api/v1/agents"


@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=5000, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=stripe_base, stripe_retry_max_wait_seconds=0.1, topup_poll_interval_seconds=0.3,
                    outbox_poll_interval_seconds=0.2)


async def agent(api: httpx.AsyncClient, account: str, agent_id: str) -> dict[str, Any]:
    resp = await api.get(f"{AGENTS}/{agent_id}", params={"account_id": account})
    assert resp.status_code == 200, resp.text
    return resp.json()


async def register(api: httpx.AsyncClient, account: str, agent_id: str, **settings: object) -> dict[str, Any]:
    resp = await api.post(AGENTS, json={"account_id": account, "id": agent_id, **settings})
    assert resp.status_code == 201, resp.text
    return resp.json()


async def outbox(pool: AsyncConnectionPool, account: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute("SELECT kind, payload FROM outbox WHERE account_id = %s ORDER BY id",
                                          (account,))).fetchall()


async def plan_lot_remaining(pool: AsyncConnectionPool, account: str) -> int:
    async with pool.connection() as conn:
        await conn.execute("SELECT cf_settle_account_burns(%s)", (account,))
        row = await (await conn.execute("SELECT coalesce(sum(remaining_micros), 0) AS n FROM credit_lots"
                                        " WHERE account_id = %s AND source = 'plan'", (account,))).fetchone()
    return int(row["n"])


async def test_use_balance_agent_at_its_plan_credit_limit_goes_on_from_the_wallet_only(
        api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    account = await new_account(api)
    capped = await register(api, account, "capped", plan_credit_limit=10, monthly_limit=1000)
    assert (capped["plan_credit_limit"], capped["plan_credits_used"], capped["monthly_limit"]) == (10, 0, 1000)
    await register(api, account, "free")
    await register(api, account, "stoplim", on_plan_exhausted="stop", plan_credit_limit=10)
    await subscribe(pool, account, credits=100)  # Growth: voice 8 a minute in the plan, 9 over it

    first = await track(api, account, "voice_minute", 1, "c-1", agent_id="capped")
    assert (first.json()["credits_charged"], first.json()["credits_per_unit"]) == (8, 8)
    # 2 plan credits left to it: 2 from the plan, 6 from the wallet, still at the plan rate (it starts in the plan).
    second = await track(api, account, "voice_minute", 1, "c-2", agent_id="capped")
    assert (second.json()["credits_charged"], second.json()["credits_per_unit"]) == (8, 8)
    assert await plan_left(pool, account) == 90 * MICROS_PER_CREDIT
    # At its limit: the overage rate, all from the wallet; the plan credits stay for the other agents.
    third = await track(api, account, "voice_minute", 1, "c-3", agent_id="capped")
    assert (third.json()["credits_charged"], third.json()["credits_per_unit"]) == (9, 9)
    assert await plan_left(pool, account) == 90 * MICROS_PER_CREDIT
    seen_rate = (await api.post("/api/v1/billing/check", json={"account_id": account, "feature_id": "voice_minute",
                                                               "agent_id": "capped"})).json()
    assert (seen_rate["allowed"], seen_rate["credits_per_unit"]) == (True, 9)
    other = await track(api, account, "voice_minute", 1, "f-1", agent_id="free")
    assert (other.json()["credits_charged"], other.json()["credits_per_unit"]) == (8, 8)
    assert await plan_left(pool, account) == 82 * MICROS_PER_CREDIT
    assert await plan_lot_remaining(pool, account) == 82 * MICROS_PER_CREDIT
    assert (await balance(api, account))["balance"] == 5067  # 5,000 + 100 - 8 - 8 - 9 - 8
    seen = await agent(api, account, "capped")
    assert (seen["plan_credits_used"], seen["spent_this_month"]) == (10, 25)
    # A stop agent at its plan-credit limit stops (8 then 2 left to it: the next 8 is refused).
    assert (await track(api, account, "voice_minute", 1, "s-1", agent_id="stoplim")).status_code == 200
    stopped = await track(api, account, "voice_minute", 1, "s-2", agent_id="stoplim")
    assert (stopped.status_code, stopped.json()["code"]) == (402, "plan_credits_exhausted")
    events = [(e["kind"], e["payload"]) for e in await outbox(pool, account) if e["kind"] == "limit.reached"]
    assert [(k, p["scope"], p["action"], p.get("limit_micros"), p.get("spent_micros")) for k, p in events] == [
        ("limit.reached", "agent_plan_credits", "alert_only", 10 * MICROS_PER_CREDIT, 10 * MICROS_PER_CREDIT),
        ("limit.reached", "plan_credits", "pause", 10 * MICROS_PER_CREDIT, 8 * MICROS_PER_CREDIT)]
    assert (events[1][1]["available_micros"], events[1][1]["required_micros"]) == (2 * MICROS_PER_CREDIT,
                                                                                   8 * MICROS_PER_CREDIT)
    # Raising the limit lets it take plan credits again; removing it (null) lifts it.
    raised = await api.patch(f"{AGENTS}/stoplim", json={"account_id": account, "plan_credit_limit": None})
    assert (raised.status_code, raised.json()["plan_credit_limit"]) == (200, None)
    assert (await track(api, account, "voice_minute", 1, "s-3", agent_id="stoplim")).status_code == 200
    bad = await api.patch(f"{AGENTS}/stoplim", json={"account_id": account, "plan_credit_limit": 0})
    assert (bad.status_code, bad.json()["error"]["code"]) == (422, "invalid_amount")
    await assert_invariants(pool)


async def test_stop_agent_holds_are_capped_and_settle_without_the_wallet(
        api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    account = await new_account(api)
    await register(api, account, "caller", on_plan_exhausted="stop")
    await subscribe(pool, account, credits=20)
    hold = await api.post("/api/v1/billing/holds", json={"account_id": account, "feature_id": "voice_minute",
                                                         "value": 5, "agent_id": "caller", "idempotency_key": "h-1"})
    assert hold.status_code == 201, hold.text
    assert (hold.json()["held_amount"], hold.json()["credits_required"]) == (20, 40)
    # Nothing left to it while the hold reserves the plan credits: a second hold and an event are refused.
    again = await api.post("/api/v1/billing/holds", json={"account_id": account, "feature_id": "chat_message",
                                                          "value": 1, "agent_id": "caller", "idempotency_key": "h-2"})
    assert (again.status_code, again.json()["code"]) == (402, "plan_credits_exhausted")
    # The call ran 4 minutes (32 credits): 20 are charged (the plan credits), 12 are not, and the wallet is untouched.
    settled = await api.post(f"/api/v1/billing/holds/{hold.json()['hold_id']}/settle",
                             json={"account_id": account, "value": 4})
    assert settled.status_code == 200, settled.text
    assert settled.json()["credits_charged"] == 20
    assert (await balance(api, account))["balance"] == 5000
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT metadata FROM journal WHERE account_id = %s AND type = 'usage'",
                                        (account,))).fetchone()
    assert row["metadata"]["uncovered_micros"] == 12 * MICROS_PER_CREDIT
    await assert_invariants(pool)


@pytest.fixture
async def wf_api(temporal_settings: Settings, temporal_worker: Any) -> AsyncIterator[httpx.AsyncClient]:
    async for client in app_client(temporal_settings):
        yield client


@pytest.mark.temporal
async def test_stop_agent_is_paused_by_the_system_and_a_top_up_resumes_it_on_the_wallet(
        wf_api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient, relay: Any) -> None:  # noqa: F811
    api = wf_api
    account = await new_account(api)
    await save_card(api, sdk, account)
    await register(api, account, "stopper", on_plan_exhausted="stop")
    period = await subscribe(pool, account, credits=10)
    assert (await track(api, account, "voice_minute", 1, "s-1", agent_id="stopper")).json()["credits_charged"] == 8
    denied = await track(api, account, "voice_minute", 1, "s-2", agent_id="stopper")
    assert (denied.status_code, denied.json()["code"]) == (402, "plan_credits_exhausted")

    paused = await eventually(lambda: agent(api, account, "stopper"), lambda a: a["status"] == "paused", timeout=30)
    assert (paused["paused_by"], paused["pause_reason"]) == ("system", "plan_credits_exhausted")
    assert paused["resume_at"] == period.end.isoformat().replace("+00:00", "Z")
    assert (await track(api, account, "chat_message", 1, "s-3", agent_id="stopper")).json()["code"] == "agent_paused"
    assert (await balance(api, account))["balance"] == 5002  # the wallet's 5,000 untouched

    bought = await api.post(TOPUP, json={"account_id": account, "amount_usd": 10, "request_id": "t-1"})
    assert bought.status_code == 200 and bought.json()["status"] == "succeeded", bought.text
    resumed = await eventually(lambda: agent(api, account, "stopper"), lambda a: a["status"] == "active", timeout=30)
    assert resumed["wallet_until"] == paused["resume_at"]
    trail = (await api.get(f"{AGENTS}/stopper/events", params={"account_id": account})).json()["items"]
    assert [(e["action"], e["actor"], e["reason"]) for e in trail] == [
        ("paused", "system", "plan_credits_exhausted"), ("resumed", "system", "top-up")]
    # Until the renewal it goes on from the wallet: 2 plan credits + 6 from the wallet, then the overage rate.
    assert (await track(api, account, "voice_minute", 1, "s-4", agent_id="stopper")).json()["credits_charged"] == 8
    assert (await track(api, account, "voice_minute", 1, "s-5", agent_id="stopper")).json()["credits_charged"] == 9
    assert (await balance(api, account))["balance"] == 5985  # 5,002 + 1,000 - 8 - 9

    async with pool.connection() as conn:
        notes = await (await conn.execute("SELECT kind, payload FROM notifications_log WHERE account_id = %s"
                                          " AND kind IN ('limit.reached', 'agent.paused') ORDER BY id",
                                          (account,))).fetchall()
    assert [(n["kind"], n["payload"].get("scope") or n["payload"].get("reason")) for n in notes] == [
        ("limit.reached", "plan_credits"), ("agent.paused", "plan_credits_exhausted")]
    await assert_invariants(pool)


@pytest.mark.temporal
async def test_raising_the_plan_credit_limit_resumes_a_stopped_agent(
        wf_api: httpx.AsyncClient, pool: AsyncConnectionPool, relay: Any) -> None:  # noqa: F811
    api = wf_api
    account = await new_account(api)
    await register(api, account, "stopper", on_plan_exhausted="stop", plan_credit_limit=8)
    await subscribe(pool, account, credits=100)
    assert (await track(api, account, "voice_minute", 1, "s-1", agent_id="stopper")).json()["credits_charged"] == 8
    refused = await track(api, account, "voice_minute", 1, "s-2", agent_id="stopper")
    assert refused.json()["code"] == "plan_credits_exhausted"
    await eventually(lambda: agent(api, account, "stopper"), lambda a: a["status"] == "paused", timeout=30)
    raised = await api.patch(f"{AGENTS}/stopper", json={"account_id": account, "plan_credit_limit": 50})
    assert raised.status_code == 200, raised.text
    await eventually(lambda: agent(api, account, "stopper"), lambda a: a["status"] == "active", timeout=30)
    trail = (await api.get(f"{AGENTS}/stopper/events", params={"account_id": account})).json()["items"]
    assert [(e["action"], e["reason"]) for e in trail] == [("paused", "plan_credits_exhausted"),
                                                          ("resumed", "limit raised")]
    ok = await track(api, account, "voice_minute", 1, "s-3", agent_id="stopper")
    assert (ok.status_code, ok.json()["credits_charged"]) == (200, 8)
    assert (await balance(api, account))["balance"] == 5084  # all from plan credits: 5,100 - 16


async def test_stop_agent_paused_for_plan_credits_resumes_at_the_renewal(
        api: httpx.AsyncClient, pool: AsyncConnectionPool, temporal_settings: Settings) -> None:
    """Time-skipping: the pause written by the hot path (its real outbox row) lasts until the cycle renews."""
    from datetime import UTC, datetime, timedelta
    from pathlib import Path

    from temporalio.contrib.pydantic import pydantic_data_converter
    from temporalio.testing import WorkflowEnvironment

    from creditflow.domain.periods import period_containing
    from tests.conftest import _temporal_cli
    from workers.main import build_worker
    from workflows.contract import (
        ACCOUNT_WORKFLOW,
        SIGNAL_OUTBOX_EVENT,
        AccountWorkflowInput,
        OutboxEvent,
        account_workflow_id,
    )

    account = await new_account(api)
    await register(api, account, "stopper", on_plan_exhausted="stop")
    now = datetime.now(UTC)
    period = period_containing(now - timedelta(days=30) + timedelta(hours=2), now)
    assert now < period.end <= now + timedelta(hours=3)
    await subscribe(pool, account, credits=10, period=period)
    assert (await track(api, account, "voice_minute", 2, "s-1", agent_id="stopper")).json()["code"] == (
        "plan_credits_exhausted")
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT dedup_key, kind, payload, created_at FROM outbox WHERE account_id = %s"
                                        " AND kind = 'limit.reached'", (account,))).fetchone()
    event = OutboxEvent(dedup_key=row["dedup_key"], kind=row["kind"], payload=row["payload"],
                        created_at=row["created_at"])
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(Path(_temporal_cli()).parent / "temporal-test-server"),
        data_converter=pydantic_data_converter)
    try:
        queue = temporal_settings.temporal_task_queue + "-ts"
        async with build_worker(env.client, pool, temporal_settings, task_queue=queue):
            handle = await env.client.start_workflow(
                ACCOUNT_WORKFLOW, AccountWorkflowInput(account_id=account, publish_search_attributes=False),
                id=account_workflow_id(account), task_queue=queue, start_signal=SIGNAL_OUTBOX_EVENT,
                start_signal_args=[event])
            paused = await eventually(lambda: agent(api, account, "stopper"), lambda a: a["status"] == "paused",
                                      timeout=20)
            assert paused["pause_reason"] == "plan_credits_exhausted"
            await env.sleep(timedelta(hours=4))
            resumed = await eventually(lambda: agent(api, account, "stopper"), lambda a: a["status"] == "active",
                                       timeout=30)
            assert resumed["wallet_until"] is None  # a new cycle: stop again, on the new plan credits
            trail = (await api.get(f"{AGENTS}/stopper/events", params={"account_id": account})).json()["items"]
            assert [(e["action"], e["reason"]) for e in trail] == [("paused", "plan_credits_exhausted"),
                                                                  ("resumed", "new period")]
            await handle.terminate("test over")
    finally:
        await env.shutdown()


async def test_a_stop_agents_hold_cut_at_the_renewal_settles_within_its_plan_credit_limit(
        api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    """A stop agent's hold whose reservation the renewal cut, settled when other holds reserve the new plan credits:
    the settlement (``cf_hold_settle``'s fallback: never refused, charged down to what is free) takes plan credits only,
    and they count against the agent's ``plan_credit_limit`` like any other it takes."""
    from creditflow.domain.periods import next_period
    from creditflow.ledger import subscriptions
    from tests.support.ledger import new_account as ledger_account
    from tests.support.plans import GROWTH

    account = await ledger_account(pool, bonus=10)  # 10 wallet credits
    await register(api, account, "caller", on_plan_exhausted="stop", plan_credit_limit=50)
    first = await subscribe(pool, account, credits=100)

    async def hold(key: str, minutes: int, **agent: object) -> str:
        resp = await api.post("/api/v1/billing/holds", json={"account_id": account, "feature_id": "voice_minute",
                                                             "value": minutes, "idempotency_key": key, **agent})
        assert resp.status_code == 201, resp.text
        return str(resp.json()["hold_id"])

    await hold("other-1", 3)  # 24 plan credits reserved
    call = await hold("call", 5, agent_id="caller")  # 40
    # The renewal: the 100 plan credits expire whatever is held (holds cut, newest first: the call's 40, then 14),
    # the next period's 100 arrive, and another hold takes all but 4 of what is free.
    await subscriptions.expire_plan_credits(pool, account, first, GROWTH.name)
    second = next_period(first)
    await subscriptions.grant_plan_credits(pool, account, GROWTH, second, credits=100)
    await subscriptions.save_subscription(pool, account, plan_id=GROWTH.id, period=second, pending_plan_id=None)
    await hold("other-2", 12)  # 96
    body = await balance(api, account)
    assert (body["balance"], body["pending_charges"], body["plan_credits_remaining"]) == (110, 106, 100)

    settled = await api.post(f"/api/v1/billing/holds/{call}/settle", json={"account_id": account, "value": 5})
    assert settled.status_code == 200, settled.text
    assert settled.json()["credits_charged"] == 4  # what was free; the other 36 are not charged
    assert await plan_left(pool, account) == 96 * MICROS_PER_CREDIT  # plan credits, not the wallet's 10
    assert (await agent(api, account, "caller"))["plan_credits_used"] == 4
    await assert_invariants(pool)


async def test_a_use_balance_agents_cut_hold_past_its_limit_settles_from_the_wallet_only(
        api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    """The same settlement for a use_balance agent already at its plan-credit limit: what is charged comes from the
    wallet's lots (at the overage rate), never from the plan credits it left to the other agents."""
    from creditflow.domain.periods import next_period
    from creditflow.ledger import subscriptions
    from tests.support.ledger import new_account as ledger_account
    from tests.support.plans import GROWTH

    account = await ledger_account(pool, bonus=10)  # 10 wallet credits
    await register(api, account, "ub", plan_credit_limit=10)
    first = await subscribe(pool, account, credits=100)

    async def hold(key: str, minutes: int, **agent: object) -> str:
        resp = await api.post("/api/v1/billing/holds", json={"account_id": account, "feature_id": "voice_minute",
                                                             "value": minutes, "idempotency_key": key, **agent})
        assert resp.status_code == 201, resp.text
        return str(resp.json()["hold_id"])

    await hold("other-1", 3)  # 24
    call = await hold("call", 5, agent_id="ub")  # 40, cut to 0 at the renewal (and the other to 10)
    await subscriptions.expire_plan_credits(pool, account, first, GROWTH.name)
    second = next_period(first)
    await subscriptions.grant_plan_credits(pool, account, GROWTH, second, credits=100)
    await subscriptions.save_subscription(pool, account, plan_id=GROWTH.id, period=second, pending_plan_id=None)
    # In the new period it reaches its limit: 16 credits, 10 from the plan and 6 from the wallet (4 left there).
    used = await track(api, account, "voice_minute", 2, "ub-1", agent_id="ub")
    assert used.json()["credits_charged"] == 16, used.text
    await hold("other-2", 10)  # 80 of the 84 free
    assert await plan_left(pool, account) == 90 * MICROS_PER_CREDIT

    settled = await api.post(f"/api/v1/billing/holds/{call}/settle", json={"account_id": account, "value": 5})
    assert settled.status_code == 200, settled.text
    assert settled.json()["credits_charged"] == 4  # what is free (the wallet's last 4); 41 of 45 not charged
    assert await plan_left(pool, account) == 90 * MICROS_PER_CREDIT  # the plan credits stay for the others
    assert (await agent(api, account, "ub"))["plan_credits_used"] == 10
    assert await plan_lot_remaining(pool, account) == 90 * MICROS_PER_CREDIT
    await assert_invariants(pool)
