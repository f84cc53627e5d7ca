"""Issue 11, billing-cycle money: lifecycles that cross holds, renewals, overage and invoice payments, driven through
the public paths (HTTP API, the real AccountWorkflow / InvoiceWorkflow on Temporal's time-skipping server,
localstripe), every amount asserted exactly.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from creditflow.config import Settings
from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.ledger.accounts import create_account
from tests.test_account_workflow import eventually
from tests.test_billing_cycle import journal, settings, start_account, ts_env  # noqa: F401 (fixtures)
from tests.test_ledger_invariants import assert_invariants
from workers.main import build_worker
from workflows.contract import QUERY_STATE, UPDATE_CHANGE_PLAN, AccountState, PlanChange, SubscriptionState

pytestmark = pytest.mark.temporal


async def _balance(api: httpx.AsyncClient, account: str) -> dict[str, Any]:
    resp = await api.get("/api/v1/billing/balance", params={"account_id": account})
    assert resp.status_code == 200, resp.text
    return resp.json()


async def _renew(ts_env: WorkflowEnvironment, handle: WorkflowHandle[Any, Any],  # noqa: F811
                 state: SubscriptionState) -> SubscriptionState:
    """Let the period end; wait until the workflow opened the next one."""
    await ts_env.sleep(state.period_end - await ts_env.get_current_time() + timedelta(minutes=1))
    index = state.period_index
    after = (await eventually(lambda: handle.query(QUERY_STATE, result_type=AccountState),
                              lambda s: s.subscription is not None and s.subscription.period_index == index + 1,
                              timeout=30)).subscription
    assert after is not None
    return after


async def _hold_whole_plan(api: httpx.AsyncClient, account: str, key: str) -> str:
    """Starter prices chat at the card rate, 1 credit a message: 5,000 messages reserve the 5,000 plan credits."""
    hold = await api.post("/api/v1/billing/holds", json={"account_id": account, "feature_id": "chat_message",
                                                         "value": 5_000, "idempotency_key": key,
                                                         "ttl_seconds": 7 * 24 * 3600})
    assert hold.status_code == 201 and hold.json()["held_amount"] == 5_000, hold.text
    return str(hold.json()["hold_id"])


async def test_hold_across_renewal_does_not_keep_plan_credits_alive(
        ts_env: WorkflowEnvironment, pool: AsyncConnectionPool, settings: Settings,  # noqa: F811
        api: httpx.AsyncClient) -> None:
    """Defect 2: hold the whole plan balance over the period boundary, release it after. The old period's plan
    credits expired at the renewal whatever was held; only the new period's grant is spendable."""
    account = (await create_account(pool, name="Holdco", billing_email="h@holdco.test",
                                    welcome_bonus_credits=0)).id
    queue = f"hold-{account[-8:]}"
    async with build_worker(ts_env.client, pool, settings, task_queue=queue):
        handle = await start_account(ts_env.client, queue, account)
        now = await ts_env.get_current_time()
        state: SubscriptionState = await handle.execute_update(
            UPDATE_CHANGE_PLAN, PlanChange(plan_id="starter", anchor=now), result_type=SubscriptionState)
        hold_id = await _hold_whole_plan(api, account, "call-over-the-boundary")
        state = await _renew(ts_env, handle, state)
        expiries = await eventually(lambda: journal(pool, account, "plan_expiry"), lambda rows: len(rows) == 1)
        assert [e["amount_micros"] for e in expiries] == [-5_000 * MICROS_PER_CREDIT]
        released = await api.post(f"/api/v1/billing/holds/{hold_id}/release", json={"account_id": account})
        assert released.status_code == 200, released.text
        body = await _balance(api, account)
        assert (body["balance"], body["pending_charges"], body["plan_credits_remaining"]) == (5_000, 0, 5_000)
        # Repeat over the next boundary: the same 5,000, never 10,000.
        hold_id = await _hold_whole_plan(api, account, "call-over-the-next-boundary")
        await _renew(ts_env, handle, state)
        await eventually(lambda: journal(pool, account, "plan_expiry"), lambda rows: len(rows) == 2)
        assert (await api.post(f"/api/v1/billing/holds/{hold_id}/release",
                               json={"account_id": account})).status_code == 200
        body = await _balance(api, account)
        assert (body["balance"], body["pending_charges"], body["plan_credits_remaining"]) == (5_000, 0, 5_000)
        await handle.terminate("test over")
    await assert_invariants(pool)


async def test_hold_across_renewal_settles_from_the_next_source(
        ts_env: WorkflowEnvironment, pool: AsyncConnectionPool, settings: Settings,  # noqa: F811
        api: httpx.AsyncClient) -> None:
    """Defect 2, settling instead of releasing: the usage is charged from the next source in burn order (here the
    new period's plan credits, which arrived after the old ones expired); the settlement is not refused."""
    account = (await create_account(pool, name="Holdco", billing_email="h@holdco.test",
                                    welcome_bonus_credits=0)).id
    queue = f"hold-{account[-8:]}"
    async with build_worker(ts_env.client, pool, settings, task_queue=queue):
        handle = await start_account(ts_env.client, queue, account)
        now = await ts_env.get_current_time()
        state: SubscriptionState = await handle.execute_update(
            UPDATE_CHANGE_PLAN, PlanChange(plan_id="starter", anchor=now), result_type=SubscriptionState)
        hold_id = await _hold_whole_plan(api, account, "call-1")
        await _renew(ts_env, handle, state)
        await eventually(lambda: journal(pool, account, "plan_expiry"), lambda rows: len(rows) == 1)
        settled = await api.post(f"/api/v1/billing/holds/{hold_id}/settle",
                                 json={"account_id": account, "value": 1_200})
        assert settled.status_code == 200, settled.text
        assert (settled.json()["credits_charged"], settled.json()["balance"]) == (1_200, 3_800)
        body = await _balance(api, account)
        assert (body["balance"], body["pending_charges"], body["plan_credits_remaining"]) == (3_800, 0, 3_800)
        await handle.terminate("test over")
    await assert_invariants(pool)
