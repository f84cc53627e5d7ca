"""Spend control end to end, through every hop: usage on the hot path -> outbox -> relay -> AccountWorkflow ->
notification service -> the customer's HTTP endpoint. The received webhooks are signed (verified with the
snippet of docs/concepts.md), exact, and each sent once. Real PostgreSQL, Temporal dev server, real HTTP
receiver; no mocks."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool

from creditflow.config import Settings
from tests.conftest import ADMIN_KEY, STRIPE_KEY
from tests.receivers import http_receiver
from tests.support.api import new_account, track
from tests.support.auto_recharge import api, relay  # noqa: F401 - fixtures (worker, relay) built on `settings` below
from tests.support.notifications import readme_verifier, set_channels
from tests.support.plans import AGENTS
from tests.support.temporal import eventually

pytestmark = pytest.mark.temporal


@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=5000, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=stripe_base, outbox_poll_interval_seconds=0.2,
                    notify_allow_http_urls=True, notify_allow_private_urls=True, webhook_timeout_seconds=5)


async def test_limit_pause_and_low_balance_reach_the_customer_once(
        api: httpx.AsyncClient, pool: AsyncConnectionPool, relay: Any) -> None:  # noqa: F811
    account = await new_account(api)
    async with http_receiver() as hook:
        config = await set_channels(api, account, webhook_url=f"{hook.url}/creditflow")
        secret = config["webhook_secret"]
        alerts = await api.put("/api/v1/billing/alerts", json={
            "account_id": account, "alerts": [{"threshold": 4990, "channels": ["webhook"]}]})
        assert alerts.status_code == 200, alerts.text
        await api.post(AGENTS, json={"account_id": account, "id": "voice-7", "monthly_limit": 30})

        for n in range(3):  # 5,000 -> 4,970: crosses the 4,990 alert once, reaches the agent's limit exactly
            assert (await track(api, account, "chat_message", 10, f"u-{n}", agent_id="voice-7")).status_code == 200
        denied = await track(api, account, "chat_message", 1, "u-late", agent_id="voice-7")
        assert denied.json()["code"] in ("agent_limit_reached", "agent_paused")

        def kinds() -> list[str]:
            return sorted(r.headers["creditflow-event-type"] for r in hook.requests)

        async def received() -> list[str]:
            return kinds()

        await eventually(received, lambda ks: ks == ["agent.paused", "balance.low", "limit.reached"], timeout=30)
        verify = readme_verifier()
        for request in hook.requests:
            assert request.path == "/creditflow"
            assert verify(request.body, request.headers["creditflow-signature"], secret)
        by_type = {r.headers["creditflow-event-type"]: r.json() for r in hook.requests}
        assert by_type["agent.paused"]["data"]["agent_id"] == "voice-7"
        assert by_type["agent.paused"]["data"]["paused_by"] == "system"
        assert by_type["limit.reached"]["data"]["scope"] == "agent_monthly"
        assert by_type["limit.reached"]["data"]["limit_micros"] == 30_000_000
        assert by_type["balance.low"]["data"]["threshold_micros"] == 4_990_000_000
        assert all(body["account_id"] == account for body in by_type.values())
        # Redelivery of the outbox rows (a relay crash before marking them) sends nothing twice.
        async with pool.connection() as conn:
            await conn.execute("UPDATE outbox SET dispatched_at = NULL WHERE account_id = %s", (account,))
        await relay.run_once()
        await eventually(lambda: _outbox_pending(pool, account), lambda n: n == 0)
        await asyncio.sleep(1.0)  # room for a duplicate send to show up, if there were one
        assert kinds() == ["agent.paused", "balance.low", "limit.reached"]


async def _outbox_pending(pool: AsyncConnectionPool, account: str) -> int:
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT count(*) AS n FROM outbox WHERE account_id = %s AND"
                                        " dispatched_at IS NULL", (account,))).fetchone()
    return int(row["n"]) if row else 0
