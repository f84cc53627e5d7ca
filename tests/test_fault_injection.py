"""Exactly once, proven: the worker process is SIGKILLed in the middle of a saved-card top-up, restarted, and the
top-up still ends with one PaymentIntent, one ledger credit and the exact balance.

The worker runs as a real subprocess (``workers.main.run_worker``, settings from ``CREDITFLOW_*``) with the
test-only hook ``CREDITFLOW_FAULT_INJECT`` (activities/topups.py) set to the kill point; it is restarted without.
A killed activity is only retried once its start-to-close timeout expires (no heartbeats): ``credit_topup`` has
``DB_TIMEOUT`` (30 s), and the ``after_credit`` case waits for the server to time it out. ``charge_topup`` has
``STRIPE_TIMEOUT`` (3 minutes, not a setting): waiting for it made ``after_charge`` the suite's slowest test, so that
case checks the scheduled timeout and retry policy in the history and then fails the dead attempt by id, which is
exactly what the server does when the timeout expires (the attempt ends as failed, the retry policy schedules
attempt 2 on a live worker). Temporal's own enforcement of start-to-close timeouts after a kill is what
``after_credit`` and the scale-out test wait for (``credit_topup``, 30 s).
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from creditflow.config import Settings
from tests.conftest import ADMIN_KEY, STRIPE_KEY
from tests.support.api import app_client, new_account
from tests.support.ledger import assert_invariants
from tests.support.payments import charges, customer_of, intents_of, purchases, receipts, reconcile, save_card
from tests.support.workers import (
    Workers,
    wait_exit,
    workers,  # noqa: F401 - fixture
)
from workflows.common import STRIPE_TIMEOUT
from workflows.contract import TopUpInput, TopUpOutcome, TopUpTerms, topup_workflow_id
from workflows.topup import TopUpWorkflow

pytestmark = [pytest.mark.temporal, pytest.mark.slow]



@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=5000, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=stripe_base, stripe_retry_max_wait_seconds=0.1)


@pytest.fixture
async def api(temporal_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real app on the test's task queue, with NO in-process worker: only the subprocess runs the work."""
    async for client in app_client(temporal_settings):
        yield client


async def time_out_the_dead_attempt(client: Client, handle: Any, activity: str, timeout: timedelta) -> None:
    """End the killed worker's attempt of ``activity`` now, as the server does once its start-to-close timeout expires
    (a failed attempt, retried by the activity's policy), instead of waiting ``timeout`` of real time. First checks in
    the history that the attempt has exactly that timeout and a policy that retries it: the server's own enforcement
    of the timeout is what ``after_credit`` and the scale-out test wait for."""
    history = await handle.fetch_history()
    [scheduled] = [e.activity_task_scheduled_event_attributes for e in history.events
                   if e.HasField("activity_task_scheduled_event_attributes")
                   and e.activity_task_scheduled_event_attributes.activity_type.name == activity]
    assert scheduled.start_to_close_timeout.ToTimedelta() == timeout
    assert scheduled.retry_policy.maximum_attempts >= 2, scheduled.retry_policy
    await client.get_async_activity_handle(workflow_id=handle.id, run_id=handle.result_run_id,
                                           activity_id=scheduled.activity_id).fail(
        RuntimeError(f"start-to-close timeout of the killed worker's {activity} attempt (ended early by the test)"))


