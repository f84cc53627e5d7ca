"""The credit an invoice carries forward is applied to the next invoices, once.

``InvoiceWorkflow`` on the real Temporal dev server with the production worker, real PostgreSQL and localstripe.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from creditflow.config import Settings
from creditflow.ledger.verify import verify
from tests.support.api import new_account
from tests.support.invoices import (  # noqa: F401 - fixtures
    invoice_charges,
    period_around_now,
    run_invoice,
    settings,
    smtp,
    wf_api,
    workflow_input,
)
from tests.support.payments import customer_of, intents_of, save_card
from workflows.contract import InvoiceAdjustmentLine

pytestmark = pytest.mark.temporal


async def test_credit_carried_forward_is_applied_to_the_next_invoices(
        wf_api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient,  # noqa: F811
        temporal_client: Client, temporal_settings: Settings) -> None:
    api = wf_api
    account = await new_account(api)
    await save_card(api, sdk, account)
    begin, end = period_around_now()
    month = timedelta(days=31)  # each invoice its own period (the key is the start date)
    amounts: list[tuple[Any, ...]] = []
    credit = InvoiceAdjustmentLine(description="Proration credit: Scale to Starter", amount_cents=-10_000)
    for n, extra in enumerate(({"adjustments": [credit]}, {"plan_id": "starter"}, {"plan_id": "starter"},
                               {"plan_id": "starter"})):
        outcome = await run_invoice(temporal_client, temporal_settings, workflow_input(
            account, begin + n * month, end + n * month, **extra))
        detail = (await api.get(f"/api/v1/billing/invoices/{outcome.invoice_id}",
                                params={"account_id": account})).json()
        amounts.append((outcome.status, outcome.amount_due_cents, detail["credit_carried_forward_usd"],
                        [(line["description"], line["amount_usd"]) for line in detail["lines"]]))
    assert amounts == [
        ("paid", 0, 100, [("Proration credit: Scale to Starter", -100)]),
        ("paid", 0, 51, [("Starter plan, " + _label(begin + month, end + month), 49),
                         ("Applied credit balance", -49)]),
        ("paid", 0, 2, [("Starter plan, " + _label(begin + 2 * month, end + 2 * month), 49),
                        ("Applied credit balance", -49)]),
        ("paid", 4_700, 0, [("Starter plan, " + _label(begin + 3 * month, end + 3 * month), 49),
                            ("Applied credit balance", -2)]),
    ]
    # Only the last invoice was charged, $47.
    [charge] = await invoice_charges(pool, account)
    assert (charge["amount_cents"], charge["status"]) == (4_700, "succeeded")
    assert [pi.amount for pi in intents_of(sdk, await customer_of(pool, account)) if pi.status == "succeeded"] == [
        4_700]
    report = await verify(pool, account)  # the credit balance carried and applied as the rule says
    assert report.ok, report.violations


def _label(start: Any, end: Any) -> str:
    return f"{start:%Y-%m-%d} to {end:%Y-%m-%d}"

