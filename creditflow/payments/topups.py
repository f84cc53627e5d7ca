"""Top-up charges, exactly once: the ``stripe_charges`` row, the PaymentIntent, the ledger credit.

Why a row of our own: localstripe ignores Stripe idempotency keys and Stripe keeps them only 24 hours, so
the charge must be guarded by our records. The sequence, each step safe to repeat:

1. ``record_charge`` writes the row (unique per account and request id) before Stripe is called, with the
   card resolved once (the one asked for, after an ownership check, else the customer's default, else none:
   the client-secret path). A second request with the same id and other terms is ``idempotency_conflict``.
2. ``charge`` locks the row, and if a PaymentIntent is recorded retrieves it; otherwise it creates one
   (confirmed off-session with a saved card) and records its id in the same transaction as the lock.
   A decline is recorded (``failed`` with the codes) and raised as ``card_declined``.
3. ``credit`` posts a ``purchase`` keyed ``sys:topup:{payment_intent_id}`` (the ledger replays a repeated key)
   and marks the row ``succeeded`` with the transaction id. A top-up naming a credit system (``credit_system_id``)
   posts it, with the lot's price, to that system's ledger sub-account (docs/credit-systems.md).

Known gap (as for customers): if the process dies after Stripe created a PaymentIntent and before the
row's commit, a retry creates a second one on localstripe; on Stripe the idempotency key
``creditflow:topup:{charge_id}`` returns the first within 24 hours.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from psycopg import sql
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.domain.charges import KIND_AUTO_RECHARGE, KIND_INVOICE, KIND_TOPUP  # noqa: F401 - re-exported
from creditflow.domain.lots import LotSource
from creditflow.domain.money import credits_to_micros
from creditflow.domain.topups import cents_to_usd
from creditflow.errors import CreditflowError
from creditflow.ids import new_id
from creditflow.ledger import postings
from creditflow.ledger.credit_systems import ensure_sub_account, sub_account_id
from creditflow.ledger.pagination import Cursor, keyset
from creditflow.payments.customers import ensure_customer
from creditflow.payments.gateway import ACCOUNT_METADATA_KEY, PaymentIntentState, StripeGateway
from creditflow.payments.methods import PAYMENT_METHOD_ID

CHARGE_METADATA_KEY = "creditflow_charge_id"
REQUEST_METADATA_KEY = "creditflow_request_id"
PURCHASE_BOOK = "system:payments_clearing"
# The outbox kind of a PaymentIntent that succeeded after its charge's workflow recorded failure or gave up, for
# every kind (``creditflow/payments/late.py``). ``stripe.recharge.succeeded_late``, written for auto-recharges
# before, is applied the same way.
PAYMENT_SUCCEEDED_LATE = "stripe.payment.succeeded_late"


class ChargeRecord(BaseModel):
    """A row of ``stripe_charges``."""

    id: str
    account_id: str
    request_id: str
    kind: str
    amount_cents: int
    credits: int
    package_id: str | None
    description: str
    requested_payment_method_id: str | None
    payment_method_id: str | None
    customer_id: str
    status: str
    payment_intent_id: str | None
    failure_code: str | None
    decline_code: str | None
    failure_message: str | None
    ledger_txn_id: str | None
    created_at: datetime
    updated_at: datetime
    credit_system_id: str | None = None  # a named credit system's top-up (migration 0040); None: the wallet

    @property
    def amount_usd(self) -> Decimal:
        return cents_to_usd(self.amount_cents)

    @property
    def ledger_account_id(self) -> str:
        """The ledger account its purchase lot lives in: the wallet, or the system's sub-account."""
        return charge_ledger_account(self.account_id, self.credit_system_id)


def charge_ledger_account(account_id: str, credit_system_id: str | None) -> str:
    """Where a charge's credits land: the account itself (the wallet) or its sub-account in a named system (the
    same expression as SQL's ``coalesce(account_id || '.' || credit_system_id, account_id)``)."""
    return account_id if credit_system_id is None else sub_account_id(account_id, credit_system_id)


