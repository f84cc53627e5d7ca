"""An invoice is charged at most once across its collection attempts.

``InvoiceWorkflow`` on the real Temporal dev server with the production worker, real PostgreSQL and localstripe.
Stripe's side is driven through the emulator's own API; the only fault injected is a pass-through proxy in front of
it that refuses PaymentIntent cancels, as Stripe does for a PaymentIntent it is still processing (localstripe has no
``processing`` state). That is the "unclear" end of attempt 1: it is recorded failed while its PaymentIntent can
still succeed, and does (the customer completes 3-D Secure) before attempt 2.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import stripe
from aiohttp import ClientSession, web
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from creditflow.config import Settings
from tests.conftest import ADMIN_KEY, STRIPE_KEY, free_port
from tests.support.api import app_client
from tests.support.invoices import invoice_charges, period_around_now, rows, start, workflow_input
from tests.support.ledger import assert_invariants
from tests.support.payments import customer_of, intents_of, save_card
from tests.support.temporal import eventually
from workflows.invoice import InvoiceWorkflow

pytestmark = pytest.mark.temporal

NEEDS_3DS = "4000002500003155"  # localstripe: attaches; an off-session charge needs the customer (requires_action)


@pytest.fixture
async def cancel_refusing_stripe(stripe_base: str) -> AsyncIterator[tuple[str, dict[str, bool]]]:
    """localstripe behind a pass-through proxy that refuses ``POST /v1/payment_intents/{id}/cancel`` while
    ``state["refuse_cancel"]`` is set (Stripe's answer for a PaymentIntent that is processing)."""
    state = {"refuse_cancel": True, "answer_processing": False}
    session = ClientSession()

    async def forward(request: web.Request) -> web.StreamResponse:
        if state["refuse_cancel"] and request.method == "POST" and request.path.endswith("/cancel") \
                and request.path.startswith("/v1/payment_intents/"):
            return web.json_response({"error": {
                "type": "invalid_request_error", "code": "payment_intent_unexpected_state",
                "message": "You cannot cancel this PaymentIntent because it has a status of processing."}},
                status=400)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with session.request(request.method, stripe_base + request.path_qs, data=await request.read(),
                                   headers=headers) as resp:
            body = await resp.read()
            if state["answer_processing"] and resp.status == 200 \
                    and request.path.startswith("/v1/payment_intents") and not request.path.endswith("/cancel"):
                # The bank takes its time: Stripe says ``processing`` for as long as the flag is set (the emulator
                # has no such state; reading the PaymentIntent back afterwards shows what really happened).
                body = body.replace(b'"status": "succeeded"', b'"status": "processing"')
            return web.Response(body=body, status=resp.status, content_type=resp.content_type)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        await runner.cleanup()
        await session.close()


@pytest.fixture
def settings(database_url: str, cancel_refusing_stripe: tuple[str, dict[str, bool]]) -> Settings:
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=5000, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=cancel_refusing_stripe[0], stripe_retry_max_wait_seconds=0.1,
                    topup_poll_interval_seconds=0.3)


@pytest.fixture
async def wf_api(temporal_settings: Settings, temporal_worker: Any) -> AsyncIterator[httpx.AsyncClient]:
    async for client in app_client(temporal_settings):
        yield client


