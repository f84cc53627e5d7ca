"""The customer portal in a real browser (Debian's Chromium through Playwright) against the real stack: the app on
a real port (uvicorn), the production Temporal worker, localstripe, PostgreSQL. Screenshots of every page are saved
as artifacts (.data/artifacts/screenshots/portal-*.png)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from creditflow.api.app import create_app
from creditflow.config import Settings
from tests.conftest import ADMIN_KEY, STRIPE_KEY, ledger_snapshot, new_card, serve_app, shot
from tests.support.checkout import type_card
from tests.support.invoices import past_due_invoice
from tests.support.payments import succeeded_intents

pytestmark = [pytest.mark.slow, pytest.mark.temporal]

DECLINED_AT_CHARGE = "4000000000000341"  # localstripe: attaches, then every charge is declined
RETURN = "https://platform.example/account"


@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=5000, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=stripe_base, stripe_retry_max_wait_seconds=0.1, topup_poll_interval_seconds=0.3,
                    platform_name="Flowyte", stripe_js_url=f"{stripe_base}/js.stripe.com/v3/",
                    stripe_publishable_key="pk_test_creditflow_tests")


@pytest.fixture
async def stack(temporal_settings: Settings, temporal_worker: Any) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    """The app on a real port and an admin client over real HTTP (the platform's backend)."""
    async with serve_app(create_app(temporal_settings)) as base, httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as api:
        yield base, api


async def new_account(api: httpx.AsyncClient) -> str:
    resp = await api.post("/api/v1/accounts", json={"name": "Acme", "billing_email": "billing@acme.test"})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


async def session_url(api: httpx.AsyncClient, account: str) -> str:
    resp = await api.post("/api/v1/portal/sessions", json={"account_id": account, "return_url": RETURN})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["url"])


async def attach(api: httpx.AsyncClient, sdk: stripe.StripeClient, account: str, number: str,
                 default: bool = True) -> str:
    resp = await api.post("/api/v1/billing/payment-methods", json={
        "account_id": account, "payment_method_id": new_card(sdk, number), "set_default": default})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


async def figure(page: Any, name: str) -> str:
    return str(await page.inner_text(f"#{name}"))


