"""Packages and hosted checkout (seed 000 "Select a credit package ... Complete checkout via Stripe").

Through the HTTP API and the hosted page's own endpoints, against the real stack: PostgreSQL, localstripe (its
SetupIntent confirmation called as its Stripe.js calls it) and, for paying, the Temporal dev server with the
production worker. The browser itself is driven in tests/test_checkout_browser.py.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool

from creditflow.api.app import create_app
from creditflow.config import Settings
from creditflow.payments.checkout import with_session_id
from tests.conftest import ADMIN_KEY, ledger_snapshot
from tests.support.api import bearer, key_for, new_account
from tests.support.checkout import (
    PUBLISHABLE_KEY,
    card_confirmed_on_page,
    checkout_settings,
    page_config,
    pay,
)
from tests.support.payments import DECLINED_AT_CHARGE, charges, customer_of, intents_of, purchases, reconcile

SESSIONS = "/api/v1/checkout/sessions"
PACKAGES = "/api/v1/billing/packages"
SUCCESS = "https://shop.example/billing?success=true"
CANCEL = "https://shop.example/billing?canceled=true"


@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    return checkout_settings(database_url, stripe_base)


async def _client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://creditflow.test",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as client:
        yield client


@pytest.fixture
async def paying_api(temporal_settings: Settings, temporal_worker: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app with Temporal (the dev server) and the production worker on the test's queue: pays for real."""
    async for client in _client(temporal_settings):
        yield client


# --- helpers ---------------------------------------------------------------------------------------------------


async def create(api: httpx.AsyncClient, account: str, **body: Any) -> httpx.Response:
    return await api.post(SESSIONS, json={"account_id": account, "success_url": SUCCESS, "cancel_url": CANCEL,
                                          **body})


async def session_count(database_url: str) -> int:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        row = await (await conn.execute("SELECT count(*) FROM checkout_sessions")).fetchone()
    assert row is not None
    return int(row[0])


def exact(resp: httpx.Response) -> Any:
    """The answer with its amounts as Decimals (exact JSON numbers)."""
    return json.loads(resp.text, parse_float=Decimal)


