"""Top-ups that name the credit system they fund (docs/credit-systems.md), end to end: HTTP API,
TopUpWorkflow / RefundWorkflow on the production worker (real Temporal dev server), localstripe, real PostgreSQL.

The money of a system's purchase is conserved exactly as the wallet's: its lot carries its price, a refund takes
that lot's credits back at its price, a dispute claws back from it, and ``creditflow verify`` stays clean."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from creditflow.client import topup_workflow_id
from creditflow.config import Settings
from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.domain.reconciliation import RunWindow
from creditflow.notify.templates import render
from creditflow.payments import topups
from creditflow.payments.gateway import StripeGateway
from creditflow.payments.reconcile import Reconciler
from tests.conftest import ledger_snapshot
from tests.support.api import new_account, track
from tests.support.auto_recharge import relay  # noqa: F401 - fixture: the outbox relay running
from tests.support.credit_systems import FEATURE, SYSTEM, key_headers, transcription_system
from tests.support.payments import (
    DECLINED_AT_CHARGE,
    REFUNDS,
    TOPUP,
    TOPUPS,
    customer_of,
    intents_of,
    receipts,
    save_card,
    stripe_refunds,
)
from tests.support.reconcile import kinds, reconcile_now
from tests.support.temporal import eventually
from tests.support.webhooks import Clients, cf, event, pay, settings, sign  # noqa: F401 - fixtures
from workflows.contract import TopUpOutcome

pytestmark = [pytest.mark.temporal, pytest.mark.slow]


async def rows(pool: AsyncConnectionPool, sql: str, *args: object) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute(sql, args)).fetchall()


async def balances(api: httpx.AsyncClient, account: str) -> tuple[object, list[object]]:
    """(the wallet's balance, [transcription-credits' balance] or [] when the account has none)."""
    body = (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()
    return body["balance"], [s["balance"] for s in body.get("credit_systems", []) if s["credit_system"] == SYSTEM]


async def lots(pool: AsyncConnectionPool, ledger_account: str) -> list[tuple[str, int, int | None]]:
    found = await rows(pool, "SELECT source, remaining_micros, paid_cents FROM credit_lots WHERE account_id = %s"
                             " ORDER BY created_at, id", ledger_account)
    return [(r["source"], r["remaining_micros"], r["paid_cents"]) for r in found]


async def verify_clean(api: httpx.AsyncClient, account: str | None = None) -> None:
    params = {"account_id": account} if account else {}
    body = (await api.get("/api/v1/verify", params=params)).json()
    assert body["ok"] is True and body["violations"] == [], body


async def buy(api: httpx.AsyncClient, account: str, request_id: str, usd: int = 10, **extra: object) -> dict[str, Any]:
    resp = await api.post(TOPUP, json={"account_id": account, "amount_usd": usd, "request_id": request_id,
                                       "credit_system": SYSTEM, **extra})
    assert resp.status_code == 200, resp.text
    return resp.json()


async def test_a_topup_funds_its_system_and_a_refund_takes_back_from_its_lot(
        cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient) -> None:  # noqa: F811
    api = cf.admin
    await transcription_system(api)
    account = await new_account(api)  # 5,000 welcome credits in the wallet
    sub = f"{account}.{SYSTEM}"
    await save_card(api, sdk, account)

    bought = await buy(api, account, "sys-1")
    assert (bought["status"], bought["credits"], bought["amount_usd"], bought["balance"], bought["credit_system"]) == (
        "succeeded", 1000, 10, 1000, SYSTEM)
    assert await balances(api, account) == (5000, [1000])
    # The purchase lot, with its price, is in the system's ledger account; the wallet has only its welcome bonus.
    assert await lots(pool, sub) == [("purchase", 1000 * MICROS_PER_CREDIT, 1000)]
    assert [s for s, _, _ in await lots(pool, account)] == ["welcome_bonus"]
    [charge] = await rows(pool, "SELECT * FROM stripe_charges WHERE account_id = %s", account)
    assert (charge["credit_system_id"], charge["amount_cents"], charge["status"], charge["ledger_txn_id"]) == (
        SYSTEM, 1000, "succeeded", bought["transaction_id"])
    [purchase] = await rows(pool, "SELECT amount_micros, idempotency_key, counter_book FROM journal"
                                  " WHERE account_id = %s AND type = 'purchase'", sub)
    assert purchase == {"amount_micros": 1000 * MICROS_PER_CREDIT,
                        "idempotency_key": f"sys:topup:{bought['payment_intent_id']}",
                        "counter_book": "system:payments_clearing"}
    listed = (await api.get(TOPUPS, params={"account_id": account})).json()["items"]
    assert [(t["request_id"], t["credit_system"]) for t in listed] == [("sys-1", SYSTEM)]
    history = (await api.get("/api/v1/billing/transactions", params={"account_id": account, "type": "purchase",
                                                                     "credit_system": SYSTEM})).json()["items"]
    assert [(t["id"], t["amount"]) for t in history] == [(bought["transaction_id"], 1000)]
    wallet_history = (await api.get("/api/v1/billing/transactions", params={"account_id": account,
                                                                            "type": "purchase"})).json()["items"]
    assert wallet_history == []
    # The receipt names the system the credits went to.
    [receipt] = await eventually(lambda: receipts(pool, account), lambda r: len(r) == 1, timeout=20)
    assert (receipt["kind"], receipt["payload"]["credit_system"], receipt["payload"]["credits"]) == (
        "receipt", SYSTEM, 1000)
    text = render("receipt", receipt["payload"], account_id=account, account_name="Acme").email_body
    assert f"1,000 credits were added to your {SYSTEM} balance." in text

    # The same request again: the same answer, no second charge; the same id for the wallet is another request.
    again = await buy(api, account, "sys-1")
    assert (again["transaction_id"], again["payment_intent_id"]) == (bought["transaction_id"],
                                                                     bought["payment_intent_id"])
    conflict = await api.post(TOPUP, json={"account_id": account, "amount_usd": 10, "request_id": "sys-1"})
    assert (conflict.status_code, conflict.json()["error"]["code"]) == (409, "idempotency_conflict")
    assert len(intents_of(sdk, await customer_of(pool, account))) == 1
    assert await balances(api, account) == (5000, [1000])
    await verify_clean(api, account)

    # The system's feature spends it: 10 minutes x 3 = 30 credits, from the purchase lot; the wallet is untouched.
    used = await track(api, account, FEATURE, 10, "call-1")
    assert (used.status_code, used.json()["credits_charged"], used.json()["balance"]) == (200, 30, 970)
    assert await balances(api, account) == (5000, [970])

    # Refund 400 of what remains: 400 credits leave the system's lot, $4.00 goes back (1 credit = 1 cent here).
    writer = {"Authorization": (await key_headers(api, account, "billing:read", "payments:write"))["Authorization"]}
    resp = await api.post(REFUNDS, headers=writer, json={"payment_intent_id": bought["payment_intent_id"],
                                                         "credits": 400, "request_id": "ref-1"})
    assert resp.status_code == 200, resp.text
    refund = resp.json()
    assert (refund["status"], refund["credits"], refund["amount_usd"], refund["balance"], refund["credit_system"]) == (
        "succeeded", 400, 4, 570, SYSTEM)
    [on_stripe] = stripe_refunds(sdk, bought["payment_intent_id"])
    assert (on_stripe.amount, on_stripe.status) == (400, "succeeded")
    assert await lots(pool, sub) == [("purchase", 570 * MICROS_PER_CREDIT, 1000)]
    assert await balances(api, account) == (5000, [570])
    [reserved] = await rows(pool, "SELECT amount_micros FROM journal WHERE account_id = %s AND type = 'refund'", sub)
    assert reserved["amount_micros"] == -400 * MICROS_PER_CREDIT
    assert await rows(pool, "SELECT 1 FROM journal WHERE account_id = %s AND type = 'refund'", account) == []
    # A retry refunds nothing more.
    retry = await api.post(REFUNDS, headers=writer, json={"payment_intent_id": bought["payment_intent_id"],
                                                          "credits": 400, "request_id": "ref-1"})
    assert (retry.status_code, retry.json()["refund_id"]) == (200, refund["refund_id"])
    assert len(stripe_refunds(sdk, bought["payment_intent_id"])) == 1 and await balances(api, account) == (5000, [570])
    await verify_clean(api, account)

    # The rest, named by its purchase transaction: 570 credits, $5.70; then nothing remains to refund.
    rest = await api.post(REFUNDS, json={"account_id": account, "purchase_transaction_id": bought["transaction_id"],
                                         "request_id": "ref-2"})
    assert rest.status_code == 200, rest.text
    assert (rest.json()["credits"], rest.json()["amount_usd"], rest.json()["balance"]) == (570, 5.7, 0)
    assert sorted(r.amount for r in stripe_refunds(sdk, bought["payment_intent_id"])) == [400, 570]
    more = await api.post(REFUNDS, json={"account_id": account, "payment_intent_id": bought["payment_intent_id"],
                                         "request_id": "ref-3"})
    assert (more.status_code, more.json()["error"]["code"]) == (422, "refund_exceeds_remaining")
    assert await balances(api, account) == (5000, [0])
    listed = (await api.get(REFUNDS, params={"account_id": account})).json()["items"]
    assert [(r["request_id"], r["credits"], r["credit_system"]) for r in listed] == [
        ("ref-2", 570, SYSTEM), ("ref-1", 400, SYSTEM)]
    await verify_clean(api, account)
    await verify_clean(api)


async def test_a_package_and_the_client_secret_path_fund_the_system(
        cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient, temporal_client: Client) -> None:  # noqa: F811
    api = cf.admin
    await transcription_system(api)
    account = await new_account(api)  # no saved card: the client-secret path
    resp = await api.post(TOPUP, json={"account_id": account, "package_id": "starter", "request_id": "cs-1",
                                       "credit_system": SYSTEM})
    assert resp.status_code == 200, resp.text
    assert (resp.json()["status"], resp.json()["credits"], resp.json()["credit_system"]) == (
        "requires_payment", 1000, SYSTEM)
    [pi] = intents_of(sdk, await customer_of(pool, account))
    paid = pay(sdk, pi.id)  # the customer pays in the browser; Stripe tells creditflow with a signed event
    assert paid["status"] == "succeeded"
    body = event("payment_intent.succeeded", paid, event_id="evt_cs_succeeded")
    assert (await cf.deliver(body, sign(body))).json()["outcome"] == "signaled"
    handle = temporal_client.get_workflow_handle(topup_workflow_id(account, "cs-1"), result_type=TopUpOutcome)
    outcome = await asyncio.wait_for(handle.result(), 30)
    assert (outcome.status, outcome.credits, outcome.balance) == ("succeeded", 1000, 1000)
    assert await balances(api, account) == (5000, [1000])
    assert await lots(pool, f"{account}.{SYSTEM}") == [("purchase", 1000 * MICROS_PER_CREDIT, 1000)]
    await verify_clean(api, account)


async def test_a_dispute_claws_back_from_the_systems_lot(
        cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient, relay: Any) -> None:  # noqa: F811
    api = cf.admin
    await transcription_system(api)
    account = await new_account(api)
    sub = f"{account}.{SYSTEM}"
    await save_card(api, sdk, account)
    pi = (await buy(api, account, "sys-1", usd=25))["payment_intent_id"]
    assert await balances(api, account) == (5000, [2500])

    # A refund of $3 made in the Stripe dashboard: 300 credits leave the system's lot.
    charge = {"id": "ch_ext", "object": "charge", "payment_intent": pi, "amount": 2500, "amount_refunded": 300,
              "refunds": {"object": "list", "data": [{"id": "re_dash_1", "amount": 300}]}}
    refunded = event("charge.refunded", charge, event_id="evt_refund_1")
    assert (await cf.deliver(refunded, sign(refunded))).json()["outcome"] == "routed"
    taken = await eventually(lambda: rows(pool, "SELECT amount_micros FROM journal WHERE account_id = %s"
                                                " AND type = 'refund'", sub), lambda r: len(r) == 1, timeout=20)
    assert taken == [{"amount_micros": -300 * MICROS_PER_CREDIT}]
    assert await balances(api, account) == (5000, [2200])
    await verify_clean(api, account)

    # A dispute of the whole $25: what remains of that purchase (2,200) is taken; the wallet keeps its credits.
    dispute = {"id": "dp_1", "object": "dispute", "payment_intent": pi, "charge": "ch_ext", "amount": 2500,
               "reason": "fraudulent", "status": "needs_response"}
    opened = event("charge.dispute.created", dispute, event_id="evt_dispute_1")
    assert (await cf.deliver(opened, sign(opened))).json()["outcome"] == "routed"
    [clawed] = await eventually(lambda: rows(pool, "SELECT amount_micros, counter_book FROM journal"
                                                   " WHERE account_id = %s AND type = 'dispute'", sub),
                                lambda r: len(r) == 1, timeout=20)
    assert clawed == {"amount_micros": -2200 * MICROS_PER_CREDIT, "counter_book": "system:disputes"}
    assert await balances(api, account) == (5000, [0])
    [row] = await rows(pool, "SELECT account_id, taken_micros FROM disputes WHERE id = 'dp_1'")
    assert row == {"account_id": account, "taken_micros": 2200 * MICROS_PER_CREDIT}
    assert await rows(pool, "SELECT 1 FROM journal WHERE account_id = %s AND type IN ('refund', 'dispute')",
                      account) == []
    await verify_clean(api, account)

    # Won: the credits come back to the system's lot, once.
    won = event("charge.dispute.closed", {**dispute, "status": "won"}, event_id="evt_dispute_won")
    assert (await cf.deliver(won, sign(won))).json()["outcome"] == "routed"
    await eventually(lambda: rows(pool, "SELECT 1 FROM journal WHERE account_id = %s AND type = 'dispute_reversal'",
                                  sub), lambda r: len(r) == 1, timeout=20)
    assert await balances(api, account) == (5000, [2200])
    assert await lots(pool, sub) == [("purchase", 2200 * MICROS_PER_CREDIT, 2500)]
    await verify_clean(api, account)
    await verify_clean(api)


async def test_bad_input_is_refused_and_changes_nothing(
        cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient, database_url: str) -> None:  # noqa: F811
    api = cf.admin
    await transcription_system(api)
    account = await new_account(api)
    other = await new_account(api)
    await save_card(api, sdk, account)
    await save_card(api, sdk, other)
    bought = await buy(api, other, "theirs")
    before = await ledger_snapshot(database_url)
    charges_before = await rows(pool, "SELECT id FROM stripe_charges ORDER BY id")
    intents_before = len(intents_of(sdk, await customer_of(pool, account)))

    cases: list[tuple[dict[str, Any], dict[str, str] | None, int, str]] = [
        ({"account_id": account, "amount_usd": 10, "credit_system": "no-such-system", "request_id": "b-1"}, None,
         404, "unknown_credit_system"),
        ({"account_id": account, "amount_usd": 10, "credit_system": "Not A System!", "request_id": "b-2"}, None,
         422, "validation_error"),
        ({"account_id": account, "amount_usd": 10, "credit_system": 7, "request_id": "b-3"}, None,
         422, "validation_error"),
        ({"account_id": account, "amount_usd": 0, "credit_system": SYSTEM, "request_id": "b-4"}, None,
         422, None),
    ]
    own_key = await key_headers(api, account, "billing:read", "payments:write")
    cases.append(({"account_id": other, "amount_usd": 10, "credit_system": SYSTEM, "request_id": "b-5"}, own_key,
                  403, None))
    for body, headers, status, code in cases:
        resp = await api.post(TOPUP, json=body, headers=headers)
        assert resp.status_code == status, (body, resp.text)
        if code is not None:
            assert resp.json()["error"]["code"] == code, resp.text
    # Another tenant's purchase in a system cannot be refunded with this account's key.
    resp = await api.post(REFUNDS, headers=own_key, json={"payment_intent_id": bought["payment_intent_id"],
                                                          "request_id": "steal"})
    assert (resp.status_code, resp.json()["error"]["code"]) == (404, "unknown_purchase")
    resp = await api.post(REFUNDS, headers=own_key, json={"purchase_transaction_id": bought["transaction_id"],
                                                          "request_id": "steal-2"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_purchase", resp.text

    assert await ledger_snapshot(database_url) == before
    assert await rows(pool, "SELECT id FROM stripe_charges ORDER BY id") == charges_before

    # A declined card: the charge row records the failure (as for the wallet); no credits, no empty system balance.
    declined = await new_account(api)
    await save_card(api, sdk, declined, DECLINED_AT_CHARGE)
    before = await ledger_snapshot(database_url)
    resp = await api.post(TOPUP, json={"account_id": declined, "amount_usd": 10, "credit_system": SYSTEM,
                                       "request_id": "d-1"})
    assert (resp.status_code, resp.json()["error"]["code"]) == (402, "card_declined")
    assert await ledger_snapshot(database_url) == before
    [failed] = await rows(pool, "SELECT status, credit_system_id FROM stripe_charges WHERE account_id = %s", declined)
    assert failed == {"status": "failed", "credit_system_id": SYSTEM}
    assert await balances(api, declined) == (5000, [])

    # A wallet top-up next to a system's (naming the default system is the wallet): answered and listed exactly as
    # before (no credit_system field).
    wallet = await api.post(TOPUP, json={"account_id": other, "amount_usd": 10, "request_id": "w-1",
                                         "credit_system": "credits"})
    assert wallet.status_code == 200 and "credit_system" not in wallet.json() and wallet.json()["balance"] == 6000
    listed = (await api.get(TOPUPS, params={"account_id": other})).json()["items"]
    assert [(t["request_id"], t.get("credit_system", "absent")) for t in listed] == [
        ("w-1", "absent"), ("theirs", SYSTEM)]
    assert await balances(api, other) == (6000, [1000])
    back = await api.post(REFUNDS, json={"account_id": other, "payment_intent_id": wallet.json()["payment_intent_id"],
                                         "credits": 100, "request_id": "w-ref"})
    assert back.status_code == 200 and "credit_system" not in back.json() and back.json()["balance"] == 5900
    refunds_listed = (await api.get(REFUNDS, params={"account_id": other})).json()["items"]
    assert [(r["request_id"], r.get("credit_system", "absent")) for r in refunds_listed] == [("w-ref", "absent")]
    assert await balances(api, other) == (5900, [1000])
    await verify_clean(api)
    assert len(intents_of(sdk, await customer_of(pool, account))) == intents_before
    assert await rows(pool, "SELECT 1 FROM accounts WHERE id = %s", f"{account}.{SYSTEM}") == []
    assert await balances(api, account) == (5000, [])
    await verify_clean(api)


async def test_verify_sees_a_systems_purchase_lot_as_a_wallets(
        cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient) -> None:  # noqa: F811
    """Proof that verify's money checks look at the system's lot: a dispute recorded as taking nothing from a system
    purchase that still has credits is reported (a check joining the lot on the wallet's account would miss it)."""
    api = cf.admin
    await transcription_system(api)
    account = await new_account(api)
    await save_card(api, sdk, account)
    bought = await buy(api, account, "sys-1")
    await verify_clean(api, account)
    [charge] = await rows(pool, "SELECT id FROM stripe_charges WHERE account_id = %s", account)
    [lot] = await rows(pool, "SELECT id FROM credit_lots WHERE account_id = %s", f"{account}.{SYSTEM}")
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO disputes (id, account_id, charge_id, payment_intent_id, lot_id, amount_cents, claimed_micros,"
            " taken_micros) VALUES ('dp_tampered', %s, %s, %s, %s, 1000, 0, 0)",
            (account, charge["id"], bought["payment_intent_id"], lot["id"]))
    try:
        body = (await api.get("/api/v1/verify", params={"account_id": account})).json()
        assert body["ok"] is False
        assert [(v["check"], v["account_id"]) for v in body["violations"]] == [
            ("credits_leave_with_their_money", account)]
    finally:
        async with pool.connection() as conn:
            await conn.execute("DELETE FROM disputes WHERE id = 'dp_tampered'")
    await verify_clean(api, account)


async def test_reconciliation_matches_a_systems_charge_and_repairs_through_its_lot(
        cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient, settings: Settings) -> None:  # noqa: F811
    """A system's top-up is matched with its PaymentIntent; a refund made on Stripe that no webhook reported is taken
    back from the system's lot once, and given back once when Stripe reports it failed; a payment whose workflow gave
    up is credited late into the system, once."""
    api = cf.admin
    gateway = StripeGateway.from_settings(settings)
    await transcription_system(api)
    account = await new_account(api)
    await save_card(api, sdk, account)
    pi = (await buy(api, account, "sys-1"))["payment_intent_id"]
    assert kinds(await reconcile_now(pool, gateway), account) == []

    refund = sdk.v1.refunds.create(params={"payment_intent": pi, "amount": 250})
    first = await reconcile_now(pool, gateway)
    assert kinds(first, account) == [("repaired", "stripe_refund_taken_back")]
    assert await balances(api, account) == (5000, [750])
    assert kinds(await reconcile_now(pool, gateway), account) == []  # found applied in the system's journal
    assert await balances(api, account) == (5000, [750])
    await verify_clean(api, account)

    now = datetime.now(UTC)
    reconciler = Reconciler(pool, gateway, RunWindow(run_id="t", trigger="manual", since=now, until=now), now=now,
                            server_filter=False, grace=timedelta(0))
    failed = {"id": refund.id, "status": "failed", "amount": 250, "created": None, "metadata": {},
              "payment_intent": pi}
    await reconciler._refund(failed)
    await reconciler._refund(failed)
    assert kinds(reconciler.result, account) == [("repaired", "stripe_refund_failed_restored")]
    assert await balances(api, account) == (5000, [1000])
    assert await lots(pool, f"{account}.{SYSTEM}") == [("purchase", 1000 * MICROS_PER_CREDIT, 1000)]

    # Charged on Stripe, its workflow gave up before crediting: reconciliation credits the system, once.
    record = await topups.record_charge(pool, gateway, account_id=account, request_id="late-1", amount_cents=500,
                                        credits=500, package_id=None, description="Credits", payment_method_id=None,
                                        credit_system=SYSTEM)
    assert (await topups.charge(pool, gateway, record.id)).status == "succeeded"
    await topups.set_status(pool, record.id, "canceled", failure_code="payment_expired")
    assert kinds(await reconcile_now(pool, gateway), account) == [("repaired", "payment_credited_late")]
    assert kinds(await reconcile_now(pool, gateway), account) == []
    assert await balances(api, account) == (5000, [1500])
    await verify_clean(api, account)


async def test_a_refund_stripe_refuses_puts_the_credits_back_in_the_systems_lot(
        cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient) -> None:  # noqa: F811
    """RefundWorkflow's compensation: Stripe refuses for good, the reserved credits go back to the same system lot."""
    api = cf.admin
    await transcription_system(api)
    account = await new_account(api)
    sub = f"{account}.{SYSTEM}"
    await save_card(api, sdk, account)
    bought = await buy(api, account, "sys-1")
    # As in test_refunds: an unpaid PaymentIntent is the one refund localstripe refuses permanently.
    unpaid = sdk.v1.payment_intents.create(params={"amount": 1000, "currency": "usd", "payment_method_types": ["card"]})
    async with pool.connection() as conn:
        await conn.execute("UPDATE stripe_charges SET payment_intent_id = %s WHERE account_id = %s",
                           (unpaid.id, account))
    lots_before = await lots(pool, sub)
    resp = await api.post(REFUNDS, json={"account_id": account, "payment_intent_id": unpaid.id, "credits": 600,
                                         "request_id": "refused"})
    assert (resp.status_code, resp.json()["error"]["code"]) == (422, "payment_request_invalid"), resp.text
    assert await lots(pool, sub) == lots_before
    assert await balances(api, account) == (5000, [1000])
    types = await rows(pool, "SELECT type, amount_micros FROM journal WHERE account_id = %s"
                             " AND type LIKE 'refund%%' ORDER BY seq", sub)
    assert [(t["type"], t["amount_micros"] // MICROS_PER_CREDIT) for t in types] == [
        ("refund", -600), ("refund_reversal", 600)]
    async with pool.connection() as conn:  # the real PaymentIntent back, for verify
        await conn.execute("UPDATE stripe_charges SET payment_intent_id = %s WHERE account_id = %s",
                           (bought["payment_intent_id"], account))
    await verify_clean(api, account)
