"""The invoice stack for tests: settings, the SMTP sink, the app with a worker, invoice workflow runs and rows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, WorkflowHandle

from creditflow.config import Settings
from creditflow.domain.invoices import (
    BillingDetails,
    ChannelUsage,
    InvoiceDraft,
    InvoiceInput,
    RecurringCharge,
    TaxRegistration,
    TopUpPaid,
    draft_invoice,
    invoice_number,
)
from creditflow.domain.periods import period_at
from creditflow.domain.plans import load_plan_catalog
from tests.conftest import ADMIN_KEY, STRIPE_KEY
from tests.receivers import SmtpServer, smtp_server
from tests.support.api import app_client
from workflows.contract import InvoiceOutcome, InvoiceWorkflowInput, invoice_workflow_id
from workflows.invoice import InvoiceWorkflow


def assert_run(lines: list[str], expected: list[str]) -> None:
    """``expected`` appears as consecutive lines (a table row reads left to right)."""
    for start in range(len(lines) - len(expected) + 1):
        if lines[start:start + len(expected)] == expected:
            return
    raise AssertionError(f"{expected} not found in order in {lines}")


@pytest.fixture
async def smtp() -> AsyncIterator[SmtpServer]:
    async with smtp_server() as server:
        yield server


@pytest.fixture
def settings(database_url: str, stripe_base: str, smtp: SmtpServer) -> Settings:
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=5000, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=stripe_base, stripe_retry_max_wait_seconds=0.1, topup_poll_interval_seconds=0.3,
                    smtp_host=smtp.host, smtp_port=smtp.port, smtp_starttls=False, smtp_timeout_seconds=5,
                    smtp_from="creditflow <billing@creditflow.test>", invoice_seller_name="Creditflow Inc.")


@pytest.fixture
async def wf_api(temporal_settings: Settings, temporal_worker: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The real app and the production worker on this test's task queue."""
    async for client in app_client(temporal_settings):
        yield client


def workflow_input(account: str, start: datetime, end: datetime, **extra: Any) -> InvoiceWorkflowInput:
    return InvoiceWorkflowInput(account_id=account, period_start=start, period_end=end, **extra)


async def start(client: Client, settings: Settings, input: InvoiceWorkflowInput) -> WorkflowHandle[Any, InvoiceOutcome]:
    return await client.start_workflow(InvoiceWorkflow.run, input, id=invoice_workflow_id(input.account_id,
                                                                                           input.key()),
                                       task_queue=settings.temporal_task_queue)


async def run_invoice(client: Client, settings: Settings, input: InvoiceWorkflowInput) -> InvoiceOutcome:
    return await asyncio.wait_for((await start(client, settings, input)).result(), 60)


async def rows(pool: AsyncConnectionPool, sql: str, *params: Any) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute(sql, params)).fetchall()


async def invoice_charges(pool: AsyncConnectionPool, account: str) -> list[dict[str, Any]]:
    return await rows(pool, "SELECT * FROM stripe_charges WHERE account_id = %s AND kind = 'invoice'"
                            " ORDER BY created_at", account)


def period_around_now() -> tuple[datetime, datetime]:
    now = datetime.now(UTC).replace(microsecond=0)
    return now - timedelta(hours=1), now + timedelta(hours=1)


async def past_due_invoice(api: httpx.AsyncClient, client: Client, settings: Settings, account: str) -> str:
    """A Starter invoice ($49) whose only charge attempt failed: past due, its workflow closed."""
    now = datetime.now(UTC).replace(microsecond=0)
    input = InvoiceWorkflowInput(account_id=account, period_start=now - timedelta(hours=1),
                                 period_end=now + timedelta(hours=1), plan_id="starter", charge_attempts=1)
    outcome = await asyncio.wait_for(client.execute_workflow(
        InvoiceWorkflow.run, input, id=invoice_workflow_id(account, input.key()),
        task_queue=settings.temporal_task_queue), 60)
    assert (outcome.status, outcome.amount_due_cents) == ("past_due", 4900)
    assert outcome.invoice_id is not None
    return outcome.invoice_id


# --- A sample invoice draft (rendering tests) ------------------------------------------------

ACCOUNT = "acc_3f2a9c1b4d5e6f708192a3b4c5d6e7f8"
PERIOD = period_at(datetime(2026, 1, 31, 9, 30, tzinfo=UTC), 0)


def draft(**overrides: object) -> InvoiceDraft:
    fields: dict[str, object] = {
        "number": invoice_number(ACCOUNT, PERIOD), "account_id": ACCOUNT, "issued_at": PERIOD.end,
        "due_at": datetime(2026, 3, 14, 9, 30, tzinfo=UTC), "period": PERIOD, "seller_name": "Creditflow Inc.",
        "bill_to": BillingDetails(company="Müller & Söhne <GmbH>", address_line1="Hauptstraße 5", city="Berlin",
                                  postal_code="10115", country="Germany", po_number="PO-7781",
                                  billing_email="ap@mueller.example"),
        "tax_registrations": [TaxRegistration(country="DE", description="European VAT number", value="DE123456789",
                                              status="verified"),
                              TaxRegistration(country="GB", description="UK VAT number", value="GB987654321")],
        "plan": load_plan_catalog().get("growth"),
        "recurring_charges": [RecurringCharge(description="Phone number rental", quantity=3, unit="number",
                                              unit_price_credits=150)],
        "overage_credits": "1234.5",
        "usage": [ChannelUsage(channel="voice", unit="minute", quantity="2750.5", credits="22004"),
                  ChannelUsage(channel="llm", unit="token", quantity=24505, credits="2450.5")],
        "top_ups": [TopUpPaid(paid_at=datetime(2026, 2, 3, 12, tzinfo=UTC), description="Top-up of $50.00",
                              amount_cents=5000, credits=5000)],
    }
    fields.update(overrides)
    return draft_invoice(InvoiceInput(**fields))  # type: ignore[arg-type]