async def balance(api: httpx.AsyncClient, account: str) -> Any:
    return (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()["balance"]


def test_the_success_url_names_the_session() -> None:
    sid = "cs_" + "a" * 32
    assert with_session_id("https://shop.example/done", sid) == f"https://shop.example/done?session_id={sid}"
    assert with_session_id("https://shop.example/b?x=1&y=#f", sid) == f"https://shop.example/b?x=1&y=&session_id={sid}#f"
    assert with_session_id("https://shop.example/ok/{CHECKOUT_SESSION_ID}?a=1", sid) == (
        f"https://shop.example/ok/{sid}?a=1")


# --- packages --------------------------------------------------------------------------------------------------


async def test_packages_show_exact_prices_bonus_and_the_custom_amount_bounds(api: httpx.AsyncClient) -> None:
    account = await new_account(api)
    reader = bearer(await key_for(api, account, "billing:read"))
    resp = await api.get(PACKAGES, headers=reader)
    assert resp.status_code == 200, resp.text
    assert '"price_usd":9.99' in resp.text  # an exact JSON number, never a float's digits
    assert resp.json() == {
        "items": [
            {"id": "starter", "object": "credit_package", "name": "Starter", "credits": 1000, "price_usd": 10,
             "price_cents": 1000, "currency": "usd", "bonus_credits": 0},
            {"id": "growth", "object": "credit_package", "name": "Growth", "credits": 5000, "price_usd": 50,
             "price_cents": 5000, "currency": "usd", "bonus_credits": 0},
            {"id": "scale", "object": "credit_package", "name": "Scale", "credits": 20000, "price_usd": 200,
             "price_cents": 20000, "currency": "usd", "bonus_credits": 0},
            {"id": "bonus", "object": "credit_package", "name": "Bonus", "credits": 1200, "price_usd": 9.99,
             "price_cents": 999, "currency": "usd", "bonus_credits": 201},
        ],
        "custom_amount": {"min_usd": 5, "max_usd": 5000, "credits_per_usd": 100},
    }
    usage_only = bearer(await key_for(api, account, "usage:write"))
    assert (await api.get(PACKAGES, headers=usage_only)).status_code == 403


# --- creating sessions -----------------------------------------------------------------------------------------


async def test_a_session_for_a_package_fixes_price_and_credits_and_links_the_hosted_page(
        api: httpx.AsyncClient) -> None:
    account = await new_account(api)
    writer = bearer(await key_for(api, account, "billing:write"))
    resp = await api.post(SESSIONS, headers=writer,
                          json={"package_id": "growth", "success_url": SUCCESS, "cancel_url": CANCEL})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    sid = body["id"]
    assert re.fullmatch(r"cs_[0-9a-f]{32}", sid)
    url = f"http://creditflow.test/checkout/{sid}"
    created, expires = datetime.fromisoformat(body["created_at"]), datetime.fromisoformat(body["expires_at"])
    assert timedelta(hours=24) - timedelta(seconds=5) < expires - created <= timedelta(hours=24)
    assert body == {"id": sid, "object": "checkout.session", "url": url, "status": "open", "payment_status": "unpaid",
                    "account_id": account, "amount": 50, "amount_usd": 50, "currency": "usd", "credits": 5000,
                    "package_id": "growth", "description": "Growth package purchase", "success_url": SUCCESS,
                    "cancel_url": CANCEL, "created_at": body["created_at"], "expires_at": body["expires_at"],
                    "completed_at": None, "transaction_id": None, "session_id": sid, "checkout_url": url,
                    "mode": "payment", "payment_method_id": None}
    got = await api.get(f"{SESSIONS}/{sid}", headers=bearer(await key_for(api, account, "billing:read")))
    assert (got.status_code, got.json()) == (200, body)
    # Seed 000's own path answers the same object (session_id, checkout_url).
    seed = await api.post("/api/v1/billing/checkout", headers=writer,
                          json={"package_id": "growth", "success_url": SUCCESS, "cancel_url": CANCEL})
    assert seed.status_code == 201 and seed.json()["checkout_url"].endswith(f"/checkout/{seed.json()['session_id']}")
    # A bonus package: its price, its credits (the lot is priced 999 cents for 1,200 credits when paid).
    bonus = await create(api, account, package_id="bonus")
    assert (exact(bonus)["amount"], exact(bonus)["credits"]) == (Decimal("9.99"), 1200)
    assert '"amount":9.99' in bonus.text


async def test_a_session_for_an_amount_is_held_to_the_top_up_rules(api: httpx.AsyncClient, database_url: str) -> None:
    account = await new_account(api)
    resp = await create(api, account, amount="25.50")
    assert resp.status_code == 201, resp.text
    assert (exact(resp)["amount"], exact(resp)["credits"], exact(resp)["package_id"]) == (Decimal("25.5"), 2550, None)
    assert resp.json()["description"] == "Top-up of $25.50"
    assert (await create(api, account, amount_usd=5)).json()["credits"] == 500
    before = await session_count(database_url)
    refused = {
        "amount_out_of_range": [{"amount": "4.99"}, {"amount": 5000.01}, {"amount": 0}, {"amount": -10}],
        "invalid_amount": [{"amount": "25.555"}, {}, {"package_id": "growth", "amount": 50}],
        "unknown_package": [{"package_id": "platinum"}],
        "validation_error": [{"amount": "ten"}, {"amount": True}, {"amount": "1e999999"}, {"package_id": "Growth Pack"},
                             {"amount": 10, "amount_usd": 11}, {"amount": 10, "surprise": True}],
    }
    for code, bodies in refused.items():
        for body in bodies:
            resp = await create(api, account, **body)
            assert (resp.status_code, resp.json()["error"]["code"]) == (422, code), (body, resp.text)
    assert await session_count(database_url) == before


async def test_return_urls_are_http_absolute_bounded_and_clean(api: httpx.AsyncClient, database_url: str) -> None:
    account = await new_account(api)
    before = await ledger_snapshot(database_url)
    bad = ["javascript:alert(1)", "data:text/html,hi", "ftp://shop.example/x", "/billing", "shop.example/billing",
           "https://", "https://shop.example/a b", "https://shop.example/\x00", "https://shop.example\\@evil.test/",
           "https://shop.example/\u0085", "https://shop.example:99999/", "http://[::1/", "",
           "https://shop.example/" + "a" * 2030]
    for url in bad:
        for field in ("success_url", "cancel_url"):
            resp = await create(api, account, package_id="starter", **{field: url})
            assert (resp.status_code, resp.json()["error"]["code"]) == (422, "validation_error"), (field, url)
    assert await session_count(database_url) == 0
    assert await ledger_snapshot(database_url) == before
    ok = await create(api, account, package_id="starter", success_url="http://localhost:3000/done#top",
                      cancel_url="https://shop.example/" + "a" * 2000)
    assert ok.status_code == 201, ok.text


async def test_the_idempotency_key_returns_the_same_session_and_refuses_another_request(
        api: httpx.AsyncClient, database_url: str) -> None:
    account = await new_account(api)
    key = {"Idempotency-Key": "order-7"}
    body = {"account_id": account, "package_id": "growth", "success_url": SUCCESS, "cancel_url": CANCEL}
    first = await api.post(SESSIONS, headers=key, json=body)
    again = await api.post(SESSIONS, headers=key, json=body)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    in_body = await api.post(SESSIONS, json={**body, "idempotency_key": "order-7"})
    assert in_body.json()["id"] == first.json()["id"]
    other = await api.post(SESSIONS, headers=key, json={**body, "package_id": "scale"})
    assert (other.status_code, other.json()["error"]["code"]) == (409, "idempotency_conflict")
    mismatch = await api.post(SESSIONS, headers=key, json={**body, "idempotency_key": "order-8"})
    assert (mismatch.status_code, mismatch.json()["error"]["code"]) == (400, "idempotency_key_mismatch")
    # Keys are scoped to the account; without a key every request is a new session (as Stripe's).
    elsewhere = await api.post(SESSIONS, headers=key, json={**body, "account_id": await new_account(api)})
    assert elsewhere.status_code == 201 and elsewhere.json()["id"] != first.json()["id"]
    assert (await create(api, account, package_id="growth")).json()["id"] != first.json()["id"]
    assert await session_count(database_url) == 3


async def test_another_accounts_session_is_not_found_and_creating_needs_billing_write(api: httpx.AsyncClient) -> None:
    mine, theirs = await new_account(api), await new_account(api)
    sid = (await create(api, theirs, package_id="starter")).json()["id"]
    reader = bearer(await key_for(api, mine, "billing:read"))
    for path in (f"{SESSIONS}/{sid}", f"{SESSIONS}/cs_{'0' * 32}", f"{SESSIONS}/nope"):
        resp = await api.get(path, headers=reader)
        assert (resp.status_code, resp.json()["error"]["code"]) == (404, "unknown_checkout_session"), path
    named = await api.get(f"{SESSIONS}/{sid}", headers=reader, params={"account_id": theirs})
    assert (named.status_code, named.json()["error"]["code"]) == (403, "forbidden")
    assert (await api.get(f"{SESSIONS}/{sid}", params={"account_id": mine})).status_code == 404  # admin, wrong account
    assert (await api.get(f"{SESSIONS}/{sid}")).json()["account_id"] == theirs  # admin, any account
    for scope in ("usage:write", "billing:read", "payments:write"):
        key = bearer(await key_for(api, mine, scope))
        resp = await api.post(SESSIONS, headers=key,
                              json={"package_id": "starter", "success_url": SUCCESS, "cancel_url": CANCEL})
        assert (resp.status_code, resp.json()["error"]["details"]) == (403, {"required_scopes": ["billing:write"]})
    cross = await api.post(SESSIONS, headers=bearer(await key_for(api, mine, "billing:write")),
                           json={"account_id": theirs, "package_id": "starter", "success_url": SUCCESS,
                                 "cancel_url": CANCEL})
    assert (cross.status_code, cross.json()["error"]["code"]) == (403, "forbidden")
    unknown = await create(api, "acc_" + "0" * 32, package_id="starter")
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "unknown_account")


