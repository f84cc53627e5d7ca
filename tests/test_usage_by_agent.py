"""``GET /api/v1/billing/usage?group_by=agent``: credits per agent in a window, exactly, read like the daily report
(whole rolled-up days from usage_daily, the rest from the journal), so the portal's per-agent chart covers the
billing period (issue 14)."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from decimal import Decimal

import httpx
from psycopg_pool import AsyncConnectionPool

from creditflow.ledger import metering, partitions
from creditflow.ledger.metering import UsageEvent
from tests.support.api import assert_error, new_account, track
from tests.support.ledger import clock_pool


def _midnight(day: datetime) -> datetime:
    return datetime.combine(day.date(), time(), UTC)


async def test_usage_grouped_by_agent_totals_each_agents_credits_in_the_window_exactly(
        api: httpx.AsyncClient, database_url: str, pool: AsyncConnectionPool) -> None:
    acc = await new_account(api)
    today = _midnight(datetime.now(UTC))
    three_ago, two_ago = today - timedelta(days=3), today - timedelta(days=2)
    async with clock_pool(database_url, three_ago + timedelta(hours=12)) as then:
        assert (await metering.track(then, UsageEvent.build(acc, "chat_message", 5, "old", "sales"))).code == "ok"
    async with clock_pool(database_url, two_ago + timedelta(hours=12)) as then:
        for event in (UsageEvent.build(acc, "chat_message", 2, "d2-chat", "support"),
                      UsageEvent.build(acc, "voice_minute", 1, "d2-voice", "sales")):
            assert (await metering.track(then, event)).code == "ok"
    async with clock_pool(database_url, two_ago + timedelta(hours=14)) as then:
        event = UsageEvent.build(acc, "voice_minute", "0.25", "d2-late", "support")
        assert (await metering.track(then, event)).code == "ok"
    # The days that are over are rolled up (what the partition maintenance does): they are read from usage_daily.
    assert await partitions.rollup_usage(pool, three_ago.date(), today.date()) > 0
    for feature, value, key, agent in (("voice_minute", "0.05", "t-sub", "support"),
                                       ("chat_message", 1, "t-none", None), ("chat_message", 3, "t-sales", "sales")):
        extra = {"agent_id": agent} if agent else {}
        assert (await track(api, acc, feature, value, key, **extra)).status_code == 200

    async def by_agent(**window: datetime) -> list[tuple[str | None, str, int]]:
        params = {"account_id": acc, "group_by": "agent", **{k: v.isoformat() for k, v in window.items()}}
        resp = await api.get("/api/v1/billing/usage", params=params)
        assert resp.status_code == 200, resp.text
        return [(i["agent_id"], str(i["credits"]), i["events"]) for i in resp.json()["items"]]

    # From the start of two days ago: the older usage is left out; 0.05 voice minutes is half a credit, exactly.
    assert await by_agent(start=two_ago) == [("sales", "13", 2), ("support", "5", 3), (None, "1", 1)]
    # A start inside a rolled-up day reads that day from the journal.
    assert await by_agent(start=two_ago + timedelta(hours=13)) == [
        ("sales", "3", 1), ("support", "3", 2), (None, "1", 1)]
    assert await by_agent(start=three_ago, end=today) == [("sales", "15", 2), ("support", "4.5", 2)]
    assert await by_agent() == [("sales", "18", 3), ("support", "5", 3), (None, "1", 1)]
    # The same window per day adds up to the same total.
    daily = (await api.get("/api/v1/billing/usage", params={"account_id": acc, "start": two_ago.isoformat()})).json()
    assert sum(Decimal(str(r["credits"])) for r in daily["items"]) == Decimal("19")


async def test_usage_refuses_an_unknown_grouping(api: httpx.AsyncClient) -> None:
    acc = await new_account(api)
    resp = await api.get("/api/v1/billing/usage", params={"account_id": acc, "group_by": "feature"})
    assert_error(resp, 422, "validation_error")
