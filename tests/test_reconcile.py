"""Reconciliation with Stripe: the engine against the real emulator (PaymentIntents and refunds), the workflow on
the real worker, the Temporal Schedule on the dev server, and the CLI/API reports.

localstripe has no disputes and creates every refund ``succeeded``: the dispute branch is exercised by feeding
dispute objects through ``Reconciler._dispute`` (what the SDK's list returns on Stripe), and the list's absence
is checked to be reported as a note.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from typer.testing import CliRunner

from creditflow import ops_cli
from creditflow.cli import app
from creditflow.client import CreditflowClient
from creditflow.config import Settings, get_settings
from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.domain.reconciliation import RunWindow
from creditflow.ledger.verify import verify
from creditflow.payments import clawbacks, refunds, topups
from creditflow.payments.gateway import ACCOUNT_METADATA_KEY, RefundState, StripeGateway
from creditflow.payments.reconcile import Reconciler, get_run, list_runs, open_run
from creditflow.temporal_setup import ensure_reconcile_schedule
from tests.conftest import ADMIN_KEY, STRIPE_KEY, new_card
from tests.support.api import app_client, new_account
from tests.support.payments import customer_of, lost_answer_charge, save_card
from tests.support.reconcile import kinds, reconcile_now
from workflows.contract import ReconcileSummary

pytestmark = pytest.mark.temporal


@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=0, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=stripe_base, stripe_retry_max_wait_seconds=0.1, reconcile_grace_seconds=0)


@pytest.fixture
def gateway(settings: Settings) -> StripeGateway:
    return StripeGateway.from_settings(settings)


async def charged(pool: AsyncConnectionPool, gateway: StripeGateway, account: str, *, cents: int = 1000,
                  credits: int = 1000) -> topups.ChargeRecord:
    """A top-up charged on Stripe (PaymentIntent succeeded) whose workflow gave up before crediting it."""
    record = await topups.record_charge(pool, gateway, account_id=account, request_id=f"r-{uuid.uuid4().hex[:8]}",
                                        amount_cents=cents, credits=credits, package_id=None, description="Credits",
                                        payment_method_id=None)
    pi = await topups.charge(pool, gateway, record.id)
    assert pi.status == "succeeded"
    await topups.set_status(pool, record.id, "canceled", failure_code="payment_expired")
    return await topups.get_charge(pool, record.id)


async def balance_micros(pool: AsyncConnectionPool, account: str) -> int:
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT balance_micros FROM balances WHERE account_id = %s",
                                        (account,))).fetchone()
    assert row is not None
    return int(row["balance_micros"])


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async for client in app_client(settings):
        yield client


async def test_a_payment_that_succeeded_after_its_workflow_gave_up_is_credited_once(
        pool: AsyncConnectionPool, api: httpx.AsyncClient, sdk: stripe.StripeClient, gateway: StripeGateway) -> None:
    account = await new_account(api)
    await save_card(api, sdk, account)
    record = await charged(pool, gateway, account)
    assert await balance_micros(pool, account) == 0

    young = await reconcile_now(pool, gateway, grace=timedelta(hours=1))
    assert kinds(young, account) == [] and young.in_flight >= 1  # left to the workflow still handling it

    first = await reconcile_now(pool, gateway)
    assert kinds(first, account) == [("repaired", "payment_credited_late")]
    assert [d.ids for d in first.differences if d.account_id == account] == [{"charge_id": record.id}]
    assert await balance_micros(pool, account) == 1000 * MICROS_PER_CREDIT
    assert (await topups.get_charge(pool, record.id)).status == "succeeded"
    again = await reconcile_now(pool, gateway)
    assert kinds(again, account) == [] and again.matched >= 1
    assert await balance_micros(pool, account) == 1000 * MICROS_PER_CREDIT
    assert (await verify(pool, account)).ok


async def test_a_refund_made_on_stripe_takes_its_credits_back_once(
        pool: AsyncConnectionPool, api: httpx.AsyncClient, sdk: stripe.StripeClient, gateway: StripeGateway) -> None:
    account = await new_account(api)
    await save_card(api, sdk, account)
    record = await charged(pool, gateway, account, cents=1000, credits=1200)
    await topups.credit(pool, record.id)
    assert record.payment_intent_id is not None
    refund = sdk.v1.refunds.create(params={"payment_intent": record.payment_intent_id, "amount": 500})

    first = await reconcile_now(pool, gateway)
    assert kinds(first, account) == [("repaired", "stripe_refund_taken_back")]
    assert [d.stripe_id for d in first.differences if d.account_id == account] == [refund.id]
    assert await balance_micros(pool, account) == 600 * MICROS_PER_CREDIT  # half the money: half the credits
    assert kinds(await reconcile_now(pool, gateway), account) == []
    assert await balance_micros(pool, account) == 600 * MICROS_PER_CREDIT
    assert (await verify(pool, account)).ok

    # Stripe later reports that refund failed (the emulator cannot): the credits it took come back, once.
    now = datetime.now(UTC)
    reconciler = Reconciler(pool, gateway, RunWindow(run_id="t", trigger="manual", since=now, until=now), now=now,
                            server_filter=False, grace=timedelta(0))
    failed = {"id": refund.id, "status": "failed", "amount": 500, "created": None, "metadata": {},
              "payment_intent": record.payment_intent_id}
    await reconciler._refund(failed)
    await reconciler._refund(failed)
    assert kinds(reconciler.result, account) == [("repaired", "stripe_refund_failed_restored")]
    assert await balance_micros(pool, account) == 1200 * MICROS_PER_CREDIT


class StripeFailsRefunds(StripeGateway):
    """localstripe creates every refund ``succeeded`` and never fails one: this gateway answers ``retrieve_refund``
    ``failed`` for the refunds the test names (what Stripe returns days later); everything else is the emulator's."""

    failed: set[str] = set()

    async def retrieve_refund(self, refund_id: str) -> RefundState:
        state = await super().retrieve_refund(refund_id)
        return state.model_copy(update={"status": "failed"}) if refund_id in self.failed else state


