"""Plan and spend-control helpers for tests: subscribing, plan credits left, agent limits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from psycopg_pool import AsyncConnectionPool

from creditflow.domain.periods import Period, period_containing
from creditflow.domain.plans import Plan, load_plan_catalog
from creditflow.ledger import subscriptions

CATALOG = load_plan_catalog()
GROWTH = CATALOG.get("growth")


async def subscribe(pool: AsyncConnectionPool, account: str, credits: int, plan: Plan = GROWTH,
                    period: Period | None = None) -> Period:
    """What ``start_subscription`` does: the period's plan credits (``credits`` of them), then the subscription."""
    period = period or period_containing(datetime.now(UTC) - timedelta(days=3), datetime.now(UTC))
    await subscriptions.grant_plan_credits(pool, account, plan, period, credits=credits)
    await subscriptions.save_subscription(pool, account, plan_id=plan.id, period=period, pending_plan_id=None)
    return period


async def plan_left(pool: AsyncConnectionPool, account: str) -> int:
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT plan_left_micros FROM balances WHERE account_id = %s",
                                        (account,))).fetchone()
    return int(row["plan_left_micros"])


LIMITS = "/api/v1/billing/limits"
AGENTS = "/api/v1/agents"


async def set_limits(api: httpx.AsyncClient, account: str, **limits: object) -> dict[str, Any]:
    resp = await api.put(LIMITS, json={"account_id": account, **limits})
    assert resp.status_code == 200, resp.text
    return resp.json()
