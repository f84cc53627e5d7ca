"""Pay an issued invoice now (seed 002, *Payments Due*): the customer's "pay" action and a card just saved.

Both go through the invoice's own workflow, ``invoice:{account_id}:{period_key}``, so the rules of the scheduled
attempts hold: signal ``pay_now`` (signal-with-start: a closed run is started again, finds the stored invoice and
makes one attempt numbered after the earlier ones), which first reads every earlier attempt's PaymentIntent back from
Stripe (one that succeeded late pays the invoice; none is made while one may still succeed), records the charge
(``stripe_charges`` kind ``invoice``, request id ``{invoice id}:{n}``) before calling Stripe, and settles the invoice
once. A paid invoice is answered as it is: paying twice never makes a second PaymentIntent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from psycopg_pool import AsyncConnectionPool

from creditflow.client import CreditflowClient
from creditflow.errors import CreditflowError
from creditflow.invoicing import store
from creditflow.invoicing.store import DUE_STATUSES, InvoiceRecord
from creditflow.payments import methods
from creditflow.payments.gateway import StripeGateway
from workflows.contract import InvoiceWorkflowInput

log = logging.getLogger(__name__)
POLL_SECONDS = 0.2


def workflow_input(record: InvoiceRecord) -> InvoiceWorkflowInput:
    """The stored invoice's workflow input: prepare finds the row by its period key, so only the key fields matter;
    one attempt now (the invoice's retry schedule is not started again)."""
    return InvoiceWorkflowInput(account_id=record.account_id, period_start=record.period_start,
                                period_end=record.period_end, period_key=record.period_key, plan_id=record.plan_id,
                                overage_micros=record.overage_micros, charge_attempts=1)


def check_payable(record: InvoiceRecord) -> None:
    """Only an open or past-due invoice can be paid (``invoice_not_payable`` for void, refunded, disputed)."""
    if record.status not in DUE_STATUSES:
        raise CreditflowError("invoice_not_payable", f"a {record.status} invoice cannot be paid",
                              details={"status": record.status})


async def pay_now(pool: AsyncConnectionPool, gateway: StripeGateway, client: CreditflowClient, record: InvoiceRecord,
                  payment_method_id: str | None, *, wait: float) -> InvoiceRecord | None:
    """Charge ``record`` now with the card named (default: the default card) and wait up to ``wait`` seconds.

    Returns the invoice once paid (at once if it already was); None if not decided in time. A failed attempt is
    raised as its code (``card_declined``, ``authentication_required``, ...); ``unknown_payment_method`` for a card that
    is not the account's, ``no_payment_method`` without one, ``invoice_not_payable`` for a void, refunded or disputed
    invoice."""
    if record.status == "paid":
        return record
    check_payable(record)
    cards = await methods.list_methods(pool, gateway, record.account_id)
    if payment_method_id is not None and not any(c.id == payment_method_id for c in cards):
        raise CreditflowError("unknown_payment_method", "no such payment method")
    if payment_method_id is None and not any(c.is_default for c in cards):
        raise CreditflowError("no_payment_method", "no default card: save a card or name one (payment_method_id)")
    await client.pay_invoice_now(workflow_input(record), payment_method_id)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECONDS)
        now = await store.get(pool, record.id, record.account_id)
        if now.status == "paid":
            return now
        if now.attempts > record.attempts:
            code, _, message = (now.last_error or "payment_failed").partition(": ")
            raise CreditflowError(code, message or "the charge failed", details={"invoice_id": record.id,
                                                                                 "attempts": now.attempts})
    return None


async def retry_past_due(pool: AsyncConnectionPool, gateway: StripeGateway, client: CreditflowClient,
                         account_id: str, payment_method_id: str) -> list[str]:
    """A card was saved: try the account's past-due invoices with it now (not waiting for the outcome). A failure to
    reach the workflows is logged, never the card's error: the scheduled retries still run."""
    started = []
    for record in await store.list_for(pool, account_id, status="past_due"):
        try:
            await pay_now(pool, gateway, client, record, payment_method_id, wait=0)
        except CreditflowError as exc:
            log.warning("past-due invoice %s not retried with the new card: %s", record.id, exc.code)
            continue
        started.append(record.id)
    return started


async def card_saved(pool: AsyncConnectionPool, gateway: StripeGateway,
                     temporal: Callable[[], Awaitable[CreditflowClient]], account_id: str,
                     payment_method_id: str) -> list[str]:
    """Seed 002: a card just saved (through the API or the hosted page) pays the account's past-due invoices.
    Temporal is reached only when there is one; if it cannot be, the card stays saved and the invoices' scheduled
    retries still run (logged, never the caller's error)."""
    if not await store.list_for(pool, account_id, status="past_due", limit=1):
        return []
    try:
        return await retry_past_due(pool, gateway, await temporal(), account_id, payment_method_id)
    except CreditflowError as exc:
        log.warning("past-due invoices of %s not retried: %s", account_id, exc.code)
        return []