async def test_a_refund_made_on_stripe_that_fails_after_the_runs_window_gives_its_credits_back_once(
        pool: AsyncConnectionPool, api: httpx.AsyncClient, sdk: stripe.StripeClient, settings: Settings) -> None:
    """Issue 11 open point (review item 5): a refund made on Stripe whose credits were taken back, and that Stripe
    fails later with its ``refund.failed`` lost, was re-checked only if the run happened to list it (created in its
    window). The ledger knows what it took back: those refunds are re-checked for ``RECHECK`` like creditflow's own."""
    gateway = StripeFailsRefunds.from_settings(settings)
    account = await new_account(api)
    await save_card(api, sdk, account)
    record = await charged(pool, gateway, account, cents=1000, credits=1200)
    await topups.credit(pool, record.id)
    refund = sdk.v1.refunds.create(params={"payment_intent": str(record.payment_intent_id), "amount": 500})
    taken = await reconcile_now(pool, gateway)
    assert kinds(taken, account) == [("repaired", "stripe_refund_taken_back")]
    assert await balance_micros(pool, account) == 600 * MICROS_PER_CREDIT

    StripeFailsRefunds.failed.add(refund.id)  # later: Stripe fails it, the webhook is lost
    after = datetime.now(UTC) + timedelta(seconds=1)  # the refund was created before this run's window
    restored = await reconcile_now(pool, gateway, since=after)
    assert [(d.action, d.kind, d.stripe_id) for d in restored.differences if d.account_id == account] == [
        ("repaired", "stripe_refund_failed_restored", refund.id)]
    assert await balance_micros(pool, account) == 1200 * MICROS_PER_CREDIT
    assert kinds(await reconcile_now(pool, gateway, since=after), account) == []  # once
    assert await balance_micros(pool, account) == 1200 * MICROS_PER_CREDIT
    assert (await verify(pool, account)).ok

    # A refund on Stripe of a purchase whose credits were all used took nothing back; when Stripe fails it there
    # is nothing to give back either: not reported as repaired (now that it is re-checked every run).
    spent = await charged(pool, gateway, account, cents=500, credits=500)
    await topups.credit(pool, spent.id)
    used = await api.post("/api/v1/billing/track", json={"account_id": account, "feature_id": "chat_message",
                                                         "value": 1700, "idempotency_key": "use-all"})
    assert used.status_code == 200 and used.json()["balance"] == 0, used.text
    empty = sdk.v1.refunds.create(params={"payment_intent": str(spent.payment_intent_id), "amount": 200})
    await reconcile_now(pool, gateway)
    StripeFailsRefunds.failed.add(empty.id)
    for _ in range(2):
        rechecked = await reconcile_now(pool, gateway, since=datetime.now(UTC) + timedelta(seconds=1))
        assert kinds(rechecked, account) == []
    assert await balance_micros(pool, account) == 0
    assert (await verify(pool, account)).ok


