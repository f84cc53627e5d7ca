"""Hosted checkout helpers for tests: settings whose page loads the emulator's Stripe.js, typing a card into it."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

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
