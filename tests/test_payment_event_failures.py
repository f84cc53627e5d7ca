"""A payment event the account workflow cannot apply is kept, visible and re-drivable, never logged and dropped
(each one moves money). Signed webhook, outbox relay, account workflow on the Temporal dev server, localstripe,
PostgreSQL, the operator CLI; no mocks.

The refusal: Stripe reports a late success for a PaymentIntent that is not the one the charge row records (the
known gap of creditflow/payments/topups.py: a retry after a lost answer created a second PaymentIntent on a
provider that ignores idempotency keys). Crediting it blindly could double-credit, so it is refused and kept; the
operator checks that the recorded PaymentIntent was canceled, clears it, and re-drives the event: credited once.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
import stripe
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer
from typer.testing import CliRunner

from creditflow import payment_events_cli
from creditflow.config import Settings, get_settings
from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.ledger import payment_event_failures
from creditflow.payments import topups
from creditflow.payments.gateway import StripeGateway
from tests.support.api import new_account
from tests.support.auto_recharge import relay  # noqa: F401 - fixture: the outbox relay running
from tests.support.ledger import assert_invariants, journal_rows
from tests.support.payments import lost_answer_charge, save_card
from tests.support.temporal import HISTORIES, eventually
from tests.support.webhooks import Clients, cf, event, settings, sign  # noqa: F401 - fixtures
from workflows.account import AccountWorkflow
from workflows.contract import account_workflow_id

pytestmark = pytest.mark.temporal


async def cli(database_url: str, *args: str) -> Any:
    """``creditflow payment-events ...`` (its own event loop, in a thread: this test's loop is running)."""
    def invoke() -> Any:
        get_settings.cache_clear()
        return CliRunner(env={"CREDITFLOW_DATABASE_URL": database_url}).invoke(payment_events_cli.payment_events_app,
                                                                              list(args))
    try:
        return await asyncio.to_thread(invoke)
    finally:
        get_settings.cache_clear()


async def test_payment_event_refused_is_kept_and_can_be_redriven(
        cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient, database_url: str,  # noqa: F811
        temporal_client: Client, temporal_settings: Settings, relay: Any,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(payment_events_cli.console, "width", 300)
    account = await new_account(cf.admin)  # 5,000 welcome credits
    await save_card(cf.admin, sdk, account)
    gateway = StripeGateway.from_settings(temporal_settings)
    charge_id, paid_pi = await lost_answer_charge(pool, gateway, account, "dup-1", amount_cents=1000, credits=1000)
    record = await topups.get_charge(pool, charge_id)
    first = await gateway.create_payment_intent(amount_cents=1000, customer_id=record.customer_id,
                                                payment_method_id=None, metadata={}, idempotency_key="first")
    await gateway.cancel_payment_intent(first.id)
    async with pool.connection() as conn:  # the row names the first (canceled) PaymentIntent, Stripe paid the second
        await conn.execute("UPDATE stripe_charges SET payment_intent_id = %s WHERE id = %s", (first.id, charge_id))

    body = event("payment_intent.succeeded", sdk.v1.payment_intents.retrieve(paid_pi).to_dict(),
                 event_id="evt_second_pi")
    assert (await cf.deliver(body, sign(body))).json()["outcome"] == "routed"
    [failure] = await eventually(lambda: payment_event_failures.list_failures(pool, account_id=account),
                                 lambda rows: len(rows) == 1, timeout=20)
    assert (failure.dedup_key, failure.kind, failure.error_code, failure.failures, failure.resolved_at) == (
        "stripe:evt_second_pi", topups.PAYMENT_SUCCEEDED_LATE, "payment_intent_mismatch", 1, None)
    assert failure.payload == {"charge_id": charge_id, "payment_intent_id": paid_pi}
    assert await journal_rows(pool, account, "purchase") == []  # refused: nothing credited, but not lost
    listed = await cli(database_url, "failed", "--account-id", account)
    assert listed.exit_code == 0, listed.output
    assert "stripe:evt_second_pi" in listed.output and "payment_intent_mismatch" in listed.output

    # The operator checks the recorded PaymentIntent was canceled, clears it, and re-drives the event.
    async with pool.connection() as conn:
        await conn.execute("UPDATE stripe_charges SET payment_intent_id = NULL WHERE id = %s", (charge_id,))
    redriven = await cli(database_url, "redrive", str(failure.id))
    assert redriven.exit_code == 0 and "stripe:evt_second_pi#redrive-1" in redriven.output, redriven.output
    [credit] = await eventually(lambda: journal_rows(pool, account, "purchase"), lambda r: len(r) == 1, timeout=20)
    assert (credit["amount_micros"], credit["idempotency_key"]) == (1000 * MICROS_PER_CREDIT, f"sys:topup:{paid_pi}")
    [resolved] = await eventually(
        lambda: payment_event_failures.list_failures(pool, account_id=account, include_resolved=True),
        lambda rows: rows[0].resolved_at is not None)
    assert (resolved.failures, resolved.redrives) == (1, 1)
    assert await payment_event_failures.list_failures(pool, account_id=account) == []
    again = await cli(database_url, "redrive", str(failure.id))  # resolved: nothing to re-drive
    assert again.exit_code == 1 and "not_found" in again.output
    balance = (await cf.admin.get("/api/v1/billing/balance", params={"account_id": account})).json()["balance"]
    assert balance == 6000
    await assert_invariants(pool)
    # The account workflow's history (a refused late payment, then its re-drive credited) replays and is kept.
    history = await temporal_client.get_workflow_handle(account_workflow_id(account)).fetch_history()
    replayed = await Replayer(workflows=[AccountWorkflow], data_converter=pydantic_data_converter
                              ).replay_workflow(history)
    assert replayed.replay_failure is None
    recorded = HISTORIES / "account_workflow_v4_late_payment_redriven.json"
    if not recorded.exists() or os.environ.get("CREDITFLOW_RECORD_HISTORIES") == "1":
        recorded.write_text(history.to_json())