class CreditResult(BaseModel):
    transaction_id: str
    credits: int
    balance: Decimal
    replayed: bool


async def _load(conn: Any, charge_id: str, *, lock: bool = False) -> ChargeRecord:
    sql = "SELECT * FROM stripe_charges WHERE id = %s" + (" FOR UPDATE" if lock else "")
    row = await (await conn.execute(sql, (charge_id,))).fetchone()
    if row is None:
        raise CreditflowError("not_found", f"no charge {charge_id}")
    return ChargeRecord(**row)


async def get_charge(pool: AsyncConnectionPool, charge_id: str) -> ChargeRecord:
    async with pool.connection() as conn:
        return await _load(conn, charge_id)


async def resolve_card(gateway: StripeGateway, customer_id: str, requested: str | None) -> str | None:
    """The card to charge: the one asked for (only if it is this customer's), else the default, else None."""
    if requested is None:
        return await gateway.default_payment_method(customer_id)
    if not PAYMENT_METHOD_ID.match(requested):
        raise CreditflowError("unknown_payment_method", "no such payment method")
    card = await gateway.retrieve_payment_method(requested)
    if card.customer_id != customer_id:  # another tenant's, or not saved: same answer, nothing to probe
        raise CreditflowError("unknown_payment_method", "no such payment method")
    return card.id


async def record_charge(pool: AsyncConnectionPool, gateway: StripeGateway, *, account_id: str, request_id: str,
                        amount_cents: int, credits: int, package_id: str | None, description: str,
                        payment_method_id: str | None, kind: str = KIND_TOPUP,
                        require_card: bool = False, credit_system: str | None = None) -> ChargeRecord:
    """The charge row of this request, written on the first call (before any charge), read on later ones.

    ``credit_system``: a named system the credits fund (checked to exist by the caller; its sub-account is created
    when the credits land, so a declined card leaves no empty balance behind); None: the wallet.

    ``require_card`` (auto-recharge, off-session only): no saved card means ``no_payment_method`` and no row,
    never the client-secret path."""
    select = "SELECT * FROM stripe_charges WHERE account_id = %s AND kind = %s AND request_id = %s"
    async with pool.connection() as conn:
        row = await (await conn.execute(select, (account_id, kind, request_id))).fetchone()
    if row is None:
        customer_id = await ensure_customer(pool, gateway, account_id)
        card = await resolve_card(gateway, customer_id, payment_method_id)
        if card is None and require_card:
            raise CreditflowError("no_payment_method", "no saved payment method to charge off-session")
        async with pool.connection() as conn:
            if credit_system is None:
                await conn.execute(
                    "INSERT INTO stripe_charges (id, account_id, request_id, kind, amount_cents, credits, package_id,"
                    " description, requested_payment_method_id, payment_method_id, customer_id)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (account_id, kind, request_id) DO NOTHING",
                    (new_id("chg"), account_id, request_id, kind, amount_cents, credits, package_id, description,
                     payment_method_id, card, customer_id))
            else:
                await conn.execute(
                    "INSERT INTO stripe_charges (id, account_id, request_id, kind, amount_cents, credits, package_id,"
                    " description, requested_payment_method_id, payment_method_id, customer_id, credit_system_id)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (account_id, kind, request_id) DO NOTHING",
                    (new_id("chg"), account_id, request_id, kind, amount_cents, credits, package_id, description,
                     payment_method_id, card, customer_id, credit_system))
            row = await (await conn.execute(select, (account_id, kind, request_id))).fetchone()
    assert row is not None
    record = ChargeRecord(**row)
    if (record.amount_cents, record.credits, record.package_id, record.requested_payment_method_id,
            record.credit_system_id) != (amount_cents, credits, package_id, payment_method_id, credit_system):
        raise CreditflowError("idempotency_conflict",
                              f"request_id {request_id} was already used for another top-up")
    return record


