"""/api/v1/billing/payment-methods: an account's saved cards on Stripe (list, attach, default, detach)."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.api.deps import get_gateway, get_pool, require, target_account
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import Principal, Scope
from creditflow.api.schemas import PaymentMethodAttach
from creditflow.api.topups import get_temporal
from creditflow.invoicing import pay_now
from creditflow.payments import methods
from creditflow.payments.gateway import StripeGateway
from creditflow.payments.methods import PaymentMethod

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1/billing/payment-methods", tags=["payment methods"], route_class=ExactRoute)

Reader = Annotated[Principal, Depends(require(Scope.BILLING_READ))]
Writer = Annotated[Principal, Depends(require(Scope.PAYMENTS_WRITE))]
Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]
Gateway = Annotated[StripeGateway, Depends(get_gateway)]
AccountQuery = Annotated[str | None, Query(description="Admin keys only.")]

_ERRORS: dict[int | str, dict[str, str]] = {
    404: {"description": "unknown_payment_method (malformed, unknown, or another account's) / unknown_account"},
    503: {"description": "payment_provider_unavailable (Stripe unreachable after retries; nothing changed)"},
}


class PaymentMethodList(BaseModel):
    items: list[PaymentMethod]


class PaymentMethodDetached(BaseModel):
    id: str
    detached: bool


@router.get("", response_model=PaymentMethodList, response_class=ExactJSONResponse, responses=_ERRORS)
async def list_payment_methods(principal: Reader, pool: Pool, gateway: Gateway,
                               account_id: AccountQuery = None) -> ExactJSONResponse:
    """The account's saved cards (newest first) and which one is the default."""
    items = await methods.list_methods(pool, gateway, target_account(principal, account_id))
    return respond(PaymentMethodList(items=items))


@router.post("", response_model=PaymentMethod, response_class=ExactJSONResponse, status_code=201,
             responses={**_ERRORS, 402: {"description": "card_declined (`details.decline_code`)"}})
async def attach_payment_method(req: PaymentMethodAttach, principal: Writer, pool: Pool,
                                gateway: Gateway, request: Request) -> ExactJSONResponse:
    """Save a card created client-side. The account's Stripe customer is created on first use. Attaching
    a card the account already has changes nothing (safe to retry)."""
    account_id = target_account(principal, req.account_id)
    card = await methods.attach_method(pool, gateway, account_id, req.payment_method_id, req.set_default)
    await pay_now.card_saved(pool, gateway, lambda: get_temporal(request), account_id, card.id)  # seed 002
    return respond(card, 201)


@router.post("/{payment_method_id}/default", response_model=PaymentMethod, response_class=ExactJSONResponse,
             responses=_ERRORS)
async def set_default_payment_method(payment_method_id: str, principal: Writer, pool: Pool, gateway: Gateway,
                                     account_id: AccountQuery = None) -> ExactJSONResponse:
    """Make this card the one charged by default (top-ups, auto-recharge, invoices)."""
    account = target_account(principal, account_id)
    return respond(await methods.set_default_method(pool, gateway, account, payment_method_id))


@router.delete("/{payment_method_id}", response_model=PaymentMethodDetached, response_class=ExactJSONResponse,
               responses=_ERRORS)
async def detach_payment_method(payment_method_id: str, principal: Writer, pool: Pool, gateway: Gateway,
                                account_id: AccountQuery = None) -> ExactJSONResponse:
    """Remove a saved card (if it was the default, the account has no default afterwards)."""
    account = target_account(principal, account_id)
    card = await methods.detach_method(pool, gateway, account, payment_method_id)
    return respond(PaymentMethodDetached(id=card.id, detached=True))
