"""The hosted checkout in a real browser: Debian's Chromium (Playwright) on the real app over a real socket, the
emulator's Stripe.js rendering the card form, the Temporal dev server with the production worker charging the card,
and a merchant site of the test's own behind success_url / cancel_url. Screenshots of every page are saved as
artifacts (.data/artifacts/screenshots/checkout-*.png)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from html import escape
from typing import Any

import httpx
import pytest
import stripe
from playwright.async_api import expect
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from creditflow.api.app import create_app
from creditflow.config import Settings
from tests.conftest import ADMIN_KEY, serve_app, shot
from tests.support.api import new_account
from tests.support.checkout import checkout_settings, type_card
from tests.support.payments import DECLINED_AT_CHARGE, charges, purchases, reconcile

pytestmark = [pytest.mark.slow, pytest.mark.temporal]

DECLINED_AT_SETUP = "4000000000000002"  # localstripe: refused when Stripe.js confirms the card


@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    return checkout_settings(database_url, stripe_base)


@pytest.fixture
async def live(temporal_settings: Settings, temporal_worker: Any) -> AsyncIterator[str]:
    """creditflow on a real port, with Temporal and the worker: the page can pay."""
    async with serve_app(create_app(temporal_settings)) as base:
        yield base


async def _shop_page(request: Request) -> HTMLResponse:
    query = escape(str(request.url.query))
    return HTMLResponse(f"<!doctype html><title>Shop</title><h1>Shop billing</h1><p id='query'>{query}</p>")


@pytest.fixture
async def shop() -> AsyncIterator[str]:
    """The merchant's own site, where the buyer comes back to."""
    async with serve_app(Starlette(routes=[Route("/billing", _shop_page)])) as base:
        yield base


@pytest.fixture
async def api(live: str) -> AsyncIterator[httpx.AsyncClient]:
    """The platform's side: the API over the same socket, with the admin key."""
    async with httpx.AsyncClient(base_url=live, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as client:
        yield client


async def _session(api: httpx.AsyncClient, shop: str, **body: Any) -> tuple[str, dict[str, Any]]:
    account = await new_account(api)
    resp = await api.post("/api/v1/checkout/sessions", json={
        "account_id": account, "success_url": f"{shop}/billing?success=true",
        "cancel_url": f"{shop}/billing?canceled=true", **body})
    assert resp.status_code == 201, resp.text
    return account, resp.json()


async def test_a_buyer_pays_for_a_package_in_the_browser_and_gets_the_credits_once(
        page: Any, live: str, shop: str, api: httpx.AsyncClient, pool: AsyncConnectionPool,
        sdk: stripe.StripeClient) -> None:
    account, session = await _session(api, shop, package_id="growth")
    sid = session["id"]
    assert session["url"] == f"{live}/checkout/{sid}"
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    response = await page.goto(session["url"])
    assert response is not None and response.status == 200
    await page.wait_for_selector("#card-element input[placeholder='number']")
    assert await page.inner_text("#package-name") == "Growth"
    assert await page.inner_text("#credits") == "5,000 credits"
    assert await page.inner_text("#price") == "$50.00 USD"
    assert await page.is_enabled("#pay-button")
    await shot(page, "checkout-open")

    # A card refused when Stripe.js confirms it: the page says so, nothing is charged.
    await page.fill("#card-name", "Ada Lovelace")
    await type_card(page, DECLINED_AT_SETUP)
    await page.click("#pay-button")
    await expect(page.locator("#card-errors")).to_contain_text("declined", ignore_case=True)
    await expect(page.locator("#pay-button")).to_be_enabled()
    await shot(page, "checkout-declined-card")

    # A card confirmed but declined when charged: the page says so, the session stays open.
    await type_card(page, DECLINED_AT_CHARGE)
    await page.click("#pay-button")
    await expect(page.locator("#card-errors")).to_contain_text("declined", ignore_case=True, timeout=60_000)
    await expect(page.locator("#pay-button")).to_be_enabled()
    await shot(page, "checkout-declined-charge")
    assert (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()["balance"] == 5000

    # A good card: paid, redirected to success_url with the session id.
    await type_card(page, "4242424242424242")
    await page.click("#pay-button")
    await page.wait_for_url(f"{shop}/billing?success=true&session_id={sid}", timeout=60_000)
    assert await page.inner_text("#query") == f"success=true&session_id={sid}"
    await shot(page, "checkout-success")
    assert errors == []

    # The credits once: 5,000 welcome + 5,000 bought; one purchase; one succeeded charge after the failed one.
    assert (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()["balance"] == 10000
    assert len(await purchases(pool, account)) == 1
    assert [c["status"] for c in await charges(pool, account)] == ["failed", "succeeded"]
    assert await reconcile(pool, sdk, account) == 1
    got = (await api.get(f"/api/v1/checkout/sessions/{sid}")).json()
    assert (got["status"], got["payment_status"]) == ("complete", "paid")

    # Back on the checkout link (a reload, the back button): it says paid and charges nothing again.
    await page.goto(session["url"])
    assert "Payment received" in await page.inner_text("h1")
    assert "5,000 credits" in await page.inner_text("#status")
    await shot(page, "checkout-already-paid")
    assert (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()["balance"] == 10000


async def test_the_cancel_link_returns_to_the_shop_and_charges_nothing(
        page: Any, live: str, shop: str, api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    account, session = await _session(api, shop, amount="12.34")
    await page.goto(session["url"])
    await page.wait_for_selector("#card-element input[placeholder='number']")
    assert await page.inner_text("#price") == "$12.34 USD"
    assert await page.inner_text("#credits") == "1,234 credits"
    await page.click("#cancel-link")
    await page.wait_for_url(f"{shop}/billing?canceled=true")
    assert await page.inner_text("h1") == "Shop billing"
    await shot(page, "checkout-canceled")
    assert (await api.get(f"/api/v1/checkout/sessions/{session['id']}")).json()["status"] == "open"
    assert (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()["balance"] == 5000
    assert await charges(pool, account) == []
    # An unknown link gets a clear page in the browser too.
    response = await page.goto(f"{live}/checkout/cs_{'0' * 32}")
    assert response is not None and response.status == 404
    assert await page.inner_text("h1") == "Checkout not found"
    await shot(page, "checkout-not-found")


async def test_a_card_that_asks_for_3d_secure_is_authenticated_on_the_page_and_charged_once(
        page: Any, live: str, shop: str, api: httpx.AsyncClient, pool: AsyncConnectionPool,
        sdk: stripe.StripeClient) -> None:
    """The emulator's 3-D Secure card: confirmCardSetup asks (a confirm box), then the off-session charge asks again
    (the workflow hands back the PaymentIntent's secret; the page runs confirmCardPayment and pays again)."""
    account, session = await _session(api, shop, amount="7.77")
    await page.goto(session["url"])
    await page.wait_for_selector("#card-element input[placeholder='number']")
    await type_card(page, "4000002500003155")
    await page.click("#pay-button")
    await page.wait_for_selector("text=Complete authentication")  # the card's setup asks
    await shot(page, "checkout-3ds-setup")
    await page.click("text=Complete authentication")
    await page.wait_for_selector("text=Complete authentication", timeout=60_000)  # the charge asks
    await shot(page, "checkout-3ds-charge")
    await page.click("text=Complete authentication")
    await page.wait_for_url(f"{shop}/billing?success=true&session_id={session['id']}", timeout=60_000)
    await shot(page, "checkout-3ds-success")
    assert (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()["balance"] == 5777
    assert [c["status"] for c in await charges(pool, account)] == ["succeeded"]
    assert await reconcile(pool, sdk, account) == 1
