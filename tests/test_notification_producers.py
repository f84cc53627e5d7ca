"""Every notification template renders on every channel from the payload its real producer writes.

The payloads are not written by hand: the test drives the real code that emits each kind (the metering hot path
and its outbox, the relay, ``AccountWorkflow``, ``TopUpWorkflow``, ``AutoRechargeWorkflow``, ``InvoiceWorkflow``,
the alert activities) on the real stack (PostgreSQL, Temporal dev server, localstripe), reads what the
``send_notification`` activity logged (``notifications_log.payload``, the very dict the channels render) and
renders it for email (subject and body), Slack, SMS and the signed webhook. A template that reads a field its
producer does not write fails here (``limit.reached`` once read ``limit_type``, which the hot path never wrote).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from creditflow.config import Settings
from creditflow.notify.channels import Outgoing, webhook_body
from creditflow.notify.destinations import Destinations
from creditflow.notify.events import envelopes
from creditflow.notify.templates import DEFAULT_CHANNELS, TEMPLATES_DIR, canonical_kind, render
from tests.conftest import ADMIN_KEY, STRIPE_KEY
from tests.support.api import app_client, new_account, track
from tests.support.auto_recharge import relay  # noqa: F401 - the worker's outbox relay, on this module's settings
from tests.support.payments import DECLINED_AT_CHARGE, REFUNDS, TOPUP, save_card, topup
from tests.support.plans import subscribe
from tests.support.temporal import eventually
from workflows.contract import InvoiceWorkflowInput, invoice_workflow_id
from workflows.invoice import InvoiceWorkflow

pytestmark = [pytest.mark.temporal, pytest.mark.slow]

# Templates no code sends today: kept so the kinds render when a producer is added; this set must stay empty or
# shrink, never silently grow.
NO_PRODUCER: set[str] = set()


@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=5000, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=stripe_base, stripe_retry_max_wait_seconds=0.1, topup_poll_interval_seconds=0.3,
                    outbox_poll_interval_seconds=0.2, auto_recharge_retry_base_seconds=1,
                    auto_recharge_max_consecutive_failures=1, auto_recharge_max_per_day=1)


@pytest.fixture
async def api(temporal_settings: Settings, temporal_worker: Any) -> AsyncIterator[httpx.AsyncClient]:
    async for client in app_client(temporal_settings):
        yield client


async def logged(pool: AsyncConnectionPool) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute(
            "SELECT account_id, kind, dedup_key, payload FROM notifications_log ORDER BY id")).fetchall()


async def ok(resp: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    return resp.json()


async def test_every_template_renders_on_every_channel_from_its_producers_payload(
        api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient, temporal_client: Client,
        temporal_settings: Settings, relay: Any) -> None:  # noqa: F811
    # Spend control (hot path -> outbox -> AccountWorkflow): an agent limit that pauses, account limits that only
    # alert, the daily usage alert, a low-balance alert, then the customer resumes the agent.
    limits = await new_account(api)
    await ok(await api.put("/api/v1/billing/limits", json={
        "account_id": limits, "daily_limit": 50, "monthly_limit": 60, "action_on_limit": "alert_only"}))
    await ok(await api.put("/api/v1/billing/alerts", json={
        "account_id": limits, "alerts": [{"threshold": 4990, "channels": ["email"]}], "daily_usage_threshold": 40}))
    await ok(await api.post("/api/v1/agents", json={"account_id": limits, "id": "voice-7", "name": "Voice 7",
                                                   "monthly_limit": 30, "limit_action": "pause"}), 201)
    for n in range(3):
        await ok(await track(api, limits, "chat_message", 10, f"agent-{n}", agent_id="voice-7"))
    for n in range(3):
        await ok(await track(api, limits, "chat_message", 10, f"plain-{n}"))
    await eventually(lambda: api.get("/api/v1/agents/voice-7", params={"account_id": limits}),
                     lambda r: r.json()["status"] == "paused", timeout=30)
    await ok(await api.post("/api/v1/agents/voice-7/resume", json={"account_id": limits, "reason": "raised"}))

    # Plan credits and agents (0030_1): a stop agent refused for want of plan credits (paused), a use_balance agent
    # reaching its plan-credit limit (notified only).
    planned = await new_account(api)
    await ok(await api.post("/api/v1/agents", json={"account_id": planned, "id": "stopper",
                                                   "on_plan_exhausted": "stop"}), 201)
    await ok(await api.post("/api/v1/agents", json={"account_id": planned, "id": "capped",
                                                   "plan_credit_limit": 8}), 201)
    await subscribe(pool, planned, credits=20)
    await ok(await track(api, planned, "voice_minute", 1, "p-1", agent_id="capped"))
    refused = await track(api, planned, "voice_minute", 2, "p-2", agent_id="stopper")
    assert refused.json()["code"] == "plan_credits_exhausted"

    # A top-up with a saved card (TopUpWorkflow's receipt); auto-recharge that succeeds, then hits its daily cap of 1.
    buyer = await new_account(api)
    await save_card(api, sdk, buyer)
    await ok(await api.post(TOPUP, json={"account_id": buyer, "amount_usd": 10, "request_id": "t-1"}))
    await ok(await api.put("/api/v1/billing/auto-recharge", json={
        "account_id": buyer, "enabled": True, "threshold": 6500, "recharge_amount": 1000}))
    await eventually(lambda: logged(pool), lambda rows: any(r["kind"] == "auto_recharge.succeeded" for r in rows),
                     timeout=60)
    await ok(await track(api, buyer, "chat_message", 600, "below-again"))  # 7,000 -> 6,400: the cap (1 a day) stops it
    await eventually(lambda: logged(pool), lambda rows: any(r["kind"] == "auto_recharge.daily_cap_reached"
                                                             for r in rows), timeout=60)

    # Refunds (RefundWorkflow): part of a top-up refunded; a refund Stripe refuses (localstripe refuses to refund an
    # unpaid PaymentIntent: the charge row is pointed at one), whose credits go back.
    refunded = await new_account(api)
    await save_card(api, sdk, refunded)
    bought = await topup(api, sdk, refunded)
    await ok(await api.post(REFUNDS, json={"account_id": refunded, "payment_intent_id": bought["payment_intent_id"],
                                           "credits": 1000, "request_id": "r-1"}))
    refused = await new_account(api)
    await save_card(api, sdk, refused)
    await topup(api, sdk, refused)
    unpaid = sdk.v1.payment_intents.create(params={"amount": 2500, "currency": "usd", "payment_method_types": ["card"]})
    async with pool.connection() as conn:
        await conn.execute("UPDATE stripe_charges SET payment_intent_id = %s WHERE account_id = %s",
                           (unpaid.id, refused))
    resp = await api.post(REFUNDS, json={"account_id": refused, "payment_intent_id": unpaid.id, "credits": 1000,
                                         "request_id": "r-2"})
    assert resp.status_code == 422, resp.text

    # Auto-recharge on a card declined at charge: one failure disables it (max_consecutive_failures = 1).
    declined = await new_account(api)
    await save_card(api, sdk, declined, DECLINED_AT_CHARGE)
    await ok(await api.put("/api/v1/billing/auto-recharge", json={
        "account_id": declined, "enabled": True, "threshold": 6000, "recharge_amount": 1000}))

    # A number rental the wallet cannot cover (RentalWorkflow): unpaid, the customer told.
    poor = await new_account(api)
    await ok(await api.post("/api/v1/billing/wallet/credit", json={
        "account_id": poor, "amount": -4990, "reason": "t", "idempotency_key": "d"}))
    await ok(await api.post("/api/v1/billing/recurring-charges", json={
        "account_id": poor, "description": "Phone number rental", "quantity": 2, "unit": "number",
        "unit_price": 150}), 201)

    # Invoices: paid with the card, past due on the declined card, issued without charging.
    now = datetime.now(UTC).replace(microsecond=0)
    for account, extra in ((buyer, {"plan_id": "starter"}),
                           (declined, {"plan_id": "starter", "charge_attempts": 1}),
                           (limits, {"plan_id": "starter", "charge": False})):
        input = InvoiceWorkflowInput(account_id=account, period_start=now - timedelta(hours=1),
                                     period_end=now + timedelta(hours=1), **extra)
        await asyncio.wait_for(temporal_client.execute_workflow(
            InvoiceWorkflow.run, input, id=invoice_workflow_id(account, input.key()),
            task_queue=temporal_settings.temporal_task_queue), 60)

    templated = {p.name.removesuffix(".j2") for p in TEMPLATES_DIR.glob("*.j2") if not p.name.startswith("_")}
    assert set(DEFAULT_CHANNELS) <= templated
    expected = templated - NO_PRODUCER
    rows = await eventually(lambda: logged(pool), lambda rs: expected <= {canonical_kind(r["kind"]) for r in rs},
                            timeout=60)
    produced = {canonical_kind(r["kind"]) for r in rows}
    assert not (produced & NO_PRODUCER), "a producer exists now: take it out of NO_PRODUCER"
    scopes = sorted(r["payload"]["scope"] for r in rows if r["kind"] == "limit.reached")
    assert scopes == ["agent_monthly", "agent_plan_credits", "daily", "monthly", "plan_credits"]

    for row in rows:
        kind, payload = canonical_kind(row["kind"]), row["payload"]
        text = render(kind, payload, account_id=row["account_id"], account_name="Acme")
        assert text.email_subject and "\n" not in text.email_subject, (kind, payload)
        assert text.email_body.startswith("Hello Acme,\n\n"), (kind, payload)
        assert text.slack and text.sms and "\n" not in text.sms, (kind, payload)
        if kind in templated:  # its own words, not the generic text of kinds without a template
            assert not text.email_subject.startswith("creditflow notification:"), (kind, payload)
        out = Outgoing(kind=kind, event_id="ntf_x", created=1, payload=payload, rendered=text,
                       destinations=Destinations(account_id=row["account_id"], account_name="Acme",
                                                 billing_email="billing@acme.test"))
        assert webhook_body(out).startswith(b'{"account_id":"'), kind
        # The body sent matches the kind's declared webhook schema (the OpenAPI ``webhooks``).
        envelopes()[kind].model_validate(json.loads(webhook_body(out), parse_float=Decimal))

    paid_back = next(r for r in rows if r["kind"] == "refund.succeeded")
    assert render("refund.succeeded", paid_back["payload"], account_id=refunded, account_name="Acme").sms == (
        "creditflow: refund of $10.00 issued (1,000 credits).")
    failed = next(r for r in rows if r["kind"] == "refund.failed")
    assert failed["account_id"] == refused and failed["payload"]["error_code"] == "payment_request_invalid"
    assert render("refund.failed", failed["payload"], account_id=refused, account_name="Acme").sms == (
        "creditflow: refund of $10.00 failed; your credits were restored.")
    agent_limit = next(r for r in rows if r["kind"] == "limit.reached" and r["payload"]["scope"] == "agent_monthly")
    text = render("limit.reached", agent_limit["payload"], account_id=limits, account_name="Acme")
    assert text.email_subject == "Spending limit reached: agent monthly (voice-7)"
    assert text.sms == "creditflow: agent monthly limit reached (voice-7) (30/30 credits), usage paused."
    stop = next(r for r in rows if r["kind"] == "limit.reached" and r["payload"]["scope"] == "plan_credits")
    assert render("limit.reached", stop["payload"], account_id=planned, account_name="Acme").slack == (
        ":octagonal_sign: *Acme*: agent stopper is out of plan credits (12 left, 16 needed) and paused until a "
        "top-up or the renewal.")
    daily = next(r for r in rows if r["kind"] == "limit.reached" and r["payload"]["scope"] == "daily")
    assert render("limit.reached", daily["payload"], account_id=limits, account_name="Acme").slack == (
        ":octagonal_sign: *Acme* reached its daily limit: 50 of 50 credits.")
