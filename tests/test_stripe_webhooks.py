"""Stripe webhooks end to end: ``POST /api/v1/stripe/webhook`` on the real app, the real Temporal dev server
(TopUpWorkflow on the production worker), real localstripe and real PostgreSQL. No mocks.

The top-up workflows here poll the PaymentIntent every 10 minutes, so a credit that lands within seconds
can only have been caused by the webhook's signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import stripe
from fastapi import FastAPI
from psycopg_pool import AsyncConnectionPool
from pydantic import SecretStr
from temporalio.client import Client

from creditflow.api.app import create_app
from creditflow.config import Settings
from tests.conftest import ADMIN_KEY, free_port, ledger_snapshot
from tests.support.api import new_account
from tests.support.payments import DECLINED_AT_CHARGE, TOPUP, charges, purchases, reconcile
from tests.support.webhooks import (  # noqa: F401 - fixtures
    SECRET,
    WEBHOOK,
    Clients,
    cf,
    clients_for,
    event,
    pay,
    settings,
    sign,
)
from workflows.contract import TOPUP_REQUIRES_PAYMENT, TopUpOutcome, topup_workflow_id

pytestmark = pytest.mark.temporal

# --- helpers ----------------------------------------------------------------------------------------


async def client_secret_topup(cf: Clients, account: str, request_id: str, amount_usd: int = 10) -> str:  # noqa: F811
    """A top-up without a saved card: the workflow waits for the payment. Returns the PaymentIntent id."""
    resp = await cf.admin.post(TOPUP, json={"account_id": account, "amount_usd": amount_usd,
                                            "request_id": request_id})
    assert resp.status_code == 200 and resp.json()["status"] == "requires_payment", resp.text
    return resp.json()["payment_intent_id"]


async def stripe_events(pool: AsyncConnectionPool) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute("SELECT * FROM stripe_events ORDER BY received_at, id")).fetchall()


async def status_of(temporal_client: Client, account: str, request_id: str) -> TopUpOutcome:
    handle = temporal_client.get_workflow_handle(topup_workflow_id(account, request_id))
    return await handle.query("status", result_type=TopUpOutcome)


async def result_of(temporal_client: Client, account: str, request_id: str, timeout: float = 20) -> TopUpOutcome:
    handle = temporal_client.get_workflow_handle(topup_workflow_id(account, request_id), result_type=TopUpOutcome)
    return await asyncio.wait_for(handle.result(), timeout)


# --- tests ------------------------------------------------------------------------------------------


async def test_signed_event_credits_once(cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient,  # noqa: F811
                                         temporal_client: Client) -> None:
    account = await new_account(cf.admin)
    pi_id = await client_secret_topup(cf, account, "wh-1")
    pi = pay(sdk, pi_id)
    assert pi["status"] == "succeeded"
    await asyncio.sleep(1.0)  # paid, but the workflow does not know: its next poll is 10 minutes away
    assert (await status_of(temporal_client, account, "wh-1")).status == TOPUP_REQUIRES_PAYMENT
    assert await purchases(pool, account) == []

    body = event("payment_intent.succeeded", pi, event_id="evt_wh1_succeeded")
    started = time.monotonic()
    resp = await cf.deliver(body, sign(body))
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"received": True, "duplicate": False, "event_id": "evt_wh1_succeeded",
                           "outcome": "signaled"}
    outcome = await result_of(temporal_client, account, "wh-1")
    assert time.monotonic() - started < 15
    assert (outcome.status, outcome.credits, outcome.payment_intent_id) == ("succeeded", 1000, pi_id)

    [row] = await stripe_events(pool)
    [charge] = await charges(pool, account)
    assert (row["id"], row["type"], row["outcome"], row["charge_id"], row["attempts"]) == (
        "evt_wh1_succeeded", "payment_intent.succeeded", "signaled", charge["id"], 1)
    assert row["processed_at"] is not None and row["payload"] == json.loads(body)
    assert int(row["created"].timestamp()) == json.loads(body)["created"]

    # Redelivered (Stripe does): acknowledged, nothing done again.
    again = await cf.deliver(body, sign(body))
    assert again.status_code == 200 and again.json() == {"received": True, "duplicate": True}
    assert len(await stripe_events(pool)) == 1
    assert await reconcile(pool, sdk, account) == 1


async def test_five_deliveries_concurrent_and_out_of_order(cf: Clients, pool: AsyncConnectionPool,  # noqa: F811
                                                           sdk: stripe.StripeClient, temporal_client: Client) -> None:
    account = await new_account(cf.admin)
    paid_pi = await client_secret_topup(cf, account, "wh-paid", 25)
    declined_pi = await client_secret_topup(cf, account, "wh-declined", 30)
    paid = pay(sdk, paid_pi)
    declined = pay(sdk, declined_pi, DECLINED_AT_CHARGE)
    assert (paid["status"], declined["status"]) == ("succeeded", "requires_payment_method")

    now = int(time.time())
    succeeded = event("payment_intent.succeeded", paid, event_id="evt_paid_succeeded", created=now)
    # An older failure of the same PaymentIntent (a first attempt), arriving late: it must not undo anything.
    stale_failure = event("payment_intent.payment_failed", {**paid, "status": "requires_payment_method"},
                          event_id="evt_paid_failed_earlier", created=now - 60)
    failed = event("payment_intent.payment_failed", declined, event_id="evt_declined_failed", created=now)
    deliveries = [succeeded] * 5 + [failed] * 2 + [stale_failure]
    random.Random(7).shuffle(deliveries)
    responses = await asyncio.gather(*(cf.deliver(body, sign(body)) for body in deliveries))
    assert [r.status_code for r in responses] == [200] * len(deliveries), [r.text for r in responses]
    firsts = [r.json() for r in responses if not r.json()["duplicate"]]
    assert sorted(f["event_id"] for f in firsts) == ["evt_declined_failed", "evt_paid_failed_earlier",
                                                     "evt_paid_succeeded"]
    assert sum(r.json()["duplicate"] for r in responses) == 5

    outcome = await result_of(temporal_client, account, "wh-paid")
    assert (outcome.status, outcome.credits) == ("succeeded", 2500)
    # The declined payment was looked at and is still waiting for the customer: nothing credited.
    waiting = await status_of(temporal_client, account, "wh-declined")
    assert (waiting.status, waiting.transaction_id) == (TOPUP_REQUIRES_PAYMENT, None)

    rows = {r["id"]: r for r in await stripe_events(pool)}
    assert sorted(rows) == ["evt_declined_failed", "evt_paid_failed_earlier", "evt_paid_succeeded"]
    assert all(r["processed_at"] is not None and r["attempts"] == 1 for r in rows.values())
    assert (rows["evt_paid_succeeded"]["outcome"], rows["evt_declined_failed"]["outcome"]) == ("signaled", "signaled")
    assert rows["evt_paid_failed_earlier"]["outcome"] in ("signaled", "workflow_closed")
    by_pi = {c["payment_intent_id"]: c for c in await charges(pool, account)}
    assert rows["evt_paid_succeeded"]["charge_id"] == by_pi[paid_pi]["id"]
    assert rows["evt_declined_failed"]["charge_id"] == by_pi[declined_pi]["id"]
    [purchase] = await purchases(pool, account)
    assert purchase["metadata"]["payment_intent_id"] == paid_pi
    assert await reconcile(pool, sdk, account) == 1


async def test_bad_deliveries_change_nothing(cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient,  # noqa: F811
                                             temporal_client: Client, database_url: str,
                                             temporal_settings: Settings) -> None:
    account = await new_account(cf.admin)
    pi_id = await client_secret_topup(cf, account, "wh-bad")
    pi = pay(sdk, pi_id)  # paid: a delivery that got through would credit it
    body = event("payment_intent.succeeded", pi)
    before = await ledger_snapshot(database_url)
    tampered = body.replace(b'"livemode": false', b'"livemode": true')
    assert tampered != body
    cases: list[tuple[bytes, dict[str, str], str]] = [
        (body, sign(body, secret="whsec_someone_else"), "webhook_signature_invalid"),  # forged
        (tampered, sign(body), "webhook_signature_invalid"),  # body changed after signing
        (body, sign(body, t=int(time.time()) - 301), "webhook_signature_invalid"),  # replayed: stale timestamp
        (body, {"Stripe-Signature": f"t={int(time.time())},v0=abc"}, "webhook_signature_invalid"),  # no v1
        (body, {"Stripe-Signature": "garbage"}, "webhook_signature_invalid"),
        (body, {"Content-Type": "application/json"}, "webhook_signature_missing"),
        (body, {"Stripe-Signature": ""}, "webhook_signature_missing"),
        (b"{not json", sign(b"{not json"), "webhook_payload_invalid"),
        (b"\xff\xfe\x00", sign(b"x"), "webhook_payload_invalid"),
        (b'{"object": "list", "data": []}', sign(b'{"object": "list", "data": []}'), "webhook_payload_invalid"),
        (b'{"id": "nope", "object": "event", "type": "x", "created": 1, "data": {"object": {}}}',
         sign(b'{"id": "nope", "object": "event", "type": "x", "created": 1, "data": {"object": {}}}'),
         "webhook_payload_invalid"),
    ]
    for payload, headers, code in cases:
        resp = await cf.deliver(payload, headers)
        assert (resp.status_code, resp.json()["error"]["code"]) == (400, code), (headers, payload[:40], resp.text)
    # No secret configured: refused before anything is read.
    unset = temporal_settings.model_copy(update={"stripe_webhook_secret": SecretStr("")})
    async with clients_for(unset) as unconfigured:
        resp = await unconfigured.deliver(body, sign(body))
        assert (resp.status_code, resp.json()["error"]["code"]) == (503, "webhook_not_configured")

    assert await ledger_snapshot(database_url) == before
    assert await stripe_events(pool) == []
    await asyncio.sleep(0.5)
    assert (await status_of(temporal_client, account, "wh-bad")).status == TOPUP_REQUIRES_PAYMENT
    assert await purchases(pool, account) == []
    # The genuine delivery still works afterwards.
    assert (await cf.deliver(body, sign(body))).json()["outcome"] == "signaled"
    assert (await result_of(temporal_client, account, "wh-bad")).status == "succeeded"
    assert await reconcile(pool, sdk, account) == 1


async def test_temporal_down_keeps_the_event_for_redelivery(cf: Clients, pool: AsyncConnectionPool,  # noqa: F811
                                                            sdk: stripe.StripeClient, temporal_client: Client,
                                                            temporal_settings: Settings, database_url: str) -> None:
    """503 while Temporal is unreachable (Stripe retries), the event left unprocessed; the redelivery is then
    processed rather than taken for a duplicate. Events that need no workflow are handled meanwhile."""
    account = await new_account(cf.admin)
    pi_id = await client_secret_topup(cf, account, "wh-down")
    pi = pay(sdk, pi_id)
    body = event("payment_intent.succeeded", pi, event_id="evt_while_down")
    refunded = event("charge.refunded", {"id": "ch_test_1", "object": "charge", "payment_intent": pi_id,
                                         "amount_refunded": 1000}, event_id="evt_refunded")
    disputed = event("charge.dispute.created", {"id": "dp_test_1", "object": "dispute", "charge": "ch_test_2",
                                                "payment_intent": "pi_notcreditflow"}, event_id="evt_disputed")
    stranger = event("payment_intent.succeeded", {"id": "pi_notcreditflow", "object": "payment_intent",
                                                  "metadata": {}}, event_id="evt_stranger")
    other_type = event("customer.created", {"id": "cus_x", "object": "customer"}, event_id="evt_customer")
    before = await ledger_snapshot(database_url)

    down = temporal_settings.model_copy(update={"temporal_address": f"127.0.0.1:{free_port()}"})
    async with clients_for(down) as broken:
        for _ in range(2):
            resp = await broken.deliver(body, sign(body))
            assert (resp.status_code, resp.json()["error"]["code"]) == (503, "workflow_unavailable"), resp.text
        # Refunds and disputes go through the outbox, so they are routed even while Temporal is down.
        for b, outcome in [(refunded, "routed"), (disputed, "ignored"), (stranger, "ignored"),
                           (other_type, "ignored")]:
            resp = await broken.deliver(b, sign(b))
            assert resp.status_code == 200 and resp.json()["outcome"] == outcome, resp.text
    rows = {r["id"]: r for r in await stripe_events(pool)}
    kept = rows["evt_while_down"]
    assert (kept["processed_at"], kept["outcome"], kept["attempts"], kept["last_error"]) == (
        None, None, 2, "workflow_unavailable")
    [charge] = await charges(pool, account)
    assert (rows["evt_refunded"]["outcome"], rows["evt_refunded"]["charge_id"]) == ("routed", charge["id"])
    assert (rows["evt_disputed"]["outcome"], rows["evt_disputed"]["charge_id"]) == ("ignored", None)
    assert rows["evt_stranger"]["outcome"] == rows["evt_customer"]["outcome"] == "ignored"
    assert await ledger_snapshot(database_url) == before

    # Temporal is back (the normal app): Stripe's retry is processed, once.
    resp = await cf.deliver(body, sign(body))
    assert resp.json() == {"received": True, "duplicate": False, "event_id": "evt_while_down", "outcome": "signaled"}
    assert (await result_of(temporal_client, account, "wh-down")).status == "succeeded"
    again = await cf.deliver(body, sign(body))
    assert again.json() == {"received": True, "duplicate": True}
    kept = next(r for r in await stripe_events(pool) if r["id"] == "evt_while_down")
    assert (kept["outcome"], kept["attempts"], kept["last_error"]) == ("signaled", 3, None)
    assert await reconcile(pool, sdk, account) == 1


@contextlib.asynccontextmanager
async def serve(app: FastAPI, port: int) -> AsyncIterator[str]:
    """The app on a real port (uvicorn, in this event loop, next to the worker)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 15
    while not server.started:
        if task.done() or time.monotonic() > deadline:
            raise AssertionError("the API server did not start")
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


