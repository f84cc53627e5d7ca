"""The outbox relay keeps each account's order (effects depend on it): while an account's earlier row fails (or is
held by another relay), its later rows wait, so e.g. ``dispute.closed`` never reaches the account workflow before
``dispute.created``; other accounts are not held back. Real PostgreSQL and Temporal dev server."""

from __future__ import annotations

from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from temporalio.worker import Worker

from creditflow.config import Settings
from creditflow.ledger.accounts import create_account
from tests.support.temporal import eventually, state_of
from workers.relay import OutboxRelay

pytestmark = pytest.mark.temporal


async def rows_of(pool: AsyncConnectionPool, account: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute(
            "SELECT id, kind, dispatched_at, attempts, last_error FROM outbox WHERE account_id = %s ORDER BY id",
            (account,))).fetchall()


async def test_relay_keeps_each_accounts_order_when_an_earlier_row_fails(
        pool: AsyncConnectionPool, temporal_client: Client, temporal_settings: Settings,
        temporal_worker: Worker) -> None:
    acme = await create_account(pool, name="Acme", billing_email="billing@acme.test")
    assert await OutboxRelay(pool, temporal_client, temporal_settings).run_once() == 1  # account.created
    async with pool.connection() as conn:  # the first one cannot be delivered (its payload is not an object)
        await conn.execute(
            "INSERT INTO outbox (account_id, kind, dedup_key, payload) VALUES"
            " (%(a)s, 'test.dispute_created', 'order:1', '[1]'::jsonb),"
            " (%(a)s, 'test.dispute_closed', 'order:2', '{}'::jsonb)", {"a": acme.id})
    other = await create_account(pool, name="Other", billing_email="billing@other.test")

    relay = OutboxRelay(pool, temporal_client, temporal_settings)
    assert await relay.run_once() == 1  # only the other account's row
    _, first, second = await rows_of(pool, acme.id)
    assert (first["dispatched_at"], first["attempts"]) == (None, 1)
    assert first["last_error"].startswith("ValidationError")
    assert (second["dispatched_at"], second["attempts"]) == (None, 0)  # never tried: it waits for the first
    assert (await rows_of(pool, other.id))[0]["dispatched_at"] is not None
    # A second relay (which knows nothing of the first one's back-off) tries the first row again, not the second.
    assert await OutboxRelay(pool, temporal_client, temporal_settings).run_once() == 0
    _, first, second = await rows_of(pool, acme.id)
    assert (first["attempts"], second["dispatched_at"], second["attempts"]) == (2, None, 0)

    # Repaired, but held by another relay's transaction: the later row still waits.
    async with pool.connection() as conn:
        await conn.execute("UPDATE outbox SET payload = '{}'::jsonb WHERE id = %s", (first["id"],))
    async with pool.connection() as holder, holder.transaction():
        await holder.execute("SELECT id FROM outbox WHERE id = %s FOR UPDATE", (first["id"],))
        assert await OutboxRelay(pool, temporal_client, temporal_settings).run_once() == 0
        assert (await rows_of(pool, acme.id))[2]["attempts"] == 0

    # Released: both go, in order.
    assert await OutboxRelay(pool, temporal_client, temporal_settings).run_once() == 2
    assert all(r["dispatched_at"] is not None for r in await rows_of(pool, acme.id))
    state = await eventually(lambda: state_of(temporal_client, acme.id), lambda s: s.events_processed == 3)
    assert state.last_event_kind == "test.dispute_closed"
