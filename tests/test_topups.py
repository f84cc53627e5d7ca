"""Top-ups end to end: the HTTP API, the real Temporal dev server (TopUpWorkflow on the production worker),
real localstripe and real PostgreSQL. No mocks.

Every test ends with a reconciliation: each succeeded PaymentIntent of the account's customer has exactly
one ``purchase`` journal row (keyed by it, for the amount paid) and each purchase row has one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from creditflow.config import Settings
from creditflow.domain.money import MICROS_PER_CREDIT
from tests.conftest import ADMIN_KEY, STRIPE_KEY, free_port, ledger_snapshot, new_card
from tests.support.api import app_client, bearer, key_for, new_account
from tests.support.payments import (
    DECLINED_AT_CHARGE,
    TOPUP,
    TOPUPS,
    charges,
    customer_of,
    intents_of,
    purchases,
    receipts,
    reconcile,
    save_card,
)
from tests.support.temporal import eventually
from workflows.contract import TOPUP_CANCELED, TopUpOutcome, topup_workflow_id

pytestmark = pytest.mark.temporal

@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=5000, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=stripe_base, stripe_retry_max_wait_seconds=0.1,
                    topup_poll_interval_seconds=0.3)


@pytest.fixture
async def api(temporal_settings: Settings, temporal_worker: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The real app, with Temporal from the dev server and the production worker on the test's queue."""
    async for client in app_client(temporal_settings):
        yield client


# --- helpers ----------------------------------------------------------------------------------------


# --- tests ------------------------------------------------------------------------------------------