async def test_a_refund_stripe_finished_is_finalized_and_a_failed_one_restored(
        pool: AsyncConnectionPool, api: httpx.AsyncClient, sdk: stripe.StripeClient, gateway: StripeGateway) -> None:
    account = await new_account(api)
    await save_card(api, sdk, account)
    record = await charged(pool, gateway, account)
    credit = await topups.credit(pool, record.id)
    plan = await refunds.plan(pool, account_id=account, request_id="rf-1", purchase_transaction_id=None,
                              payment_intent_id=record.payment_intent_id, credits=300,
                              reason=refunds.RefundReason.REQUESTED_BY_CUSTOMER, requested_by="admin",
                              now=datetime.now(UTC))
    reserved = await refunds.reserve(pool, plan)
    await refunds.refund_payment(pool, gateway, reserved.refund.id)  # Stripe refunded; the finalize step was lost
    assert credit.credits == 1000

    result = await reconcile_now(pool, gateway)
    assert kinds(result, account) == [("repaired", "refund_finalized_late")]
    assert (await refunds.get_refund(pool, reserved.refund.id)).status == "succeeded"
    assert await balance_micros(pool, account) == 700 * MICROS_PER_CREDIT
    assert kinds(await reconcile_now(pool, gateway), account) == []

    # A refund row still open whose Stripe refund failed (Stripe answers ``failed`` later): the credits come back.
    plan2 = plan.model_copy(update={"request_id": "rf-2", "credits": 200, "amount_cents": 200})
    reserved2 = await refunds.reserve(pool, plan2)
    stripe_refund = await refunds.refund_payment(pool, gateway, reserved2.refund.id)
    reconciler = Reconciler(pool, gateway, RunWindow(run_id="t", trigger="manual", since=datetime.now(UTC),
                                                     until=datetime.now(UTC)), now=datetime.now(UTC),
                            server_filter=False, grace=timedelta(0))
    await reconciler._refund({"id": stripe_refund.id, "status": "failed", "amount": 200, "created": None,
                              "payment_intent": record.payment_intent_id,
                              "metadata": {refunds.REFUND_METADATA_KEY: reserved2.refund.id}})
    assert kinds(reconciler.result, account) == [("repaired", "refund_failed_restored")]
    assert (await refunds.get_refund(pool, reserved2.refund.id)).status == "failed"
    assert await balance_micros(pool, account) == 700 * MICROS_PER_CREDIT

    # Stripe fails a refund it had reported succeeded (the first one): the credits come back, once.
    first_refund = await refunds.get_refund(pool, reserved.refund.id)
    for _ in range(2):
        await reconciler._refund({"id": first_refund.stripe_refund_id, "status": "failed", "amount": 300,
                                  "created": None, "payment_intent": record.payment_intent_id,
                                  "metadata": {refunds.REFUND_METADATA_KEY: first_refund.id}})
    assert kinds(reconciler.result, account) == [("repaired", "refund_failed_restored")] * 2
    assert (await refunds.get_refund(pool, reserved.refund.id)).status == "failed"
    assert await balance_micros(pool, account) == 1000 * MICROS_PER_CREDIT
    assert (await verify(pool, account)).ok


