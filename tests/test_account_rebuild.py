"""A new run of the account workflow rebuilds its state from the database: the database is the
truth, a run only caches it.

After an operator terminates ``account:{id}`` (or resets it, or the relay starts a new run), the next run must
behave exactly like the one before it: the subscription renews (the pending plan change applies, the invoice is
issued and paid, the old plan credits expire), a recharge charges and credits once under a new sequence number,
subscribing again is not a second grant, and events already delivered stay deduplicated. Time-skipping Temporal,
real PostgreSQL and localstripe, the production worker.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import httpx
import pytest
import stripe
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from creditflow.config import Settings
from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.ledger import outbox
from creditflow.ledger.accounts import create_account
from creditflow.ledger.verify import verify
from tests.conftest import ADMIN_KEY, STRIPE_KEY, new_card, skip_time
from tests.support.api import balance, track
from tests.support.auto_recharge import SETTINGS, recharge_charges, recharge_rows
from tests.support.ledger import assert_invariants, invoices, journal  # noqa: F401 - fixture
from tests.support.payments import customer_of, intents_of
from tests.support.temporal import (
    HISTORIES,
    eventually,
    ts_env,  # noqa: F401 - fixture
)
from workers.main import build_worker
from workflows.account import AccountWorkflow
from workflows.contract import (
    ACCOUNT_WORKFLOW,
    QUERY_STATE,
    SIGNAL_OUTBOX_EVENT,
    UPDATE_CHANGE_PLAN,
    AccountState,
    AccountWorkflowInput,
    OutboxEvent,
    PlanChange,
    SubscriptionState,
    account_workflow_id,
)

pytestmark = pytest.mark.temporal

RENEWAL_IN = timedelta(minutes=2)  # from the test's start to the first renewal: ample for the steps before it


@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=0, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=stripe_base, stripe_retry_max_wait_seconds=0.1)


def _event(row: dict[str, Any]) -> OutboxEvent:
    return OutboxEvent(dedup_key=row["dedup_key"], kind=row["kind"], payload=row["payload"],
                       created_at=row["created_at"])


async def signal_with_start(client: Client, queue: str, account: str, event: OutboxEvent) -> WorkflowHandle[Any, Any]:
    """What the outbox relay does (signal-with-start), minus the search attributes the test server lacks."""
    return await client.start_workflow(
        ACCOUNT_WORKFLOW, AccountWorkflowInput(account_id=account, publish_search_attributes=False),
        id=account_workflow_id(account), task_queue=queue, start_signal=SIGNAL_OUTBOX_EVENT,
        start_signal_args=[event], id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING)


async def relay_pending(pool: AsyncConnectionPool, client: Client, queue: str, account: str) -> list[OutboxEvent]:
    """Deliver the account's pending outbox rows in order and mark them dispatched, as the relay does."""
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT * FROM outbox WHERE account_id = %s AND dispatched_at IS NULL ORDER BY id", (account,))).fetchall()
        for row in rows:
            handle = await signal_with_start(client, queue, account, _event(row))
            await outbox.mark_dispatched(conn, {row["id"]: handle.result_run_id})
    return [_event(r) for r in rows]


