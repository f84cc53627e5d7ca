"""Refunds made on Stripe directly and disputes: the signed webhook is stored once and routed through the
outbox to the account workflow, which takes back the credits that payment bought, once per refund or dispute id.
Real PostgreSQL, Temporal dev server, localstripe; no mocks.
"""

from __future__ import annotations

from typing import Any

import pytest
import stripe
from psycopg_pool import AsyncConnectionPool

from creditflow.config import Settings
from creditflow.domain.money import MICROS_PER_CREDIT
from tests.support.api import new_account
from tests.support.auto_recharge import relay  # noqa: F401 - fixture: the outbox relay running
from tests.support.ledger import assert_invariants
from tests.support.payments import TOPUP, save_card
from tests.support.temporal import eventually
from tests.support.webhooks import Clients, cf, event, settings, sign  # noqa: F401 - fixtures

pytestmark = pytest.mark.temporal


async def rows(pool: AsyncConnectionPool, account: str, type_: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute(
            "SELECT amount_micros, counter_book, idempotency_key FROM journal WHERE account_id = %s AND type = %s"
            " ORDER BY seq", (account, type_))).fetchall()


async def test_stripe_side_refunds_and_disputes_take_back_credits_once(
        cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient, relay: Any) -> None:  # noqa: F811
    account = await new_account(cf.admin)  # 5,000 welcome credits
    await save_card(cf.admin, sdk, account)
    paid = await cf.admin.post(TOPUP, json={"account_id": account, "amount_usd": 25, "request_id": "buy-1"})
    assert paid.status_code == 200, paid.text
    pi = paid.json()["payment_intent_id"]

    # A refund of $10 made in the Stripe dashboard: 1,000 of the 2,500 purchased credits go.
    charge = {"id": "ch_ext", "object": "charge", "payment_intent": pi, "amount": 2500, "amount_refunded": 1000,
              "refunds": {"object": "list", "data": [{"id": "re_dash_1", "amount": 1000}]}}
    first = event("charge.refunded", charge, event_id="evt_refund_1")
    resp = await cf.deliver(first, sign(first))
    assert (resp.status_code, resp.json()["outcome"]) == (200, "routed")
    again = await cf.deliver(first, sign(first))
    assert again.json()["duplicate"] is True
    [refund] = await eventually(lambda: rows(pool, account, "refund"), lambda r: len(r) == 1, timeout=20)
    assert (refund["amount_micros"], refund["counter_book"], refund["idempotency_key"]) == (
        -1000 * MICROS_PER_CREDIT, "system:refund_reserve", "sys:stripe_refund:re_dash_1")

    # Stripe sends charge.refunded again for a second refund (the list is cumulative): only the new one applies.
    charge["refunds"]["data"].append({"id": "re_dash_2", "amount": 500})  # type: ignore[index]
    # One made by creditflow's RefundWorkflow (its id in the metadata) is never taken back a second time.
    charge["refunds"]["data"].append({"id": "re_ours", "amount": 100,  # type: ignore[index]
                                      "metadata": {"creditflow_refund_id": "ref_" + "0" * 32}})
    second = event("charge.refunded", charge, event_id="evt_refund_2")
    assert (await cf.deliver(second, sign(second))).json()["outcome"] == "routed"
    found = await eventually(lambda: rows(pool, account, "refund"), lambda r: len(r) == 2, timeout=20)
    assert [r["amount_micros"] for r in found] == [-1000 * MICROS_PER_CREDIT, -500 * MICROS_PER_CREDIT]

    # A dispute of the whole $25: what remains of that purchase (1,000 credits) is taken, never bonus credits.
    dispute = {"id": "dp_1", "object": "dispute", "payment_intent": pi, "charge": "ch_ext", "amount": 2500,
               "reason": "fraudulent", "status": "needs_response"}
    body = event("charge.dispute.created", dispute, event_id="evt_dispute_1")
    assert (await cf.deliver(body, sign(body))).json()["outcome"] == "routed"
    [taken] = await eventually(lambda: rows(pool, account, "dispute"), lambda r: len(r) == 1, timeout=20)
    assert (taken["amount_micros"], taken["counter_book"]) == (-1000 * MICROS_PER_CREDIT, "system:disputes")
    balance = (await cf.admin.get("/api/v1/billing/balance", params={"account_id": account})).json()["balance"]
    assert balance == 5000  # the welcome bonus is untouched
    async def disputed_notices() -> list[dict[str, Any]]:  # sent after the clawback commits: wait for it
        async with pool.connection() as conn:
            return await (await conn.execute(
                "SELECT kind, payload FROM notifications_log WHERE account_id = %s AND kind = 'payment.disputed'",
                (account,))).fetchall()

    notices = await eventually(disputed_notices, lambda rows: len(rows) >= 1)
    assert [(n["payload"]["dispute_id"], n["payload"]["amount_cents"]) for n in notices] == [("dp_1", 2500)]

    # The dispute is won: the credits taken come back, once (a lost one would keep them taken).
    won = event("charge.dispute.closed", {**dispute, "status": "won"}, event_id="evt_dispute_won")
    for _ in range(2):
        assert (await cf.deliver(won, sign(won))).status_code == 200
    [back] = await eventually(lambda: rows(pool, account, "dispute_reversal"), lambda r: len(r) == 1, timeout=20)
    assert (back["amount_micros"], back["idempotency_key"]) == (1000 * MICROS_PER_CREDIT, "sys:dispute_won:dp_1")
    assert (await cf.admin.get("/api/v1/billing/balance", params={"account_id": account})).json()["balance"] == 6000

    # An event for a PaymentIntent creditflow does not know is stored and ignored.
    stranger = event("charge.refunded", {**charge, "payment_intent": "pi_unknown"}, event_id="evt_refund_3")
    assert (await cf.deliver(stranger, sign(stranger))).json()["outcome"] == "ignored"
    await assert_invariants(pool)


