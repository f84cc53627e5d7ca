"""/api/v1/billing/refunds: refund unused purchased credits through Stripe (the ``RefundWorkflow`` does the work).

Admin keys may use every reason; account keys with ``billing:write`` only ``requested_by_customer``. The API
validates the request, then starts ``refund:{account_id}:{request_id}`` with update-with-start (a running one
is joined, so a repeated request never refunds twice) and waits a bounded time for its answer.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from creditflow.api.conventions import EndingBefore, IdempotencyKey, StartingAfter, idempotency_key, page_of
from creditflow.api.deps import get_app_settings, get_pool, require, target_account
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import Principal, Scope
from creditflow.api.schemas import Amount, PaymentIntentId, Strict, Token
from creditflow.api.topups import get_temporal
from creditflow.client import refund_workflow_id
from creditflow.config import Settings
from creditflow.domain.refunds import RefundError, check_credits, parse_reason
from creditflow.domain.topups import cents_to_usd
from creditflow.errors import CreditflowError
from creditflow.ids import check_id
from creditflow.ledger.pagination import Cursor
from creditflow.payments import refunds
from creditflow.payments.customers import stored_customer
from workflows.contract import REFUND_FAILED, REFUND_PENDING, RefundInput, RefundOutcome, RefundTerms

router = APIRouter(prefix="/api/v1/billing", tags=["refunds"], route_class=ExactRoute)

Reader = Annotated[Principal, Depends(require(Scope.BILLING_READ))]
Writer = Annotated[Principal, Depends(require(Scope.PAYMENTS_WRITE))]
Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]
AppSettings = Annotated[Settings, Depends(get_app_settings)]


class RefundRequest(Strict):
    account_id: str | None = Field(default=None, description="Required with an admin key; implied by an account key.")
    purchase_transaction_id: str | None = Field(default=None, description="The purchase (txn_...) to refund.")
    payment_intent_id: PaymentIntentId | None = Field(default=None,
                                                      description="Or the top-up's PaymentIntent (pi_...).")
    credits: Amount | None = Field(default=None, description="Whole credits; default: all that remains of it.")
    reason: Token | None = Field(default=None, description="requested_by_customer (default); duplicate_charge and "
                                                         "billing_error are for admin keys.")
    request_id: Token | None = Field(default=None, description="Idempotency: the same request id never refunds "
                                                               "twice. Or the Idempotency-Key header.")


class RefundResponse(BaseModel):
    status: str = Field(description="succeeded, or pending (still deciding, or Stripe has not settled the refund: "
                                    "ask again with the same request_id)")
    request_id: str
    refund_id: str | None = None
    credits: int | None = None
    amount_usd: Decimal | None = None
    transaction_id: str | None = None
    purchase_transaction_id: str | None = None
    payment_intent_id: str | None = None
    stripe_refund_id: str | None = None
    balance: Decimal | None = None
    workflow_id: str | None = Field(default=None, description="Set on a 202 answered before the workflow decided.")
    credit_system: str | None = Field(default=None, description="The named credit system the refunded top-up "
                                                                "funded; `balance` is that system's. Absent for the "
                                                                "wallet.")


class RefundItem(BaseModel):
    id: str
    request_id: str
    status: str
    reason: str
    credits: int
    amount_usd: Decimal
    purchase_transaction_id: str
    payment_intent_id: str
    transaction_id: str | None
    stripe_refund_id: str | None
    failure_code: str | None
    created_at: datetime
    updated_at: datetime
    credit_system: str | None = Field(default=None, description="The named credit system of the refunded top-up "
                                                                "(absent: the wallet).")


class RefundList(BaseModel):
    items: list[RefundItem]
    has_more: bool = Field(default=False, description="More items beyond this page in the paging direction.")


def _body(outcome: RefundOutcome) -> dict[str, object]:
    if outcome.status == REFUND_FAILED:
        details: dict[str, object] = {"request_id": outcome.request_id}
        if outcome.refund_id:
            details.update(refund_id=outcome.refund_id, status=REFUND_FAILED,
                           reversal_transaction_id=outcome.reversal_transaction_id)
        raise CreditflowError(outcome.error_code or "refund_failed", outcome.error_message, details=details)
    return RefundResponse(
        status=outcome.status, request_id=outcome.request_id, refund_id=outcome.refund_id, credits=outcome.credits,
        amount_usd=cents_to_usd(outcome.amount_cents) if outcome.amount_cents is not None else None,
        transaction_id=outcome.transaction_id, purchase_transaction_id=outcome.purchase_transaction_id,
        payment_intent_id=outcome.payment_intent_id, stripe_refund_id=outcome.stripe_refund_id,
        balance=outcome.balance).model_dump(exclude_none=True)


@router.post("/refunds", response_model=RefundResponse, response_class=ExactJSONResponse,
             responses={202: {"model": RefundResponse,
                              "description": "not decided within the wait, or Stripe has not settled the refund "
                                             "(credits stay reserved): `status: pending`; repeat the request"},
                        403: {"description": "forbidden (an admin-only reason with an account key)"},
                        404: {"description": "unknown_purchase / unknown_account"},
                        409: {"description": "idempotency_conflict (request_id used for another refund)"},
                        422: {"description": "not_refundable / refund_window_expired / refund_exceeds_remaining / "
                                             "invalid_amount / payment_request_invalid (Stripe refused; released)"},
                        503: {"description": "workflow_unavailable"}})
async def create_refund(req: RefundRequest, principal: Writer, pool: Pool, settings: AppSettings,
                        request: Request, key: IdempotencyKey = None) -> ExactJSONResponse:
    """Refund unused credits of one top-up (within 30 days; never bonus or plan credits, never more than what
    remains of that purchase or was paid). 1 credit = 1 cent is refunded to the card through Stripe."""
    account_id = target_account(principal, req.account_id)
    request_id = idempotency_key(key, req.request_id, "request_id")
    try:
        reason = parse_reason(req.reason, is_admin=principal.is_admin)
        credits = None
        if req.credits is not None:
            if req.credits != req.credits.to_integral_value():
                raise RefundError("invalid_amount", "credits must be whole credits")
            credits = check_credits(int(req.credits))
    except RefundError as exc:
        raise CreditflowError(exc.code, exc.message) from exc
    if (req.purchase_transaction_id is None) == (req.payment_intent_id is None):
        raise CreditflowError("validation_error", "name the purchase: purchase_transaction_id or payment_intent_id")
    if req.purchase_transaction_id is not None:
        check_id(req.purchase_transaction_id, "txn", "purchase_transaction_id")
    await stored_customer(pool, account_id)  # unknown_account before any workflow starts
    input = RefundInput(account_id=account_id, request_id=request_id, requested_by=(
        "admin" if principal.is_admin else "customer"), terms=RefundTerms(
        purchase_transaction_id=req.purchase_transaction_id, payment_intent_id=req.payment_intent_id,
        credits=credits, reason=reason.value))
    client = await get_temporal(request)
    outcome = await client.refund(input, wait=timedelta(seconds=settings.topup_answer_timeout_seconds))
    if outcome is None:
        return respond({"status": REFUND_PENDING, "request_id": request_id,
                        "workflow_id": refund_workflow_id(account_id, request_id)}, 202)
    # Stripe accepted the refund without settling it: pending (202) until Stripe's final word.
    body = _body(outcome)
    if outcome.payment_intent_id is not None:
        system = await refunds.funded_system(pool, account_id, outcome.payment_intent_id)
        if system is not None:
            body["credit_system"] = system
    return respond(body, 202 if outcome.status == REFUND_PENDING else 200)


@router.get("/refunds", response_model=RefundList, response_class=ExactJSONResponse)
async def list_refunds(principal: Reader, pool: Pool, limit: Annotated[int, Query(ge=1, le=500)] = 50,
                       account_id: Annotated[str | None, Query(description="Admin keys only.")] = None,
                       starting_after: StartingAfter = None, ending_before: EndingBefore = None
                       ) -> ExactJSONResponse:
    """The account's refunds, newest first, with their status (reserved, refunding, pending, succeeded, failed).
    Pages with ``limit`` and ``starting_after`` / ``ending_before`` (an item id); ``has_more``."""
    cursor = Cursor(starting_after, ending_before)
    rows, has_more = page_of(await refunds.list_refunds(pool, target_account(principal, account_id), limit + 1,
                                                        cursor), limit, cursor)
    items = [RefundItem(id=r.id, request_id=r.request_id, status=r.status, reason=r.reason, credits=r.credits,
                        amount_usd=r.amount_usd, purchase_transaction_id=f"txn_{r.purchase_txn_id.hex}",
                        payment_intent_id=r.payment_intent_id, transaction_id=r.transaction_id,
                        stripe_refund_id=r.stripe_refund_id, failure_code=r.failure_code, created_at=r.created_at,
                        updated_at=r.updated_at) for r in rows]
    # ``credit_system`` only on refunds of a named system's top-ups: a wallet refund is listed exactly as before.
    systems = await refunds.refunded_systems(pool, rows)
    return respond({"items": [{**i.model_dump(exclude={"credit_system"}),
                               **({"credit_system": systems[i.id]} if i.id in systems else {})} for i in items],
                    "has_more": has_more})