async def test_localstripe_delivers_to_a_real_server(temporal_settings: Settings, temporal_worker: Any,
                                                     pool: AsyncConnectionPool, sdk: stripe.StripeClient,
                                                     temporal_client: Client, stripe_base: str) -> None:
    """localstripe signs and posts its own events to the API on a real port, as ``creditflow dev`` sets up."""
    hook = f"creditflow-test-{uuid.uuid4().hex[:8]}"
    events = ["payment_intent.succeeded", "payment_intent.payment_failed", "payment_intent.canceled",
              "charge.refunded", "charge.dispute.created"]
    async with serve(create_app(temporal_settings), free_port()) as url, httpx.AsyncClient(
            base_url=url, timeout=60, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as api:
        resp = httpx.post(f"{stripe_base}/_config/webhooks/{hook}",
                          json={"url": f"{url}{WEBHOOK}", "secret": SECRET, "events": events})
        assert resp.status_code == 200, resp.text
        try:
            account = await new_account(api)
            resp = await api.post(TOPUP, json={"account_id": account, "amount_usd": 15, "request_id": "ls-1"})
            assert resp.json()["status"] == "requires_payment", resp.text
            pi_id = resp.json()["payment_intent_id"]
            assert pay(sdk, pi_id)["status"] == "succeeded"
            outcome = await result_of(temporal_client, account, "ls-1")  # localstripe waits 1 s, then posts
            assert (outcome.status, outcome.credits) == ("succeeded", 1500)
        finally:  # the store is shared by the session: stop sending its events here
            httpx.post(f"{stripe_base}/_config/webhooks/{hook}",
                       json={"url": f"{url}{WEBHOOK}", "secret": SECRET, "events": ["creditflow.test.off"]})
    [row] = [r for r in await stripe_events(pool) if r["type"] == "payment_intent.succeeded"
             and r["payload"]["data"]["object"]["id"] == pi_id]
    [charge] = await charges(pool, account)
    assert (row["outcome"], row["charge_id"], row["attempts"]) == ("signaled", charge["id"], 1)
    assert row["id"].startswith("evt_") and row["payload"]["object"] == "event"
    assert await reconcile(pool, sdk, account) == 1
