"""Spend management on/off (seed 002's toggle, issue 14): ``PUT /api/v1/billing/limits {enabled}`` turns the
account's limits off without losing them and on again; while off none is enforced and limits saved are kept."""

from __future__ import annotations

import httpx

from tests.conftest import ledger_snapshot
from tests.support.api import assert_error, new_account, track

LIMITS = "/api/v1/billing/limits"
SPEND = "/api/v1/billing/spend"


async def test_turning_spend_management_off_keeps_the_limits_and_enforces_none_until_it_is_on_again(
        api: httpx.AsyncClient, database_url: str) -> None:
    acc = await new_account(api)

    async def put(**body: object) -> dict[str, object]:
        resp = await api.put(LIMITS, json={"account_id": acc, **body})
        assert resp.status_code == 200, resp.text
        return {k: resp.json()[k] for k in ("daily_limit", "monthly_limit", "per_agent_limit", "enabled")}

    assert await put(daily_limit=5, monthly_limit=100, per_agent_limit=50) == {
        "daily_limit": 5, "monthly_limit": 100, "per_agent_limit": 50, "enabled": True}
    assert (await track(api, acc, "chat_message", 4, "a")).status_code == 200
    refused = await track(api, acc, "chat_message", 2, "b")
    assert (refused.status_code, refused.json()["code"]) == (429, "daily_limit_reached")

    # Off: the limits are kept (and shown as kept), the spend figures show none applying, usage goes through.
    assert await put(enabled=False) == {"daily_limit": 5, "monthly_limit": 100, "per_agent_limit": 50,
                                        "enabled": False}
    assert (await api.get(LIMITS, params={"account_id": acc})).json()["enabled"] is False
    spend = (await api.get(SPEND, params={"account_id": acc})).json()
    assert (spend["daily_limit"], spend["monthly_limit"]) == (None, None)
    assert (await track(api, acc, "chat_message", 2, "c")).status_code == 200
    # A limit saved while off is kept for later and still not enforced.
    assert await put(daily_limit=10) == {"daily_limit": 10, "monthly_limit": 100, "per_agent_limit": 50,
                                         "enabled": False}
    assert (await track(api, acc, "chat_message", 1, "d", agent_id="bot")).status_code == 200

    # On again: the kept limits apply, counting the day's usage so far (4 + 2 + 1 = 7 of 10).
    assert await put(enabled=True) == {"daily_limit": 10, "monthly_limit": 100, "per_agent_limit": 50,
                                       "enabled": True}
    over = await track(api, acc, "chat_message", 4, "e")
    assert (over.status_code, over.json()["code"]) == (429, "daily_limit_reached")
    assert (await track(api, acc, "chat_message", 3, "f")).status_code == 200
    spend = (await api.get(SPEND, params={"account_id": acc})).json()
    assert (spend["today"], spend["daily_limit"], spend["monthly_limit"]) == (10, 10, 100)

    # Bad input: 422 and nothing changed.
    before, limits_before = await ledger_snapshot(database_url), (await api.get(LIMITS, params={"account_id": acc})
                                                                  ).json()
    assert_error(await api.put(LIMITS, json={"account_id": acc, "enabled": "maybe"}), 422, "validation_error")
    assert (await api.get(LIMITS, params={"account_id": acc})).json() == limits_before
    assert await ledger_snapshot(database_url) == before
