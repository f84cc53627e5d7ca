"""Hosted checkout helpers for tests: settings whose page loads the emulator's Stripe.js, typing a card into it."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import httpx

from creditflow.config import Settings
from creditflow.domain.topups import DEFAULT_PACKAGES, CreditPackage
from tests.conftest import ADMIN_KEY, STRIPE_KEY

PUBLISHABLE_KEY = "pk_test_creditflow_tests"
BONUS = CreditPackage(id="bonus", name="Bonus", price_usd=Decimal("9.99"), credits=1200)


def checkout_settings(database_url: str, stripe_base: str, **extra: Any) -> Settings:
    """Stripe is localstripe (as in tests/test_topups.py) and the page loads the emulator's Stripe.js."""
    values: dict[str, Any] = {
        "database_url": database_url, "admin_api_key": ADMIN_KEY, "welcome_bonus_credits": 5000,
        "stripe_api_key": STRIPE_KEY, "stripe_api_base": stripe_base, "stripe_retry_max_wait_seconds": 0.1,
        "topup_poll_interval_seconds": 0.3, "topup_packages": [*DEFAULT_PACKAGES, BONUS],
        "stripe_js_url": f"{stripe_base}/js.stripe.com/v3/", "stripe_publishable_key": PUBLISHABLE_KEY}
    return Settings(**{**values, **extra})


async def type_card(page: Any, number: str) -> None:
    """Type a card into the card element (the emulator's Stripe.js renders plain inputs named by placeholder)."""
    for field, value in (("number", number), ("exp_month", "12"), ("exp_year", "30"), ("cvc", "123"),
                         ("postal_code", "75001")):
        await page.fill(f"#card-element input[placeholder='{field}']", value)


def page_config(html: str) -> dict[str, Any]:
    """What the hosted page hands its script (publishable key, CSRF token, endpoints)."""
    found = re.search(r'<script id="checkout-config" type="application/json">(.*?)</script>', html, re.S)
    assert found, html
    return json.loads(found.group(1))


async def confirm_card(stripe_base: str, client_secret: str, number: str = "4242424242424242") -> dict[str, Any]:
    """What the emulator's Stripe.js ``confirmCardSetup`` sends for the card typed into its element."""
    seti = client_secret.split("_secret_")[0]
    async with httpx.AsyncClient() as http:
        resp = await http.post(f"{stripe_base}/v1/setup_intents/{seti}/confirm", json={
            "key": PUBLISHABLE_KEY, "use_stripe_sdk": True, "client_secret": client_secret,
            "payment_method_data": {"type": "card", "card": {"number": number, "exp_month": "12",
                                                             "exp_year": "2030", "cvc": "123"}}})
    return {"status_code": resp.status_code, **resp.json()}


async def card_confirmed_on_page(api: httpx.AsyncClient, stripe_base: str, session_id: str,
                                 number: str = "4242424242424242") -> tuple[dict[str, str], dict[str, Any]]:
    """Open the page, get a SetupIntent from it and confirm a card as Stripe.js does: (CSRF header, SetupIntent)."""
    page = await api.get(f"/checkout/{session_id}", headers={"Authorization": ""})
    assert page.status_code == 200, page.text
    csrf = {"X-CSRF-Token": page_config(page.text)["csrfToken"]}
    intent = await api.post(f"/checkout/{session_id}/intent", headers=csrf)
    assert intent.status_code == 200, intent.text
    seti = await confirm_card(stripe_base, intent.json()["client_secret"], number)
    return csrf, seti


async def pay(api: httpx.AsyncClient, session_id: str, csrf: dict[str, str], seti: dict[str, Any]) -> httpx.Response:
    return await api.post(f"/checkout/{session_id}/pay", headers=csrf,
                          json={"setup_intent": seti["id"], "payment_method": seti["payment_method"]})
