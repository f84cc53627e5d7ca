"""An account's saved cards: list, attach, set the default, detach.

Tenant isolation: a payment method is acted on only when Stripe says it belongs to this account's
customer. An id that is malformed, unknown to Stripe, or attached to any other customer is
``unknown_payment_method`` (404), the same answer for all three so ids of other tenants cannot be probed.
Stripe refuses to attach a card that belongs to another customer, but localstripe silently moves it,
so the check is ours, before every call that changes something.
"""

from __future__ import annotations

import re

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.errors import CreditflowError
from creditflow.payments.customers import ensure_customer, stored_customer
from creditflow.payments.gateway import CardDetails, StripeGateway

PAYMENT_METHOD_ID = re.compile(r"^pm_[A-Za-z0-9]{1,200}$")


class PaymentMethod(BaseModel):
    """A saved card as the API returns it."""

    id: str
    brand: str
    last4: str
    exp_month: int
    exp_year: int
    name_on_card: str | None
    is_default: bool


def _view(card: CardDetails, default_id: str | None) -> PaymentMethod:
    return PaymentMethod(id=card.id, brand=card.brand, last4=card.last4, exp_month=card.exp_month,
                         exp_year=card.exp_year, name_on_card=card.name_on_card, is_default=card.id == default_id)


def _unknown() -> CreditflowError:
    # The gateway's wording for an id Stripe does not know: the two cases must not be told apart.
    return CreditflowError("unknown_payment_method", "no such payment method")


async def _owned(gateway: StripeGateway, customer_id: str | None, payment_method_id: str) -> CardDetails:
    """The card, if it is attached to ``customer_id``; otherwise ``unknown_payment_method``."""
    if customer_id is None or not PAYMENT_METHOD_ID.match(payment_method_id):
        raise _unknown()
    card = await gateway.retrieve_payment_method(payment_method_id)
    if card.customer_id != customer_id:
        raise _unknown()
    return card


async def list_methods(pool: AsyncConnectionPool, gateway: StripeGateway, account_id: str) -> list[PaymentMethod]:
    """Saved cards; an account without a Stripe customer has none (listing never creates one)."""
    customer_id = await stored_customer(pool, account_id)
    if customer_id is None:
        return []
    cards = await gateway.list_payment_methods(customer_id)
    default_id = await gateway.default_payment_method(customer_id) if cards else None
    return [_view(card, default_id) for card in cards]


async def attach_method(pool: AsyncConnectionPool, gateway: StripeGateway, account_id: str,
                        payment_method_id: str, set_default: bool | None = None) -> PaymentMethod:
    """Attach a card (created client-side with Stripe.js) to the account's customer, creating the customer
    on first use. ``set_default`` None makes it the default only if the account has none yet.

    Attaching a card the account already has is a no-op (safe to retry)."""
    if not PAYMENT_METHOD_ID.match(payment_method_id):
        raise _unknown()
    customer_id = await ensure_customer(pool, gateway, account_id)
    card = await gateway.retrieve_payment_method(payment_method_id)
    if card.customer_id is not None and card.customer_id != customer_id:
        raise _unknown()
    if card.customer_id is None:
        card = await gateway.attach_payment_method(payment_method_id, customer_id)
    default_id = await gateway.default_payment_method(customer_id)
    if set_default or (set_default is None and default_id is None):
        if default_id != card.id:
            await gateway.set_default_payment_method(customer_id, card.id)
        default_id = card.id
    return _view(card, default_id)


async def set_default_method(pool: AsyncConnectionPool, gateway: StripeGateway, account_id: str,
                             payment_method_id: str) -> PaymentMethod:
    customer_id = await stored_customer(pool, account_id)
    card = await _owned(gateway, customer_id, payment_method_id)
    assert customer_id is not None
    await gateway.set_default_payment_method(customer_id, card.id)
    return _view(card, card.id)


async def detach_method(pool: AsyncConnectionPool, gateway: StripeGateway, account_id: str,
                        payment_method_id: str) -> PaymentMethod:
    """Remove a card. If it was the default, the default is cleared first, so a failure between the two
    calls leaves an attached card that is not the default (a retry finishes the job), never a default
    that points at a detached card."""
    customer_id = await stored_customer(pool, account_id)
    card = await _owned(gateway, customer_id, payment_method_id)
    assert customer_id is not None
    if await gateway.default_payment_method(customer_id) == card.id:
        await gateway.set_default_payment_method(customer_id, None)
    await gateway.detach_payment_method(card.id)
    return _view(card, None)
