"""Billing-cycle money: lifecycles that cross holds, renewals, overage and invoice payments, driven through
the public paths (HTTP API, the real AccountWorkflow / InvoiceWorkflow on Temporal's time-skipping server,
localstripe), every amount asserted exactly.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from creditflow.config import Settings
from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.ledger.accounts import create_account
from tests.conftest import skip_time
from tests.support.cycle import settings, start_account  # noqa: F401 (fixtures)
from tests.support.ledger import (
    assert_invariants,
    journal,  # noqa: F401 (fixtures)
)
from tests.support.temporal import (
    eventually,
    ts_env,  # noqa: F401 (fixtures)
)
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
    await skip_time(ts_env, state.period_end - await ts_env.get_current_time() + timedelta(minutes=1))
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
    """A call held across the renewal: hold the whole plan balance over the period boundary, release it after. The old
    period's plan credits expired at the renewal whatever was held; only the new period's grant is spendable."""
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
    """A call held across the renewal, settled instead of released: the usage is charged from the next source in burn
    order (here the new period's plan credits, which arrived after the old ones expired); the settlement is not
    refused."""
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


async def _invoices(pool: AsyncConnectionPool, account: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute(
            "SELECT id, period_key, status, amount_due_cents, overage_micros FROM invoices WHERE account_id = %s"
            " ORDER BY period_start", (account,))).fetchall()


async def _lots(pool: AsyncConnectionPool, account: str) -> list[tuple[str, int]]:
    """(source, credits remaining) of the lots with something left."""
    async with pool.connection() as conn:
        await conn.execute("SELECT cf_settle_account_burns(%s)", (account,))
        rows = await (await conn.execute(
            "SELECT source, remaining_micros FROM credit_lots WHERE account_id = %s AND NOT depleted"
            " ORDER BY created_at", (account,))).fetchall()
    return [(r["source"], r["remaining_micros"] // MICROS_PER_CREDIT) for r in rows]


async def test_paid_overage_is_not_credited_again_as_permanent_credits(
        ts_env: WorkflowEnvironment, pool: AsyncConnectionPool, settings: Settings,  # noqa: F811
        sdk: stripe.StripeClient, api: httpx.AsyncClient) -> None:
    """Overage is repaid once: 600 credits of overage, billed $6 at the renewal; the next plan grant repays the credit
    line out of its plan credits (5,000 -> 4,400 left). Paying the invoice restores only what is still drawn for it
    (nothing), so no 600 permanent credits appear, and the next renewal expires everything left of the plan."""
    from tests.conftest import new_card
    from tests.support.api import track

    account = (await create_account(pool, name="Overage Ltd", billing_email="billing@overage.test",
                                    welcome_bonus_credits=0, overage_credit_line=1_000)).id
    await api.post("/api/v1/billing/payment-methods", json={"account_id": account, "payment_method_id": new_card(sdk)})
    queue = f"over3-{account[-8:]}"
    async with build_worker(ts_env.client, pool, settings, task_queue=queue):
        handle = await start_account(ts_env.client, queue, account)
        now = await ts_env.get_current_time()
        state: SubscriptionState = await handle.execute_update(
            UPDATE_CHANGE_PLAN, PlanChange(plan_id="starter", anchor=now), result_type=SubscriptionState)
        used = await track(api, account, "chat_message", 5_600, "big-day")
        assert used.status_code == 200 and used.json()["balance"] == -600
        state = await _renew(ts_env, handle, state)
        [invoice] = await eventually(lambda: _invoices(pool, account),
                                     lambda rows: len(rows) == 1 and rows[0]["status"] == "paid", timeout=30)
        assert (invoice["amount_due_cents"], invoice["overage_micros"]) == (4_900 + 600, 600 * MICROS_PER_CREDIT)
        body = await _balance(api, account)
        assert (body["balance"], body["plan_credits_remaining"]) == (4_400, 4_400)
        assert await _lots(pool, account) == [("plan", 4_400)]
        assert [r["amount_micros"] for r in await journal(pool, account, "overage_repayment")] == []
        # The next renewal: the 4,400 plan credits left expire, the new grant is all there is.
        await _renew(ts_env, handle, state)
        await eventually(lambda: _invoices(pool, account),
                         lambda rows: len(rows) == 2 and rows[1]["status"] == "paid", timeout=30)
        body = await _balance(api, account)
        assert (body["balance"], body["plan_credits_remaining"]) == (5_000, 5_000)
        await handle.terminate("test over")
    await assert_invariants(pool)


@pytest.fixture
def patient_settings(settings: Settings) -> Settings:  # noqa: F811
    """Invoices retried once, 40 days later: an unpaid invoice is still waiting at the next renewal."""
    return settings.model_copy(update={"invoice_charge_attempts": 2,
                                       "invoice_retry_interval_seconds": 40 * 24 * 3600})


async def test_unpaid_overage_is_not_billed_again(
        ts_env: WorkflowEnvironment, pool: AsyncConnectionPool, patient_settings: Settings,  # noqa: F811
        sdk: stripe.StripeClient, api: httpx.AsyncClient) -> None:
    """Overage larger than a grant is billed once: 7,000 credits of overage (more than Starter's 5,000 grant), the
    invoice unpaid at the next renewal (no card). The next close must not bill the 2,000 still drawn again; paying both
    invoices restores nothing more than what is still drawn (nothing: the two grants repaid it)."""
    from tests.conftest import new_card
    from tests.support.api import track
    from workflows.contract import SIGNAL_RETRY_INVOICE_PAYMENT, invoice_workflow_id

    account = (await create_account(pool, name="Late Payer", billing_email="billing@late.test",
                                    welcome_bonus_credits=0, overage_credit_line=10_000)).id
    queue = f"over4-{account[-8:]}"
    async with build_worker(ts_env.client, pool, patient_settings, task_queue=queue):
        handle = await start_account(ts_env.client, queue, account)
        now = await ts_env.get_current_time()
        state: SubscriptionState = await handle.execute_update(
            UPDATE_CHANGE_PLAN, PlanChange(plan_id="starter", anchor=now), result_type=SubscriptionState)
        used = await track(api, account, "chat_message", 12_000, "huge-month")
        assert used.status_code == 200 and used.json()["balance"] == -7_000
        state = await _renew(ts_env, handle, state)
        await eventually(lambda: _invoices(pool, account),
                         lambda rows: len(rows) == 1 and rows[0]["status"] == "past_due", timeout=30)
        assert (await _balance(api, account))["balance"] == -2_000  # the grant repaid 5,000 of the 7,000
        await _renew(ts_env, handle, state)  # no usage in between
        first, second = await eventually(lambda: _invoices(pool, account),
                                         lambda rows: len(rows) == 2 and rows[1]["status"] == "past_due", timeout=30)
        assert (first["amount_due_cents"], first["overage_micros"]) == (4_900 + 7_000, 7_000 * MICROS_PER_CREDIT)
        assert (second["amount_due_cents"], second["overage_micros"]) == (4_900, 0)
        assert (await _balance(api, account))["balance"] == 3_000  # the second grant repaid the last 2,000

        # Paying both restores nothing: every unit of the overage was repaid once, by the grants.
        attached = await api.post("/api/v1/billing/payment-methods",
                                  json={"account_id": account, "payment_method_id": new_card(sdk)})
        assert attached.status_code == 201, attached.text
        for row in (first, second):
            await ts_env.client.get_workflow_handle(invoice_workflow_id(account, row["period_key"])).signal(
                SIGNAL_RETRY_INVOICE_PAYMENT)
        await eventually(lambda: _invoices(pool, account),
                         lambda rows: [r["status"] for r in rows] == ["paid", "paid"], timeout=30)
        assert [r["amount_micros"] for r in await journal(pool, account, "overage_repayment")] == []
        body = await _balance(api, account)
        assert (body["balance"], body["plan_credits_remaining"]) == (3_000, 3_000)
        await handle.terminate("test over")
    await assert_invariants(pool)


async def test_overage_under_half_a_credit_is_not_billed_0_and_credited_back(
        ts_env: WorkflowEnvironment, pool: AsyncConnectionPool, settings: Settings,  # noqa: F811
        sdk: stripe.StripeClient, api: httpx.AsyncClient) -> None:
    """Overage billed in whole credits, restored as billed: 0.4 credits drawn on the line were billed $0.00 (half-up to
    the cent) and the payment credited the 0.4 credits back in full. Overage is billed in whole credits, rounded down
    (domain.invoices.billable_overage_micros): nothing is billed and nothing is restored; the fraction stays drawn (the
    next grant repays it)."""
    from decimal import Decimal

    from tests.conftest import new_card
    from tests.support.api import track

    account = (await create_account(pool, name="Fraction", billing_email="billing@fraction.test",
                                    welcome_bonus_credits=0, overage_credit_line=1_000)).id
    await api.post("/api/v1/billing/payment-methods", json={"account_id": account, "payment_method_id": new_card(sdk)})
    queue = f"frac-{account[-8:]}"
    async with build_worker(ts_env.client, pool, settings, task_queue=queue):
        handle = await start_account(ts_env.client, queue, account)
        now = await ts_env.get_current_time()
        state: SubscriptionState = await handle.execute_update(
            UPDATE_CHANGE_PLAN, PlanChange(plan_id="starter", anchor=now), result_type=SubscriptionState)
        used = await track(api, account, "llm_tokens", 50_004, "tokens")  # 5,000.4 credits at 0.1
        assert used.status_code == 200 and Decimal(str(used.json()["balance"])) == Decimal("-0.4"), used.text
        await _renew(ts_env, handle, state)
        [invoice] = await eventually(lambda: _invoices(pool, account),
                                     lambda rows: len(rows) == 1 and rows[0]["status"] == "paid", timeout=30)
        assert (invoice["amount_due_cents"], invoice["overage_micros"]) == (4_900, 0)
        assert await journal(pool, account, "overage_repayment") == []
        body = await _balance(api, account)
        assert Decimal(str(body["balance"])) == Decimal("4999.6")  # the grant repaid the 0.4 drawn, once
        await handle.terminate("test over")
    await assert_invariants(pool)
