"""AccountWorkflow and the outbox relay against a real Temporal dev server and real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer, Worker

from creditflow.client import CreditflowClient, signal_with_start_account
from creditflow.config import Settings
from creditflow.ledger.accounts import create_account
from creditflow.temporal_setup import ensure_search_attributes
from tests.support.temporal import eventually, state_of
from workers.main import run_worker
from workers.relay import OutboxRelay
from workflows.account import AccountWorkflow
from workflows.contract import (
    ACCOUNT_WORKFLOW,
    SA_ACCOUNT_ID,
    SA_STATUS,
    SEARCH_ATTRIBUTES,
    AccountState,
    AccountWorkflowInput,
    OutboxEvent,
    account_workflow_id,
)

pytestmark = pytest.mark.temporal

HISTORIES = Path(__file__).parent / "histories"
async def outbox_row(pool: AsyncConnectionPool, account_id: str) -> dict[str, Any]:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT * FROM outbox WHERE account_id = %s", (account_id,))
        rows = await cur.fetchall()
    assert len(rows) == 1
    return rows[0]


def event(key: str, kind: str = "test.event") -> OutboxEvent:
    return OutboxEvent(dedup_key=key, kind=kind, payload={"n": key},
                       created_at=datetime(2026, 1, 1, tzinfo=UTC))


def expected_created_state(account_id: str, created_at: datetime, **changes: Any) -> AccountState:
    return AccountState(account_id=account_id, name="Acme", status="active", events_processed=1,
                        duplicates_ignored=0, last_event_kind="account.created", last_event_at=created_at,
                        recent_dedup_keys=1, continued_as_new=0).model_copy(update=changes)


async def test_account_creation_starts_its_workflow(pool: AsyncConnectionPool, temporal_client: Client,
                                                    temporal_settings: Settings,
                                                    temporal_worker: Worker) -> None:
    account = await create_account(pool, name="Acme", billing_email="billing@acme.test")
    relay = OutboxRelay(pool, temporal_client, temporal_settings)

    assert await relay.run_once() == 1

    row = await outbox_row(pool, account.id)
    assert row["dispatched_at"] is not None and row["attempts"] == 1 and row["last_error"] is None
    state = await eventually(lambda: state_of(temporal_client, account.id), lambda s: s.status == "active")
    assert state == expected_created_state(account.id, row["created_at"])
    handle = temporal_client.get_workflow_handle(account_workflow_id(account.id))
    description = await handle.describe()
    assert description.workflow_type == ACCOUNT_WORKFLOW
    assert await description.static_summary() == f"Account Acme ({account.id})"


async def test_redelivery_has_one_effect(pool: AsyncConnectionPool, temporal_client: Client,
                                         temporal_settings: Settings, temporal_worker: Worker) -> None:
    account = await create_account(pool, name="Acme", billing_email="billing@acme.test")
    relay = OutboxRelay(pool, temporal_client, temporal_settings)
    assert await relay.run_once() == 1
    assert await relay.run_once() == 0  # nothing pending

    # A relay that crashed after signalling but before marking the row delivers it again.
    async with pool.connection() as conn:
        await conn.execute("UPDATE outbox SET dispatched_at = NULL WHERE account_id = %s", (account.id,))
    assert await relay.run_once() == 1
    row = await outbox_row(pool, account.id)
    created = OutboxEvent(dedup_key=row["dedup_key"], kind=row["kind"], payload=row["payload"],
                          created_at=row["created_at"])
    await signal_with_start_account(temporal_client, temporal_settings.temporal_task_queue, account.id,
                                    created)

    state = await eventually(lambda: state_of(temporal_client, account.id),
                             lambda s: s.duplicates_ignored == 2 and s.status == "active")
    assert state == expected_created_state(account.id, row["created_at"], duplicates_ignored=2)
    assert row["attempts"] == 2


async def test_account_creation_does_not_need_temporal(pool: AsyncConnectionPool, temporal_client: Client,
                                                       temporal_settings: Settings,
                                                       temporal_worker: Worker) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_address = f"127.0.0.1:{s.getsockname()[1]}"
    dead_client = await Client.connect(dead_address, lazy=True, data_converter=pydantic_data_converter)
    dead_relay = OutboxRelay(pool, dead_client, temporal_settings)

    account = await create_account(pool, name="Acme", billing_email="billing@acme.test")
    assert await dead_relay.run_once() == 0
    row = await outbox_row(pool, account.id)
    assert row["dispatched_at"] is None and row["attempts"] == 1
    assert "Connection refused" in row["last_error"]
    # Backing off: an immediate retry does not touch the row.
    assert await dead_relay.run_once() == 0
    assert (await outbox_row(pool, account.id))["attempts"] == 1

    assert await OutboxRelay(pool, temporal_client, temporal_settings).run_once() == 1
    row = await outbox_row(pool, account.id)
    assert row["dispatched_at"] is not None and row["attempts"] == 2
    state = await eventually(lambda: state_of(temporal_client, account.id), lambda s: s.status == "active")
    assert state == expected_created_state(account.id, row["created_at"])


async def test_search_attributes_make_accounts_filterable(pool: AsyncConnectionPool, temporal_client: Client,
                                                          temporal_settings: Settings,
                                                          temporal_worker: Worker) -> None:
    account = await create_account(pool, name="Acme", billing_email="billing@acme.test")
    assert await OutboxRelay(pool, temporal_client, temporal_settings).run_once() == 1

    async def listed() -> list[Any]:
        query = f'CreditflowAccountId = "{account.id}" AND CreditflowStatus = "active"'
        return [wf async for wf in temporal_client.list_workflows(query)]

    [found] = await eventually(listed, lambda wfs: len(wfs) == 1)
    assert found.id == account_workflow_id(account.id)
    assert found.workflow_type == ACCOUNT_WORKFLOW
    assert found.typed_search_attributes.get(SA_ACCOUNT_ID) == account.id
    assert found.typed_search_attributes.get(SA_STATUS) == "active"


async def test_continue_as_new_keeps_dedup_keys(pool: AsyncConnectionPool, temporal_client: Client,
                                                temporal_settings: Settings, temporal_worker: Worker) -> None:
    account = await create_account(pool, name="Acme", billing_email="billing@acme.test")
    handle = await temporal_client.start_workflow(
        AccountWorkflow.run, AccountWorkflowInput(account_id=account.id, continue_as_new_after_events=2),
        id=account_workflow_id(account.id), task_queue=temporal_settings.temporal_task_queue)
    first_run = handle.result_run_id
    await handle.signal(AccountWorkflow.outbox_event, event("e1"))
    await handle.signal(AccountWorkflow.outbox_event, event("e2"))
    await eventually(lambda: state_of(temporal_client, account.id), lambda s: s.continued_as_new == 1)

    await handle.signal(AccountWorkflow.outbox_event, event("e1"))  # remembered across the new run
    await handle.signal(AccountWorkflow.outbox_event, event("e3"))
    state = await eventually(lambda: state_of(temporal_client, account.id), lambda s: s.events_processed == 3)
    assert state == AccountState(account_id=account.id, name="Acme", status="active", events_processed=3,
                                 duplicates_ignored=1, last_event_kind="test.event",
                                 last_event_at=datetime(2026, 1, 1, tzinfo=UTC), recent_dedup_keys=3,
                                 continued_as_new=1)
    description = await temporal_client.get_workflow_handle(handle.id, run_id=first_run).describe()
    assert description.status is not None and description.status.name == "CONTINUED_AS_NEW"

    # Both runs replay deterministically.
    replayer = Replayer(workflows=[AccountWorkflow], data_converter=pydantic_data_converter)
    for run_id in (first_run, None):
        history = await temporal_client.get_workflow_handle(handle.id, run_id=run_id).fetch_history()
        await replayer.replay_workflow(history)


async def test_dedup_memory_is_bounded(pool: AsyncConnectionPool, temporal_client: Client,
                                       temporal_settings: Settings, temporal_worker: Worker) -> None:
    account = await create_account(pool, name="Acme", billing_email="billing@acme.test")
    handle = await temporal_client.start_workflow(
        AccountWorkflow.run, AccountWorkflowInput(account_id=account.id, dedup_capacity=2),
        id=account_workflow_id(account.id), task_queue=temporal_settings.temporal_task_queue)
    for key in ("e1", "e2", "e3", "e3", "e1"):  # e1 has been forgotten by the time it comes back
        await handle.signal(AccountWorkflow.outbox_event, event(key))
    state = await eventually(lambda: state_of(temporal_client, account.id),
                             lambda s: s.events_processed + s.duplicates_ignored == 5)
    assert (state.events_processed, state.duplicates_ignored, state.recent_dedup_keys) == (4, 1, 2)


async def test_unknown_account_is_shown_as_unknown(temporal_client: Client, temporal_settings: Settings,
                                                   temporal_worker: Worker) -> None:
    account_id = "acc_00000000000000000000000000000000"
    client = CreditflowClient(temporal_client, temporal_settings.temporal_task_queue)
    first = await client.ensure_account_workflow(account_id)
    second = await client.ensure_account_workflow(account_id)  # reuses the running workflow
    assert second.result_run_id == first.result_run_id

    async def ledger_read() -> bool:
        history = await client.account_handle(account_id).fetch_history()
        return any(e.HasField("activity_task_completed_event_attributes") for e in history.events)

    await eventually(ledger_read, bool)
    assert await client.account_state(account_id) == AccountState(account_id=account_id, status="unknown")


async def test_relays_in_parallel_deliver_each_row_once(pool: AsyncConnectionPool, temporal_client: Client,
                                                        temporal_settings: Settings,
                                                        temporal_worker: Worker) -> None:
    accounts = [await create_account(pool, name="Acme", billing_email="b@acme.test") for _ in range(5)]
    relays = [OutboxRelay(pool, temporal_client, temporal_settings) for _ in range(2)]
    assert sum(await asyncio.gather(*(r.run_once() for r in relays))) == 5
    for account in accounts:
        assert (await outbox_row(pool, account.id))["attempts"] == 1


async def test_poisoned_row_backs_off_without_blocking_others(
        pool: AsyncConnectionPool, temporal_client: Client, temporal_settings: Settings,
        temporal_worker: Worker) -> None:
    poisoned = "acc_11111111111111111111111111111111"
    async with pool.connection() as conn:  # a payload that is not an object cannot become an OutboxEvent
        await conn.execute("INSERT INTO outbox (account_id, kind, dedup_key, payload)"
                           " VALUES (%s, 'test.event', 'poison:1', '[1]'::jsonb)", (poisoned,))
    account = await create_account(pool, name="Acme", billing_email="billing@acme.test")
    relay = OutboxRelay(pool, temporal_client, temporal_settings)

    assert await relay.run_once() == 1
    assert await relay.run_once() == 0
    bad = await outbox_row(pool, poisoned)
    assert bad["dispatched_at"] is None and bad["attempts"] == 1
    assert bad["last_error"].startswith("ValidationError")
    assert (await outbox_row(pool, account.id))["dispatched_at"] is not None


async def test_recorded_histories_replay() -> None:
    """Histories recorded from earlier versions must replay on the current code (determinism)."""
    files = sorted(HISTORIES.glob("*.json"))
    assert files, "no recorded histories"
    replayer = Replayer(workflows=[AccountWorkflow], data_converter=pydantic_data_converter)
    for path in files:
        await replayer.replay_workflow(WorkflowHistory.from_json(path.stem, path.read_text()))


async def test_search_attribute_registration_is_idempotent(temporal_client: Client) -> None:
    from temporalio.common import SearchAttributeKey

    namespace = temporal_client.namespace
    assert await ensure_search_attributes(temporal_client, namespace) == []  # the dev server has them
    extra = [*SEARCH_ATTRIBUTES, SearchAttributeKey.for_keyword("CreditflowSetupTest")]
    assert await ensure_search_attributes(temporal_client, namespace, extra) == ["CreditflowSetupTest"]
    assert await ensure_search_attributes(temporal_client, namespace, extra) == []


async def test_worker_process_delivers_on_notify_and_stops_on_sigterm(
        pool: AsyncConnectionPool, temporal_client: Client, temporal_settings: Settings) -> None:
    """The composition root end to end: LISTEN/NOTIFY wakes the relay long before its poll tick."""
    settings = temporal_settings.model_copy(update={"outbox_poll_interval_seconds": 60.0,
                                                    "db_pool_min_size": 1, "db_pool_max_size": 4})
    worker = asyncio.create_task(run_worker(settings))
    try:
        await asyncio.sleep(0.5)  # the relay's first drain and LISTEN
        client = CreditflowClient(temporal_client, settings.temporal_task_queue)
        for _ in range(2):  # the relay keeps listening after a wake-up
            account = await create_account(pool, name="Acme", billing_email="billing@acme.test")
            state = await eventually(lambda: client.account_state(account.id),  # noqa: B023
                                     lambda s: s.status == "active", timeout=5.0)
            created_at = (await outbox_row(pool, account.id))["created_at"]
            assert state == expected_created_state(account.id, created_at)
    finally:
        if not worker.done():  # run_worker handles SIGTERM while it runs
            os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(worker, timeout=15)
    assert worker.result() is None