async def test_a_customer_uses_the_portal_end_to_end(
        page: Any, stack: tuple[str, httpx.AsyncClient], sdk: stripe.StripeClient, pool: AsyncConnectionPool,
        temporal_client: Client, temporal_settings: Settings, tmp_path: Path) -> None:
    base, api = stack
    account = await new_account(api)
    declined = await attach(api, sdk, account, DECLINED_AT_CHARGE)  # the default card: every charge declined
    good = await attach(api, sdk, account, "4242424242424242", default=False)
    invoice = await past_due_invoice(api, temporal_client, temporal_settings, account)  # $49, declined: past due
    assert (await api.post("/api/v1/agents", json={"account_id": account, "id": "support-bot",
                                                   "name": "Support bot"})).status_code == 201

    # Open the link: the overview, with the figures exactly.
    response = await page.goto(await session_url(api, account))
    assert response.status == 200 and page.url == f"{base}/portal"
    assert await page.title() == "Overview · Flowyte"
    assert (await figure(page, "total-credits"), await figure(page, "balance"),
            await figure(page, "available-to-use"), await figure(page, "usage-this-period")) == (
        "5,000", "5,000", "5,000", "0")
    await shot(page, "portal-overview")

    # Set the good card as the default.
    await page.click("nav >> text=Payment methods")
    assert "Default card" in await page.inner_text(f"#card-{declined}")
    await shot(page, "portal-payment-methods")
    await page.click(f"#card-{good} >> text=Set as default")
    assert await page.inner_text("[role=status]") == "Default card changed."
    assert "Default card" in await page.inner_text(f"#card-{good}")
    assert "Default card" not in await page.inner_text(f"#card-{declined}")
    cards = (await api.get("/api/v1/billing/payment-methods", params={"account_id": account})).json()["items"]
    assert {c["id"]: c["is_default"] for c in cards} == {good: True, declined: False}

    # Buy the Starter package (1,000 credits for $10) with the saved default card: the balance changes.
    await page.click("nav >> text=Buy credits")
    await shot(page, "portal-buy-credits")
    await page.check("#pkg-starter")
    assert await page.input_value("#payment_method_id") == good
    await page.click("text=Add to my balance")
    assert page.url == f"{base}/portal?ok=topup"
    assert await page.inner_text("[role=status]") == "Payment received: your credits were added."
    assert (await figure(page, "balance"), await figure(page, "total-credits")) == ("6,000", "6,000")
    await shot(page, "portal-overview-after-top-up")
    assert [(pi.amount, pi.payment_method) for pi in await succeeded_intents(sdk, pool, account)] == [(1000, good)]

    # Usage through the metering API (chat 40, voice 3 minutes at 10, llm 25 tokens at 0.1): the balance follows.
    for feature, value, agent in (("chat_message", 40, "support-bot"), ("voice_minute", 3, "support-bot"),
                                  ("llm_tokens", 25, None)):
        tracked = await api.post("/api/v1/billing/track", json={
            "account_id": account, "feature_id": feature, "value": value, "agent_id": agent,
            "idempotency_key": f"use-{feature}"})
        assert tracked.status_code == 200, tracked.text
    await page.reload()
    assert (await figure(page, "balance"), await figure(page, "usage-this-period")) == ("5,927.5", "72.5")
    await page.click("nav >> text=Usage")
    # 3 channels on one day; per agent this period: support-bot and "(no agent)" (the llm tokens)
    assert await page.locator("svg[role=img] rect").count() == 5
    assert "chat: 40 credits" in await page.inner_html("svg[role=img] >> nth=0")
    await shot(page, "portal-usage")

    # Pay the past-due invoice now (with the default card, now the good one), then download its PDF.
    await page.click("nav >> text=Invoices")
    assert "$49.00" in await page.inner_text(f"#due-{invoice}")
    await shot(page, "portal-invoices-due")
    await page.click(f"#due-{invoice} >> text=Pay now")
    assert await page.inner_text("[role=status]") == "Invoice paid."
    assert "paid" in await page.inner_text(f"#inv-{invoice}")
    paid = (await api.get(f"/api/v1/billing/invoices/{invoice}", params={"account_id": account})).json()
    assert (paid["status"], paid["amount_usd"]) == ("paid", 49)
    await shot(page, "portal-invoices")
    async with page.expect_download() as info:
        await page.click(f"#inv-{invoice} >> text=Download PDF")
    download = await info.value
    target = tmp_path / "invoice.pdf"
    await download.save_as(str(target))
    assert target.read_bytes().startswith(b"%PDF") and download.suggested_filename == f"{paid['number']}.pdf"

    # Pause an agent: through the account workflow, as the API does.
    await page.click("nav >> text=Agents")
    await page.click("#agent-support-bot form.pause button")
    assert await page.inner_text("[role=status]") == "Agent paused."
    assert (await page.inner_text("#agent-support-bot .status")).startswith("paused")
    agent = (await api.get("/api/v1/agents/support-bot", params={"account_id": account})).json()
    assert agent["status"] == "paused"
    await shot(page, "portal-agents")
    await page.click("#agent-support-bot form.pause button")  # now "Resume"
    assert await page.inner_text("[role=status]") == "Agent resumed."
    assert await page.inner_text("#agent-support-bot .status") == "active"
    agent = (await api.get("/api/v1/agents/support-bot", params={"account_id": account})).json()
    assert agent["status"] == "active"

    # The other pages render (screenshots for the reviewer); history shows the purchase.
    await page.click("nav >> text=Balance history")
    assert "1,000" in await page.inner_text("table")
    await shot(page, "portal-balance-history")
    for link, name in (("Plan", "plan"), ("Auto-recharge", "auto-recharge"),
                       ("Spend management", "spend"), ("Billing details", "details")):
        await page.click(f"nav >> text={link}")
        assert await page.locator("h1").count() == 1
        await shot(page, f"portal-{name}")

    # A phone-sized screen: still readable (no horizontal scrolling of the page itself).
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.goto(f"{base}/portal")
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    await shot(page, "portal-overview-phone")

    # Log out: back link to the platform, and the portal is closed.
    await page.click("text=Log out")
    assert "signed out" in await page.inner_text("h1")
    assert await page.get_attribute("main a", "href") == RETURN
    response = await page.goto(f"{base}/portal")
    assert response.status == 401


