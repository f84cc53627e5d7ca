"""The auto-recharge stack for tests: its settings, the app with the production worker, the outbox relay."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from creditflow.config import Settings
from tests.conftest import ADMIN_KEY, STRIPE_KEY
from tests.support.api import app_client
from workers.relay import OutboxRelay

SETTINGS = "/api/v1/billing/auto-recharge"


@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=5000, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=stripe_base, stripe_retry_max_wait_seconds=0.1,
                    outbox_poll_interval_seconds=0.2, auto_recharge_retry_base_seconds=1,
                    auto_recharge_max_consecutive_failures=3, auto_recharge_max_per_day=10)


@pytest.fixture
async def api(temporal_settings: Settings, temporal_worker: Any) -> AsyncIterator[httpx.AsyncClient]:
    async for client in app_client(temporal_settings):
        yield client


@pytest.fixture
async def relay(pool: AsyncConnectionPool, temporal_client: Client, temporal_settings: Settings
                ) -> AsyncIterator[OutboxRelay]:
    """The outbox relay of the worker process, running in the background."""
    relay = OutboxRelay(pool, temporal_client, temporal_settings)
    task = asyncio.create_task(relay.run())
    yield relay
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def recharge_rows(pool: AsyncConnectionPool, account: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute(
            "SELECT id, amount_micros, balance_after_micros, idempotency_key, metadata, description FROM journal"
            " WHERE account_id = %s AND type = 'auto_recharge' ORDER BY seq", (account,))).fetchall()


async def recharge_charges(pool: AsyncConnectionPool, account: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute(
            "SELECT * FROM stripe_charges WHERE account_id = %s AND kind = 'auto_recharge' ORDER BY created_at",
            (account,))).fetchall()
