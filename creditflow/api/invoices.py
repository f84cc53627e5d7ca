"""/api/v1/billing: the billing profile (invoice address, billing email, tax registrations) and the invoices.

The pages of the billing-overview seed: *Invoice Address*, *Invoice Notifications* (the billing email), *Tax
Settings* and *Invoices* ("Payments Due" = ``open`` and ``past_due`` invoices; "Order and invoice history" =
the rest). Same rules as every router: account keys act on their own account (``billing:read`` to read,
``billing:write`` to change), admin keys name the account; another tenant's invoice or tax registration is
answered ``404`` like one that does not exist; bad input is a ``422`` and changes nothing.
"""

from __future__ import annotations

import unicodedata
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from psycopg_pool import AsyncConnectionPool
from pydantic import AfterValidator, BaseModel, Field, StringConstraints

from creditflow.api.conventions import EndingBefore, StartingAfter, page_of
from creditflow.api.deps import get_gateway, get_pool, require, target_account
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import Principal, Scope
from creditflow.api.schemas import Email, Strict
from creditflow.api.topups import get_temporal
from creditflow.domain.invoices import InvoiceDraft
from creditflow.domain.topups import cents_to_usd
from creditflow.errors import CreditflowError
from creditflow.ids import check_id
from creditflow.invoicing import pay_now, profile, store
from creditflow.invoicing.profile import InvoiceAddress, TaxRegistrationRecord, check_country
from creditflow.invoicing.store import InvoiceRecord
from creditflow.ledger.pagination import Cursor
from creditflow.payments.gateway import StripeGateway

router = APIRouter(prefix="/api/v1/billing", tags=["invoices"], route_class=ExactRoute)

Reader = Annotated[Principal, Depends(require(Scope.BILLING_READ))]
Writer = Annotated[Principal, Depends(require(Scope.BILLING_WRITE))]
Admin = Annotated[Principal, Depends(require(Scope.ADMIN))]
Payer = Annotated[Principal, Depends(require(Scope.PAYMENTS_WRITE))]
Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]
AccountQuery = Annotated[str | None, Query(description="Admin keys only.")]

_ERRORS: dict[int | str, dict[str, str]] = {
    403: {"description": "insufficient_scope, forbidden (another account)"},
    404: {"description": "unknown_account, unknown_invoice, unknown_tax_registration"},
    422: {"description": "validation_error (`details.problems` names each bad field; nothing was changed), invalid_id"},
}