# --- the hosted page -------------------------------------------------------------------------------------------


async def test_the_page_shows_what_is_bought_and_loads_stripe_js_from_the_setting(
        api: httpx.AsyncClient, stripe_base: str) -> None:
    account = await new_account(api)
    sid = (await create(api, account, package_id="bonus")).json()["id"]
    page = await api.get(f"/checkout/{sid}", headers={"Authorization": ""})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert '<dd id="package-name">Bonus</dd>' in html
    assert '<dd id="credits">1,200 credits</dd>' in html
    assert '<dd id="price" class="price">$9.99 <span class="currency">USD</span></dd>' in html
    assert f'<script src="{stripe_base}/js.stripe.com/v3/"></script>' in html
    assert f'href="{CANCEL}"' in html
    config = page_config(html)
    assert config["publishableKey"] == PUBLISHABLE_KEY and config["payUrl"] == f"/checkout/{sid}/pay"
    assert len(config["csrfToken"]) >= 40
    csp = page.headers["content-security-policy"]
    assert f"script-src 'self' {stripe_base}" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["cache-control"] == "no-store"
    js = await api.get("/checkout/static/checkout.js")
    assert js.status_code == 200 and "confirmCardSetup" in js.text
    assert (await api.get("/checkout/static/checkout.css")).status_code == 200
    # A custom amount: no package line, the price from integer cents.
    sid2 = (await create(api, account, amount="1234.56")).json()["id"]
    html2 = (await api.get(f"/checkout/{sid2}")).text
    assert 'id="package-name"' not in html2 and "$1,234.56" in html2 and "123,456 credits" in html2
    for bad in (f"cs_{'0' * 32}", "nope", "cs_" + "f" * 32 + "x", "%3Cscript%3E"):
        resp = await api.get(f"/checkout/{bad}")
        assert resp.status_code == 404 and "Checkout not found" in resp.text, bad
        assert resp.headers["content-type"].startswith("text/html")


