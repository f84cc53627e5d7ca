"""Refunds and disputes conserve money (issue 11): a purchase's credits and money move together, in the proportion
that lot was bought, whatever the order of refunds, disputes and Stripe's answers.

Real PostgreSQL, Temporal dev server (production worker), localstripe; disputes and refund status changes are fed as
signed webhook events (localstripe has no disputes and creates every refund ``succeeded``). No mocks.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
import stripe
from psycopg_pool import AsyncConnectionPool

from creditflow.config import Settings
from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.domain.topups import DEFAULT_PACKAGES, CreditPackage
from tests.conftest import ADMIN_KEY, STRIPE_KEY
from tests.test_account_workflow import eventually
from tests.test_api_metering import new_account
from tests.test_auto_recharge import relay  # noqa: F401 - fixture: the outbox relay running
from tests.test_ledger_invariants import assert_invariants
from tests.test_stripe_webhooks import SECRET, Clients, cf, event, sign  # noqa: F401 - fixtures
from tests.test_topups import TOPUP, save_card

pytestmark = pytest.mark.temporal

REFUNDS = "/api/v1/billing/refunds"
# A package carrying more credits than cents (packages allow it): 1,200 credits for $10.
BONUS = CreditPackage(id="bonus", name="Bonus", price_usd=Decimal(10), credits=1_200)


@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=5000, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=stripe_base, stripe_retry_max_wait_seconds=0.1,
                    stripe_webhook_secret=SECRET,  # type: ignore[arg-type]
                    topup_packages=[*DEFAULT_PACKAGES, BONUS])


async def balance_of(client: Clients, account: str) -> Any:
    return (await client.admin.get("/api/v1/billing/balance", params={"account_id": account})).json()["balance"]


async def buy(client: Clients, account: str, request_id: str, **what: Any) -> dict[str, Any]:
    resp = await client.admin.post(TOPUP, json={"account_id": account, "request_id": request_id, **what})
    assert resp.status_code == 200 and resp.json()["status"] == "succeeded", resp.text
    return dict(resp.json())


def exact(resp: Any) -> dict[str, Any]:
    """The JSON body with exact decimals (amounts are never floats)."""
    return dict(json.loads(resp.text, parse_float=Decimal))


async def refund(client: Clients, account: str, pi: str, request_id: str, credits: int | None = None) -> Any:
    body: dict[str, Any] = {"account_id": account, "payment_intent_id": pi, "request_id": request_id}
    if credits is not None:
        body["credits"] = credits
    return await client.admin.post(REFUNDS, json=body)


async def lot_of(pool: AsyncConnectionPool, transaction_id: str) -> dict[str, Any]:
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT source, original_micros, remaining_micros, paid_cents FROM credit_lots"
            " WHERE txn_id = %s::uuid", (transaction_id.removeprefix("txn_"),))).fetchone()
    assert row is not None
    return dict(row)


async def journal(pool: AsyncConnectionPool, account: str, type_: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute(
            "SELECT amount_micros, idempotency_key FROM journal WHERE account_id = %s AND type = %s ORDER BY seq",
            (account, type_))).fetchall()


def stripe_money(sdk: stripe.StripeClient, pis: list[str]) -> tuple[int, int]:
    """(captured, refunded) cents of these PaymentIntents, as Stripe has them."""
    captured = sum(sdk.v1.payment_intents.retrieve(pi).amount for pi in pis)
    refunded = sum(r.amount for pi in pis
                   for r in sdk.v1.refunds.list(params={"payment_intent": pi, "limit": 100}).auto_paging_iter()
                   if r.status == "succeeded")
    return captured, refunded


# --- defect 1 ------------------------------------------------------------------------------------------


async def test_bonus_package_refund_loop_creates_no_credits(
        cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient) -> None:  # noqa: F811
    """Buy 1,200 credits for $10 and refund "all refundable", three times: every time the 1,200 credits leave with the
    $10; credits and money end where they started (5,000 welcome credits, $0 net)."""
    account = await new_account(cf.admin)
    await save_card(cf.admin, sdk, account)
    pis = []
    for n in range(3):
        bought = await buy(cf, account, f"bonus-{n}", package_id="bonus")
        assert (bought["credits"], bought["amount_usd"], bought["balance"]) == (1200, 10, 6200)
        pis.append(bought["payment_intent_id"])
        resp = await refund(cf, account, bought["payment_intent_id"], f"all-{n}")
        assert resp.status_code == 200, resp.text
        body = exact(resp)
        assert (body["status"], body["credits"], body["amount_usd"], body["balance"]) == ("succeeded", 1200, 10, 5000)
        lot = await lot_of(pool, bought["transaction_id"])
        assert (lot["source"], lot["original_micros"], lot["remaining_micros"], lot["paid_cents"]) == (
            "purchase", 1200 * MICROS_PER_CREDIT, 0, 1000)
    assert await balance_of(cf, account) == 5000
    assert stripe_money(sdk, pis) == (3000, 3000)
    await assert_invariants(pool)


async def test_partial_refunds_are_priced_by_the_lot_and_round_against_the_refund(
        cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient) -> None:  # noqa: F811
    """1,200 credits for 1,000 cents: 600 credits give 500 cents; 7 credits give floor(5.83) = 5 cents; 1 credit is
    worth less than a cent (refused, nothing written); the rest (593) gives floor(494.17) = 494 cents. Never more
    than paid."""
    account = await new_account(cf.admin)
    await save_card(cf.admin, sdk, account)
    bought = await buy(cf, account, "b", package_id="bonus")
    pi = bought["payment_intent_id"]
    half = exact(await refund(cf, account, pi, "r-600", 600))
    assert (half["credits"], half["amount_usd"], half["balance"]) == (600, 5, 5600)
    seven = exact(await refund(cf, account, pi, "r-7", 7))
    assert (seven["credits"], seven["amount_usd"], seven["balance"]) == (7, Decimal("0.05"), 5593)
    tiny = await refund(cf, account, pi, "r-1", 1)
    assert tiny.status_code == 422 and tiny.json()["error"]["code"] == "refund_exceeds_remaining", tiny.text
    rest = exact(await refund(cf, account, pi, "r-rest"))
    assert (rest["credits"], rest["amount_usd"], rest["balance"]) == (593, Decimal("4.94"), 5000)
    assert stripe_money(sdk, [pi]) == (1000, 999)
    await assert_invariants(pool)


async def test_dispute_of_a_bonus_package_takes_credits_in_the_lots_proportion(
        cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient, relay: Any) -> None:  # noqa: F811
    """A lost dispute of D cents takes ceil(D * 1,200 / 1,000) credits of that lot: 500 cents -> 600 credits, then a
    Stripe-side refund of 7 cents -> 8.4 credits (rounded up, in micros)."""
    account = await new_account(cf.admin)
    await save_card(cf.admin, sdk, account)
    bought = await buy(cf, account, "b", package_id="bonus")
    pi = bought["payment_intent_id"]
    dispute = {"id": "dp_half", "object": "dispute", "payment_intent": pi, "charge": "ch_x", "amount": 500,
               "reason": "fraudulent", "status": "needs_response"}
    body = event("charge.dispute.created", dispute)
    assert (await cf.deliver(body, sign(body))).json()["outcome"] == "routed"
    [taken] = await eventually(lambda: journal(pool, account, "dispute"), lambda r: len(r) == 1, timeout=20)
    assert taken["amount_micros"] == -600 * MICROS_PER_CREDIT
    charge = {"id": "ch_x", "object": "charge", "payment_intent": pi, "amount": 1000, "amount_refunded": 7,
              "refunds": {"object": "list", "data": [{"id": "re_dash_7", "amount": 7}]}}
    body = event("charge.refunded", charge)
    assert (await cf.deliver(body, sign(body))).json()["outcome"] == "routed"
    [back] = await eventually(lambda: journal(pool, account, "refund"), lambda r: len(r) == 1, timeout=20)
    assert back["amount_micros"] == -8_400_000
    assert (await lot_of(pool, bought["transaction_id"]))["remaining_micros"] == 1200 * MICROS_PER_CREDIT - 608_400_000
    await assert_invariants(pool)