async def test_saved_card_topup(api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient) -> None:
    account = await new_account(api)
    card = await save_card(api, sdk, account)
    writer = bearer(await key_for(api, account, "billing:write", "usage:write", "payments:write"))

    resp = await api.post(TOPUP, headers=writer, json={"amount_usd": 25, "request_id": "order-1"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    [pi] = intents_of(sdk, await customer_of(pool, account))
    assert body == {"status": "succeeded", "request_id": "order-1", "amount_usd": 25, "credits": 2500,
                    "transaction_id": body["transaction_id"], "balance": 7500, "payment_intent_id": pi.id}
    assert (pi.status, pi.amount, pi.currency, pi.payment_method) == ("succeeded", 2500, "usd", card)

    [row] = await purchases(pool, account)
    assert row["amount_micros"] == 2500 * MICROS_PER_CREDIT
    assert row["metadata"]["payment_intent_id"] == pi.id
    assert row["description"] == "Top-up of $25.00"
    txns = (await api.get("/api/v1/billing/transactions", headers=writer, params={"type": "purchase"})).json()
    [txn] = txns["items"]
    assert (txn["id"], txn["type"], txn["amount"], txn["balance_after"]) == (
        body["transaction_id"], "purchase", 2500, 7500)
    assert txn["metadata"]["payment_intent_id"] == pi.id

    [receipt] = await eventually(lambda: receipts(pool, account), lambda rows: len(rows) == 1)
    [charge] = await charges(pool, account)
    assert receipt["kind"] == "receipt" and receipt["dedup_key"] == f"receipt:{charge['id']}"
    assert receipt["payload"]["transaction_id"] == body["transaction_id"]
    assert (receipt["payload"]["amount"], receipt["payload"]["credits"]) == ("$25.00", 2500)
    assert (charge["status"], charge["payment_method_id"], charge["kind"]) == ("succeeded", card, "topup")

    # The same request later (the workflow has closed): the same top-up, no second charge or credit.
    again = await api.post(TOPUP, headers=writer, json={"amount_usd": "25.00", "request_id": "order-1"})
    assert again.status_code == 200
    assert {k: v for k, v in again.json().items() if k != "balance"} == {
        k: v for k, v in body.items() if k != "balance"}
    # Reusing the request id for another amount is a conflict.
    conflict = await api.post(TOPUP, headers=writer, json={"amount_usd": 30, "request_id": "order-1"})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_conflict"

    # A package, through an admin key naming the account.
    resp = await api.post(TOPUP, json={"account_id": account, "package_id": "growth", "request_id": "order-2"})
    assert resp.status_code == 200, resp.text
    assert (resp.json()["credits"], resp.json()["amount_usd"], resp.json()["balance"]) == (5000, 50, 12500)
    listed = (await api.get(TOPUPS, headers=writer)).json()["items"]
    assert [(t["request_id"], t["status"], t["amount_usd"], t["credits"], t["package_id"]) for t in listed] == [
        ("order-2", "succeeded", 50, 5000, "growth"), ("order-1", "succeeded", 25, 2500, None)]
    # The receipt is sent after the answer: wait for it.
    await eventually(lambda: receipts(pool, account), lambda rows: len(rows) == 2)
    assert await reconcile(pool, sdk, account) == 2


async def test_same_request_five_times_concurrently(api: httpx.AsyncClient, pool: AsyncConnectionPool,
                                                    sdk: stripe.StripeClient) -> None:
    account = await new_account(api)
    await save_card(api, sdk, account)
    request = {"account_id": account, "amount_usd": "12.34", "request_id": "dup-1"}
    responses = await asyncio.gather(*(api.post(TOPUP, json=request) for _ in range(5)))
    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    bodies = [r.json() for r in responses]
    assert all(b == bodies[0] for b in bodies)
    assert (bodies[0]["status"], bodies[0]["credits"], bodies[0]["amount_usd"]) == ("succeeded", 1234, 12.34)
    assert len(intents_of(sdk, await customer_of(pool, account))) == 1
    assert len(await charges(pool, account)) == 1
    await eventually(lambda: receipts(pool, account), lambda rows: len(rows) == 1)
    assert await reconcile(pool, sdk, account) == 1


async def test_declined_card(api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient,
                             database_url: str) -> None:
    account = await new_account(api)
    await save_card(api, sdk, account, DECLINED_AT_CHARGE)
    before = await ledger_snapshot(database_url)
    resp = await api.post(TOPUP, json={"account_id": account, "amount_usd": 40, "request_id": "declined-1"})
    assert resp.status_code == 402, resp.text
    error = resp.json()["error"]
    assert error["code"] == "card_declined"
    assert error["details"]["decline_code"] is None and error["details"]["request_id"] == "declined-1"
    assert await ledger_snapshot(database_url) == before
    [charge] = await charges(pool, account)
    assert (charge["status"], charge["failure_code"], charge["ledger_txn_id"]) == ("failed", "card_declined", None)
    assert await receipts(pool, account) == []
    # Asking again gives the same refusal and still charges nothing.
    again = await api.post(TOPUP, json={"account_id": account, "amount_usd": 40, "request_id": "declined-1"})
    assert again.status_code == 402 and again.json()["error"]["code"] == "card_declined"
    assert await ledger_snapshot(database_url) == before
    assert all(pi.status != "succeeded" for pi in intents_of(sdk, await customer_of(pool, account)))
    assert await reconcile(pool, sdk, account) == 0


async def test_bad_requests_change_nothing(api: httpx.AsyncClient, pool: AsyncConnectionPool,
                                           sdk: stripe.StripeClient, database_url: str) -> None:
    account, other = await new_account(api), await new_account(api)
    await save_card(api, sdk, account)
    theirs = await save_card(api, sdk, other)
    before = await ledger_snapshot(database_url)
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"amount_usd": "4.99"}, 422, "amount_out_of_range"),
        ({"amount_usd": 5000.01}, 422, "amount_out_of_range"),
        ({"amount_usd": 0}, 422, "amount_out_of_range"),
        ({"amount_usd": -10}, 422, "amount_out_of_range"),
        ({"amount_usd": "25.001"}, 422, "invalid_amount"),
        ({"package_id": "platinum"}, 422, "unknown_package"),
        ({"amount_usd": 25, "package_id": "growth"}, 422, "invalid_amount"),
        ({}, 422, "invalid_amount"),
        ({"amount_usd": True}, 422, "validation_error"),
        ({"amount_usd": 25, "payment_method_id": "card_123"}, 404, "unknown_payment_method"),
        ({"amount_usd": 25, "payment_method_id": "pm_doesnotexist1"}, 404, "unknown_payment_method"),
        ({"amount_usd": 25, "payment_method_id": theirs}, 404, "unknown_payment_method"),
    ]
    for i, (extra, status, code) in enumerate(cases):
        resp = await api.post(TOPUP, json={"account_id": account, "request_id": f"bad-{i}", **extra})
        assert (resp.status_code, resp.json()["error"]["code"]) == (status, code), (extra, resp.text)
    missing = await api.post(TOPUP, json={"account_id": "acc_" + "0" * 32, "amount_usd": 25, "request_id": "x"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_account"
    bad_request_id = await api.post(TOPUP, json={"account_id": account, "amount_usd": 25, "request_id": "a b"})
    assert bad_request_id.status_code == 422
    reader = bearer(await key_for(api, account, "billing:read"))
    denied = await api.post(TOPUP, headers=reader, json={"amount_usd": 25, "request_id": "r"})
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "insufficient_scope"
    assert await ledger_snapshot(database_url) == before
    # Only the unknown-card requests reached the workflow; their rows were never written (refused first).
    assert await charges(pool, account) == []
    assert await reconcile(pool, sdk, account) == 0


async def test_client_secret_path(api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient,
                                  temporal_client: Client) -> None:
    account = await new_account(api)
    resp = await api.post(TOPUP, json={"account_id": account, "package_id": "starter", "request_id": "cs-1"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    [pi] = intents_of(sdk, await customer_of(pool, account))
    assert body == {"status": "requires_payment", "request_id": "cs-1", "amount_usd": 10, "credits": 1000,
                    "package_id": "starter", "payment_intent_id": pi.id, "client_secret": pi.client_secret,
                    "clientSecret": pi.client_secret}  # seed 004's name for it
    assert pi.status == "requires_payment_method"
    [charge] = await charges(pool, account)
    assert (charge["status"], charge["payment_method_id"]) == ("requires_action", None)
    assert await purchases(pool, account) == []
    # Asked again while waiting: the same answer.
    again = await api.post(TOPUP, json={"account_id": account, "package_id": "starter", "request_id": "cs-1"})
    assert again.json() == body

    # The customer pays in the browser (Stripe.js would confirm with the client secret).
    sdk.v1.payment_intents.update(pi.id, params={"payment_method": new_card(sdk)})
    assert sdk.v1.payment_intents.confirm(pi.id).status == "succeeded"
    handle = temporal_client.get_workflow_handle(topup_workflow_id(account, "cs-1"), result_type=TopUpOutcome)
    outcome = await asyncio.wait_for(handle.result(), 20)
    assert (outcome.status, outcome.credits, outcome.payment_intent_id) == ("succeeded", 1000, pi.id)
    [row] = await purchases(pool, account)
    assert row["metadata"]["package_id"] == "starter" and row["description"] == "Starter package purchase"
    assert len(await receipts(pool, account)) == 1

    # After the workflow closed: the same request answers with the credit, and credits nothing more.
    done = await api.post(TOPUP, json={"account_id": account, "package_id": "starter", "request_id": "cs-1"})
    assert done.status_code == 200
    assert (done.json()["status"], done.json()["transaction_id"]) == ("succeeded", outcome.transaction_id)
    assert len(intents_of(sdk, await customer_of(pool, account))) == 1
    assert await reconcile(pool, sdk, account) == 1


async def test_client_secret_expires(temporal_settings: Settings, temporal_worker: Any, temporal_client: Client,
                                     pool: AsyncConnectionPool, sdk: stripe.StripeClient) -> None:
    """Not paid in time: the PaymentIntent is canceled, the row says so, nothing is credited."""
    short = temporal_settings.model_copy(update={"topup_payment_expiry_seconds": 2})
    async for api in app_client(short):
        account = await new_account(api)
        resp = await api.post(TOPUP, json={"account_id": account, "amount_usd": 7, "request_id": "late-1"})
        assert resp.status_code == 200 and resp.json()["status"] == "requires_payment", resp.text
        handle = temporal_client.get_workflow_handle(topup_workflow_id(account, "late-1"), result_type=TopUpOutcome)
        outcome = await asyncio.wait_for(handle.result(), 20)
        assert (outcome.status, outcome.error_code, outcome.client_secret) == (TOPUP_CANCELED, "payment_expired", None)
        [pi] = intents_of(sdk, await customer_of(pool, account))
        assert pi.status == "canceled"
        [charge] = await charges(pool, account)
        assert (charge["status"], charge["failure_code"]) == ("canceled", "payment_expired")
        listed = (await api.get(TOPUPS, params={"account_id": account})).json()["items"]
        assert [t["status"] for t in listed] == ["canceled"]
        assert await reconcile(pool, sdk, account) == 0


async def test_payment_event_signal_wakes_the_workflow(api: httpx.AsyncClient, pool: AsyncConnectionPool,
                                                       sdk: stripe.StripeClient, temporal_client: Client) -> None:
    """The webhook slice will signal ``payment_event``; the workflow looks at once instead of at the next poll."""
    account = await new_account(api)
    resp = await api.post(TOPUP, json={"account_id": account, "amount_usd": 9, "request_id": "sig-1"})
    pi_id = resp.json()["payment_intent_id"]
    sdk.v1.payment_intents.update(pi_id, params={"payment_method": new_card(sdk)})
    sdk.v1.payment_intents.confirm(pi_id)
    handle = temporal_client.get_workflow_handle(topup_workflow_id(account, "sig-1"), result_type=TopUpOutcome)
    await handle.signal("payment_event", {"payment_intent_id": pi_id, "event_type": "payment_intent.succeeded"})
    outcome = await asyncio.wait_for(handle.result(), 20)
    assert outcome.status == "succeeded"
    state = await eventually(lambda: handle.query("status", result_type=TopUpOutcome), lambda o: o.balance == 5900)
    assert state.transaction_id == outcome.transaction_id
    assert await reconcile(pool, sdk, account) == 1


async def test_temporal_down_is_503(settings: Settings, pool: AsyncConnectionPool, database_url: str) -> None:
    """The API starts and serves without Temporal; a top-up then says so and changes nothing."""
    down = settings.model_copy(update={"temporal_address": f"127.0.0.1:{free_port()}"})
    async for api in app_client(down):
        account = await new_account(api)
        before = await ledger_snapshot(database_url)
        resp = await api.post(TOPUP, json={"account_id": account, "amount_usd": 25, "request_id": "r-1"})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "workflow_unavailable"
        assert (await api.get(TOPUPS, params={"account_id": account})).json() == {"items": [], "has_more": False}
        assert await ledger_snapshot(database_url) == before


async def test_cli_topup(temporal_settings: Settings, temporal_worker: Any, api: httpx.AsyncClient,
                         pool: AsyncConnectionPool, sdk: stripe.StripeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from creditflow import topup_cli
    from creditflow.cli import app
    from creditflow.config import get_settings

    account = await new_account(api)
    await save_card(api, sdk, account)
    env = {"DATABASE_URL": temporal_settings.database_url, "TEMPORAL_ADDRESS": temporal_settings.temporal_address,
           "TEMPORAL_TASK_QUEUE": temporal_settings.temporal_task_queue, "STRIPE_API_KEY": STRIPE_KEY,
           "STRIPE_API_BASE": temporal_settings.stripe_api_base}
    for name, value in env.items():
        monkeypatch.setenv(f"CREDITFLOW_{name}", value)
    monkeypatch.setattr(topup_cli.console, "width", 250)
    get_settings.cache_clear()
    runner = CliRunner()
    try:
        # In a thread: the CLI runs its own event loop while the worker keeps running on this one.
        args = ["topup", account, "--amount-usd", "25", "--request-id", "cli-1"]
        first = await asyncio.to_thread(runner.invoke, app, args)
        assert first.exit_code == 0, first.output
        assert "succeeded: $25.00 for 2,500 credits" in first.output and "balance 7500" in first.output
        again = await asyncio.to_thread(runner.invoke, app, args)
        assert again.exit_code == 0 and "succeeded" in again.output
        package = await asyncio.to_thread(runner.invoke, app, ["topup", account, "--package", "growth"])
        assert package.exit_code == 0 and "$50.00 for 5,000 credits" in package.output
        bad = await asyncio.to_thread(runner.invoke, app, ["topup", account, "--amount-usd", "4"])
        assert bad.exit_code == 1 and "amount_out_of_range" in bad.output
    finally:
        get_settings.cache_clear()
    assert await reconcile(pool, sdk, account) == 2