async def test_restarted_account_workflow_rebuilds_its_state_from_the_database(
        ts_env: WorkflowEnvironment, pool: AsyncConnectionPool, settings: Settings,  # noqa: F811
        sdk: stripe.StripeClient, api: httpx.AsyncClient) -> None:
    client = ts_env.client
    # The first period ends two minutes from now (anchored a month earlier) so that the renewal comes in real time
    # rather than by skipping a month: when an operator terminates a run while one of its workflow tasks is out, the
    # Java test server leaks that task's time-skipping lock, and skipping a month over leaked locks has stalled the
    # renewal (two of five runs on a loaded machine). A day past the 28th would shift the anchor's day: skip past
    # it first, while nothing runs.
    if (await ts_env.get_current_time() + RENEWAL_IN).day > 28:
        await skip_time(ts_env, timedelta(days=4))
    first_period_end = await ts_env.get_current_time() + RENEWAL_IN
    anchor = (first_period_end.replace(day=1) - timedelta(days=1)).replace(day=first_period_end.day)
    account = (await create_account(pool, name="Acme", billing_email="billing@acme.test",
                                    welcome_bonus_credits=0)).id
    card = new_card(sdk)
    attached = await api.post("/api/v1/billing/payment-methods", json={"account_id": account,
                                                                      "payment_method_id": card})
    assert attached.status_code == 201, attached.text
    queue = f"rebuild-{account[-8:]}"
    async with build_worker(client, pool, settings, task_queue=queue):
        # First life: Starter now (5,000 plan credits), Growth from the next renewal, one auto-recharge.
        created = await relay_pending(pool, client, queue, account)
        handle = client.get_workflow_handle(account_workflow_id(account))
        sub: SubscriptionState = await handle.execute_update(
            UPDATE_CHANGE_PLAN, PlanChange(plan_id="starter", anchor=anchor), result_type=SubscriptionState)
        assert (sub.period_index, sub.period_end) == (0, first_period_end)
        pending: SubscriptionState = await handle.execute_update(
            UPDATE_CHANGE_PLAN, PlanChange(plan_id="growth"), result_type=SubscriptionState)
        assert (pending.plan_id, pending.pending_plan_id) == ("starter", "growth")
        saved = await api.put(SETTINGS, json={"account_id": account, "enabled": True, "threshold": 6000,
                                              "recharge_amount": 2000})
        assert saved.status_code == 200, saved.text
        [first_below] = await relay_pending(pool, client, queue, account)  # 5,000 < 6,000: recharge #1
        await eventually(lambda: recharge_rows(pool, account), lambda r: len(r) == 1, timeout=30)
        await eventually(lambda: handle.query(QUERY_STATE, result_type=AccountState),
                         lambda s: s.recharge.last_status == "succeeded" and s.recharge_in_flight is None)
        assert (await balance(api, account))["balance"] == 7000

        # An operator terminates it mid-life.
        await handle.terminate("operator: stuck workflow")

        # Usage crosses the threshold again; the relay's signal-with-start begins a new run.
        used = await track(api, account, "chat_message", 1500, "use-1")
        assert used.status_code == 200 and used.json()["balance"] == 5500
        [second_below] = await relay_pending(pool, client, queue, account)
        rebuilt_run = (await client.get_workflow_handle(account_workflow_id(account)).describe()).run_id
        handle = client.get_workflow_handle(account_workflow_id(account))
        # Events the first run applied are still known: redelivered, they are ignored.
        for old in (*created, first_below):
            await signal_with_start(client, queue, account, old)
        [_, second] = await eventually(lambda: recharge_rows(pool, account), lambda r: len(r) == 2, timeout=30)
        state: AccountState = await eventually(
            lambda: handle.query(QUERY_STATE, result_type=AccountState),
            lambda s: s.recharge.last_status == "succeeded" and s.recharge.seq == 2 and s.recharge_in_flight is None
            and s.duplicates_ignored == 2)
        assert (state.recharge.attempts_today, state.recharge.consecutive_failures) == (2, 0)
        assert state.subscription is not None
        assert (state.subscription.plan_id, state.subscription.pending_plan_id, state.subscription.period_end) == (
            "starter", "growth", sub.period_end)
        assert (await balance(api, account))["balance"] == 7500

        # Subscribing again in the same period is a plan change for the next renewal, not a second grant.
        again: SubscriptionState = await handle.execute_update(
            UPDATE_CHANGE_PLAN, PlanChange(plan_id="growth", anchor=await ts_env.get_current_time()),
            result_type=SubscriptionState)
        assert (again.plan_id, again.pending_plan_id, again.period_index) == ("starter", "growth", sub.period_index)
        assert len(await journal(pool, account, "plan_grant")) == 1

        # The next period: the renewal happens, the pending plan applies, the old period is invoiced and paid.
        # Skipping to it is instant unless a lock leaked (then the test server's clock runs in real time: at most
        # RENEWAL_IN); leaked locks are not released (no ``watch``), so time never jumps past the renewal's work.
        left = sub.period_end - await ts_env.get_current_time()
        assert left > timedelta(0), f"the steps before the renewal took longer than {RENEWAL_IN}"
        await skip_time(ts_env, left + timedelta(seconds=5))
        renewed = await eventually(lambda: handle.query(QUERY_STATE, result_type=AccountState),
                                   lambda s: s.subscription is not None
                                   and s.subscription.period_index == sub.period_index + 1, timeout=120)
        assert renewed.subscription is not None
        assert (renewed.subscription.plan_id, renewed.subscription.pending_plan_id) == ("growth", None)
        [invoice] = await eventually(lambda: invoices(pool, account),
                                     lambda rows: len(rows) == 1 and rows[0]["status"] == "paid", timeout=120)
        # The rebuilt run (closed by its continue-as-new at the renewal) replays, and is kept as a recorded history.
        history = await client.get_workflow_handle(account_workflow_id(account), run_id=rebuilt_run).fetch_history()
        replayed = await Replayer(workflows=[AccountWorkflow], data_converter=pydantic_data_converter
                                  ).replay_workflow(history)
        assert replayed.replay_failure is None
        recorded = HISTORIES / "account_workflow_v4_rebuilt_run.json"
        if not recorded.exists() or os.environ.get("CREDITFLOW_RECORD_HISTORIES") == "1":
            recorded.write_text(history.to_json())

    assert invoice["amount_due_cents"] == 4_900
    grants = [g["amount_micros"] // MICROS_PER_CREDIT for g in await journal(pool, account, "plan_grant")]
    assert grants == [5_000, 22_000]
    expiries = [e["amount_micros"] // MICROS_PER_CREDIT for e in await journal(pool, account, "plan_expiry")]
    assert expiries == [-3_500]  # 5,000 Starter credits less the 1,500 used
    charges = await recharge_charges(pool, account)
    assert [(c["request_id"], c["status"]) for c in charges] == [("recharge-1", "succeeded"),
                                                                 ("recharge-2", "succeeded")]
    paid = [p for p in intents_of(sdk, await customer_of(pool, account)) if p.status == "succeeded"]
    assert sorted(p.amount for p in paid) == [2_000, 2_000, 4_900]  # two recharges, one invoice: nothing twice
    assert second["idempotency_key"] == f"sys:topup:{charges[1]['payment_intent_id']}"
    assert charges[0]["payment_intent_id"] != charges[1]["payment_intent_id"]
    assert (await balance(api, account))["balance"] == 7_500 - 3_500 + 22_000
    await assert_invariants(pool)
    report = await verify(pool, account)  # two recorded recharge successes, each its own credited charge
    assert report.ok, report.violations


async def test_an_event_accepted_but_not_applied_by_a_terminated_run_is_applied_by_the_next(
        ts_env: WorkflowEnvironment, pool: AsyncConnectionPool, settings: Settings) -> None:  # noqa: F811
    """A run accepts a dispute's signal, and is terminated before its main loop takes the credits back (here: no
    worker is running). Delivered is not applied: the next run applies it, once, whatever is redelivered."""
    from creditflow.payments import clawbacks
    from tests.support.ledger import paid_purchase

    client = ts_env.client
    account = (await create_account(pool, name="Acme", billing_email="billing@acme.test",
                                    welcome_bonus_credits=0)).id
    purchase = await paid_purchase(pool, account, cents=1000, credits=1000)
    queue = f"unapplied-{account[-8:]}"
    handle = client.get_workflow_handle(account_workflow_id(account))
    async with build_worker(client, pool, settings, task_queue=queue):
        created = await relay_pending(pool, client, queue, account)
        await eventually(lambda: handle.query(QUERY_STATE, result_type=AccountState),
                         lambda s: s.events_processed == 1 and s.stripe_customer_id is not None)

    # The worker is down: the relay delivers the dispute, the run accepts it (it is in its history) and applies
    # nothing; then an operator terminates the run.
    dispute = {"id": "dp_unapplied", "object": "dispute", "payment_intent": purchase["payment_intent_id"],
               "charge": "ch_x", "amount": 1000, "reason": "fraudulent", "status": "needs_response"}
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO outbox (account_id, kind, dedup_key, payload) VALUES (%s, %s, %s, %s)",
            (account, clawbacks.EVENT_KINDS["charge.dispute.created"], "stripe:evt_unapplied",
             Jsonb(clawbacks.outbox_payload("charge.dispute.created", dispute))))
    [disputed] = await relay_pending(pool, client, queue, account)
    await handle.terminate("operator: stuck workflow")
    assert await journal(pool, account, "dispute") == []

    async with build_worker(client, pool, settings, task_queue=queue):
        # Any delivery starts the next run (here the relay redelivering old rows): it takes the credits back once.
        for old in (*created, disputed, disputed):
            await signal_with_start(client, queue, account, old)
        new_handle = client.get_workflow_handle(account_workflow_id(account))
        await eventually(lambda: new_handle.query(QUERY_STATE, result_type=AccountState),
                         lambda s: s.events_processed == 1 and s.duplicates_ignored == 3, timeout=30)
        [taken] = await eventually(lambda: journal(pool, account, "dispute"), lambda r: len(r) == 1, timeout=30)
    assert taken["amount_micros"] == -1000 * MICROS_PER_CREDIT
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT applied_at FROM outbox WHERE dedup_key = 'stripe:evt_unapplied'"
                                        )).fetchone()
    assert row is not None and row["applied_at"] is not None
    await assert_invariants(pool)
