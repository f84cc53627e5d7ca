"""Billing cycles on Temporal's time-skipping test server: the real AccountWorkflow and InvoiceWorkflow
on the production worker, real PostgreSQL and localstripe. Months pass in seconds; every grant, expiry, invoice
and charge is asserted exactly.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from creditflow.config import Settings
from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.domain.periods import period_containing
from creditflow.ledger import subscriptions
from creditflow.ledger.accounts import create_account
from tests.conftest import skip_time
from tests.support.cycle import (
    ANCHOR,
    settings,  # noqa: F401 - fixtures
    start_account,
)
from tests.support.ledger import assert_invariants, invoices, journal
from tests.support.temporal import (
    HISTORIES,
    eventually,
    ts_env,  # noqa: F401 - fixtures
)
from workers.main import build_worker
from workflows.account import AccountWorkflow
from workflows.contract import (
    ACCOUNT_WORKFLOW,
    QUERY_STATE,
    UPDATE_CHANGE_PLAN,
    AccountState,
    AccountWorkflowInput,
    PlanChange,
    SubscriptionState,
    account_workflow_id,
)

pytestmark = pytest.mark.temporal



@pytest.mark.parametrize(("plan", "included", "fee_cents"), [("starter", 5_000, 4_900), ("growth", 22_000, 19_900),
                                                             ("scale", 60_000, 49_900)])
async def test_three_cycles(plan: str, included: int, fee_cents: int, ts_env: WorkflowEnvironment,  # noqa: F811
                            pool: AsyncConnectionPool, settings: Settings, sdk: stripe.StripeClient,  # noqa: F811
                            api: httpx.AsyncClient) -> None:
    from tests.conftest import new_card

    account = (await create_account(pool, name="Acme", billing_email="billing@acme.test",
                                    welcome_bonus_credits=0)).id
    card = new_card(sdk)
    attached = await api.post("/api/v1/billing/payment-methods", json={"account_id": account,
                                                                      "payment_method_id": card})
    assert attached.status_code == 201, attached.text
    await subscriptions.add_recurring(pool, account, description="Phone number rental", quantity=2,
                                      unit="number", unit_price_credits=150)
    queue = f"cycle-{account[-8:]}"
    async with build_worker(ts_env.client, pool, settings, task_queue=queue):
        handle = await start_account(ts_env.client, queue, account)
        state: SubscriptionState = await handle.execute_update(
            UPDATE_CHANGE_PLAN, PlanChange(plan_id=plan, anchor=ANCHOR), result_type=SubscriptionState)
        now = await ts_env.get_current_time()
        first = period_containing(ANCHOR, now)
        assert (state.plan_id, state.period_index, state.period_start, state.period_end) == (
            plan, first.index, first.start, first.end)
        assert state.period_end.day in (28, 29, 30, 31)  # the Jan 31 anchor, clamped in shorter months

        for cycle in range(1, 4):
            await skip_time(ts_env, state.period_end - await ts_env.get_current_time() + timedelta(minutes=1))
            state = (await eventually(lambda: handle.query(QUERY_STATE, result_type=AccountState),
                                      lambda s, c=cycle: s.subscription is not None
                                      and s.subscription.period_index == first.index + c, timeout=30)).subscription
            assert state is not None
            await eventually(lambda: invoices(pool, account), lambda rows, c=cycle: len(rows) == c
                             and all(r["status"] == "paid" for r in rows), timeout=30)

        # The account workflow's history (three renewals, three invoice children) replays on this code; it is
        # kept as a recorded history for future versions (tests/test_account_workflow replays every one).
        history = await handle.fetch_history()
        replayed = await Replayer(workflows=[AccountWorkflow], data_converter=pydantic_data_converter
                                  ).replay_workflow(history)
        assert replayed.replay_failure is None
        recorded = HISTORIES / "account_workflow_v3_billing_cycle.json"
        if plan == "growth" and (not recorded.exists() or os.environ.get("CREDITFLOW_RECORD_HISTORIES") == "1"):
            recorded.write_text(history.to_json())

    grants = await journal(pool, account, "plan_grant")
    expiries = await journal(pool, account, "plan_expiry")
    assert [g["amount_micros"] for g in grants] == [included * MICROS_PER_CREDIT] * 4
    assert [e["amount_micros"] for e in expiries] == [-included * MICROS_PER_CREDIT] * 3
    assert len({g["idempotency_key"] for g in grants}) == 4
    rows = await invoices(pool, account)
    assert [r["amount_due_cents"] for r in rows] == [fee_cents + 300] * 3  # fee + 2 numbers x 150 credits
    assert [r["period_start"] for r in rows] == [period_containing(ANCHOR, now).start] + [
        p.start for p in (period_containing(ANCHOR, r["period_start"] + timedelta(days=32)) for r in rows[:2])]
    await assert_invariants(pool)


async def test_plan_changes_now_and_at_renewal(ts_env: WorkflowEnvironment, pool: AsyncConnectionPool,  # noqa: F811
                                               settings: Settings, sdk: stripe.StripeClient,  # noqa: F811
                                               api: httpx.AsyncClient) -> None:
    """Starter, upgraded to Growth mid-period (prorated: stated in the answer, billed on that period's invoice,
    plan credits granted for the rest of the period), then moved to Scale at the next renewal."""
    from creditflow.domain.plans import load_plan_catalog
    from creditflow.domain.proration import prorate_plan_change
    from tests.conftest import new_card

    catalog = load_plan_catalog()
    account = (await create_account(pool, name="Acme", billing_email="billing@acme.test",
                                    welcome_bonus_credits=0)).id
    await api.post("/api/v1/billing/payment-methods", json={"account_id": account, "payment_method_id": new_card(sdk)})
    queue = f"change-{account[-8:]}"
    async with build_worker(ts_env.client, pool, settings, task_queue=queue):
        handle = await start_account(ts_env.client, queue, account)
        now = await ts_env.get_current_time()
        state: SubscriptionState = await handle.execute_update(
            UPDATE_CHANGE_PLAN, PlanChange(plan_id="starter", anchor=now), result_type=SubscriptionState)
        period = period_containing(now, now)
        await skip_time(ts_env, timedelta(days=10))
        changed: SubscriptionState = await handle.execute_update(
            UPDATE_CHANGE_PLAN, PlanChange(plan_id="growth", effective="immediately"), result_type=SubscriptionState)
        p = changed.proration
        assert p is not None and (changed.plan_id, changed.fee_plan_id, changed.changes) == ("growth", "starter", 1)
        expected = prorate_plan_change(period, p.at, catalog.get("starter"), catalog.get("growth"), 5_000)
        assert (p.old_plan_credit_cents, p.new_plan_charge_cents, p.net_cents, p.plan_credits_granted) == (
            expected.old_plan_credit_cents, expected.new_plan_charge_cents, expected.net_cents,
            expected.plan_credits_granted)
        assert p.net_cents > 0 and p.plan_credits_granted > 0
        later: SubscriptionState = await handle.execute_update(
            UPDATE_CHANGE_PLAN, PlanChange(plan_id="scale"), result_type=SubscriptionState)
        assert (later.plan_id, later.pending_plan_id) == ("growth", "scale")

        await skip_time(ts_env, state.period_end - await ts_env.get_current_time() + timedelta(minutes=1))
        after = (await eventually(lambda: handle.query(QUERY_STATE, result_type=AccountState),
                                  lambda s: s.subscription is not None and s.subscription.period_index == 1,
                                  timeout=30)).subscription
        assert after is not None and (after.plan_id, after.pending_plan_id, after.changes) == ("scale", None, 0)
        [invoice] = await eventually(lambda: invoices(pool, account), lambda rows: len(rows) == 1
                                     and rows[0]["status"] == "paid", timeout=30)
    assert invoice["amount_due_cents"] == 4_900 + p.net_cents  # Starter's fee, then the prorated switch
    grants = [g["amount_micros"] // MICROS_PER_CREDIT for g in await journal(pool, account, "plan_grant")]
    assert grants == [5_000, p.plan_credits_granted, 60_000]
    expiries = [e["amount_micros"] // MICROS_PER_CREDIT for e in await journal(pool, account, "plan_expiry")]
    assert expiries == [-(5_000 + p.plan_credits_granted)]
    balance = (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()
    assert (balance["plan_id"], balance["plan_credits_remaining"], balance["balance"]) == ("scale", 60_000, 60_000)
    await assert_invariants(pool)


async def test_overage_is_billed_at_renewal_and_the_pdf_says_so(
        ts_env: WorkflowEnvironment, pool: AsyncConnectionPool, settings: Settings, sdk: stripe.StripeClient,  # noqa: F811
        api: httpx.AsyncClient) -> None:
    """Usage beyond the plan credits draws on the overage credit line; the renewal bills it (with the fee and the
    recurring charges) and the next plan grant repays the line."""
    import io

    import pypdf

    from tests.conftest import new_card
    from tests.support.api import track

    account = (await create_account(pool, name="Overage Ltd", billing_email="billing@overage.test",
                                    welcome_bonus_credits=0, overage_credit_line=1_000)).id
    await api.post("/api/v1/billing/payment-methods", json={"account_id": account, "payment_method_id": new_card(sdk)})
    await subscriptions.add_recurring(pool, account, description="Phone number rental", quantity=1, unit="number",
                                      unit_price_credits=150)
    queue = f"overage-{account[-8:]}"
    async with build_worker(ts_env.client, pool, settings, task_queue=queue):
        handle = await start_account(ts_env.client, queue, account)
        now = await ts_env.get_current_time()
        state: SubscriptionState = await handle.execute_update(
            UPDATE_CHANGE_PLAN, PlanChange(plan_id="starter", anchor=now), result_type=SubscriptionState)
        used = await track(api, account, "chat_message", 5_600, "big-day")  # 5,000 plan credits + 600 on the line
        assert used.status_code == 200 and used.json()["balance"] == -600
        await skip_time(ts_env, state.period_end - await ts_env.get_current_time() + timedelta(minutes=1))
        [invoice] = await eventually(lambda: invoices(pool, account),
                                     lambda rows: len(rows) == 1 and rows[0]["status"] == "paid", timeout=30)
    assert invoice["amount_due_cents"] == 4_900 + 150 + 600  # fee + number + 600 overage credits ($6)
    # The next plan grant already repaid the line (an overage is repaid once): the payment restores nothing more.
    assert await journal(pool, account, "overage_repayment") == []
    balance = (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()
    assert balance["balance"] == 4_400  # the new plan credits less the 600 they repaid; the line is whole again
    [listed] = (await api.get("/api/v1/billing/invoices", params={"account_id": account})).json()["items"]
    pdf = await api.get(listed["pdf_url"])
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    text = " ".join(page.extract_text() for page in pypdf.PdfReader(io.BytesIO(pdf.content)).pages)
    for expected in ("billing@overage.test", "Starter", "Phone number rental", "Overage", "56.50"):
        assert expected in text, (expected, text)
    await assert_invariants(pool)


async def test_jan_31_anchor_through_a_leap_february(ts_env: WorkflowEnvironment, pool: AsyncConnectionPool,  # noqa: F811
                                                     settings: Settings) -> None:  # noqa: F811
    """Renewals keep the anchor day: ... Jan 31 2028 -> Feb 29 2028 (leap year) -> Mar 31 2028, one grant and one
    invoice per period (simulation mode: invoices issued, not charged)."""
    account = (await create_account(pool, name="Leap", billing_email="leap@acme.test", welcome_bonus_credits=0)).id
    queue = f"leap-{account[-8:]}"
    async with build_worker(ts_env.client, pool, settings, task_queue=queue):
        handle = await ts_env.client.start_workflow(
            ACCOUNT_WORKFLOW, AccountWorkflowInput(account_id=account, publish_search_attributes=False,
                                                   simulation=True),
            id=account_workflow_id(account), task_queue=queue)
        state: SubscriptionState = await handle.execute_update(
            UPDATE_CHANGE_PLAN, PlanChange(plan_id="starter", anchor=ANCHOR), result_type=SubscriptionState)
        ends = [state.period_end]
        while state.period_end < datetime(2028, 4, 1, tzinfo=UTC):
            index = state.period_index
            await skip_time(ts_env, state.period_end - await ts_env.get_current_time() + timedelta(minutes=1))
            state = (await eventually(lambda: handle.query(QUERY_STATE, result_type=AccountState),
                                      lambda s, i=index: s.subscription is not None
                                      and s.subscription.period_index == i + 1, timeout=30)).subscription
            assert state is not None
            ends.append(state.period_end)
        await handle.terminate("test over")
    feb_2027, jan_2028, feb_2028 = (datetime(2027, 2, 28, 9, 30, tzinfo=UTC), datetime(2028, 1, 31, 9, 30, tzinfo=UTC),
                                    datetime(2028, 2, 29, 9, 30, tzinfo=UTC))
    assert {feb_2027, jan_2028, feb_2028, datetime(2028, 3, 31, 9, 30, tzinfo=UTC)} <= set(ends)
    assert all(end.day in (28, 29, 30, 31) and end.time() == ANCHOR.time() for end in ends)
    renewals = len(ends) - 1
    assert len(await journal(pool, account, "plan_grant")) == renewals + 1
    rows = await eventually(lambda: invoices(pool, account), lambda r: len(r) == renewals, timeout=30)
    assert all(r["amount_due_cents"] == 4_900 for r in rows)
