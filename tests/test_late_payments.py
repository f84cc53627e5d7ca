"""A payment that succeeds after its workflow recorded failure is credited (or its invoice settled) once, through one
late path for top-ups, auto-recharges and invoice payments (the customer paid: the money is theirs). Signed webhooks
on the real app, the outbox relay, the account workflow on the Temporal dev server, localstripe, PostgreSQL; no mocks.

The failure is the one the issue describes: Stripe was unreachable for the workflow's whole retry budget, so the
charge row was recorded ``failed`` (``payment_provider_unavailable``) without a PaymentIntent id, while Stripe had
in fact created and confirmed the PaymentIntent (its answer was lost). The tests build that state with the library
(the API cannot lose Stripe's answer on purpose) and then go through public interfaces only.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import stripe
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from creditflow.config import Settings
from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.payments import topups
from creditflow.payments.gateway import StripeGateway
from tests.support.api import new_account
from tests.support.auto_recharge import relay  # noqa: F401 - fixture: the outbox relay running
from tests.support.ledger import assert_invariants, journal_rows
from tests.support.payments import TOPUP, customer_of, intents_of, lost_answer_charge, receipts, save_card
from tests.support.temporal import eventually
from tests.support.webhooks import Clients, cf, event, settings, sign  # noqa: F401 - fixtures
from workflows.contract import InvoiceWorkflowInput, invoice_workflow_id

pytestmark = pytest.mark.temporal


async def test_topup_that_succeeds_after_its_workflow_recorded_failure_is_credited_once(
        cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient,  # noqa: F811
        temporal_settings: Settings, relay: Any) -> None:  # noqa: F811
    account = await new_account(cf.admin)  # 5,000 welcome credits
    await save_card(cf.admin, sdk, account)
    gateway = StripeGateway.from_settings(temporal_settings)
    charge_id, pi = await lost_answer_charge(pool, gateway, account, "late-1", amount_cents=1000, credits=1000)

    paid = sdk.v1.payment_intents.retrieve(pi).to_dict()
    first = event("payment_intent.succeeded", paid, event_id="evt_late_topup_1")
    resp = await cf.deliver(first, sign(first))
    assert (resp.status_code, resp.json()["outcome"]) == (200, "routed")
    again = event("payment_intent.succeeded", paid, event_id="evt_late_topup_2")  # Stripe sends it again
    assert (await cf.deliver(again, sign(again))).json()["outcome"] in ("routed", "workflow_closed")
    [credit] = await eventually(lambda: journal_rows(pool, account, "purchase"), lambda r: len(r) == 1, timeout=20)
    assert (credit["amount_micros"], credit["idempotency_key"]) == (1000 * MICROS_PER_CREDIT, f"sys:topup:{pi}")
    record = await eventually(lambda: topups.get_charge(pool, charge_id), lambda r: r.status == "succeeded")
    txn = f"txn_{credit['id'].hex}"
    assert (record.payment_intent_id, record.ledger_txn_id, record.failure_code) == (pi, txn, None)
    [receipt] = await eventually(lambda: receipts(pool, account), lambda rows: len(rows) == 1)
    assert (receipt["dedup_key"], receipt["payload"]["credits"], receipt["payload"]["transaction_id"]) == (
        f"receipt:{charge_id}", 1000, txn)

    # The same top-up request again: the success is reported (not a false card_declined), nothing charged again.
    replay = await cf.admin.post(TOPUP, json={"account_id": account, "amount_usd": 10, "request_id": "late-1"})
    assert replay.status_code == 200, replay.text
    body = replay.json()
    assert (body["status"], body["payment_intent_id"], body["transaction_id"], body["balance"]) == (
        "succeeded", pi, txn, 6000)
    assert len(await journal_rows(pool, account, "purchase")) == 1
    succeeded = [p for p in intents_of(sdk, await customer_of(pool, account)) if p.status == "succeeded"]
    assert [p.id for p in succeeded] == [pi]
    balance = (await cf.admin.get("/api/v1/billing/balance", params={"account_id": account})).json()["balance"]
    assert balance == 6000
    await assert_invariants(pool)


async def test_invoice_payment_that_succeeds_late_marks_the_invoice_paid_once(
        cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient, temporal_client: Client,  # noqa: F811
        temporal_settings: Settings, relay: Any) -> None:  # noqa: F811
    """The same path for an invoice payment: the invoice is settled by the invoicing module (``settle``)."""
    from workflows.invoice import InvoiceWorkflow

    account = await new_account(cf.admin)
    await save_card(cf.admin, sdk, account)
    now = datetime.now(UTC).replace(microsecond=0)
    input = InvoiceWorkflowInput(account_id=account, period_start=now - timedelta(hours=1),
                                 period_end=now + timedelta(hours=1), plan_id="starter", charge=False,
                                 send_email=False)
    outcome = await asyncio.wait_for((await temporal_client.start_workflow(
        InvoiceWorkflow.run, input, id=invoice_workflow_id(account, input.key()),
        task_queue=temporal_settings.temporal_task_queue)).result(), 60)
    assert (outcome.status, outcome.amount_due_cents) == ("open", 4900)
    assert outcome.invoice_id is not None
    gateway = StripeGateway.from_settings(temporal_settings)
    charge_id, pi = await lost_answer_charge(pool, gateway, account, outcome.invoice_id, amount_cents=4900,
                                             credits=0, kind=topups.KIND_INVOICE)

    body = event("payment_intent.succeeded", sdk.v1.payment_intents.retrieve(pi).to_dict(), event_id="evt_late_inv")
    resp = await cf.deliver(body, sign(body))
    assert (resp.status_code, resp.json()["outcome"]) == (200, "routed")

    async def invoice() -> dict[str, Any]:
        async with pool.connection() as conn:
            row = await (await conn.execute("SELECT status, charge_id, payment_intent_id FROM invoices WHERE id = %s",
                                            (outcome.invoice_id,))).fetchone()
        assert row is not None
        return row

    paid = await eventually(invoice, lambda r: r["status"] == "paid", timeout=20)
    assert (paid["charge_id"], paid["payment_intent_id"]) == (charge_id, pi)
    record = await topups.get_charge(pool, charge_id)
    assert (record.status, record.payment_intent_id) == ("succeeded", pi)
    assert await journal_rows(pool, account, "purchase") == []  # an invoice payment buys no credits
    await assert_invariants(pool)