async def test_the_page_posts_need_the_sessions_csrf_token(api: httpx.AsyncClient, database_url: str) -> None:
    account = await new_account(api)
    sid = (await create(api, account, package_id="starter")).json()["id"]
    other = (await create(api, account, package_id="starter")).json()["id"]
    other_token = page_config((await api.get(f"/checkout/{other}")).text)["csrfToken"]
    for headers in ({}, {"X-CSRF-Token": "nope"}, {"X-CSRF-Token": other_token}):
        for path, body in ((f"/checkout/{sid}/intent", {}),
                           (f"/checkout/{sid}/pay", {"setup_intent": "seti_x", "payment_method": "pm_x"})):
            resp = await api.post(path, headers=headers, json=body)
            assert (resp.status_code, resp.json()["error"]["code"]) == (403, "csrf_token_invalid"), (path, headers)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        row = await (await conn.execute("SELECT count(*) FROM stripe_customers")).fetchone()
    assert row == (0,)  # nothing reached Stripe


async def test_an_expired_session_shows_a_clear_page_and_cannot_be_paid(database_url: str, stripe_base: str) -> None:
    settings = checkout_settings(database_url, stripe_base, checkout_session_expiry_seconds=1)
    async for api in _client(settings):
        account = await new_account(api)
        created = (await create(api, account, package_id="growth")).json()
        sid = created["id"]
        config = page_config((await api.get(f"/checkout/{sid}")).text)
        await asyncio.sleep(1.2)
        got = await api.get(f"{SESSIONS}/{sid}")
        assert (got.json()["status"], got.json()["payment_status"]) == ("expired", "unpaid")
        page = await api.get(f"/checkout/{sid}")
        assert page.status_code == 410 and "This checkout link has expired" in page.text
        assert f'href="{CANCEL}"' in page.text and "checkout-config" not in page.text
        intent = await api.post(f"/checkout/{sid}/intent", headers={"X-CSRF-Token": config["csrfToken"]})
        assert (intent.status_code, intent.json()["error"]["code"]) == (410, "checkout_session_expired")
        paid = await api.post(f"/checkout/{sid}/pay", headers={"X-CSRF-Token": config["csrfToken"]},
                              json={"setup_intent": "seti_x", "payment_method": "pm_x"})
        assert (paid.status_code, paid.json()["error"]["code"]) == (410, "checkout_session_expired")
        assert await balance(api, account) == 5000


