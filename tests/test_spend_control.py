"""Spend control on the hot path: limits enforced inside the metering transaction, paused agents,
the outbox events that tell the account workflow, and the limits / spend / agents API. Real PostgreSQL through
the real app; the workflow side is in tests/test_agents_workflow.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from psycopg_pool import AsyncConnectionPool

from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.ledger import agents
from tests.conftest import ledger_snapshot
from tests.support.api import balance, bearer, key_for, new_account, track
from tests.support.ledger import assert_invariants
from tests.support.plans import AGENTS, LIMITS, set_limits

SPEND = "/api/v1/billing/spend"
async def outbox_events(pool: AsyncConnectionPool, account: str, kind: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute(
            "SELECT dedup_key, payload FROM outbox WHERE account_id = %s AND kind = %s ORDER BY id",
            (account, kind))).fetchall()


async def test_fifty_concurrent_events_never_overshoot_the_daily_limit(api: httpx.AsyncClient,
                                                                        pool: AsyncConnectionPool) -> None:
    account = await new_account(api)
    assert (await track(api, account, "chat_message", 10, "before")).status_code == 200  # counts once set
    assert await set_limits(api, account, daily_limit=100) == {
        "daily_limit": 100, "monthly_limit": None, "per_agent_limit": None, "action_on_limit": "pause",
        "enabled": True, "currency": "credits"}

    responses = await asyncio.gather(*(track(api, account, "chat_message", 3, f"e-{n}") for n in range(50)))
    allowed = [r for r in responses if r.status_code == 200]
    denied = [r for r in responses if r.status_code != 200]
    assert len(allowed) == 30  # 10 + 30 x 3 = 100 exactly
    assert {(r.status_code, r.json()["code"]) for r in denied} == {(429, "daily_limit_reached")}
    assert all(r.json()["allowed"] is False and r.json()["credits_charged"] == 0 for r in denied)
    spend = (await api.get(SPEND, params={"account_id": account})).json()
    assert (spend["today"], spend["this_month"], spend["daily_limit"]) == (100, 100, 100)
    assert (await balance(api, account))["balance"] == 4900
    [reached] = await outbox_events(pool, account, "limit.reached")
    assert reached["payload"] == {"scope": "daily", "period": spend["date"], "limit_micros": 100 * MICROS_PER_CREDIT,
                                  "spent_micros": 100 * MICROS_PER_CREDIT, "action": "pause"}
    # Raising the limit lets usage through again (and tells the workflow).
    await set_limits(api, account, daily_limit=103)
    assert (await track(api, account, "chat_message", 3, "after-raise")).status_code == 200
    assert len(await outbox_events(pool, account, "limits.changed")) == 2
    await assert_invariants(pool)


async def test_monthly_limit_and_alert_only(api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    account = await new_account(api)
    await set_limits(api, account, monthly_limit=50)
    assert (await track(api, account, "chat_message", 50, "m-1")).status_code == 200
    denied = await track(api, account, "chat_message", 1, "m-2")
    assert (denied.status_code, denied.json()["code"]) == (429, "monthly_limit_reached")

    other = await new_account(api)
    await set_limits(api, other, daily_limit=20, action_on_limit="alert_only")
    for n in range(3):
        assert (await track(api, other, "chat_message", 10, f"a-{n}")).status_code == 200  # not refused
    [alert] = await outbox_events(pool, other, "limit.reached")
    assert (alert["payload"]["action"], alert["payload"]["spent_micros"]) == ("alert_only", 20 * MICROS_PER_CREDIT)
    await assert_invariants(pool)


async def test_agent_limits_and_pauses(api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    account = await new_account(api)
    created = await api.post(AGENTS, json={"account_id": account, "id": "support-bot", "name": "Support",
                                           "monthly_limit": 25})
    assert created.status_code == 201, created.text
    assert {k: created.json()[k] for k in ("id", "name", "status", "monthly_limit", "spent_this_month",
                                           "on_plan_exhausted")} == {
        "id": "support-bot", "name": "Support", "status": "active", "monthly_limit": 25, "spent_this_month": 0,
        "on_plan_exhausted": "use_balance"}
    assert (await track(api, account, "chat_message", 20, "s-1", agent_id="support-bot")).status_code == 200
    over = await track(api, account, "chat_message", 6, "s-2", agent_id="support-bot")
    assert (over.status_code, over.json()["code"]) == (429, "agent_limit_reached")
    assert (await track(api, account, "chat_message", 6, "s-3", agent_id="sales-bot")).status_code == 200
    [reached] = await outbox_events(pool, account, "limit.reached")
    assert (reached["payload"]["scope"], reached["payload"]["agent_id"]) == ("agent_monthly", "support-bot")

    # The account's per-agent limit applies to agents without their own (sales-bot was seen in usage).
    await set_limits(api, account, per_agent_limit=10)
    assert (await track(api, account, "chat_message", 4, "s-4", agent_id="sales-bot")).status_code == 200
    refused = await track(api, account, "chat_message", 1, "s-5", agent_id="sales-bot")
    assert refused.json()["code"] == "agent_limit_reached"
    listed = (await api.get(AGENTS, params={"account_id": account})).json()["items"]
    assert [(a["id"], a["spent_this_month"], a["monthly_limit"]) for a in listed] == [
        ("sales-bot", 10, None), ("support-bot", 20, 25)]
    spend = (await api.get(SPEND, params={"account_id": account})).json()
    assert [(a["agent_id"], a["spent_this_month"], a["monthly_limit"]) for a in spend["agents"]] == [
        ("sales-bot", 10, 10), ("support-bot", 20, 25)]

    # A paused agent is refused on the hot path, in checks and holds; others are not.
    await agents.set_status(pool, account, "support-bot", paused=True, actor="operator", reason="test")
    paused = await track(api, account, "chat_message", 1, "s-6", agent_id="support-bot")
    assert (paused.status_code, paused.json()["code"]) == (403, "agent_paused")
    check = await api.post("/api/v1/billing/check", json={"account_id": account, "feature_id": "chat_message",
                                                          "value": 1, "agent_id": "support-bot"})
    assert (check.json()["allowed"], check.json()["code"]) == (False, "agent_paused")
    hold = await api.post("/api/v1/billing/holds", json={"account_id": account, "feature_id": "voice_minute",
                                                         "value": 1, "agent_id": "support-bot",
                                                         "idempotency_key": "h-1"})
    assert (hold.status_code, hold.json()["code"]) == (403, "agent_paused")
    assert (await track(api, account, "chat_message", 1, "s-7")).status_code == 200  # no agent: fine
    await assert_invariants(pool)


async def test_batch_and_hold_settlement_under_limits(api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    account = await new_account(api)
    plain = await new_account(api)
    hold = await api.post("/api/v1/billing/holds", json={"account_id": account, "feature_id": "voice_minute",
                                                         "value": 2, "idempotency_key": "call-1"})
    assert hold.status_code == 201
    await set_limits(api, account, daily_limit=30)
    events = [{"account_id": account, "feature_id": "chat_message", "value": 10, "idempotency_key": f"b-{n}"}
              for n in range(4)] + [{"account_id": plain, "feature_id": "chat_message", "value": 10,
                                     "idempotency_key": "p-1"}]
    resp = await api.post("/api/v1/billing/track/batch", json={"events": events})
    assert resp.status_code == 200, resp.text
    codes = [r["code"] for r in resp.json()["results"]]
    # The active hold's 20 credits count against the limit: 20 reserved + 10 = 30, then nothing more today.
    assert codes == ["ok", "daily_limit_reached", "daily_limit_reached", "daily_limit_reached", "ok"]
    # The call happened: settling is never refused by a limit, and it counts.
    settled = await api.post(f"/api/v1/billing/holds/{hold.json()['hold_id']}/settle",
                             json={"account_id": account, "value": 2})
    assert settled.status_code == 200 and settled.json()["credits_charged"] == 20
    spend = (await api.get(SPEND, params={"account_id": account})).json()
    assert spend["today"] == 30  # never past the hard limit, holds included
    await assert_invariants(pool)


async def test_limits_and_agents_bad_input_change_nothing(api: httpx.AsyncClient, database_url: str) -> None:
    account = await new_account(api)
    other = await new_account(api)
    writer = bearer(await key_for(api, account, "billing:write", "usage:write", "payments:write"))
    reader = bearer(await key_for(api, account, "billing:read"))
    await api.post(AGENTS, headers=writer, json={"id": "bot-1", "monthly_limit": 10})
    before = await ledger_snapshot(database_url)
    limits_before = (await api.get(LIMITS, headers=writer)).json()
    agents_before = (await api.get(AGENTS, headers=writer)).json()
    cases: list[tuple[str, str, dict[str, str], dict[str, Any], int, str]] = [
        ("put", LIMITS, writer, {"daily_limit": -5}, 422, "invalid_amount"),
        ("put", LIMITS, writer, {"daily_limit": 0}, 422, "invalid_amount"),
        ("put", LIMITS, writer, {"monthly_limit": "0.0000001"}, 422, "invalid_amount"),
        ("put", LIMITS, writer, {"monthly_limit": "10e12"}, 422, "invalid_amount"),
        ("put", LIMITS, writer, {"daily_limit": True}, 422, "validation_error"),
        ("put", LIMITS, writer, {"action_on_limit": "explode"}, 422, "validation_error"),
        ("put", LIMITS, writer, {"surprise": 1}, 422, "validation_error"),
        ("put", LIMITS, writer, {"account_id": other, "daily_limit": 5}, 403, "forbidden"),
        ("put", LIMITS, reader, {"daily_limit": 5}, 403, "insufficient_scope"),
        ("post", AGENTS, writer, {"id": "bot-1"}, 409, "agent_exists"),
        ("post", AGENTS, writer, {"id": "bad id!"}, 422, "validation_error"),
        ("post", AGENTS, writer, {"id": "bot-2", "monthly_limit": -1}, 422, "invalid_amount"),
        ("post", AGENTS, writer, {"id": "bot-2", "on_plan_exhausted": "maybe"}, 422, "validation_error"),
        ("post", AGENTS, reader, {"id": "bot-2"}, 403, "insufficient_scope"),
        ("patch", f"{AGENTS}/bot-1", writer, {"monthly_limit": "-3"}, 422, "invalid_amount"),
        ("patch", f"{AGENTS}/nobody", writer, {"name": "x"}, 404, "unknown_agent"),
        ("patch", f"{AGENTS}/bot-1", writer, {"account_id": other, "name": "x"}, 403, "forbidden"),
    ]
    for method, path, headers, body, status, code in cases:
        resp = await api.request(method.upper(), path, headers=headers, json=body)
        assert (resp.status_code, resp.json().get("error", {}).get("code")) == (status, code), (path, body, resp.text)
    other_view = await api.get(f"{AGENTS}/bot-1", headers=writer, params={"account_id": other})
    assert (other_view.status_code, other_view.json()["error"]["code"]) == (403, "forbidden")
    assert await ledger_snapshot(database_url) == before
    assert (await api.get(LIMITS, headers=writer)).json() == limits_before
    assert (await api.get(AGENTS, headers=writer)).json() == agents_before


async def test_credit_system_entitled_and_event(api: httpx.AsyncClient) -> None:
    """The credit-systems document's shape: customer_id (account id or external id), /entitled, /event."""
    account = await new_account(api, external_id="user-123")
    ok = await api.post("/api/v1/entitled", json={"customer_id": "user-123", "feature_id": "voice_minute"})
    assert ok.status_code == 200
    assert ok.json() == {"customer_id": "user-123", "feature_id": "voice_minute", "code": "feature_found",
                         "allowed": True, "balances": [{"feature_id": "credits", "unlimited": False, "balance": 5000}]}
    unknown = await api.post("/api/v1/entitled", json={"customer_id": account, "feature_id": "teleport"})
    assert (unknown.json()["allowed"], unknown.json()["code"]) == (False, "unknown_feature")

    recorded = await api.post("/api/v1/event", json={"customer_id": "user-123", "feature_id": "voice_minute",
                                                     "value": 10, "idempotency_key": "call-9"})
    assert recorded.status_code == 200, recorded.text
    body = recorded.json()
    assert (body["message"], body["customer_id"], body["feature_id"], body["credits_charged"], body["balance"]) == (
        "Event recorded successfully", "user-123", "voice_minute", 100, 4900)
    assert body["event_id"].startswith("txn_")
    again = await api.post("/api/v1/event", json={"customer_id": "user-123", "feature_id": "voice_minute",
                                                  "value": 10, "idempotency_key": "call-9"})
    assert (again.json()["replayed"], again.json()["balance"]) == (True, 4900)
    too_much = await api.post("/api/v1/event", json={"customer_id": account, "feature_id": "voice_minute",
                                                     "value": 1000})
    assert (too_much.status_code, too_much.json()["code"]) == (402, "insufficient_credits")
    nobody = await api.post("/api/v1/entitled", json={"customer_id": "ghost", "feature_id": "voice_minute"})
    assert (nobody.status_code, nobody.json()["error"]["code"]) == (404, "unknown_account")
    writer = bearer(await key_for(api, account, "billing:write", "usage:write", "payments:write"))
    other = await new_account(api, external_id="user-456")
    foreign = await api.post("/api/v1/event", headers=writer, json={"customer_id": "user-456",
                                                                    "feature_id": "voice_minute", "value": 1})
    assert (foreign.status_code, foreign.json()["error"]["code"]) == (403, "forbidden")
    assert (await balance(api, other))["balance"] == 5000
