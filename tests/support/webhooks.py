"""The Stripe webhook stack for tests: signed events, the app and its Stripe clients."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import stripe

from creditflow.api.app import create_app
from creditflow.config import Settings
from tests.conftest import ADMIN_KEY, STRIPE_KEY, new_card

WEBHOOK = "/api/v1/stripe/webhook"
SECRET = "whsec_creditflow_tests_" + "k" * 24
POLL_SECONDS = 600.0  # far longer than any test waits: only a signal can wake the workflow


@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=5000, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=stripe_base, stripe_retry_max_wait_seconds=0.1,
                    stripe_webhook_secret=SECRET,  # type: ignore[arg-type]
                    topup_poll_interval_seconds=POLL_SECONDS)


class Clients:
    """One app: ``admin`` for the API, ``stripe`` for deliveries (no API key, as Stripe calls)."""

    def __init__(self, admin: httpx.AsyncClient, anonymous: httpx.AsyncClient) -> None:
        self.admin = admin
        self.stripe = anonymous

    async def deliver(self, body: bytes, headers: dict[str, str]) -> httpx.Response:
        return await self.stripe.post(WEBHOOK, content=body, headers=headers)


@contextlib.asynccontextmanager
async def clients_for(settings: Settings) -> AsyncIterator[Clients]:
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), \
            httpx.AsyncClient(transport=transport, base_url="http://creditflow.test", timeout=60,
                              headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin, \
            httpx.AsyncClient(transport=transport, base_url="http://creditflow.test", timeout=60) as anonymous:
        yield Clients(admin, anonymous)


@pytest.fixture
async def cf(temporal_settings: Settings, temporal_worker: Any) -> AsyncIterator[Clients]:
    async with clients_for(temporal_settings) as clients:
        yield clients


def sign(body: bytes, secret: str = SECRET, t: int | None = None) -> dict[str, str]:
    """The ``Stripe-Signature`` header exactly as Stripe computes it: HMAC-SHA256 of ``{t}.{body}``."""
    t = int(time.time()) if t is None else t
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={t},v1={mac}", "Content-Type": "application/json"}


def event(type_: str, obj: dict[str, Any], *, event_id: str | None = None, created: int | None = None) -> bytes:
    payload = {"id": event_id or f"evt_{uuid.uuid4().hex}", "object": "event", "type": type_,
               "api_version": "2024-06-20", "created": created or int(time.time()), "livemode": False,
               "pending_webhooks": 1, "data": {"object": obj}}
    return json.dumps(payload, indent=2).encode()


def pay(sdk: stripe.StripeClient, pi_id: str, number: str = "4242424242424242") -> dict[str, Any]:
    """What the customer's browser does with the client secret; the PaymentIntent as Stripe then shows it."""
    sdk.v1.payment_intents.update(pi_id, params={"payment_method": new_card(sdk, number)})
    with contextlib.suppress(stripe.CardError):
        sdk.v1.payment_intents.confirm(pi_id)
    return sdk.v1.payment_intents.retrieve(pi_id).to_dict()
