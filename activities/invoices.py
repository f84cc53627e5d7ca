"""Invoice activities: thin adapters over ``creditflow.invoicing`` (each step is safe to repeat).

What crosses the workflow boundary is small on purpose: ids, amounts and dates (``InvoiceSummary``). The draft,
HTML and PDF stay in the ``invoices`` row; the email attaches the PDF by invoice id (the notification service
reads it), so no workflow history ever holds the document.
"""

from __future__ import annotations

from datetime import datetime

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel
from temporalio import activity

from activities.errors import translating_errors
from creditflow.config import Settings
from creditflow.domain.invoices import Adjustment, RecurringCharge
from creditflow.invoicing import payment, store
from creditflow.invoicing.store import InvoiceRecord, InvoiceRequest
from creditflow.payments.gateway import StripeGateway
from workflows.contract import InvoiceWorkflowInput


class PrepareInvoiceInput(BaseModel):
    request: InvoiceWorkflowInput
    issued_at: datetime  # the workflow's clock, so a replay and a retry draft the same dates


class InvoiceSummary(BaseModel):
    """The stored invoice as the workflow needs it, plus the charge policy resolved from the settings."""

    invoice_id: str
    account_id: str
    number: str
    status: str
    amount_due_cents: int
    subtotal_cents: int
    overage_micros: int
    issued_at: datetime
    due_at: datetime
    paid_at: datetime | None = None
    attempts: int = 0
    charge_id: str | None = None
    payment_intent_id: str | None = None
    period_label: str = ""
    created: bool = False
    charge_attempts: int = 1
    retry_interval_seconds: int = 0


class InvoiceRef(BaseModel):
    invoice_id: str


class SettleInvoiceInput(BaseModel):
    invoice_id: str
    charge_id: str | None = None
    attempts: int | None = None


class InvoiceFailureInput(BaseModel):
    invoice_id: str
    attempts: int
    error: str


def summary(record: InvoiceRecord, **extra: object) -> InvoiceSummary:
    return InvoiceSummary(
        invoice_id=record.id, account_id=record.account_id, number=record.number, status=record.status,
        amount_due_cents=record.amount_due_cents, subtotal_cents=record.subtotal_cents,
        overage_micros=record.overage_micros, issued_at=record.issued_at, due_at=record.due_at,
        paid_at=record.paid_at, attempts=record.attempts, charge_id=record.charge_id,
        payment_intent_id=record.payment_intent_id,
        period_label=f"{record.period_start:%Y-%m-%d} to {record.period_end:%Y-%m-%d}", **extra)  # type: ignore[arg-type]


class InvoiceActivities:
    """Activities bound to the worker's database pool, Stripe gateway and settings (plan catalog, policy)."""

    def __init__(self, pool: AsyncConnectionPool, gateway: StripeGateway, settings: Settings) -> None:
        self._pool = pool
        self._gateway = gateway
        self._settings = settings
        self._catalog = settings.plan_catalog()

    @activity.defn(name="prepare_invoice")
    @translating_errors
    async def prepare_invoice(self, input: PrepareInvoiceInput) -> InvoiceSummary:
        """Collect the period's facts, draft, render HTML and PDF, store as ``draft``; or return the stored one."""
        r = input.request
        request = InvoiceRequest(
            account_id=r.account_id, period_start=r.period_start, period_end=r.period_end, period_key=r.key(),
            plan_id=r.plan_id, subscription_fee_cents=r.subscription_fee_cents,
            recurring_charges=tuple(RecurringCharge(**c.model_dump()) for c in r.recurring_charges),
            overage_micros=r.overage_micros,
            adjustments=tuple(Adjustment(**a.model_dump()) for a in r.adjustments))
        s = self._settings
        due_days = s.invoice_due_days if r.due_days is None else r.due_days
        record, created = await store.prepare(self._pool, request, catalog=self._catalog,
                                              seller_name=s.invoice_seller_name, issued_at=input.issued_at,
                                              due_days=due_days, render_processes=s.invoice_render_processes)
        return summary(record, created=created,
                       charge_attempts=r.charge_attempts or s.invoice_charge_attempts,
                       retry_interval_seconds=r.retry_interval_seconds or s.invoice_retry_interval_seconds)

    @activity.defn(name="open_invoice")
    @translating_errors
    async def open_invoice(self, input: InvoiceRef) -> InvoiceSummary:
        """Issue it: ``draft`` -> ``open`` (a later status is left as it is)."""
        return summary(await store.mark_open(self._pool, input.invoice_id))

    @activity.defn(name="settle_invoice")
    @translating_errors
    async def settle_invoice(self, input: SettleInvoiceInput) -> InvoiceSummary:
        """Check the payment with Stripe, restore the billed overage to the wallet, mark the invoice ``paid``."""
        return summary(await payment.settle(self._pool, self._gateway, input.invoice_id, charge_id=input.charge_id,
                                            attempts=input.attempts))

    @activity.defn(name="check_earlier_invoice_charges")
    @translating_errors
    async def check_earlier_invoice_charges(self, input: InvoiceRef) -> payment.EarlierCharges:
        """Before charge attempt 2+: did an earlier attempt's PaymentIntent succeed after all (then settle with
        it), or may it still (then it is canceled, or no new charge is made while it cannot be)?"""
        return await payment.earlier_charges(self._pool, self._gateway, input.invoice_id)

    @activity.defn(name="record_invoice_payment_failure")
    @translating_errors
    async def record_invoice_payment_failure(self, input: InvoiceFailureInput) -> InvoiceSummary:
        """A charge attempt failed: the invoice is ``past_due`` with the attempt count and the error."""
        return summary(await store.mark_failed_attempt(self._pool, input.invoice_id, attempts=input.attempts,
                                                       error=input.error))