def _row_status(pi: PaymentIntentState) -> str:
    """The row's status while the charge is not credited yet."""
    if pi.status == "canceled":
        return "canceled"
    if pi.status == "succeeded":
        return "pending"  # becomes ``succeeded`` with the ledger credit, in ``credit``
    return "requires_action"


async def charge(pool: AsyncConnectionPool, gateway: StripeGateway, charge_id: str) -> PaymentIntentState:
    """The charge's PaymentIntent: created (and confirmed with a saved card) on the first call, retrieved on
    every later one. The row lock serializes concurrent attempts (an activity retried after a timeout)."""
    declined: CreditflowError | None = None
    async with pool.connection() as conn, conn.transaction():
        record = await _load(conn, charge_id, lock=True)
        if record.payment_intent_id is not None:
            return await gateway.retrieve_payment_intent(record.payment_intent_id)
        if record.status == "failed" and record.failure_code == "card_declined":
            # Declined before Stripe named a PaymentIntent: the same answer again. Any other failure without a
            # PaymentIntent (Stripe unreachable for a whole retry budget) is not a decline: the charge is tried
            # again under the same Stripe idempotency key (Stripe returns the PaymentIntent it may have created).
            raise CreditflowError("card_declined", record.failure_message,
                                  details={"decline_code": record.decline_code})
        metadata = {ACCOUNT_METADATA_KEY: record.account_id, CHARGE_METADATA_KEY: record.id,
                    REQUEST_METADATA_KEY: record.request_id}
        try:
            pi = await gateway.create_payment_intent(
                amount_cents=record.amount_cents, customer_id=record.customer_id,
                payment_method_id=record.payment_method_id, metadata=metadata,
                idempotency_key=f"creditflow:topup:{record.id}")
        except CreditflowError as exc:
            if exc.code != "card_declined":
                raise
            declined = exc
            pi_id = exc.details.get("payment_intent_id")
            await conn.execute(
                "UPDATE stripe_charges SET status = 'failed', failure_code = %s, decline_code = %s,"
                " failure_message = %s, payment_intent_id = coalesce(payment_intent_id, %s), updated_at = now()"
                " WHERE id = %s",
                (exc.code, exc.details.get("decline_code"), exc.message,
                 pi_id, charge_id))
        else:
            await conn.execute("UPDATE stripe_charges SET payment_intent_id = %s, status = %s, updated_at = now()"
                               " WHERE id = %s", (pi.id, _row_status(pi), charge_id))
    if declined is not None:
        raise declined
    return pi


async def refresh(pool: AsyncConnectionPool, gateway: StripeGateway, charge_id: str) -> PaymentIntentState:
    """The PaymentIntent's current state (polling while the customer pays with the client secret)."""
    record = await get_charge(pool, charge_id)
    if record.payment_intent_id is None:
        raise CreditflowError("not_found", f"charge {charge_id} has no PaymentIntent")
    return await gateway.retrieve_payment_intent(record.payment_intent_id)


async def cancel(pool: AsyncConnectionPool, gateway: StripeGateway, charge_id: str) -> PaymentIntentState:
    """Cancel an unpaid PaymentIntent (the payment window expired). If it was paid meanwhile, it is
    returned as ``succeeded`` and the row is left for ``credit``."""
    record = await get_charge(pool, charge_id)
    if record.payment_intent_id is None:
        raise CreditflowError("not_found", f"charge {charge_id} has no PaymentIntent")
    pi = await gateway.cancel_payment_intent(record.payment_intent_id)
    if pi.status == "canceled":
        await set_status(pool, charge_id, "canceled", failure_code="payment_expired",
                         failure_message="the payment was not completed in time")
    return pi


