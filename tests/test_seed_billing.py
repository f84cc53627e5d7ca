"""What the seed products promise about entitlement checks, console figures and invoices (issue 13 items 6, 5, 10),
through the HTTP API on the real stack (PostgreSQL; Temporal and localstripe where a payment runs)."""

from __future__ import annotations

from typing import Any

import httpx
from psycopg_pool import AsyncConnectionPool

from tests.test_api_metering import new_account, track

CHECK = "/api/v1/billing/check"
ENTITLED = "/api/v1/entitled"


async def debit(api: httpx.AsyncClient, account: str, credits: int, key: str) -> None:
    resp = await api.post("/api/v1/billing/wallet/credit", json={
        "account_id": account, "amount": -credits, "reason": "test", "idempotency_key": key})
    assert resp.status_code in (200, 201), resp.text


async def checked(api: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = await api.post(path, json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


# --- item 6: a check without a value asks for one unit ----------------------------------------------------------


async def test_check_and_entitled_without_value_ask_for_one_unit(api: httpx.AsyncClient,
                                                                 pool: AsyncConnectionPool) -> None:
    account = await new_account(api, external_id="user-1")
    await debit(api, account, 4995, "d-1")  # 5 credits left: one chat message (1) yes, one voice minute (10) no
    voice = await checked(api, CHECK, {"account_id": account, "feature_id": "voice_minute"})
    assert (voice["allowed"], voice["code"]) == (False, "insufficient_credits")
    chat = await checked(api, CHECK, {"account_id": account, "feature_id": "chat_message"})
    assert (chat["allowed"], chat["code"]) == (True, "ok")
    no = await checked(api, ENTITLED, {"customer_id": "user-1", "feature_id": "voice_minute"})
    assert no == {"customer_id": "user-1", "feature_id": "voice_minute", "code": "insufficient_credits",
                  "allowed": False, "balances": [{"feature_id": "credits", "unlimited": False, "balance": 5}]}
    yes = await checked(api, ENTITLED, {"customer_id": "user-1", "feature_id": "chat_message"})
    assert (yes["allowed"], yes["code"]) == (True, "feature_found")
    # Exactly one unit affordable is allowed; the same with an explicit value of 1.
    await debit(api, account, 4, "d-2")
    assert (await checked(api, CHECK, {"account_id": account, "feature_id": "chat_message"}))["allowed"] is True
    assert (await checked(api, CHECK, {"account_id": account, "feature_id": "chat_message", "value": 1}))[
        "allowed"] is True

    # Spend control sees one unit too: an agent limit with 5 of 10 credits left stops a minute (10), not a message.
    other = await new_account(api)
    resp = await api.post("/api/v1/agents", json={"account_id": other, "id": "bot", "monthly_limit": 10})
    assert resp.status_code == 201, resp.text
    assert (await track(api, other, "chat_message", 5, "c-1", agent_id="bot")).status_code == 200
    minute = await checked(api, CHECK, {"account_id": other, "feature_id": "voice_minute", "agent_id": "bot"})
    assert (minute["allowed"], minute["code"]) == (False, "agent_limit_reached")
    message = await checked(api, CHECK, {"account_id": other, "feature_id": "chat_message", "agent_id": "bot"})
    assert (message["allowed"], message["code"]) == (True, "ok")


# --- item 5: the console's credit balance figures -----------------------------------------------------------------


async def test_balance_reports_total_usage_and_remaining_for_the_period(api: httpx.AsyncClient,
                                                                       pool: AsyncConnectionPool) -> None:
    from datetime import UTC, datetime, timedelta

    from tests.test_plan_pricing import subscribe

    # Wallet-only: the calendar month (UTC). 5,000 welcome + 300 granted by hand; 245 + 10 used; a debit is no usage.
    account = await new_account(api)
    grant = await api.post("/api/v1/billing/wallet/credit", json={
        "account_id": account, "amount": 300, "reason": "goodwill", "idempotency_key": "g-1"})
    assert grant.status_code in (200, 201), grant.text
    await debit(api, account, 5, "d-1")
    assert (await track(api, account, "llm_tokens", 2450, "t-1")).status_code == 200
    assert (await track(api, account, "voice_minute", 1, "t-2")).status_code == 200
    got = (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()
    now = datetime.now(UTC)
    month = datetime(now.year, now.month, 1, tzinfo=UTC)
    following = (month + timedelta(days=32)).replace(day=1)
    assert {k: got[k] for k in ("total_credits", "usage_this_period", "remaining_credits", "balance",
                                "period_start", "period_end")} == {
        "total_credits": 5300, "usage_this_period": 255, "remaining_credits": 5040, "balance": 5040,
        "period_start": month.isoformat().replace("+00:00", "Z"),
        "period_end": following.isoformat().replace("+00:00", "Z")}
    # Usage of an earlier month is not this period's; nor are the credits granted then.
    async with pool.connection() as conn, conn.transaction():  # the simulator's clock, for this transaction only
        await conn.execute("SELECT set_config('creditflow.now', %s, true)", ((month - timedelta(days=3)).isoformat(),))
        await conn.execute("SELECT * FROM cf_track(%s, 'chat_message', 7, NULL, 'old-1', NULL, NULL)", (account,))
    again = (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()
    assert (again["total_credits"], again["usage_this_period"], again["balance"]) == (5300, 255, 5033)

    # A plan account: the billing period, plan credits granted in it count as granted.
    planned = await new_account(api)
    period = await subscribe(pool, planned, credits=100)
    assert (await track(api, planned, "voice_minute", 2, "p-1")).status_code == 200  # Growth: 8 a minute
    got = (await api.get("/api/v1/billing/balance", params={"account_id": planned})).json()
    assert {k: got[k] for k in ("total_credits", "usage_this_period", "remaining_credits", "plan_credits_remaining",
                                "period_start", "period_end")} == {
        "total_credits": 5100, "usage_this_period": 16, "remaining_credits": 5084, "plan_credits_remaining": 84,
        "period_start": period.start.isoformat().replace("+00:00", "Z"),
        "period_end": period.end.isoformat().replace("+00:00", "Z")}
