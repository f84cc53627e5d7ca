"""Invoices in PostgreSQL: the period's facts from the ledger, the stored invoice, its status changes.

One invoice per account and period: ``invoices`` is unique on (account_id, period_key), and
:func:`prepare` looks for the stored invoice *before* drafting, so a retried activity or a second run of the
workflow gets the invoice that exists, with the same id, number, totals and PDF, never a second one. The draft,
HTML and PDF are written together, once, and never re-rendered: the PDF a customer downloaded stays the one
they have.

Money is exact: usage credits are summed in micro-credits in SQL, amounts due are integer cents from
``creditflow.domain.invoices``; nothing goes through a float.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from creditflow.domain.invoices import (
    Adjustment,
    ChannelUsage,
    InvoiceDraft,
    InvoiceInput,
    RecurringCharge,
    TopUpPaid,
    draft_invoice,
    invoice_number,
)
from creditflow.domain.money import MICROS_PER_CREDIT, micros_to_credits
from creditflow.domain.periods import Period
from creditflow.domain.plans import PlanCatalog
from creditflow.errors import CreditflowError
from creditflow.ids import new_id
from creditflow.invoicing import profile
from creditflow.invoicing.render import pdf_from_html, render_html
from creditflow.ledger.pagination import Cursor, keyset

STATUSES = ("draft", "open", "paid", "past_due", "void", "refunded", "disputed")
# "Payments due" on the invoices page: issued and not paid yet.
DUE_STATUSES = ("open", "past_due")
PDF_CONTENT_TYPE = "application/pdf"
# Top-ups shown on the invoice (informational): journal types of credits paid through Stripe.
TOPUP_TYPES = ("purchase", "auto_recharge")

_COLUMNS = ("id, account_id, number, period_key, period_start, period_end, status, currency, subtotal_cents,"
            " amount_due_cents, overage_micros, plan_id, issued_at, due_at, paid_at, charge_id, payment_intent_id,"
            " repayment_txn_id, attempts, last_error, created_at, updated_at, credit_applied_cents, credit_added_cents")


class InvoiceRecord(BaseModel):
    """A row of ``invoices`` without its HTML and PDF (those are fetched only when asked for)."""

    id: str
    account_id: str
    number: str
    period_key: str
    period_start: datetime
    period_end: datetime
    status: str
    currency: str
    subtotal_cents: int
    amount_due_cents: int
    overage_micros: int
    plan_id: str | None
    issued_at: datetime
    due_at: datetime
    paid_at: datetime | None
    charge_id: str | None
    payment_intent_id: str | None
    repayment_txn_id: str | None
    attempts: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    credit_applied_cents: int = 0
    credit_added_cents: int = 0

    @property
    def payment_due(self) -> bool:
        return self.status in DUE_STATUSES


class InvoiceRequest(BaseModel):
    """What the billing cycle asks to be invoiced (the workflow's input, validated)."""

    account_id: str
    period_start: datetime
    period_end: datetime
    period_key: str
    plan_id: str | None = None
    subscription_fee_cents: int | None = Field(default=None, ge=0)
    recurring_charges: tuple[RecurringCharge, ...] = ()
    overage_micros: int = Field(default=0, ge=0)
    adjustments: tuple[Adjustment, ...] = ()


async def period_usage(pool: AsyncConnectionPool, account_id: str, start: datetime,
                       end: datetime) -> tuple[ChannelUsage, ...]:
    """Usage per channel from the journal's usage rows in [start, end): quantity and credits, exact.

    The unit is the features' unit when every feature of the channel shares it (voice: minute), else empty."""
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT j.channel, sum(j.quantity) AS quantity, -sum(j.amount_micros) AS micros,"
            " array_agg(DISTINCT f.unit) FILTER (WHERE f.unit IS NOT NULL) AS units"
            " FROM journal j LEFT JOIN features f ON f.id = j.feature_id"
            " WHERE j.account_id = %s AND j.type = 'usage' AND j.created_at >= %s AND j.created_at < %s"
            " GROUP BY j.channel ORDER BY j.channel", (account_id, start, end))).fetchall()
    return tuple(ChannelUsage(channel=r["channel"] or "other", quantity=Decimal(r["quantity"] or 0),
                              credits=micros_to_credits(int(r["micros"])),
                              unit=r["units"][0] if r["units"] and len(r["units"]) == 1 else "")
                 for r in rows)


