"""Payment helpers for tests: saved cards on localstripe, charges, PaymentIntents, receipts, reconciliation."""

from __future__ import annotations

from typing import Any

import httpx
import stripe
from psycopg_pool import AsyncConnectionPool

from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.payments import topups
from creditflow.payments.gateway import ACCOUNT_METADATA_KEY, StripeGateway
from tests.conftest import new_card


async def lost_answer_charge(pool: AsyncConnectionPool, gateway: StripeGateway, account: str, request_id: str, *,
                             amount_cents: int, credits: int, kind: str = topups.KIND_TOPUP) -> tuple[str, str]:
    """The state a workflow leaves when Stripe created and confirmed the PaymentIntent but its answer never came back
    within the retry budget: the row ``failed`` (payment_provider_unavailable) with no PaymentIntent id. Returns
    (charge id, PaymentIntent id)."""
    record = await topups.record_charge(pool, gateway, account_id=account, request_id=request_id,
                                        amount_cents=amount_cents, credits=credits, package_id=None,
                                        description=f"{credits:,} credits", payment_method_id=None, kind=kind)
    pi = await gateway.create_payment_intent(
        amount_cents=amount_cents, customer_id=record.customer_id, payment_method_id=record.payment_method_id,
        metadata={ACCOUNT_METADATA_KEY: account, topups.CHARGE_METADATA_KEY: record.id,
                  topups.REQUEST_METADATA_KEY: request_id}, idempotency_key=f"creditflow:topup:{record.id}")
    assert pi.status == "succeeded"
    await topups.set_status(pool, record.id, "failed", failure_code="payment_provider_unavailable",
                            failure_message="Stripe did not answer")
    return record.id, pi.id


TOPUP = "/api/v1/billing/wallet/topup"
CARDS = "/api/v1/billing/payment-methods"
DECLINED_AT_CHARGE = "4000000000000341"  # localstripe: attaches, then every charge is declined


async def save_card(api: httpx.AsyncClient, sdk: stripe.StripeClient, account: str,
                    number: str = "4242424242424242") -> str:
    resp = await api.post(CARDS, json={"account_id": account, "payment_method_id": new_card(sdk, number)})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


async def customer_of(pool: AsyncConnectionPool, account: str) -> str | None:
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT customer_id FROM stripe_customers WHERE account_id = %s",
                                        (account,))).fetchone()
    return row["customer_id"] if row else None


def intents_of(sdk: stripe.StripeClient, customer_id: str | None) -> list[Any]:
    """The customer's PaymentIntents on localstripe (it cannot filter by customer: we do)."""
    if customer_id is None:
        return []
    page = sdk.v1.payment_intents.list(params={"limit": 100})
    return [pi for pi in page.auto_paging_iter() if pi.customer == customer_id]


async def purchases(pool: AsyncConnectionPool, account: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute(
            "SELECT id, amount_micros, counter_book, idempotency_key, metadata, description FROM journal"
            " WHERE account_id = %s AND type = 'purchase' ORDER BY seq", (account,))).fetchall()


async def charges(pool: AsyncConnectionPool, account: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute("SELECT * FROM stripe_charges WHERE account_id = %s ORDER BY created_at",
                                         (account,))).fetchall()


async def receipts(pool: AsyncConnectionPool, account: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute(
            "SELECT kind, dedup_key, payload FROM notifications_log WHERE account_id = %s ORDER BY id",
            (account,))).fetchall()


async def reconcile(pool: AsyncConnectionPool, sdk: stripe.StripeClient, account: str) -> int:
    """Every succeeded PaymentIntent has exactly one purchase row for what was paid, and vice versa.
    Returns how many there are."""
    succeeded = {pi.id: pi for pi in intents_of(sdk, await customer_of(pool, account)) if pi.status == "succeeded"}
    rows = await purchases(pool, account)
    by_pi: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_pi.setdefault(row["metadata"]["payment_intent_id"], []).append(row)
    assert set(by_pi) == set(succeeded), (by_pi, succeeded)
    charge_rows = {c["payment_intent_id"]: c for c in await charges(pool, account) if c["payment_intent_id"]}
    for pi_id, pi_rows in by_pi.items():
        [row] = pi_rows
        charge = charge_rows[pi_id]
        assert row["idempotency_key"] == f"sys:topup:{pi_id}"
        assert row["counter_book"] == "system:payments_clearing"
        assert row["amount_micros"] == charge["credits"] * MICROS_PER_CREDIT
        assert succeeded[pi_id].amount == charge["amount_cents"]
        assert charge["status"] == "succeeded" and charge["ledger_txn_id"] == f"txn_{row['id'].hex}"
    return len(rows)


REFUNDS = "/api/v1/billing/refunds"


async def topup(api: httpx.AsyncClient, sdk: stripe.StripeClient, account: str, usd: int = 25) -> dict[str, Any]:
    """A succeeded top-up of ``usd`` with the account's saved card (request id ``t-{usd}``)."""
    resp = await api.post(TOPUP, json={"account_id": account, "amount_usd": usd, "request_id": f"t-{usd}"})
    assert resp.status_code == 200 and resp.json()["status"] == "succeeded", resp.text
    return resp.json()


async def succeeded_intents(sdk: stripe.StripeClient, pool: AsyncConnectionPool, account: str) -> list[Any]:
    """The account's PaymentIntents that succeeded on Stripe's side (the emulator)."""
    return [pi for pi in intents_of(sdk, await customer_of(pool, account)) if pi.status == "succeeded"]


TOPUPS = "/api/v1/billing/wallet/topups"


def stripe_refunds(sdk: stripe.StripeClient, pi: str) -> list[Any]:
    return list(sdk.v1.refunds.list(params={"payment_intent": pi, "limit": 100}).auto_paging_iter())