async def test_what_cannot_be_repaired_is_reported(
        pool: AsyncConnectionPool, api: httpx.AsyncClient, sdk: stripe.StripeClient, gateway: StripeGateway) -> None:
    account = await new_account(api)
    await save_card(api, sdk, account)
    customer = await customer_of(pool, account)
    card = new_card(sdk)
    sdk.v1.payment_methods.attach(card, params={"customer": customer})  # type: ignore[typeddict-item]
    # A payment naming creditflow that no charge row knows (made by hand with creditflow's metadata)...
    unknown = sdk.v1.payment_intents.create(params={  # type: ignore[typeddict-item]
        "amount": 700, "currency": "usd", "customer": customer, "payment_method": card, "confirm": True,
        "off_session": True, "payment_method_types": ["card"], "metadata": {ACCOUNT_METADATA_KEY: account}})
    # ...and one of another product on the same Stripe account, which is not creditflow's business.
    sdk.v1.payment_intents.create(params={  # type: ignore[typeddict-item]
        "amount": 300, "currency": "usd", "customer": customer, "payment_method": card, "confirm": True,
        "off_session": True, "payment_method_types": ["card"]})
    result = await reconcile_now(pool, gateway)
    assert kinds(result, account) == [("reported", "payment_unknown_to_ledger")]
    assert [d.stripe_id for d in result.differences if d.account_id == account] == [unknown.id]
    assert result.foreign >= 1
    assert any("disputes: not listed" in note for note in result.notes)
    assert await balance_micros(pool, account) == 0


async def test_a_second_payment_intent_is_reported_as_paid_twice_only_when_the_charge_was_paid(
        pool: AsyncConnectionPool, api: httpx.AsyncClient, sdk: stripe.StripeClient, gateway: StripeGateway) -> None:
    """Issue 11, defect 11a's proof: a PaymentIntent that succeeded for a charge whose row records another one was
    reported as ``duplicate_payment`` "which was paid by <the recorded one>" although that one was canceled and
    nothing was credited. Only a charge that was paid has a duplicate; otherwise the money is not credited."""
    account = await new_account(api)
    await save_card(api, sdk, account)
    # Not paid: the row records a PaymentIntent that was canceled; Stripe took the money on another one.
    charge_id, paid_pi = await lost_answer_charge(pool, gateway, account, "second-pi", amount_cents=1000,
                                                  credits=1000)
    record = await topups.get_charge(pool, charge_id)
    canceled = await gateway.create_payment_intent(amount_cents=1000, customer_id=record.customer_id,
                                                   payment_method_id=None, metadata={}, idempotency_key="canceled")
    await gateway.cancel_payment_intent(canceled.id)
    async with pool.connection() as conn:
        await conn.execute("UPDATE stripe_charges SET payment_intent_id = %s WHERE id = %s", (canceled.id, charge_id))
    # Paid: a credited top-up, and a second PaymentIntent that succeeded for the same charge.
    credited = await charged(pool, gateway, account)
    await topups.credit(pool, credited.id)
    second = await gateway.create_payment_intent(
        amount_cents=1000, customer_id=credited.customer_id, payment_method_id=credited.payment_method_id,
        metadata={ACCOUNT_METADATA_KEY: account, topups.CHARGE_METADATA_KEY: credited.id},
        idempotency_key="second")
    assert second.status == "succeeded"

    result = await reconcile_now(pool, gateway)
    mine = sorted(((d.kind, d.stripe_id, d.ids, d.detail) for d in result.differences if d.account_id == account),
                  key=lambda d: d[0])
    assert [(kind, stripe_id, ids) for kind, stripe_id, ids, _ in mine] == [
        ("duplicate_payment", second.id, {"charge_id": credited.id,
                                          "recorded_payment_intent_id": str(credited.payment_intent_id)}),
        ("payment_not_credited", paid_pi, {"charge_id": charge_id, "recorded_payment_intent_id": canceled.id})]
    assert f"which was paid by {credited.payment_intent_id}" in mine[0][3]
    assert "paid by" not in mine[1][3] and "nothing was credited" in mine[1][3], mine[1][3]
    assert await balance_micros(pool, account) == 1000 * MICROS_PER_CREDIT  # only the credited top-up