async def period_top_ups(pool: AsyncConnectionPool, account_id: str, start: datetime,
                         end: datetime) -> tuple[TopUpPaid, ...]:
    """Top-ups and auto-recharges credited in [start, end), with what was paid (from the charge's metadata)."""
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT type, amount_micros, description, metadata, created_at FROM journal"
            " WHERE account_id = %s AND type = ANY(%s) AND created_at >= %s AND created_at < %s"
            " ORDER BY created_at, seq", (account_id, list(TOPUP_TYPES), start, end))).fetchall()
    paid = []
    for r in rows:
        cents = (r["metadata"] or {}).get("amount_cents")
        if not isinstance(cents, int) or cents <= 0 or r["amount_micros"] % MICROS_PER_CREDIT:
            continue  # not a paid Stripe charge (e.g. a manual posting): nothing to show as paid
        description = "Auto-recharge" if r["type"] == "auto_recharge" else (r["description"] or "Top-up")
        paid.append(TopUpPaid(paid_at=r["created_at"], description=description[:200], amount_cents=cents,
                              credits=r["amount_micros"] // MICROS_PER_CREDIT))
    return tuple(paid)


async def find(pool: AsyncConnectionPool, account_id: str, period_key: str) -> InvoiceRecord | None:
    async with pool.connection() as conn:
        row = await (await conn.execute(f"SELECT {_COLUMNS} FROM invoices WHERE account_id = %s AND period_key = %s",
                                        (account_id, period_key))).fetchone()
    return InvoiceRecord(**row) if row else None


async def credit_balance(conn: Any, account_id: str) -> int:
    """The account's money credit carried from earlier invoices (cents): what they added less what they applied."""
    row = await (await conn.execute(
        "SELECT coalesce(sum(credit_added_cents - credit_applied_cents), 0) AS cents FROM invoices"
        " WHERE account_id = %s", (account_id,))).fetchone()
    return int(row["cents"])


async def draft_for(pool: AsyncConnectionPool, request: InvoiceRequest, *, catalog: PlanCatalog, seller_name: str,
                    issued_at: datetime, due_at: datetime, credit_balance_cents: int = 0) -> InvoiceDraft:
    """Gather the period's facts (usage, top-ups, billing profile) and draft the invoice (pure domain code)."""
    period = Period(anchor=request.period_start, index=0, start=request.period_start, end=request.period_end)
    bill_to, taxes = await profile.billing_details(pool, request.account_id)
    try:
        plan = catalog.get(request.plan_id) if request.plan_id else None
    except LookupError as exc:
        raise CreditflowError("unknown_plan", f"no plan {request.plan_id} in the catalog") from exc
    data = InvoiceInput(
        number=invoice_number(request.account_id, period), account_id=request.account_id, issued_at=issued_at,
        due_at=due_at, period=period, seller_name=seller_name, bill_to=bill_to, tax_registrations=taxes, plan=plan,
        subscription_fee_cents=request.subscription_fee_cents if plan else None,
        recurring_charges=request.recurring_charges, overage_credits=micros_to_credits(request.overage_micros),
        adjustments=request.adjustments,
        usage=await period_usage(pool, request.account_id, request.period_start, request.period_end),
        top_ups=await period_top_ups(pool, request.account_id, request.period_start, request.period_end),
        credit_balance_cents=credit_balance_cents)
    return draft_invoice(data)


async def prepare(pool: AsyncConnectionPool, request: InvoiceRequest, *, catalog: PlanCatalog, seller_name: str,
                  issued_at: datetime, due_days: int, render_processes: int = 0) -> tuple[InvoiceRecord, bool]:
    """The period's invoice: the stored one if it exists (``created`` False), else drafted, rendered and stored
    as ``draft``. Two concurrent calls store one row (the unique period key) and both return it. The PDF is
    rendered in ``render_processes`` other processes (0: in this one; ``render.pdf_from_html``)."""
    existing = await find(pool, request.account_id, request.period_key)
    if existing is not None:
        return existing, False
    # The credit balance an invoice applies is used up in the transaction that stores it, under a per-account lock
    # (the credit carried forward is applied once, never twice). Drafting and rendering happen outside that
    # transaction; if another invoice of the account changed the balance meanwhile, the draft is made again.
    while True:
        async with pool.connection() as conn:
            balance = await credit_balance(conn, request.account_id)
        draft = await draft_for(pool, request, catalog=catalog, seller_name=seller_name, issued_at=issued_at,
                                due_at=issued_at + timedelta(days=due_days), credit_balance_cents=balance)
        html = render_html(draft)
        pdf = await pdf_from_html(html, render_processes)
        async with pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 11))", (request.account_id,))
            stored = await (await conn.execute(
                f"SELECT {_COLUMNS} FROM invoices WHERE account_id = %s AND period_key = %s",
                (request.account_id, request.period_key))).fetchone()
            if stored is not None:  # a concurrent attempt stored it first
                return InvoiceRecord(**stored), False
            if await credit_balance(conn, request.account_id) != balance:
                continue
            row = await (await conn.execute(
                "INSERT INTO invoices (id, account_id, number, period_key, period_start, period_end, subtotal_cents,"
                " amount_due_cents, overage_micros, plan_id, draft, html, pdf, issued_at, due_at,"
                " credit_applied_cents, credit_added_cents)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                f" RETURNING {_COLUMNS}",
                (new_id("inv"), request.account_id, draft.number, request.period_key, draft.period_start,
                 draft.period_end, draft.subtotal_cents, draft.total_due_cents, request.overage_micros,
                 draft.plan_id, Jsonb(draft.model_dump(mode="json")), html, pdf, draft.issued_at, draft.due_at,
                 draft.credit_applied_cents, draft.credit_added_cents))).fetchone()
        assert row is not None
        return InvoiceRecord(**row), True


