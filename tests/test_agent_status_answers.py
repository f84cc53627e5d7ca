"""Pause and resume answer what happened even when telling the customer is slow.

The account workflow records the new status (and its audit event), then sends ``agent.paused`` / ``agent.resumed``
before its update returns. A webhook that keeps failing makes that notification retry for seconds; the API's wait
(``CREDITFLOW_TOPUP_ANSWER_TIMEOUT_SECONDS``) ran out and the answer was ``503 workflow_unavailable`` although the
agent was paused. Real PostgreSQL, the Temporal dev server with the production worker, a real failing receiver.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool

from creditflow.config import Settings
from creditflow.ledger import agents
from tests.conftest import ADMIN_KEY
from tests.receivers import http_receiver
from tests.support.api import app_client, new_account
from tests.support.notifications import set_channels
from tests.support.plans import AGENTS
from tests.support.temporal import eventually

pytestmark = pytest.mark.temporal


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=5000, topup_answer_timeout_seconds=1, notify_max_attempts=3,
                    notify_allow_private_urls=True, notify_allow_http_urls=True)


@pytest.fixture
async def api(temporal_settings: Settings, temporal_worker: Any) -> AsyncIterator[httpx.AsyncClient]:
    async for client in app_client(temporal_settings):
        yield client


async def delivered(pool: AsyncConnectionPool, account: str) -> list[tuple[str, str]]:
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT n.kind, d.status FROM notifications_log n"
            " JOIN notification_deliveries d ON d.notification_id = n.id"
            " WHERE n.account_id = %s AND d.channel = 'webhook' ORDER BY n.id", (account,))).fetchall()
    return [(r["kind"], r["status"]) for r in rows]


async def test_pause_and_resume_answer_the_new_status_while_the_notification_is_still_retrying(
        api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    account = await new_account(api)
    assert (await api.post(AGENTS, json={"account_id": account, "id": "bot"})).status_code == 201
    async with http_receiver([503]) as hook:  # the customer's webhook fails every time: the notice retries
        await set_channels(api, account, webhook_url=f"{hook.url}/in")
        paused = await api.post(f"{AGENTS}/bot/pause", json={"account_id": account, "reason": "review"})
        assert paused.status_code == 200, paused.text
        assert (paused.json()["status"], paused.json()["paused_by"], paused.json()["pause_reason"]) == (
            "paused", "admin", "review")
        await eventually(lambda: delivered(pool, account), lambda d: d == [("agent.paused", "failed")], timeout=30)
        resumed = await api.post(f"{AGENTS}/bot/resume", json={"account_id": account})
        assert (resumed.status_code, resumed.json()["status"]) == (200, "active"), resumed.text
        await eventually(lambda: delivered(pool, account),
                         lambda d: d == [("agent.paused", "failed"), ("agent.resumed", "failed")], timeout=30)
        # A refusal is still a refusal (once the workflow is free again: it changes one agent status at a time).
        again = await api.post(f"{AGENTS}/bot/resume", json={"account_id": account})
        assert (again.status_code, again.json()["error"]["code"]) == (409, "invalid_transition")
        assert len(hook.requests) == 6  # 3 attempts of each notice
    trail = await agents.agent_events(pool, account, "bot")
    assert [(e.action, e.actor) for e in trail] == [("paused", "admin"), ("resumed", "admin")]
