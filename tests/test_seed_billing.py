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