async def test_without_a_publishable_key_the_page_says_payments_are_not_configured(
        database_url: str, stripe_base: str) -> None:
    settings = checkout_settings(database_url, stripe_base, stripe_publishable_key="")
    async for api in _client(settings):
        sid = (await create(api, await new_account(api), package_id="growth")).json()["id"]
        page = await api.get(f"/checkout/{sid}")
        assert page.status_code == 503 and "Payments are not configured" in page.text


# --- paying ----------------------------------------------------------------------------------------------------


@pytest.mark.temporal
async def test_two_pays_charge_once_and_the_session_completes(
        paying_api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient, stripe_base: str) -> None:
    api = paying_api
    account = await new_account(api)
    sid = (await create(api, account, package_id="growth", success_url="https://shop.example/done?x=1#top")).json()[
        "id"]
    csrf, seti = await card_confirmed_on_page(api, stripe_base, sid)
    assert seti["status"] == "succeeded" and seti["status_code"] == 200

    # A double click: two pays at once, then a reload's pay. One charge, one purchase, the same answer.
    first, second = await asyncio.gather(pay(api, sid, csrf, seti), pay(api, sid, csrf, seti))
    third = await pay(api, sid, csrf, seti)
    for resp in (first, second, third):
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "complete"
        assert resp.json()["redirect_url"] == f"https://shop.example/done?x=1&session_id={sid}#top"
        assert resp.json()["credits"] == 5000
    assert await balance(api, account) == 10000
    [purchase] = await purchases(pool, account)
    assert purchase["amount_micros"] == 5000 * 1_000_000 and purchase["description"] == "Growth package purchase"
    [charge] = await charges(pool, account)
    assert (charge["request_id"], charge["amount_cents"], charge["credits"], charge["package_id"]) == (
        f"checkout:{sid}", 5000, 5000, "growth")
    [pi] = intents_of(sdk, await customer_of(pool, account))
    assert (pi.amount, pi.status, pi.payment_method) == (5000, "succeeded", seti["payment_method"])
    assert await reconcile(pool, sdk, account) == 1

    got = (await api.get(f"{SESSIONS}/{sid}")).json()
    assert (got["status"], got["payment_status"], got["transaction_id"]) == ("complete", "paid",
                                                                             charge["ledger_txn_id"])
    assert got["completed_at"] is not None
    # The card was saved on the customer (not made the default); the page now says it is paid.
    cards = (await api.get("/api/v1/billing/payment-methods", params={"account_id": account})).json()["items"]
    assert [(c["id"], c["is_default"]) for c in cards] == [(seti["payment_method"], False)]
    page = await api.get(f"/checkout/{sid}")
    assert page.status_code == 200 and "Payment received" in page.text and "5,000 credits" in page.text
    again = await api.post(f"/checkout/{sid}/intent", headers=csrf)
    assert (again.status_code, again.json()["error"]["code"]) == (409, "checkout_session_complete")


