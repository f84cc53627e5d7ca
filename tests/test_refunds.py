"""Refunds end to end: HTTP API, RefundWorkflow on the production worker (real Temporal dev server), real
localstripe and real PostgreSQL. No mocks. Every test ends with the ledger invariants and a reconciliation:
each refund row matches the Stripe refunds of its PaymentIntent, and refunded cents never exceed captured cents.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool

from creditflow.config import Settings
from creditflow.domain.money import MICROS_PER_CREDIT
from tests.conftest import ADMIN_KEY, STRIPE_KEY, ledger_snapshot
from tests.support.api import app_client, bearer, key_for, new_account, track
from tests.support.ledger import assert_invariants
from tests.support.payments import REFUNDS, customer_of, intents_of, reconcile, save_card, stripe_refunds, topup

pytestmark = pytest.mark.temporal



@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    """As in the top-up tests: localstripe, quick gateway retries."""
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=5000, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=stripe_base, stripe_retry_max_wait_seconds=0.1)


@pytest.fixture
async def api(temporal_settings: Settings, temporal_worker: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The real app with Temporal from the dev server and the production worker on the test's queue."""
    async for client in app_client(temporal_settings):
        yield client


async def balance_of(api: httpx.AsyncClient, account: str) -> Any:
    return (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()["balance"]


async def rows(pool: AsyncConnectionPool, sql: str, *args: object) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute(sql, args)).fetchall()


async def reconcile_refunds(pool: AsyncConnectionPool, sdk: stripe.StripeClient, account: str) -> None:
    """Succeeded refund rows = Stripe's refunds (same ids and cents); refunded <= captured; the ledger's refund
    rows are exactly the succeeded refunds' credits (failed ones reversed)."""
    await assert_invariants(pool)
    await reconcile(pool, sdk, account)
    refund_rows = await rows(pool, "SELECT * FROM refunds WHERE account_id = %s", account)
    intents = intents_of(sdk, await customer_of(pool, account))
    captured = {pi.id: pi.amount for pi in intents if pi.status == "succeeded"}
    for pi_id, cents in captured.items():
        on_stripe = stripe_refunds(sdk, pi_id)
        ours = [r for r in refund_rows if r["payment_intent_id"] == pi_id and r["status"] == "succeeded"]
        assert sorted(r.id for r in on_stripe) == sorted(r["stripe_refund_id"] for r in ours)
        assert sum(r.amount for r in on_stripe) == sum(r["amount_cents"] for r in ours) <= cents
    net = await rows(pool, "SELECT coalesce(sum(amount_micros), 0) AS s FROM journal WHERE account_id = %s"
                           " AND type IN ('refund', 'refund_reversal')", account)
    assert -net[0]["s"] == sum(r["credits"] for r in refund_rows if r["status"] == "succeeded") * MICROS_PER_CREDIT