async def test_a_new_card_pays_on_the_hosted_checkout_page_and_the_customer_comes_back(
        page: Any, stack: tuple[str, httpx.AsyncClient], sdk: stripe.StripeClient, pool: AsyncConnectionPool) -> None:
    """No saved card: Buy credits sends the customer to the hosted checkout page (the one card form, Stripe.js),
    who pays there and comes back to the portal with the credits, once."""
    base, api = stack
    account = await new_account(api)
    await page.goto(await session_url(api, account))
    await page.click("nav >> text=Buy credits")
    await page.check("#pkg-starter")
    assert await page.input_value("#payment_method_id") == "new"
    await page.click("text=Add to my balance")
    await page.wait_for_url(re.compile(re.escape(f"{base}/checkout/cs_")))
    await page.wait_for_selector("#card-element input[placeholder='number']")
    assert await page.inner_text("#credits") == "1,000 credits"
    await shot(page, "portal-buy-with-a-new-card")
    await page.fill("#card-name", "Ada Lovelace")
    await type_card(page, "4242424242424242")
    await page.click("#pay-button")
    await page.wait_for_url(re.compile(re.escape(f"{base}/portal?ok=checkout&session_id=cs_")), timeout=60_000)
    assert await page.inner_text("[role=status]") == "Payment received: your credits were added."
    assert await figure(page, "balance") == "6,000"
    assert [pi.amount for pi in await succeeded_intents(sdk, pool, account)] == [1000]
    # Back to the checkout page (the back button): it is paid, nothing is charged again.
    await page.go_back()
    assert (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()["balance"] == 6000


async def test_expired_and_reused_links_are_refused(page: Any, stack: tuple[str, httpx.AsyncClient],
                                                    temporal_settings: Settings) -> None:
    base, api = stack
    account = await new_account(api)
    url = await session_url(api, account)
    assert (await page.goto(url)).status == 200
    again = await page.context.new_page()
    response = await again.goto(url)
    assert response.status == 410 and await again.inner_text("h1") == "This link was already used"
    await shot(again, "portal-link-reused")
    # An expired link: a server with a link lifetime of 0.6 s.
    short = temporal_settings.model_copy(update={"portal_link_ttl_minutes": 0.01})
    async with serve_app(create_app(short)) as short_base, httpx.AsyncClient(
            base_url=short_base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as short_api:
        link = await session_url(short_api, account)
        await again.wait_for_timeout(1000)
        fresh = await page.context.browser.new_context()
        expired_page = await fresh.new_page()
        response = await expired_page.goto(link)
        assert response.status == 410 and await expired_page.inner_text("h1") == "This link has expired"
        await shot(expired_page, "portal-link-expired")
        await fresh.close()
    assert base


async def test_forged_forms_are_refused(page: Any, stack: tuple[str, httpx.AsyncClient], sdk: stripe.StripeClient,
                                        database_url: str, temporal_client: Client,
                                        temporal_settings: Settings) -> None:
    """Another account's card and invoice ids in a form or a URL, and a form without its CSRF token: refused,
    nothing changed."""
    base, api = stack
    mine, theirs = await new_account(api), await new_account(api)
    their_invoice = await past_due_invoice(api, temporal_client, temporal_settings, theirs)  # no card: past due
    my_card = await attach(api, sdk, mine, "4242424242424242")
    their_card = await attach(api, sdk, theirs, DECLINED_AT_CHARGE)  # retries their invoice: declined, still due
    await page.goto(await session_url(api, mine))
    await page.goto(f"{base}/portal/payment-methods")
    token = await page.get_attribute("input[name=csrf_token] >> nth=0", "value")
    before = await ledger_snapshot(database_url)
    # Their invoice: no PDF, no payment from this session (as unknown as an invoice that does not exist).
    response = await page.goto(f"{base}/portal/invoices/{their_invoice}/pdf")
    assert response.status == 404
    paid = await page.request.post(f"{base}/portal/invoices/pay", form={"csrf_token": token,
                                                                          "invoice_id": their_invoice})
    assert paid.status == 404 and "no such invoice" in await paid.text()
    listed = (await api.get(f"/api/v1/billing/invoices/{their_invoice}", params={"account_id": theirs})).json()
    assert listed["status"] == "past_due"
    await page.goto(f"{base}/portal/payment-methods")
    # Point the Delete form at the other account's card.
    await page.evaluate(f"document.querySelector('#card-{my_card} form input[name=payment_method_id]').value = "
                        f"'{their_card}'")
    await page.click(f"#card-{my_card} >> text=Delete")
    assert re.search("no such payment method", await page.inner_text("[role=alert]"), re.I)
    await shot(page, "portal-forged-card-refused")
    theirs_listed = (await api.get("/api/v1/billing/payment-methods", params={"account_id": theirs})).json()
    assert [c["id"] for c in theirs_listed["items"]] == [their_card]
    # Buy credits with the other account's card.
    await page.goto(f"{base}/portal/buy")
    await page.evaluate(f"document.querySelector('#payment_method_id option').value = '{their_card}'")
    await page.click("text=Add to my balance")
    assert await page.locator("[role=alert]").count() == 1
    # A form without the CSRF token.
    await page.goto(f"{base}/portal/payment-methods")
    await page.evaluate(f"document.querySelector('#card-{my_card} form input[name=csrf_token]').remove()")
    await page.click(f"#card-{my_card} >> text=Delete")
    assert await page.inner_text("h1") == "This form has expired"
    mine_listed = (await api.get("/api/v1/billing/payment-methods", params={"account_id": mine})).json()
    assert [c["id"] for c in mine_listed["items"]] == [my_card]
    assert await ledger_snapshot(database_url) == before


def _half_up(amount: int, numerator: int, denominator: int) -> int:
    """The expected proration share, computed here on its own (integers, half-up)."""
    return (2 * amount * numerator + denominator) // (2 * denominator)


def _micros_between(start: str, end: str) -> int:
    delta = datetime.fromisoformat(end.replace("Z", "+00:00")) - datetime.fromisoformat(start.replace("Z", "+00:00"))
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _money(cents: int) -> str:
    return ("-$" if cents < 0 else "$") + f"{abs(cents) // 100:,}.{abs(cents) % 100:02d}"


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


async def test_a_resubmitted_buy_form_charges_once_and_a_plan_change_shows_its_proration(
        stack: tuple[str, httpx.AsyncClient], sdk: stripe.StripeClient, pool: AsyncConnectionPool) -> None:
    """Over HTTP against the live stack (a browser's requests without the browser): the buy form's request id makes
    a second submission join the first top-up; an immediate plan change shows what it credited and charged."""
    base, api = stack
    account = await new_account(api)
    card = await attach(api, sdk, account, "4242424242424242")
    async with httpx.AsyncClient(base_url=base, timeout=60) as browser:
        assert (await browser.get(await session_url(api, account))).status_code == 303
        form_page = (await browser.get("/portal/buy")).text
        found = re.search(r'name="request_id" value="(portal-[0-9a-f]{32})"', form_page)
        assert found
        form = {"csrf_token": csrf_of(form_page), "request_id": found.group(1), "package_id": "starter",
                "amount_usd": "", "payment_method_id": card}
        for _ in range(2):  # a double click, or the form sent again
            resp = await browser.post("/portal/buy", data=form)
            assert (resp.status_code, resp.headers["location"]) == (303, "/portal?ok=topup"), resp.text
        balance = (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()
        assert balance["balance"] == 6000
        assert [pi.amount for pi in await succeeded_intents(sdk, pool, account)] == [1000]
        # A custom amount below the minimum: the API's refusal on the page, nothing charged.
        low = await browser.post("/portal/buy", data={**form, "request_id": "portal-low", "package_id": "custom",
                                                      "amount_usd": "4.99"})
        assert low.status_code == 422 and 'role="alert"' in low.text
        assert (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()["balance"] == 6000
        # A custom amount within the bounds, to the cent: $12.34 is 1,234 credits, charged once with the saved card.
        custom = await browser.post("/portal/buy", data={**form, "request_id": "portal-custom", "package_id": "custom",
                                                         "amount_usd": "12.34"})
        assert (custom.status_code, custom.headers["location"]) == (303, "/portal?ok=topup"), custom.text
        assert (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()["balance"] == 7234
        assert sorted(pi.amount for pi in await succeeded_intents(sdk, pool, account)) == [1000, 1234]

        # Subscribe now, then change plan now: the page shows the proration the change made.
        token = form["csrf_token"]
        subscribed = await browser.post("/portal/plan", data={"csrf_token": token, "plan_id": "starter",
                                                              "effective": "immediately"})
        assert subscribed.status_code == 200, subscribed.text
        # Now to Growth: first the preview (nothing changed yet), exact to the cent, then the confirmed change.
        asked = await browser.post("/portal/plan", data={"csrf_token": token, "plan_id": "growth",
                                                         "effective": "immediately"})
        assert asked.status_code == 200 and 'id="preview"' in asked.text and 'id="proration"' not in asked.text
        cycle = (await api.get("/api/v1/billing/subscription", params={"account_id": account})).json()
        assert (cycle["plan_id"], cycle["pending_plan_id"]) == ("starter", None)  # nothing changed yet
        at = re.search(r'<time id="preview-at" datetime="([^"]+)">', asked.text)
        assert at
        remaining, total = _micros_between(at.group(1), cycle["cycle_end"]), _micros_between(
            cycle["cycle_start"], cycle["cycle_end"])
        plans = {p["id"]: p for p in (await api.get("/api/v1/billing/plans")).json()["items"]}
        fee = {k: int(Decimal(str(plans[k]["monthly_fee_usd"])) * 100) for k in ("starter", "growth")}
        credit, charge = _half_up(fee["starter"], remaining, total), _half_up(fee["growth"], remaining, total)
        granted = _half_up(plans["growth"]["included_credits"], remaining, total) - _half_up(
            plans["starter"]["included_credits"], remaining, total)
        shown = dict(re.findall(r'<dd id="(preview-[a-z]+)">([^<]*)</dd>', asked.text))
        assert shown == {"preview-credit": _money(credit), "preview-charge": _money(charge),
                         "preview-net": _money(charge - credit), "preview-granted": f"{granted:,}",
                         "preview-expired": "0"}, (shown, remaining, total)
        confirm = dict(re.findall(r'<input type="hidden" name="([a-z_]+)" value="([^"]*)">',
                                  asked.text.split('id="preview"')[1].split("</form>")[0]))
        assert confirm == {"csrf_token": token, "plan_id": "growth", "effective": "immediately", "confirm": "yes"}
        changed = await browser.post("/portal/plan", data=confirm)
        assert changed.status_code == 200 and 'id="proration"' in changed.text, changed.text
        figures = re.findall(r"<dd[^>]*>(-?\$[0-9,]+\.[0-9]{2})</dd>", changed.text)
        credited, charged, net = (Decimal(f.replace("$", "").replace(",", "")) for f in figures)
        assert net == charged - credited and charged > 0
        current = (await api.get("/api/v1/billing/subscription", params={"account_id": account})).json()
        assert current["plan_id"] == "growth"
        assert 'id="current-plan">Growth<' in changed.text


async def test_a_card_added_without_paying_is_listed_pays_the_past_due_invoice_and_becomes_default(
        page: Any, stack: tuple[str, httpx.AsyncClient], sdk: stripe.StripeClient, pool: AsyncConnectionPool,
        temporal_client: Client, temporal_settings: Settings) -> None:
    """Payment methods > Add a card: the hosted card page in setup mode (Stripe.js, the one card form), nothing
    charged for the card itself; the card comes back listed (brand, last 4, expiry), the past-due invoice is paid
    with it (as when a card is added through the API), and it is set as the default."""
    base, api = stack
    account = await new_account(api)
    declined = await attach(api, sdk, account, DECLINED_AT_CHARGE)
    invoice = await past_due_invoice(api, temporal_client, temporal_settings, account)  # $49, declined: past due
    await page.goto(await session_url(api, account))
    await page.click("nav >> text=Payment methods")
    await page.click("button:has-text('Add a card')")
    await page.wait_for_url(re.compile(re.escape(f"{base}/checkout/cs_")))
    await page.wait_for_selector("#card-element input[placeholder='number']")
    assert await page.inner_text("h1") == "Add a card"
    assert await page.inner_text("#pay-button") == "Save card"
    await shot(page, "portal-add-a-card")
    await page.fill("#card-name", "Grace Hopper")
    await type_card(page, "4242424242424242")
    await page.click("#pay-button")
    await page.wait_for_url(re.compile(re.escape(f"{base}/portal/payment-methods?ok=card_added&session_id=cs_")),
                            timeout=60_000)
    assert await page.inner_text("[role=status]") == "Card added."
    cards = (await api.get("/api/v1/billing/payment-methods", params={"account_id": account})).json()["items"]
    [new] = [c["id"] for c in cards if c["id"] != declined]
    row = await page.inner_text(f"#card-{new}")
    assert "Visa •••• 4242" in row and "Grace Hopper" in row and "12/2030" in row and "Default card" not in row
    await shot(page, "portal-card-added")
    # The past-due invoice was retried with the new card (as through the API): paid $49.
    for _ in range(120):
        got = (await api.get(f"/api/v1/billing/invoices/{invoice}", params={"account_id": account})).json()
        if got["status"] == "paid":
            break
        await page.wait_for_timeout(500)
    assert (got["status"], got["amount_usd"]) == ("paid", 49)
    paid = [pi for pi in await succeeded_intents(sdk, pool, account)]
    assert [(pi.amount, pi.payment_method) for pi in paid] == [(4900, new)]
    # Set it as the default.
    await page.click(f"#card-{new} >> text=Set as default")
    assert await page.inner_text("[role=status]") == "Default card changed."
    assert "Default card" in await page.inner_text(f"#card-{new}")
    cards = (await api.get("/api/v1/billing/payment-methods", params={"account_id": account})).json()["items"]
    assert {c["id"]: c["is_default"] for c in cards} == {new: True, declined: False}


AXE = Path(__file__).resolve().parent.parent / "creditflow" / "web" / "static" / "vendor" / "axe-core" / "axe.min.js"
PAGES = [("/portal", "overview"), ("/portal/usage", "usage"), ("/portal/buy", "buy"), ("/portal/invoices", "invoices"),
         ("/portal/payment-methods", "payment-methods"), ("/portal/history", "history"), ("/portal/plan", "plan"),
         ("/portal/auto-recharge", "auto-recharge"), ("/portal/spend", "spend"), ("/portal/agents", "agents"),
         ("/portal/details", "details")]

# What each page must have, read from the live DOM: one h1; every visible form control with a label (a <label for>,
# aria-label or aria-labelledby that names something); the skip link first in the tab order, pointing at <main>;
# no horizontal scrolling of the page itself.
A11Y_FACTS = """() => {
  const controls = [...document.querySelectorAll('input, select, textarea')]
    .filter(el => el.type !== 'hidden' && el.offsetParent !== null);
  const unlabelled = controls.filter(el => {
    const named = [...(el.labels || [])].some(l => l.textContent.trim())
      || (el.getAttribute('aria-label') || '').trim()
      || (el.getAttribute('aria-labelledby') || '').split(' ').some(id => id && document.getElementById(id));
    return !named;
  }).map(el => el.id || el.name);
  const skip = document.querySelector('a.skip');
  return {h1: document.querySelectorAll('h1').length, unlabelled, controls: controls.length,
          skip: skip ? skip.getAttribute('href') : null, main: !!document.querySelector('main#main'),
          overflow: document.documentElement.scrollWidth - window.innerWidth,
          wide: [...document.querySelectorAll('body *')].filter(el => el.getBoundingClientRect().right
            > window.innerWidth + 1 ).map(el => el.tagName + '#' + el.id + '.'
            + el.className).slice(0, 5),
          lang: document.documentElement.lang, title: document.title};
}"""


async def _focus_ring(page: Any, selector: str) -> str:
    """The outline a focused element shows (keyboard focus must be visible)."""
    return str(await page.evaluate(
        "(sel) => { const el = document.querySelector(sel); el.focus(); const s = getComputedStyle(el);"
        " return s.outlineStyle + ' ' + s.outlineWidth; }", selector))


async def test_every_portal_page_is_accessible_and_fits_a_phone(
        browser: Any, stack: tuple[str, httpx.AsyncClient], sdk: stripe.StripeClient) -> None:
    """Every page, at 1280 px and at 375 px: one h1, every control labelled, a skip link to <main> that is the first
    Tab stop, a visible focus ring, no horizontal scrolling, and axe-core (vendored, WCAG 2.1 A/AA rules) finds no
    serious or critical violation. Screenshots at phone width: portal-phone-*.png."""
    base, api = stack
    account = await new_account(api)
    await attach(api, sdk, account, "4242424242424242")
    assert (await api.post("/api/v1/agents", json={"account_id": account, "id": "support-bot",
                                                   "name": "Support bot"})).status_code == 201
    assert (await api.post("/api/v1/billing/track", json={
        "account_id": account, "feature_id": "chat_message", "value": 12, "agent_id": "support-bot",
        "idempotency_key": "a11y-1"})).status_code == 200
    assert (await api.put("/api/v1/billing/alerts", json={"account_id": account, "alerts": [
        {"threshold": 1000, "channels": ["email", "sms"]}]})).status_code == 200
    # axe is injected as a script: the portal's own policy forbids scripts, so this context bypasses CSP (the
    # pages are otherwise what customers get).
    context = await browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    context.set_default_timeout(15_000)
    page = await context.new_page()
    try:
        await page.goto(await session_url(api, account))
        problems: dict[str, Any] = {}
        for width in (1280, 375):
            await page.set_viewport_size({"width": width, "height": 844 if width == 375 else 900})
            for path, name in PAGES:
                response = await page.goto(f"{base}{path}")
                assert response.status == 200, path
                facts = await page.evaluate(A11Y_FACTS)
                where = f"{path} @ {width}px"
                assert facts["h1"] == 1, (where, facts)
                assert re.fullmatch(r"[A-Z][A-Za-z -]+ · Flowyte", facts["title"]), (where, facts["title"])
                assert facts["unlabelled"] == [], (where, facts)
                assert (facts["skip"], facts["main"], facts["lang"]) == ("#main", True, "en"), (where, facts)
                assert facts["overflow"] <= 1, (where, facts["overflow"], facts["wide"])
                await page.keyboard.press("Tab")  # the first Tab stop is the skip link, and it is visible
                assert await page.evaluate("document.activeElement.className") == "skip", where
                box = await page.locator("a.skip").bounding_box()
                assert box and box["x"] >= 0 and box["y"] >= 0, (where, box)
                assert (await _focus_ring(page, "a.skip")).startswith("solid"), where
                for selector in ("main button", "main input:not([type=hidden])", "main select", "nav a"):
                    if await page.locator(selector).count():
                        ring = await _focus_ring(page, selector)
                        assert ring.startswith("solid") and not ring.endswith(" 0px"), (where, selector, ring)
                await page.add_script_tag(path=str(AXE))
                result = await page.evaluate(
                    "async () => { const r = await axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a',"
                    " 'wcag2aa', 'wcag21a', 'wcag21aa']}}); return r.violations.map(v => ({id: v.id, impact:"
                    " v.impact, nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 5)})); }")
                serious = [v for v in result if v["impact"] in ("serious", "critical")]
                if serious:
                    problems[where] = serious
                if width == 375:
                    await shot(page, f"portal-phone-{name}")
        assert problems == {}, problems
    finally:
        await context.close()