@pytest.mark.temporal
async def test_a_declined_card_charges_nothing_and_another_card_pays_once(
        paying_api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient, stripe_base: str) -> None:
    api = paying_api
    account = await new_account(api)
    sid = (await create(api, account, amount="12.34")).json()["id"]
    csrf, bad = await card_confirmed_on_page(api, stripe_base, sid, DECLINED_AT_CHARGE)
    declined = await pay(api, sid, csrf, bad)
    assert (declined.status_code, declined.json()["error"]["code"]) == (402, "card_declined"), declined.text
    again = await pay(api, sid, csrf, bad)  # the same card again: the same refusal, no second charge
    assert (again.status_code, again.json()["error"]["code"]) == (402, "card_declined")
    assert await balance(api, account) == 5000
    assert (await api.get(f"{SESSIONS}/{sid}")).json()["status"] == "open"

    # A card confirmed on another session, or not confirmed at all, is refused.
    other = (await create(api, account, amount="12.34")).json()["id"]
    _, foreign = await card_confirmed_on_page(api, stripe_base, other)
    refused = await pay(api, sid, csrf, foreign)
    assert (refused.status_code, refused.json()["error"]["code"]) == (422, "payment_method_invalid")

    _, good = await card_confirmed_on_page(api, stripe_base, sid)
    paid = await pay(api, sid, csrf, good)
    assert paid.status_code == 200 and paid.json()["status"] == "complete", paid.text
    assert await balance(api, account) == 5000 + 1234
    rows = await charges(pool, account)
    assert [(c["request_id"], c["status"]) for c in rows] == [(f"checkout:{sid}", "failed"),
                                                              (f"checkout:{sid}:2", "succeeded")]
    assert await reconcile(pool, sdk, account) == 1
    # After it is paid, the declined card's pay answers the redirect, never a charge.
    late = await pay(api, sid, csrf, bad)
    assert late.status_code == 200 and late.json()["status"] == "complete"
    assert len(await purchases(pool, account)) == 1


# --- setup mode: a card saved, nothing charged -----------------------------------------------------------------