def _one_line(value: str) -> str:
    """Printed on invoices: no control characters (newlines, NUL...), surrounding spaces trimmed."""
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ValueError("must be one line of text without control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("is not valid Unicode") from exc
    return value.strip()


Line200 = Annotated[str, StringConstraints(max_length=200), AfterValidator(_one_line)]
Line100 = Annotated[str, StringConstraints(max_length=100), AfterValidator(_one_line)]
Line20 = Annotated[str, StringConstraints(max_length=20), AfterValidator(_one_line)]
Required100 = Annotated[str, StringConstraints(min_length=1, max_length=100), AfterValidator(_one_line),
                        AfterValidator(lambda v: _not_blank(v))]

def _not_blank(value: str) -> str:
    if not value:
        raise ValueError("must not be blank")
    return value


Country = Annotated[str, AfterValidator(check_country)]


class InvoiceAddressUpdate(Strict):
    """Fields left out keep their value; ``null`` (or ``""``) clears one."""

    account_id: str | None = Field(default=None, description="Admin keys only.")
    company: Line200 | None = None
    address_line1: Line200 | None = None
    address_line2: Line200 | None = None
    city: Line100 | None = None
    postal_code: Line20 | None = None
    region: Line100 | None = Field(default=None, description="Region, state or province.")
    country: Country | None = Field(default=None, description="ISO 3166-1 alpha-2, e.g. `DE`, `GB`, `US`.")
    po_number: Line100 | None = Field(default=None, description="Purchase order number printed on invoices.")


class BillingEmailUpdate(Strict):
    account_id: str | None = Field(default=None, description="Admin keys only.")
    billing_email: Email = Field(description="Invoices and other billing notifications are sent here.")


class BillingEmail(BaseModel):
    account_id: str
    billing_email: str


class TaxRegistrationCreate(Strict):
    account_id: str | None = Field(default=None, description="Admin keys only.")
    country: Country = Field(description="ISO 3166-1 alpha-2 code of the registering country.")
    description: Required100 = Field(description='What the number is, e.g. "European VAT number".')
    value: Required100 = Field(description="The number, e.g. DE123456789.")
    status: Literal["verified", "unverified"] | None = Field(
        default=None, description="Admin keys only; account keys add registrations as `unverified`.")


class TaxRegistrationStatusUpdate(Strict):
    account_id: str = Field(description="The account the registration belongs to.")
    status: Literal["verified", "unverified"]


class TaxRegistrationList(BaseModel):
    items: list[TaxRegistrationRecord]


class BillingProfile(BaseModel):
    account_id: str
    billing_email: str
    invoice_address: InvoiceAddress
    tax_registrations: list[TaxRegistrationRecord]


class InvoiceOut(BaseModel):
    """One invoice as the invoices page lists it. ``amount_usd`` is what is (or was) to be paid."""

    id: str
    number: str
    status: str = Field(description="open, paid, past_due, void, refunded or disputed.")
    payment_due: bool = Field(description="true for open and past_due invoices (the seed's Payments Due).")
    currency: str
    amount_usd: Decimal
    subtotal_usd: Decimal
    period_start: datetime
    period_end: datetime
    issued_at: datetime = Field(description="The invoice date.")
    due_at: datetime
    paid_at: datetime | None = Field(description="The payment date.")
    attempts: int = Field(description="Charge attempts so far.")
    payment_intent_id: str | None
    pdf_url: str
    credit_applied_usd: Decimal = Field(default=Decimal(0), description=(
        "the account's credit balance applied to this invoice (its 'Applied credit balance' line)"))
    credit_added_usd: Decimal = Field(default=Decimal(0), description=(
        "what this invoice added to the credit balance (its lines came to less than zero)"))


class PaymentsDue(BaseModel):
    count: int
    amount_usd: Decimal


class InvoiceList(BaseModel):
    items: list[InvoiceOut]
    payments_due: PaymentsDue
    credit_balance_usd: Decimal = Field(default=Decimal(0), description=(
        "money credit carried to the next invoices (each applies it as an 'Applied credit balance' line)"))
    has_more: bool = Field(default=False, description="More items beyond this page in the paging direction.")


class PayInvoiceRequest(Strict):
    account_id: str | None = Field(default=None, description="Required with an admin key.")
    payment_method_id: str | None = Field(default=None, description="A saved card; default: the default card.")


class InvoiceDetail(InvoiceOut):
    plan_id: str | None
    plan_name: str | None
    bill_to: dict[str, Any]
    tax_registrations: list[dict[str, Any]]
    lines: list[dict[str, Any]]
    usage: list[dict[str, Any]]
    usage_total_credits: Decimal
    top_ups: list[dict[str, Any]]
    credit_carried_forward_usd: Decimal


def _invoice_out(record: InvoiceRecord, admin: bool) -> InvoiceOut:
    pdf_url = f"/api/v1/billing/invoices/{record.id}/pdf" + (f"?account_id={record.account_id}" if admin else "")
    return InvoiceOut(id=record.id, number=record.number, status=record.status, payment_due=record.payment_due,
                      currency=record.currency, amount_usd=cents_to_usd(record.amount_due_cents),
                      subtotal_usd=cents_to_usd(record.subtotal_cents), period_start=record.period_start,
                      period_end=record.period_end, issued_at=record.issued_at, due_at=record.due_at,
                      paid_at=record.paid_at, attempts=record.attempts, payment_intent_id=record.payment_intent_id,
                      pdf_url=pdf_url, credit_applied_usd=cents_to_usd(record.credit_applied_cents),
                      credit_added_usd=cents_to_usd(record.credit_added_cents))


def _invoice_id(invoice_id: str) -> str:
    return check_id(invoice_id, "inv", "invoice id")


def _registration_id(registration_id: str) -> str:
    return check_id(registration_id, "txr", "tax registration id")


# --- profile -----------------------------------------------------------------------------------------


@router.get("/profile", response_model=BillingProfile, response_class=ExactJSONResponse, responses=_ERRORS)
async def get_billing_profile(principal: Reader, pool: Pool, account_id: AccountQuery = None) -> ExactJSONResponse:
    """Everything printed on the account's next invoice: billing email, invoice address, tax registrations."""
    account = target_account(principal, account_id)
    return respond(BillingProfile(account_id=account, billing_email=await profile.get_billing_email(pool, account),
                                  invoice_address=await profile.get_address(pool, account),
                                  tax_registrations=await profile.list_tax_registrations(pool, account)))


@router.get("/invoice-address", response_model=InvoiceAddress, response_class=ExactJSONResponse, responses=_ERRORS)
async def get_invoice_address(principal: Reader, pool: Pool, account_id: AccountQuery = None) -> ExactJSONResponse:
    """The invoice address (empty fields until set)."""
    return respond(await profile.get_address(pool, target_account(principal, account_id)))


@router.put("/invoice-address", response_model=InvoiceAddress, response_class=ExactJSONResponse, responses=_ERRORS)
async def put_invoice_address(req: InvoiceAddressUpdate, principal: Writer, pool: Pool) -> ExactJSONResponse:
    """Set the fields named in the body (``null`` clears one); invoices drafted from now on print it."""
    account = target_account(principal, req.account_id)
    values: dict[str, Any] = {}
    for field in req.model_fields_set - {"account_id"}:
        value = getattr(req, field)
        values[field] = (value or None) if field == "country" else (value or "")
    return respond(await profile.put_address(pool, account, values))


@router.get("/billing-email", response_model=BillingEmail, response_class=ExactJSONResponse, responses=_ERRORS)
async def get_billing_email(principal: Reader, pool: Pool, account_id: AccountQuery = None) -> ExactJSONResponse:
    """Where invoices and billing notifications are sent."""
    account = target_account(principal, account_id)
    return respond(BillingEmail(account_id=account, billing_email=await profile.get_billing_email(pool, account)))


@router.put("/billing-email", response_model=BillingEmail, response_class=ExactJSONResponse, responses=_ERRORS)
async def put_billing_email(req: BillingEmailUpdate, principal: Writer, pool: Pool) -> ExactJSONResponse:
    """Change the billing email (an override set in ``/notification-channels`` still takes precedence there)."""
    account = target_account(principal, req.account_id)
    return respond(BillingEmail(account_id=account,
                                billing_email=await profile.set_billing_email(pool, account, req.billing_email)))


# --- tax registrations -------------------------------------------------------------------------------


@router.get("/tax-registrations", response_model=TaxRegistrationList, response_class=ExactJSONResponse,
            responses=_ERRORS)
async def list_tax_registrations(principal: Reader, pool: Pool, account_id: AccountQuery = None) -> ExactJSONResponse:
    """The account's tax registrations, oldest first."""
    items = await profile.list_tax_registrations(pool, target_account(principal, account_id))
    return respond(TaxRegistrationList(items=items))


@router.post("/tax-registrations", response_model=TaxRegistrationRecord, response_class=ExactJSONResponse,
             status_code=201, responses=_ERRORS)
async def add_tax_registration(req: TaxRegistrationCreate, principal: Writer, pool: Pool) -> ExactJSONResponse:
    """Add a registration (201). The same country and value again answers the existing one (200) unchanged.
    Only an admin key may set ``status``; account keys add registrations as ``unverified``."""
    account = target_account(principal, req.account_id)
    if req.status is not None and not principal.is_admin:
        raise CreditflowError("forbidden", "only an operator (admin key) sets the status of a tax registration")
    record, created = await profile.add_tax_registration(pool, account, country=req.country,
                                                         description=req.description, value=req.value,
                                                         status=req.status or "unverified")
    return respond(record, 201 if created else 200)


@router.patch("/tax-registrations/{registration_id}", response_model=TaxRegistrationRecord,
              response_class=ExactJSONResponse, responses=_ERRORS)
async def set_tax_registration_status(registration_id: str, req: TaxRegistrationStatusUpdate, principal: Admin,
                                      pool: Pool) -> ExactJSONResponse:
    """Admin only: mark a registration ``verified`` (checked by an operator) or back to ``unverified``."""
    account = target_account(principal, req.account_id)
    return respond(await profile.set_tax_registration_status(pool, account, _registration_id(registration_id),
                                                             req.status))


class Deleted(BaseModel):
    id: str
    deleted: bool


@router.delete("/tax-registrations/{registration_id}", response_model=Deleted, response_class=ExactJSONResponse,
               responses=_ERRORS)
async def delete_tax_registration(registration_id: str, principal: Writer, pool: Pool,
                                  account_id: AccountQuery = None) -> ExactJSONResponse:
    """Remove a registration; invoices already issued keep printing it."""
    account = target_account(principal, account_id)
    await profile.delete_tax_registration(pool, account, _registration_id(registration_id))
    return respond({"id": registration_id, "deleted": True})


# --- invoices ----------------------------------------------------------------------------------------


@router.get("/invoices", response_model=InvoiceList, response_class=ExactJSONResponse, responses=_ERRORS)
async def list_invoices(principal: Reader, pool: Pool, account_id: AccountQuery = None,
                        status: Annotated[Literal["open", "paid", "past_due", "void", "refunded", "disputed"] | None,
                                          Query()] = None,
                        limit: Annotated[int, Query(ge=1, le=500)] = 100,
                        starting_after: StartingAfter = None, ending_before: EndingBefore = None) -> ExactJSONResponse:
    """Issued invoices, newest first, each with its PDF link. ``payments_due`` sums the invoices still to pay
    (``open`` and ``past_due``: the seed's *Payments Due*); the others are the order and invoice history.
    Pages with ``starting_after`` / ``ending_before`` (an invoice id) and ``has_more``."""
    account = target_account(principal, account_id)
    cursor = Cursor(starting_after, ending_before)
    records, has_more = page_of(await store.list_for(pool, account, status=status, limit=limit + 1, cursor=cursor),
                                limit, cursor)
    due = [r for r in await store.list_for(pool, account, limit=10_000) if r.payment_due]
    async with pool.connection() as conn:
        carried = await store.credit_balance(conn, account)
    return respond(InvoiceList(items=[_invoice_out(r, principal.is_admin) for r in records], has_more=has_more,
                               payments_due=PaymentsDue(count=len(due), amount_usd=cents_to_usd(
                                   sum(r.amount_due_cents for r in due))),
                               credit_balance_usd=cents_to_usd(carried)))


@router.post("/invoices/{invoice_id}/pay", response_model=InvoiceOut, response_class=ExactJSONResponse,
             responses={**_ERRORS, 202: {"model": InvoiceOut,
                                         "description": "not decided yet: the charge goes on; read the invoice later"},
                        402: {"description": "card_declined / authentication_required / no_payment_method"},
                        409: {"description": "invoice_not_payable (void, refunded or disputed)"}})
async def pay_invoice(invoice_id: str, req: PayInvoiceRequest, principal: Payer, pool: Pool, request: Request,
                      gateway: Annotated[StripeGateway, Depends(get_gateway)]) -> ExactJSONResponse:
    """Pay an open or past-due invoice now with the default card or ``payment_method_id`` (seed 002, *Payments Due*).
    One payment per invoice: a paid invoice is answered as it is, and the attempt goes through the invoice's
    workflow, which checks its earlier charges with Stripe first (``creditflow.invoicing.pay_now``)."""
    account = target_account(principal, req.account_id)
    record = await store.get(pool, _invoice_id(invoice_id), account)
    if record.status == "paid":
        return respond(_invoice_out(record, principal.is_admin))
    pay_now.check_payable(record)
    paid = await pay_now.pay_now(pool, gateway, await get_temporal(request), record, req.payment_method_id,
                                 wait=request.app.state.settings.topup_answer_timeout_seconds)
    if paid is None:
        return respond(_invoice_out(await store.get(pool, record.id, account), principal.is_admin), 202)
    return respond(_invoice_out(paid, principal.is_admin))


@router.get("/invoices/{invoice_id}", response_model=InvoiceDetail, response_class=ExactJSONResponse,
            responses=_ERRORS)
async def get_invoice(invoice_id: str, principal: Reader, pool: Pool,
                      account_id: AccountQuery = None) -> ExactJSONResponse:
    """One invoice with its lines, bill-to, tax registrations, usage summary and top-ups, as printed."""
    account = target_account(principal, account_id)
    record = await store.get(pool, _invoice_id(invoice_id), account)
    draft = InvoiceDraft.model_validate(await store.get_draft(pool, record.id, account))
    doc = draft.model_dump(mode="python")
    detail = InvoiceDetail(
        **_invoice_out(record, principal.is_admin).model_dump(), plan_id=draft.plan_id, plan_name=draft.plan_name,
        bill_to=doc["bill_to"], tax_registrations=list(doc["tax_registrations"]),
        lines=[{**line, "amount_usd": cents_to_usd(line["amount_cents"])} for line in doc["lines"]],
        usage=list(doc["usage"]), usage_total_credits=draft.usage_total_credits,
        top_ups=[{**t, "amount_usd": cents_to_usd(t["amount_cents"])} for t in doc["top_ups"]],
        credit_carried_forward_usd=cents_to_usd(draft.credit_carried_forward_cents))
    return respond(detail)


@router.get("/invoices/{invoice_id}/pdf", response_class=Response,
            responses={**_ERRORS, 200: {"content": {"application/pdf": {}}, "description": "The invoice PDF."}})
async def get_invoice_pdf(invoice_id: str, principal: Reader, pool: Pool, account_id: AccountQuery = None) -> Response:
    """The invoice as a PDF download (the document rendered when it was issued)."""
    account = target_account(principal, account_id)
    number, pdf = await store.get_pdf(pool, _invoice_id(invoice_id), account)
    return Response(content=pdf, media_type=store.PDF_CONTENT_TYPE,
                    headers={"Content-Disposition": f'attachment; filename="{number}.pdf"'})