async def set_status(pool: AsyncConnectionPool, charge_id: str, status: str, *, failure_code: str | None = None,
                     decline_code: str | None = None, failure_message: str | None = None) -> None:
    """Move a charge that is not credited to ``status`` (a credited charge never changes again)."""
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE stripe_charges SET status = %s, failure_code = coalesce(%s, failure_code),"
            " decline_code = coalesce(%s, decline_code), failure_message = coalesce(%s, failure_message),"
            " updated_at = now() WHERE id = %s AND status <> 'succeeded'",
            (status, failure_code, decline_code, failure_message, charge_id))


async def mark_succeeded(conn: Any, charge_id: str, transaction_id: str | None) -> None:
    """The charge succeeded and names its ledger entry; called in the entry's transaction (a purchase never exists
    without its charge)."""
    await conn.execute(
        "UPDATE stripe_charges SET status = 'succeeded', ledger_txn_id = %s, failure_code = NULL,"
        " decline_code = NULL, failure_message = NULL, updated_at = now() WHERE id = %s",
        (transaction_id, charge_id))


async def credit(pool: AsyncConnectionPool, charge_id: str) -> CreditResult:
    """Credit the wallet (or the named credit system the charge funds) for a succeeded charge, once (the ledger key
    is the PaymentIntent id, unique in the ledger account the lot lands in)."""
    record = await get_charge(pool, charge_id)
    if record.payment_intent_id is None:
        raise CreditflowError("not_found", f"charge {charge_id} has no PaymentIntent")
    metadata: dict[str, Any] = {"payment_intent_id": record.payment_intent_id, "charge_id": record.id,
                                "request_id": record.request_id, "amount_cents": record.amount_cents}
    if record.package_id:
        metadata["package_id"] = record.package_id
    if record.credit_system_id is not None:
        metadata["credit_system"] = record.credit_system_id
        async with pool.connection() as conn, conn.transaction():  # the system's balance, created on its first credit
            await ensure_sub_account(conn, record.account_id, record.credit_system_id)
    recharge = record.kind == KIND_AUTO_RECHARGE
    result = await postings.post(
        pool, account_id=record.ledger_account_id, type="auto_recharge" if recharge else "purchase",
        amount_micros=credits_to_micros(record.credits), counter_book=PURCHASE_BOOK,
        description=(f"Stripe Payment Intent {record.payment_intent_id} via Auto Recharge call" if recharge
                     else record.description),
        idempotency_key=f"sys:topup:{record.payment_intent_id}", metadata=metadata,
        lot_source=LotSource.AUTO_RECHARGE if recharge else LotSource.PURCHASE, lot_paid_cents=record.amount_cents,
        with_entry=lambda conn, transaction_id: mark_succeeded(conn, charge_id, transaction_id))
    return CreditResult(transaction_id=result.transaction_id, credits=record.credits,
                        balance=result.balances.balance, replayed=result.replayed)


async def list_charges(pool: AsyncConnectionPool, account_id: str, limit: int = 50,
                       cursor: Cursor | None = None) -> list[ChargeRecord]:
    """The account's top-ups (and auto-recharges), newest first; invoice payments are listed with their invoices.
    ``cursor``: the page after or before an item (``creditflow.ledger.pagination``)."""
    async with pool.connection() as conn:
        exists = await (await conn.execute("SELECT 1 FROM accounts WHERE id = %s", (account_id,))).fetchone()
        if exists is None:
            raise CreditflowError("unknown_account", f"no account {account_id}")
        where, params, order, reverse = await keyset(conn, "stripe_charges", account_id, cursor)
        rows = await (await conn.execute(sql.SQL(
            "SELECT * FROM stripe_charges WHERE account_id = %s AND kind <> %s AND {} ORDER BY {} LIMIT %s"
        ).format(where, order), (account_id, KIND_INVOICE, *params, limit))).fetchall()
    if reverse:
        rows.reverse()
    return [ChargeRecord(**row) for row in rows]