@pytest.mark.timeout(480)
@pytest.mark.parametrize("fault", ["after_charge", "after_credit"])
async def test_worker_killed_mid_topup_charges_and_credits_once(
        fault: str, api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient,
        temporal_client: Client, temporal_settings: Settings, workers: Workers) -> None:  # noqa: F811
    account = await new_account(api)  # welcome bonus: 5,000 credits
    card = await save_card(api, sdk, account)
    request_id = f"kill-{fault}-{uuid.uuid4().hex[:6]}"
    input = TopUpInput(account_id=account, request_id=request_id, description="Top-up of $25.00",
                       terms=TopUpTerms(amount_cents=2500, credits=2500))

    doomed = workers.start(fault)
    handle = await temporal_client.start_workflow(
        TopUpWorkflow.run, input, id=topup_workflow_id(account, request_id),
        task_queue=temporal_settings.temporal_task_queue, result_type=TopUpOutcome)
    assert await wait_exit(doomed, 60) == -signal.SIGKILL, (workers.logs / "worker-0.log").read_text()

    # The kill point was reached: Stripe charged (and, after_credit, the ledger was credited) before the crash.
    [pi] = intents_of(sdk, await customer_of(pool, account))
    assert (pi.status, pi.amount, pi.payment_method) == ("succeeded", 2500, card)
    [row] = await charges(pool, account)
    assert row["payment_intent_id"] == pi.id
    assert len(await purchases(pool, account)) == (1 if fault == "after_credit" else 0)

    started = time.monotonic()
    if fault == "after_charge":
        await time_out_the_dead_attempt(temporal_client, handle, "charge_topup", STRIPE_TIMEOUT)
    workers.start()  # no fault: the activity is retried once its start-to-close timeout expires
    outcome = await asyncio.wait_for(handle.result(), 420)
    recovered_in = time.monotonic() - started
    print(f"{fault}: recovered in {recovered_in:.1f} s")

    assert (outcome.status, outcome.payment_intent_id, outcome.credits, outcome.balance) == (
        "succeeded", pi.id, 2500, 7500)
    assert [p.id for p in intents_of(sdk, await customer_of(pool, account))] == [pi.id]
    [purchase] = await purchases(pool, account)
    assert purchase["idempotency_key"] == f"sys:topup:{pi.id}"
    [row] = await charges(pool, account)
    assert (row["status"], row["payment_intent_id"], row["ledger_txn_id"]) == (
        "succeeded", pi.id, outcome.transaction_id)
    balance = (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()["balance"]
    assert balance == 7500
    assert len(await receipts(pool, account)) == 1
    await assert_invariants(pool)
    assert await reconcile(pool, sdk, account) == 1
    # The activity that was running at the kill really ran twice (the crash was not a no-op).
    activity = "charge_topup" if fault == "after_charge" else "credit_topup"
    history = await handle.fetch_history()
    attempts: list[Any] = [e.activity_task_started_event_attributes.attempt for e in history.events
                           if e.HasField("activity_task_started_event_attributes")]
    scheduled = [e.activity_task_scheduled_event_attributes.activity_type.name for e in history.events
                 if e.HasField("activity_task_scheduled_event_attributes")]
    assert activity in scheduled
    assert max(attempts) >= 2, attempts


@pytest.mark.timeout(300)
async def test_worker_killed_mid_renewal_grants_expires_and_invoices_once(
        api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient, temporal_client: Client,
        temporal_settings: Settings, workers: Workers) -> None:  # noqa: F811
    """The worker dies inside the renewal (period closed, plan credits expired, next grant not yet made); after a
    restart: one expiry, one grant of the next period, one invoice, paid once."""
    from datetime import UTC, datetime, timedelta

    from creditflow.domain.periods import period_containing
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

    account = await new_account(api)
    await save_card(api, sdk, account)
    # A cycle anchored a year before "in a few seconds", so that its current period ends then (Feb 29: a day later).
    soon = datetime.now(UTC) + timedelta(seconds=8)
    if (soon.month, soon.day) == (2, 29):
        soon += timedelta(days=1)
    anchor = soon.replace(year=soon.year - 1)
    assert period_containing(anchor, datetime.now(UTC)).end == soon

    doomed = workers.start("renewal_after_expiry")
    handle = await temporal_client.start_workflow(
        ACCOUNT_WORKFLOW, AccountWorkflowInput(account_id=account), id=account_workflow_id(account),
        task_queue=temporal_settings.temporal_task_queue)
    state = await handle.execute_update(UPDATE_CHANGE_PLAN, PlanChange(plan_id="starter", anchor=anchor),
                                        result_type=SubscriptionState)
    assert state.period_end == soon
    assert await wait_exit(doomed, 60) == -signal.SIGKILL, (workers.logs / "worker-0.log").read_text()

    async def rows(type_: str) -> list[dict[str, Any]]:
        async with pool.connection() as conn:
            return await (await conn.execute(
                "SELECT amount_micros, idempotency_key FROM journal WHERE account_id = %s AND type = %s ORDER BY seq",
                (account, type_))).fetchall()

    assert len(await rows("plan_expiry")) == 1 and len(await rows("plan_grant")) == 1  # killed before the 2nd grant
    workers.start()
    deadline = time.monotonic() + 120
    while True:
        current = await handle.query(QUERY_STATE, result_type=AccountState)
        async with pool.connection() as conn:
            invoice = await (await conn.execute("SELECT status, amount_due_cents FROM invoices WHERE account_id = %s",
                                                (account,))).fetchall()
        if current.subscription and current.subscription.period_index == state.period_index + 1 and invoice and \
                invoice[0]["status"] == "paid":
            break
        assert time.monotonic() < deadline, (current.subscription, invoice)
        await asyncio.sleep(0.5)
    expiries, grants = await rows("plan_expiry"), await rows("plan_grant")
    assert [e["amount_micros"] for e in expiries] == [-5_000 * 1_000_000]
    assert [g["amount_micros"] for g in grants] == [5_000 * 1_000_000] * 2
    assert len({g["idempotency_key"] for g in grants}) == 2
    assert [(i["status"], i["amount_due_cents"]) for i in invoice] == [("paid", 4_900)]
    succeeded = [pi for pi in intents_of(sdk, await customer_of(pool, account)) if pi.status == "succeeded"]
    assert [pi.amount for pi in succeeded] == [4_900]
    await assert_invariants(pool)
    await handle.terminate("test over")