async def test_disputes_listed_by_stripe_are_taken_back_and_given_back_once(
        pool: AsyncConnectionPool, api: httpx.AsyncClient, sdk: stripe.StripeClient, gateway: StripeGateway) -> None:
    account = await new_account(api)
    await save_card(api, sdk, account)
    record = await charged(pool, gateway, account)
    await topups.credit(pool, record.id)
    dispute = {"id": f"dp_{uuid.uuid4().hex[:14]}", "object": "dispute", "amount": 1000, "status": "needs_response",
               "payment_intent": record.payment_intent_id, "charge": "ch_x", "reason": "fraudulent",
               "created": int((datetime.now(UTC) - timedelta(hours=1)).timestamp())}
    now = datetime.now(UTC)
    reconciler = Reconciler(pool, gateway, RunWindow(run_id="t", trigger="manual", since=now, until=now), now=now,
                            server_filter=False, grace=timedelta(0))
    await reconciler._dispute(dispute)
    await reconciler._dispute(dispute)  # listed again by a later run: nothing more
    assert kinds(reconciler.result, account) == [("repaired", "dispute_taken_back")]
    assert await balance_micros(pool, account) == 0
    await reconciler._dispute({**dispute, "status": "won"})
    await reconciler._dispute({**dispute, "status": "won"})
    assert kinds(reconciler.result, account) == [("repaired", "dispute_returned"), ("repaired", "dispute_taken_back")]
    assert await balance_micros(pool, account) == 1000 * MICROS_PER_CREDIT
    assert (await verify(pool, account)).ok


