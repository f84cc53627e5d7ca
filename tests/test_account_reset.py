"""A reset account workflow never reuses a recharge sequence number (a reused number would take
an old charge for a new one). A run reset to a point
before its last recharge remembers an older sequence number than the database; the next recharge must still be a
new ``recharge-{seq}`` charge, charged and credited once, not the old row reported as a new success. Temporal dev
server (reset), the outbox relay, localstripe, PostgreSQL."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType
from temporalio.api.workflowservice.v1 import ResetWorkflowExecutionRequest
from temporalio.client import Client

from tests.support.api import balance, new_account, track
from tests.support.auto_recharge import SETTINGS, api, recharge_charges, recharge_rows, relay, settings  # noqa: F401
from tests.support.payments import customer_of, intents_of, save_card
from tests.support.temporal import eventually, state_of
from workers.relay import OutboxRelay
from workflows.contract import account_workflow_id

pytestmark = pytest.mark.temporal


async def reset_to_after_rebuild(client: Client, account: str) -> str:
    """Reset ``account:{id}`` to the workflow task that followed its state rebuild (before any recharge)."""
    handle = client.get_workflow_handle(account_workflow_id(account))
    history = await handle.fetch_history()
    scheduled = next(e.event_id for e in history.events
                     if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
                     and e.activity_task_scheduled_event_attributes.activity_type.name == "rebuild_account_state")
    completed = next(e.event_id for e in history.events
                     if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
                     and e.activity_task_completed_event_attributes.scheduled_event_id == scheduled)
    point = next(e.event_id for e in history.events
                 if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED and e.event_id > completed)
    description = await handle.describe()
    response = await client.workflow_service.reset_workflow_execution(ResetWorkflowExecutionRequest(
        namespace=client.namespace, reason="operator: reset",
        workflow_execution=WorkflowExecution(workflow_id=handle.id, run_id=description.run_id),
        workflow_task_finish_event_id=point, request_id=str(uuid.uuid4())))
    return response.run_id


async def test_reset_account_workflow_never_reuses_a_recharge_sequence_number(
        api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient,  # noqa: F811
        temporal_client: Client, relay: OutboxRelay) -> None:  # noqa: F811
    account = await new_account(api)  # 5,000 welcome credits
    await save_card(api, sdk, account)
    await api.put(SETTINGS, json={"account_id": account, "enabled": True, "threshold": 6000, "recharge_amount": 2000})
    await eventually(lambda: recharge_rows(pool, account), lambda r: len(r) == 1, timeout=30)
    await eventually(lambda: state_of(temporal_client, account),
                     lambda s: s.recharge.last_status == "succeeded" and s.recharge_in_flight is None)
    assert (await balance(api, account))["balance"] == 7000

    run_id = await reset_to_after_rebuild(temporal_client, account)
    await eventually(lambda: state_of(temporal_client, account), lambda s: s.recharge_reason is not None)
    used = await track(api, account, "chat_message", 1500, "after-reset")  # 7,000 -> 5,500: below again
    assert used.status_code == 200, used.text

    rows: list[dict[str, Any]] = await eventually(lambda: recharge_rows(pool, account), lambda r: len(r) == 2,
                                                  timeout=30)
    charges = await recharge_charges(pool, account)
    assert [(c["request_id"], c["status"]) for c in charges] == [("recharge-1", "succeeded"),
                                                                 ("recharge-2", "succeeded")]
    assert [r["idempotency_key"] for r in rows] == [f"sys:topup:{c['payment_intent_id']}" for c in charges]
    paid = [p for p in intents_of(sdk, await customer_of(pool, account)) if p.status == "succeeded"]
    assert len(paid) == 2
    assert (await balance(api, account))["balance"] == 7500
    described = await temporal_client.get_workflow_handle(account_workflow_id(account)).describe()
    assert described.run_id == run_id  # the reset run did it


async def test_recharge_left_running_by_an_earlier_run_is_not_doubled(
        api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient,  # noqa: F811
        temporal_client: Client, temporal_settings: Any, relay: OutboxRelay) -> None:  # noqa: F811
    """An operator terminated the account workflow while its recharge child was charging (the child is abandoned,
    not killed): the next run must not start a second recharge while that one may still charge and credit."""
    from creditflow.payments import topups
    from creditflow.payments.gateway import StripeGateway

    account = await new_account(api)  # 5,000 welcome credits
    await save_card(api, sdk, account)
    gateway = StripeGateway.from_settings(temporal_settings)
    await topups.record_charge(pool, gateway, account_id=account, request_id="recharge-1", amount_cents=2000,
                               credits=2000, package_id=None, description="Auto-recharge: 2,000 credits",
                               payment_method_id=None, kind=topups.KIND_AUTO_RECHARGE, require_card=True)
    await api.put(SETTINGS, json={"account_id": account, "enabled": True, "threshold": 6000, "recharge_amount": 2000})
    state = await eventually(lambda: state_of(temporal_client, account),
                             lambda s: s.recharge_reason == "recharge_in_flight", timeout=30)
    assert state.recharge_wake_at is not None and state.recharge_in_flight is None
    assert [(c["request_id"], c["status"]) for c in await recharge_charges(pool, account)] == [
        ("recharge-1", "pending")]
    assert intents_of(sdk, await customer_of(pool, account)) == []
    assert (await balance(api, account))["balance"] == 5000