async def test_invoice_is_not_charged_twice_when_an_unclear_attempt_succeeds_late(
        wf_api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient, stripe_base: str,
        temporal_client: Client, temporal_settings: Settings) -> None:
    api = wf_api
    account = (await api.post("/api/v1/accounts", json={"name": "Twice", "billing_email": "ap@twice.test"})).json()[
        "id"]
    await save_card(api, sdk, account, NEEDS_3DS)
    begin, end = period_around_now()
    input = workflow_input(account, begin, end, plan_id="starter", charge_attempts=2, retry_interval_seconds=3600)
    handle = await start(temporal_client, temporal_settings, input)
    status = await eventually(lambda: handle.query(InvoiceWorkflow.status),
                              lambda s: s.status == "past_due" and s.next_attempt_at is not None, timeout=30)
    assert (status.attempts, status.error_code) == (1, "authentication_required")
    [first] = await invoice_charges(pool, account)
    assert first["status"] == "failed" and first["payment_intent_id"]
    pi = sdk.v1.payment_intents.retrieve(first["payment_intent_id"])
    assert pi.status == "requires_action"  # not canceled: attempt 1 ended unclear

    # Attempt 1's PaymentIntent succeeds late (the customer completes 3-D Secure); then they save a new default
    # card and ask for the retry.
    done = httpx.post(f"{stripe_base}/v1/payment_intents/{pi.id}/_authenticate",
                      data={"client_secret": pi.client_secret, "success": "true"}, auth=(STRIPE_KEY, ""))
    assert done.status_code == 200 and done.json()["status"] == "succeeded", done.text
    card = await save_card(api, sdk, account)
    made_default = await api.post(f"/api/v1/billing/payment-methods/{card}/default", params={"account_id": account})
    assert made_default.status_code == 200, made_default.text
    await handle.signal(InvoiceWorkflow.retry_payment)
    outcome = await asyncio.wait_for(handle.result(), 60)

    assert (outcome.status, outcome.amount_due_cents, outcome.payment_intent_id) == ("paid", 4_900, pi.id)
    succeeded = [p.id for p in intents_of(sdk, await customer_of(pool, account)) if p.status == "succeeded"]
    assert succeeded == [pi.id]  # charged once
    charges = await invoice_charges(pool, account)
    assert [(c["id"], c["status"]) for c in charges] == [(first["id"], "succeeded")]
    [row] = await rows(pool, "SELECT status, charge_id, payment_intent_id FROM invoices WHERE account_id = %s",
                       account)
    assert (row["status"], row["charge_id"], row["payment_intent_id"]) == ("paid", first["id"], pi.id)
    await assert_invariants(pool)


async def test_an_invoice_payment_stripe_answers_processing_is_not_a_failure(
        wf_api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient,
        cancel_refusing_stripe: tuple[str, dict[str, bool]], temporal_client: Client,
        temporal_settings: Settings) -> None:
    """Stripe answers the off-session charge ``processing``: the invoice is not past due, no notice goes out, the
    charge is not marked failed; the next attempt reads the PaymentIntent back (it succeeded) and settles with it."""
    api = wf_api
    cancel_refusing_stripe[1]["answer_processing"] = True
    account = (await api.post("/api/v1/accounts", json={"name": "Slow Bank", "billing_email": "ap@slow.test"})
               ).json()["id"]
    await save_card(api, sdk, account)
    begin, end = period_around_now()
    input = workflow_input(account, begin, end, plan_id="starter", charge_attempts=3, retry_interval_seconds=3600)
    handle = await start(temporal_client, temporal_settings, input)
    status = await eventually(lambda: handle.query(InvoiceWorkflow.status),
                              lambda s: s.next_attempt_at is not None, timeout=30)
    assert (status.status, status.attempts, status.error_code) == ("open", 1, "payment_processing")
    [first] = await invoice_charges(pool, account)
    assert first["status"] != "failed" and first["payment_intent_id"]

    cancel_refusing_stripe[1]["answer_processing"] = False
    await handle.signal(InvoiceWorkflow.retry_payment)
    outcome = await asyncio.wait_for(handle.result(), 60)
    assert (outcome.status, outcome.amount_due_cents, outcome.payment_intent_id) == (
        "paid", 4_900, first["payment_intent_id"])
    succeeded = [p.id for p in intents_of(sdk, await customer_of(pool, account)) if p.status == "succeeded"]
    assert succeeded == [first["payment_intent_id"]]  # charged once
    notices = await rows(pool, "SELECT kind FROM notifications_log WHERE account_id = %s ORDER BY id", account)
    assert "invoice.past_due" not in [n["kind"] for n in notices]
    await assert_invariants(pool)