async def test_auto_recharge_paid_after_its_workflow_gave_up_is_credited_once(
        cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient,  # noqa: F811
        temporal_settings: Settings, relay: Any) -> None:  # noqa: F811
    """The workflow recorded the charge failed (Stripe answered only after its retries ran out) but the payment went
    through: Stripe's payment_intent.succeeded makes the account workflow check with Stripe and credit it, once."""
    from creditflow.payments import topups
    from creditflow.payments.gateway import StripeGateway

    account = await new_account(cf.admin)
    await save_card(cf.admin, sdk, account)
    gateway = StripeGateway.from_settings(temporal_settings)
    record = await topups.record_charge(pool, gateway, account_id=account, request_id="recharge-1", amount_cents=2000,
                                        credits=2000, package_id=None, description="Auto-recharge: 2,000 credits",
                                        payment_method_id=None, kind=topups.KIND_AUTO_RECHARGE, require_card=True)
    pi = await topups.charge(pool, gateway, record.id)
    assert pi.status == "succeeded"
    await topups.set_status(pool, record.id, "failed", failure_code="payment_provider_unavailable")

    paid = sdk.v1.payment_intents.retrieve(pi.id).to_dict()
    for n in range(2):  # Stripe delivers it (again): one credit
        body = event("payment_intent.succeeded", paid, event_id=f"evt_late_{n}")
        resp = await cf.deliver(body, sign(body))
        assert resp.json()["outcome"] in ("routed", "recorded"), resp.text
    [credit] = await eventually(lambda: rows(pool, account, "auto_recharge"), lambda r: len(r) == 1, timeout=20)
    assert (credit["amount_micros"], credit["idempotency_key"]) == (2000 * MICROS_PER_CREDIT, f"sys:topup:{pi.id}")
    balance = (await cf.admin.get("/api/v1/billing/balance", params={"account_id": account})).json()["balance"]
    assert balance == 7000
    assert (await topups.get_charge(pool, record.id)).status == "succeeded"
    async with pool.connection() as conn:  # the lot carries its price (refunds are priced by it): $20 for 2,000 credits
        [lot] = await (await conn.execute("SELECT source, original_micros, paid_cents FROM credit_lots"
                                          " WHERE account_id = %s AND source = 'auto_recharge'", (account,))).fetchall()
    assert (lot["original_micros"], lot["paid_cents"]) == (2000 * MICROS_PER_CREDIT, 2000)
    await assert_invariants(pool)


async def test_refunds_are_asked_of_stripe_when_the_event_does_not_list_them(
        cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient, relay: Any) -> None:  # noqa: F811
    """Stripe API versions from 2022-11-15 send charge.refunded without the refunds: the account workflow lists them
    from Stripe. creditflow's own refund (RefundWorkflow) is recognised there and not taken back twice."""
    account = await new_account(cf.admin)
    await save_card(cf.admin, sdk, account)
    paid = await cf.admin.post(TOPUP, json={"account_id": account, "amount_usd": 25, "request_id": "buy-2"})
    pi = paid.json()["payment_intent_id"]
    ours = await cf.admin.post("/api/v1/billing/refunds", json={
        "account_id": account, "payment_intent_id": pi, "credits": 300, "request_id": "r-1"})
    assert ours.status_code == 200 and ours.json()["status"] == "succeeded", ours.text
    sdk.v1.refunds.create(params={"payment_intent": pi, "amount": 700})  # made in the Stripe dashboard

    body = event("charge.refunded", {"id": "ch_x", "object": "charge", "payment_intent": pi, "amount": 2500,
                                     "amount_refunded": 1000}, event_id="evt_modern_refund")
    assert (await cf.deliver(body, sign(body))).json()["outcome"] == "routed"
    found = await eventually(lambda: rows(pool, account, "refund"), lambda r: len(r) == 2, timeout=20)
    assert sorted(r["amount_micros"] for r in found) == [-700 * MICROS_PER_CREDIT, -300 * MICROS_PER_CREDIT]
    assert [r["idempotency_key"].split(":")[1] for r in found].count("stripe_refund") == 1
    balance = (await cf.admin.get("/api/v1/billing/balance", params={"account_id": account})).json()["balance"]
    assert balance == 5000 + 2500 - 300 - 700
    await assert_invariants(pool)