async def get(pool: AsyncConnectionPool, invoice_id: str, account_id: str | None = None) -> InvoiceRecord:
    """The invoice; with ``account_id``, another account's invoice is ``unknown_invoice`` like a missing one."""
    async with pool.connection() as conn:
        row = await (await conn.execute(
            f"SELECT {_COLUMNS} FROM invoices WHERE id = %s AND (%s::text IS NULL OR account_id = %s)",
            (invoice_id, account_id, account_id))).fetchone()
    if row is None:
        raise CreditflowError("unknown_invoice", "no such invoice")
    return InvoiceRecord(**row)


async def get_draft(pool: AsyncConnectionPool, invoice_id: str, account_id: str) -> dict[str, Any]:
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT draft FROM invoices WHERE id = %s AND account_id = %s",
                                        (invoice_id, account_id))).fetchone()
    if row is None:
        raise CreditflowError("unknown_invoice", "no such invoice")
    return dict(row["draft"])


async def get_pdf(pool: AsyncConnectionPool, invoice_id: str, account_id: str) -> tuple[str, bytes]:
    """(invoice number, PDF bytes) of one of the account's invoices."""
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT number, pdf FROM invoices WHERE id = %s AND account_id = %s",
                                        (invoice_id, account_id))).fetchone()
    if row is None:
        raise CreditflowError("unknown_invoice", "no such invoice")
    return row["number"], bytes(row["pdf"])


async def list_for(pool: AsyncConnectionPool, account_id: str, *, status: str | None = None,
                   limit: int = 100, cursor: Cursor | None = None) -> list[InvoiceRecord]:
    """The account's issued invoices (drafts are internal), newest first (``issued_at``, then id); ``cursor``: the
    page after or before an invoice (``creditflow.ledger.pagination``)."""
    async with pool.connection() as conn:
        exists = await (await conn.execute("SELECT 1 FROM accounts WHERE id = %s", (account_id,))).fetchone()
        if exists is None:
            raise CreditflowError("unknown_account", f"no account {account_id}")
        where, params, order, reverse = await keyset(conn, "invoices", account_id, cursor, time="issued_at")
        rows = await (await conn.execute(sql.SQL(
            f"SELECT {_COLUMNS} FROM invoices WHERE account_id = %s AND status <> 'draft'"
            " AND (%s::text IS NULL OR status = %s) AND {} ORDER BY {} LIMIT %s").format(where, order),
            (account_id, status, status, *params, limit))).fetchall()
    if reverse:
        rows.reverse()
    return [InvoiceRecord(**row) for row in rows]


async def mark_open(pool: AsyncConnectionPool, invoice_id: str) -> InvoiceRecord:
    """draft -> open (issued); any later status is left alone (a retried or repeated step)."""
    async with pool.connection() as conn:
        await conn.execute("UPDATE invoices SET status = 'open', updated_at = now() WHERE id = %s AND status = 'draft'",
                           (invoice_id,))
    return await get(pool, invoice_id)


async def mark_failed_attempt(pool: AsyncConnectionPool, invoice_id: str, *, attempts: int,
                              error: str) -> InvoiceRecord:
    """A charge attempt failed: ``past_due`` (unless it was paid meanwhile), with the attempt count and error."""
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE invoices SET status = 'past_due', attempts = greatest(attempts, %s), last_error = %s,"
            " updated_at = now() WHERE id = %s AND status IN ('open', 'past_due')",
            (attempts, error[:500], invoice_id))
    return await get(pool, invoice_id)


async def lock_payable(conn: Any, invoice_id: str) -> bool:
    """Lock the invoice's row for the caller's transaction; whether it can still be paid (open or past due)."""
    row = await (await conn.execute("SELECT status FROM invoices WHERE id = %s FOR UPDATE", (invoice_id,))).fetchone()
    return row is not None and row["status"] in ("open", "past_due")


async def mark_paid(conn: Any, invoice_id: str, *, charge_id: str | None, payment_intent_id: str | None,
                    repayment_txn_id: str | None, attempts: int | None = None) -> None:
    """open / past_due -> paid, once, on the caller's connection (in its transaction)."""
    await conn.execute(
        "UPDATE invoices SET status = 'paid', paid_at = now(), charge_id = %s, payment_intent_id = %s,"
        " repayment_txn_id = %s, attempts = greatest(attempts, coalesce(%s, attempts)), last_error = NULL,"
        " updated_at = now() WHERE id = %s AND status IN ('open', 'past_due')",
        (charge_id, payment_intent_id, repayment_txn_id, attempts, invoice_id))


async def pdf_attachment(pool: AsyncConnectionPool, account_id: str, invoice_id: str) -> tuple[str, bytes] | None:
    """For the notification service: (file name, PDF bytes) of the account's invoice, or None."""
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT number, pdf FROM invoices WHERE id = %s AND account_id = %s",
                                        (invoice_id, account_id))).fetchone()
    return (f"{row['number']}.pdf", bytes(row["pdf"])) if row else None