async def test_the_workflow_reconciles_verifies_and_stores_its_report(
        pool: AsyncConnectionPool, temporal_settings: Settings, temporal_worker: Any, temporal_client: Client,
        sdk: stripe.StripeClient, gateway: StripeGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    await asyncio.sleep(1.1)  # the emulator stamps in whole seconds: earlier tests' payments fall before ``since``
    since = datetime.now(UTC).replace(microsecond=0)
    async for api in app_client(temporal_settings):
        account = await new_account(api)
        await save_card(api, sdk, account)
        record = await charged(pool, gateway, account)
        client = CreditflowClient(temporal_client, temporal_settings.temporal_task_queue)
        handle = await client.start_reconciliation(since)
        summary = await asyncio.wait_for(handle.result(), 120)
        assert summary.run_id == handle.id and summary.repaired == 1 and summary.reported == 0
        assert summary.violations == 0
        report = await get_run(pool, handle.id)
        assert report.status == "completed" and [d.kind for d in report.differences] == ["payment_credited_late"]
        assert report.differences[0].ids["charge_id"] == record.id

        listed = await api.get("/api/v1/reconciliation/runs")
        assert listed.status_code == 200 and listed.json()["items"][0]["id"] == handle.id
        one = await api.get(f"/api/v1/reconciliation/runs/{handle.id}")
        assert one.status_code == 200 and one.json()["repaired"] == 1
        assert (await api.get("/api/v1/reconciliation/runs/nope")).status_code == 404
        started = await api.post("/api/v1/reconciliation/runs", json={})
        assert started.status_code == 202, started.text
        second = await temporal_client.get_workflow_handle(started.json()["run_id"],
                                                           result_type=ReconcileSummary).result()
        stored = await get_run(pool, second.run_id)
        assert [d for d in stored.differences if d.account_id == account] == []  # repaired once, by the first
        # The CLI: a run now (waiting for the worker), a stored report, the list.
        for name, value in (("DATABASE_URL", temporal_settings.database_url),
                            ("TEMPORAL_ADDRESS", temporal_settings.temporal_address),
                            ("TEMPORAL_TASK_QUEUE", temporal_settings.temporal_task_queue)):
            monkeypatch.setenv(f"CREDITFLOW_{name}", str(value))
        get_settings.cache_clear()
        monkeypatch.setattr(ops_cli.console, "width", 400)
        runner = CliRunner()
        since_arg = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
        now_run = await asyncio.to_thread(runner.invoke, app, ["reconcile", "--since", since_arg])
        assert now_run.exit_code == 0, now_run.output
        assert "reported 0" in now_run.output and "ledger violations after: 0" in now_run.output
        shown = await asyncio.to_thread(runner.invoke, app, ["reconcile", "--show", handle.id])
        assert shown.exit_code == 0 and "payment_credited_late" in shown.output and record.id in shown.output
        runs = await asyncio.to_thread(runner.invoke, app, ["reconcile", "--list"])
        assert runs.exit_code == 0 and handle.id in runs.output
        get_settings.cache_clear()
        # The next scheduled run starts where this one ended (less the overlap): its window is the watermark.
        window = await open_run(pool, f"test:{uuid.uuid4().hex}", trigger="schedule", since=None,
                                now=datetime.now(UTC))
        last = max(r.until for r in await list_runs(pool) if r.status == "completed")
        assert window.since == last - timedelta(hours=1)
    assert await balance_micros(pool, account) == 1000 * MICROS_PER_CREDIT


async def test_the_schedule_starts_runs_on_the_worker(temporal_settings: Settings, temporal_worker: Any,
                                                      temporal_client: Client, pool: AsyncConnectionPool) -> None:
    schedule_id = f"test-reconcile-{uuid.uuid4().hex[:8]}"
    handle = await ensure_reconcile_schedule(temporal_client, task_queue=temporal_settings.temporal_task_queue,
                                             interval_hours=24, schedule_id=schedule_id)
    assert handle is not None
    # A second worker starting: the schedule is brought up to date, not duplicated.
    await ensure_reconcile_schedule(temporal_client, task_queue=temporal_settings.temporal_task_queue,
                                    interval_hours=12, schedule_id=schedule_id)
    description = await handle.describe()
    assert description.schedule.spec.intervals[0].every == timedelta(hours=12)
    await handle.trigger()
    deadline = asyncio.get_running_loop().time() + 60
    while not (description := await handle.describe()).info.recent_actions:
        assert asyncio.get_running_loop().time() < deadline, "the schedule started nothing"
        await asyncio.sleep(0.5)
    started = description.info.recent_actions[0].action
    run_id = started.workflow_id  # type: ignore[attr-defined]
    assert run_id.startswith(f"reconcile:{schedule_id}")
    await temporal_client.get_workflow_handle(run_id).result()
    report = await get_run(pool, run_id)
    assert report.trigger == "schedule" and report.status == "completed"
    assert await ensure_reconcile_schedule(temporal_client, task_queue="q", interval_hours=0,
                                           schedule_id=schedule_id) is None
    with pytest.raises(Exception):  # noqa: B017 - deleted: describing it fails (NOT_FOUND)
        await handle.describe()


class StripeWithDisputes(StripeGateway):
    """The emulator has no disputes: this gateway answers ``retrieve_dispute`` from a dict the test fills (what
    Stripe would return); everything else goes to the emulator."""

    disputes: dict[str, dict[str, Any]] = {}

    async def retrieve_dispute(self, dispute_id: str) -> dict[str, Any]:
        return self.disputes[dispute_id]


async def test_an_open_dispute_whose_close_was_lost_is_given_back(
        pool: AsyncConnectionPool, api: httpx.AsyncClient, sdk: stripe.StripeClient, settings: Settings) -> None:
    gateway = StripeWithDisputes.from_settings(settings)
    account = await new_account(api)
    await save_card(api, sdk, account)
    record = await charged(pool, gateway, account)
    await topups.credit(pool, record.id)
    dispute = {"id": f"dp_{uuid.uuid4().hex[:12]}", "object": "dispute", "amount": 1000, "status": "needs_response",
               "payment_intent": record.payment_intent_id, "charge": "ch_x", "reason": "fraudulent",
               "created": int((datetime.now(UTC) - timedelta(days=20)).timestamp())}
    await clawbacks.apply(pool, account, clawbacks.DISPUTED, clawbacks.outbox_payload("charge.dispute.created",
                                                                                      dispute))
    assert await balance_micros(pool, account) == 0
    # Weeks later the merchant wins; the charge.dispute.closed webhook is lost. The dispute was created before the
    # run's window, so only the re-check of the ledger's open disputes can find it.
    StripeWithDisputes.disputes[dispute["id"]] = {**dispute, "status": "won"}
    result = await reconcile_now(pool, gateway)
    assert kinds(result, account) == [("repaired", "dispute_returned")]
    assert await balance_micros(pool, account) == 1000 * MICROS_PER_CREDIT
    assert kinds(await reconcile_now(pool, gateway), account) == []
    assert (await verify(pool, account)).ok