async def test_refund_part_of_a_topup(api: httpx.AsyncClient, pool: AsyncConnectionPool,
                                      sdk: stripe.StripeClient) -> None:
    account = await new_account(api)
    await save_card(api, sdk, account)
    bought = await topup(api, sdk, account)
    assert bought["balance"] == 7500
    writer = bearer(await key_for(api, account, "billing:write", "usage:write", "payments:write"))
    resp = await api.post(REFUNDS, headers=writer, json={
        "purchase_transaction_id": bought["transaction_id"], "credits": 1000, "request_id": "r-1"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["status"], body["credits"], body["amount_usd"], body["balance"]) == ("succeeded", 1000, 10, 6500)
    assert await balance_of(api, account) == 6500
    [refund] = stripe_refunds(sdk, bought["payment_intent_id"])
    assert (refund.amount, refund.status, refund.id) == (1000, "succeeded", body["stripe_refund_id"])
    txns = (await api.get("/api/v1/billing/transactions", headers=writer, params={"type": "refund"})).json()
    [txn] = txns["items"]
    assert (txn["id"], txn["amount"], txn["balance_after"]) == (body["transaction_id"], -1000, 6500)
    assert txn["description"].startswith("Refund of 1,000 credits ($10.00)")
    # The purchase's own lot lost the credits; the welcome bonus is untouched.
    lots = await rows(pool, "SELECT source, remaining_micros FROM credit_lots WHERE account_id = %s ORDER BY source",
                      account)
    assert [(r["source"], r["remaining_micros"] // MICROS_PER_CREDIT) for r in lots] == [
        ("purchase", 1500), ("welcome_bonus", 5000)]
    # Repeating the request (workflow closed) refunds nothing more.
    again = await api.post(REFUNDS, headers=writer, json={
        "purchase_transaction_id": bought["transaction_id"], "credits": 1000, "request_id": "r-1"})
    assert again.status_code == 200 and again.json()["refund_id"] == body["refund_id"]
    assert len(stripe_refunds(sdk, bought["payment_intent_id"])) == 1 and await balance_of(api, account) == 6500
    listed = (await api.get(REFUNDS, headers=writer)).json()["items"]
    assert [(r["request_id"], r["status"], r["credits"], r["amount_usd"]) for r in listed] == [
        ("r-1", "succeeded", 1000, 10)]
    await reconcile_refunds(pool, sdk, account)


async def test_full_refund_after_usage(api: httpx.AsyncClient, pool: AsyncConnectionPool,
                                       sdk: stripe.StripeClient) -> None:
    """Usage burns the welcome bonus (5,000) first, then the purchase: 5,600 used leaves 1,900 of 2,500."""
    account = await new_account(api)
    await save_card(api, sdk, account)
    bought = await topup(api, sdk, account)
    for i, value in enumerate((3000, 2000, 600)):
        assert (await track(api, account, "chat_message", value, f"u-{i}")).status_code == 200
    resp = await api.post(REFUNDS, json={"account_id": account, "payment_intent_id": bought["payment_intent_id"],
                                         "request_id": "all"})
    assert resp.status_code == 200, resp.text
    assert (resp.json()["credits"], resp.json()["amount_usd"], resp.json()["balance"]) == (1900, 19, 0)
    [refund] = stripe_refunds(sdk, bought["payment_intent_id"])
    assert refund.amount == 1900
    # Nothing remains: another refund of it is refused and changes nothing.
    more = await api.post(REFUNDS, json={"account_id": account, "payment_intent_id": bought["payment_intent_id"],
                                         "request_id": "more"})
    assert more.status_code == 422 and more.json()["error"]["code"] == "refund_exceeds_remaining"
    await reconcile_refunds(pool, sdk, account)


async def test_refusals_change_nothing(api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient,
                                       database_url: str) -> None:
    account = await new_account(api)
    await save_card(api, sdk, account)
    bought = await topup(api, sdk, account)
    [bonus] = await rows(pool, "SELECT id FROM journal WHERE account_id = %s AND type = 'welcome_bonus'", account)
    writer = bearer(await key_for(api, account, "billing:write", "usage:write", "payments:write"))
    before = await ledger_snapshot(database_url)
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"purchase_transaction_id": bought["transaction_id"], "credits": 2501}, 422, "refund_exceeds_remaining"),
        ({"purchase_transaction_id": f"txn_{bonus['id'].hex}"}, 422, "not_refundable"),
        ({"purchase_transaction_id": "txn_" + "0" * 32}, 404, "unknown_purchase"),
        ({"payment_intent_id": "pi_doesnotexist"}, 404, "unknown_purchase"),
        ({"purchase_transaction_id": bought["transaction_id"], "credits": 0}, 422, "invalid_amount"),
        ({"purchase_transaction_id": bought["transaction_id"], "credits": "1.5"}, 422, "invalid_amount"),
        ({"purchase_transaction_id": bought["transaction_id"], "reason": "billing_error"}, 403, "forbidden"),
        ({"purchase_transaction_id": "txn_nope"}, 422, "invalid_id"),
    ]
    for i, (extra, status, code) in enumerate(cases):
        resp = await api.post(REFUNDS, headers=writer, json={"request_id": f"bad-{i}", **extra})
        assert (resp.status_code, resp.json()["error"]["code"]) == (status, code), (extra, resp.text)
    assert await ledger_snapshot(database_url) == before
    assert await rows(pool, "SELECT id FROM refunds") == []
    assert stripe_refunds(sdk, bought["payment_intent_id"]) == []
    # An admin may use the admin-only reasons (same limits).
    ok = await api.post(REFUNDS, json={"account_id": account, "purchase_transaction_id": bought["transaction_id"],
                                       "credits": 5, "reason": "duplicate_charge", "request_id": "admin-1"})
    assert ok.status_code == 200 and ok.json()["credits"] == 5, ok.text
    await reconcile_refunds(pool, sdk, account)


async def test_refund_window_expired(api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient,
                                     database_url: str) -> None:
    account = await new_account(api)
    await save_card(api, sdk, account)
    bought = await topup(api, sdk, account)
    # Make the purchase 31 days old directly in the test database (the journal is append-only; the lot's
    # created_at is the purchase time the rules use, the charge row's is kept consistent).
    async with pool.connection() as conn:
        await conn.execute("UPDATE credit_lots SET created_at = created_at - interval '31 days'"
                           " WHERE account_id = %s AND source = 'purchase'", (account,))
        await conn.execute("UPDATE stripe_charges SET created_at = created_at - interval '31 days'"
                           " WHERE account_id = %s", (account,))
    before = await ledger_snapshot(database_url)
    resp = await api.post(REFUNDS, json={"account_id": account, "purchase_transaction_id": bought["transaction_id"],
                                         "request_id": "late"})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "refund_window_expired", resp.text
    assert await ledger_snapshot(database_url) == before
    await reconcile_refunds(pool, sdk, account)