async def test_a_setup_session_saves_the_card_as_default_and_charges_nothing(
        api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient, stripe_base: str,
        database_url: str) -> None:
    """Mode setup: the same page and card form; completing it saves the card on the account's customer (the default
    when asked), charges nothing and writes nothing to the ledger. No past-due invoice: Temporal is not needed."""
    from tests.conftest import new_card

    account = await new_account(api)
    old = (await api.post("/api/v1/billing/payment-methods", json={
        "account_id": account, "payment_method_id": new_card(sdk, "5555555555554444")})).json()["id"]
    before_sessions = await session_count(database_url)
    for extra in ({"package_id": "starter"}, {"amount": "10"}):
        refused = await create(api, account, mode="setup", **extra)
        assert (refused.status_code, refused.json()["error"]["code"]) == (422, "invalid_amount"), extra
    bad_mode = await create(api, account, mode="subscription")
    assert bad_mode.status_code == 422
    paid_default = await create(api, account, package_id="starter", set_default=True)
    assert (paid_default.status_code, paid_default.json()["error"]["code"]) == (422, "validation_error")
    # Setup needs payments:write besides billing:write (the card may become the default).
    writer = bearer(await key_for(api, account, "billing:write"))
    body = {"mode": "setup", "success_url": SUCCESS, "cancel_url": CANCEL}
    denied = await api.post(SESSIONS, headers=writer, json=body)
    assert (denied.status_code, denied.json()["error"]["code"]) == (403, "insufficient_scope")
    assert await session_count(database_url) == before_sessions
    both = bearer(await key_for(api, account, "billing:write", "payments:write"))
    assert (await api.post(SESSIONS, headers=both, json=body)).status_code == 201

    created = await create(api, account, mode="setup", set_default=True, idempotency_key="add-card-1")
    assert created.status_code == 201, created.text
    session = exact(created)
    assert (session["mode"], session["amount"], session["credits"], session["package_id"], session["status"],
            session["payment_status"], session["description"], session["payment_method_id"]) == (
        "setup", 0, 0, None, "open", "no_payment_required", "Save a card", None)
    again = await create(api, account, mode="setup", set_default=True, idempotency_key="add-card-1")
    assert again.json()["id"] == session["id"]
    other = await create(api, account, mode="setup", set_default=False, idempotency_key="add-card-1")
    assert (other.status_code, other.json()["error"]["code"]) == (409, "idempotency_conflict")
    sid = session["id"]
    page = await api.get(f"/checkout/{sid}", headers={"Authorization": ""})
    assert page.status_code == 200 and "<h1>Add a card</h1>" in page.text and ">Save card</button>" in page.text
    assert "Buy credits" not in page.text and page_config(page.text)["setup"] is True

    snapshot = await ledger_snapshot(database_url)
    csrf, seti = await card_confirmed_on_page(api, stripe_base, sid)
    first, second = await asyncio.gather(pay(api, sid, csrf, seti), pay(api, sid, csrf, seti))
    for resp in (first, second, await pay(api, sid, csrf, seti)):
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"status": "complete", "redirect_url": f"{SUCCESS}&session_id={sid}",
                               "payment_method_id": seti["payment_method"]}
    cards = (await api.get("/api/v1/billing/payment-methods", params={"account_id": account})).json()["items"]
    assert {c["id"]: (c["brand"], c["last4"], c["exp_month"], c["exp_year"], c["is_default"]) for c in cards} == {
        seti["payment_method"]: ("visa", "4242", 12, 2030, True),
        old: ("visa", "4444", 12, 2030, False)}  # localstripe calls every card visa
    assert intents_of(sdk, await customer_of(pool, account)) == []  # nothing charged
    assert await ledger_snapshot(database_url) == snapshot and await balance(api, account) == 5000
    got = (await api.get(f"{SESSIONS}/{sid}")).json()
    assert (got["status"], got["payment_method_id"], got["transaction_id"]) == ("complete", seti["payment_method"],
                                                                                None)
    done = await api.get(f"/checkout/{sid}")
    assert done.status_code == 200 and "Card saved" in done.text and "Nothing was charged" in done.text
    assert (await api.post(f"/checkout/{sid}/intent", headers=csrf)).json()["error"]["code"] == \
        "checkout_session_complete"


async def test_a_setup_session_without_set_default_keeps_the_default_card(
        api: httpx.AsyncClient, sdk: stripe.StripeClient, stripe_base: str) -> None:
    from tests.conftest import new_card

    account = await new_account(api)
    old = (await api.post("/api/v1/billing/payment-methods", json={
        "account_id": account, "payment_method_id": new_card(sdk, "5555555555554444")})).json()["id"]
    sid = (await create(api, account, mode="setup")).json()["id"]
    csrf, seti = await card_confirmed_on_page(api, stripe_base, sid)
    assert (await pay(api, sid, csrf, seti)).json()["status"] == "complete"
    # A card confirmed on this page only: another session's SetupIntent is refused.
    other = (await create(api, account, mode="setup")).json()["id"]
    _, foreign = await card_confirmed_on_page(api, stripe_base, other)
    refused = await pay(api, sid, csrf, foreign)
    assert refused.status_code == 200 and refused.json()["payment_method_id"] == seti["payment_method"]  # done
    other_csrf = {"X-CSRF-Token": page_config((await api.get(f"/checkout/{other}")).text)["csrfToken"]}
    refused = await pay(api, other, other_csrf, seti)
    assert (refused.status_code, refused.json()["error"]["code"]) == (422, "payment_method_invalid")
    cards = (await api.get("/api/v1/billing/payment-methods", params={"account_id": account})).json()["items"]
    assert {c["id"]: c["is_default"] for c in cards} == {seti["payment_method"]: False, old: True}