async def test_same_refund_five_times_concurrently(api: httpx.AsyncClient, pool: AsyncConnectionPool,
                                                   sdk: stripe.StripeClient) -> None:
    account = await new_account(api)
    await save_card(api, sdk, account)
    bought = await topup(api, sdk, account)
    request = {"account_id": account, "purchase_transaction_id": bought["transaction_id"], "credits": 700,
               "request_id": "dup"}
    responses = await asyncio.gather(*(api.post(REFUNDS, json=request) for _ in range(5)))
    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    assert all(r.json() == responses[0].json() for r in responses)
    assert len(stripe_refunds(sdk, bought["payment_intent_id"])) == 1
    reserves = await rows(pool, "SELECT id FROM journal WHERE account_id = %s AND type = 'refund'", account)
    assert len(reserves) == 1 and await balance_of(api, account) == 6800
    await reconcile_refunds(pool, sdk, account)


async def test_stripe_refusal_releases_the_reservation(api: httpx.AsyncClient, pool: AsyncConnectionPool,
                                                       sdk: stripe.StripeClient) -> None:
    """Stripe refuses the refund for good: the credits go back to the same lot, the refund is failed."""
    account = await new_account(api)
    await save_card(api, sdk, account)
    bought = await topup(api, sdk, account)
    # Point the charge row at an unpaid PaymentIntent, which localstripe refuses to refund ("Cannot refund a
    # failed payment"): the only way to make localstripe refuse a refund permanently.
    unpaid = sdk.v1.payment_intents.create(params={"amount": 2500, "currency": "usd",
                                                   "payment_method_types": ["card"]})
    async with pool.connection() as conn:
        await conn.execute("UPDATE stripe_charges SET payment_intent_id = %s WHERE account_id = %s",
                           (unpaid.id, account))
    lots_before = await rows(pool, "SELECT id, remaining_micros FROM credit_lots WHERE account_id = %s ORDER BY id",
                             account)
    resp = await api.post(REFUNDS, json={"account_id": account, "payment_intent_id": unpaid.id, "credits": 1000,
                                         "request_id": "refused"})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "payment_request_invalid", resp.text
    assert resp.json()["error"]["details"]["status"] == "failed"
    assert await balance_of(api, account) == 7500
    assert await rows(pool, "SELECT id, remaining_micros FROM credit_lots WHERE account_id = %s ORDER BY id",
                      account) == lots_before
    [refund] = await rows(pool, "SELECT * FROM refunds WHERE account_id = %s", account)
    assert (refund["status"], refund["failure_code"], refund["stripe_refund_id"]) == (
        "failed", "payment_request_invalid", None)
    types = await rows(pool, "SELECT type, amount_micros FROM journal WHERE account_id = %s"
                             " AND type LIKE 'refund%%' ORDER BY seq", account)
    assert [(t["type"], t["amount_micros"] // MICROS_PER_CREDIT) for t in types] == [
        ("refund", -1000), ("refund_reversal", 1000)]
    listed = (await api.get(REFUNDS, params={"account_id": account})).json()["items"]
    assert [(r["status"], r["failure_code"]) for r in listed] == [("failed", "payment_request_invalid")]
    assert stripe_refunds(sdk, bought["payment_intent_id"]) == []
    async with pool.connection() as conn:  # restore the real PaymentIntent for the reconciliation
        await conn.execute("UPDATE stripe_charges SET payment_intent_id = %s WHERE account_id = %s",
                           (bought["payment_intent_id"], account))
    await reconcile_refunds(pool, sdk, account)


async def test_cli_refund(temporal_settings: Any, temporal_worker: Any, api: httpx.AsyncClient,
                          pool: AsyncConnectionPool, sdk: stripe.StripeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from creditflow import refund_cli
    from creditflow.cli import app
    from creditflow.config import get_settings

    account = await new_account(api)
    await save_card(api, sdk, account)
    bought = await topup(api, sdk, account)
    env = {"DATABASE_URL": temporal_settings.database_url, "TEMPORAL_ADDRESS": temporal_settings.temporal_address,
           "TEMPORAL_TASK_QUEUE": temporal_settings.temporal_task_queue, "STRIPE_API_KEY": STRIPE_KEY,
           "STRIPE_API_BASE": temporal_settings.stripe_api_base}
    for name, value in env.items():
        monkeypatch.setenv(f"CREDITFLOW_{name}", value)
    monkeypatch.setattr(refund_cli.console, "width", 250)
    get_settings.cache_clear()
    runner = CliRunner()
    try:
        args = ["refund", account, "--purchase", bought["transaction_id"], "--credits", "300", "--reason",
                "billing_error", "--request-id", "cli-1"]
        first = await asyncio.to_thread(runner.invoke, app, args)
        assert first.exit_code == 0, first.output
        assert "succeeded: 300 credits ($3.00) refunded" in first.output and "balance 7200" in first.output
        too_much = await asyncio.to_thread(runner.invoke, app, ["refund", account, "--purchase",
                                                                bought["transaction_id"], "--credits", "5000"])
        assert too_much.exit_code == 1 and "refund_exceeds_remaining" in too_much.output
    finally:
        get_settings.cache_clear()
    assert len(stripe_refunds(sdk, bought["payment_intent_id"])) == 1
    await reconcile_refunds(pool, sdk, account)
