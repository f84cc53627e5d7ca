"""The customer portal's session rules over HTTP (real app, real PostgreSQL, localstripe; no browser): single-use,
short-lived links; the cookie's flags; the cookie never authenticates /api/v1; CSRF on every form; logout and idle
expiry; another account's ids refused; pages show exact figures. tests/test_portal_browser.py drives a browser."""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool

from creditflow.api.app import create_app
from creditflow.config import Settings
from creditflow.domain.periods import Period
from creditflow.ledger import metering
from creditflow.ledger.metering import UsageEvent
from creditflow.ledger.subscriptions import save_subscription
from tests.conftest import ADMIN_KEY, STRIPE_KEY, ledger_snapshot, new_card
from tests.support.api import bearer, key_for, new_account, track
from tests.support.ledger import clock_pool

SESSIONS = "/api/v1/portal/sessions"
RETURN = "https://platform.example/account"


@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=5000, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=stripe_base, stripe_retry_max_wait_seconds=0.1, platform_name="Flowyte",
                    platform_logo_url="https://platform.example/logo.png")


async def _app_client(settings: Settings, base_url: str = "http://creditflow.test"
                      ) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=base_url,
            headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        yield app, client


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async for _, client in _app_client(settings):
        yield client


async def portal_link(api: httpx.AsyncClient, account: str) -> str:
    resp = await api.post(SESSIONS, json={"account_id": account, "return_url": RETURN})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["url"])


def browser_of(api: httpx.AsyncClient) -> httpx.AsyncClient:
    """A client on the same app without the admin key: what a customer's browser sends (cookies only)."""
    return httpx.AsyncClient(transport=api._transport, base_url=api.base_url)


async def open_portal(api: httpx.AsyncClient, account: str) -> httpx.AsyncClient:
    browser = browser_of(api)
    resp = await browser.get(await portal_link(api, account))
    assert (resp.status_code, resp.headers["location"]) == (303, "/portal"), resp.text
    return browser


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


async def test_creating_a_session_is_the_platforms_and_checks_its_input(api: httpx.AsyncClient) -> None:
    account = await new_account(api)
    resp = await api.post(SESSIONS, json={"account_id": account, "return_url": RETURN})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["id"].startswith("pses_") and body["account_id"] == account and body["return_url"] == RETURN
    assert re.fullmatch(r"http://creditflow\.test/portal/start/cf_pl_[A-Za-z0-9_\-]{43}", body["url"])
    assert body["expires_at"]
    # Not with an account key, even one holding every account scope.
    everything = bearer(await key_for(api, account, "billing:read", "billing:write", "payments:write"))
    denied = await api.post(SESSIONS, headers=everything, json={"account_id": account, "return_url": RETURN})
    assert (denied.status_code, denied.json()["error"]["code"]) == (403, "insufficient_scope")
    missing = await api.post(SESSIONS, json={"account_id": "acc_" + "0" * 32, "return_url": RETURN})
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "unknown_account")
    for bad in ("javascript:alert(1)", "/relative", "ftp://x.example/", "https://", "https://a.example/\r\nx"):
        resp = await api.post(SESSIONS, json={"account_id": account, "return_url": bad})
        assert (resp.status_code, resp.json()["error"]["code"]) == (422, "validation_error"), bad
    bad_id = await api.post(SESSIONS, json={"account_id": "nope", "return_url": RETURN})
    assert bad_id.status_code == 422


async def test_a_link_opens_once_and_sets_a_http_only_same_site_cookie_for_the_portal_only(
        api: httpx.AsyncClient) -> None:
    account = await new_account(api)
    link = await portal_link(api, account)
    browser = browser_of(api)
    opened = await browser.get(link)
    assert (opened.status_code, opened.headers["location"]) == (303, "/portal")
    cookie = opened.headers["set-cookie"]
    assert cookie.startswith("cf_portal=cf_ps_")
    assert all(flag in cookie for flag in ("HttpOnly", "SameSite=lax", "Path=/portal"))
    assert "Secure" not in cookie  # plain http (tests); https below
    assert (await browser.get("/portal")).status_code == 200
    # The same link again (another browser, or a reload of the link): refused, with a page saying why.
    again = await browser_of(api).get(link)
    assert again.status_code == 410 and "already used" in again.text
    unknown = await browser_of(api).get("/portal/start/cf_pl_nothing")
    assert unknown.status_code == 404 and "not valid" in unknown.text
    # No cookie, no portal.
    nobody = await browser_of(api).get("/portal")
    assert nobody.status_code == 401 and "session has ended" in nobody.text


async def test_over_https_the_cookie_is_secure(settings: Settings) -> None:
    async for _, api in _app_client(settings, "https://billing.example"):
        account = await new_account(api)
        link = await portal_link(api, account)
        assert link.startswith("https://billing.example/portal/start/")
        opened = await browser_of(api).get(link)
        assert opened.status_code == 303 and "Secure" in opened.headers["set-cookie"]


async def test_an_expired_link_is_refused(settings: Settings) -> None:
    async for _, api in _app_client(settings.model_copy(update={"portal_link_ttl_minutes": 0.01})):  # 0.6 s
        account = await new_account(api)
        link = await portal_link(api, account)
        await asyncio.sleep(1.0)
        resp = await browser_of(api).get(link)
        assert resp.status_code == 410 and "expired" in resp.text
        assert "set-cookie" not in resp.headers


async def test_an_idle_session_ends(settings: Settings) -> None:
    async for _, api in _app_client(settings.model_copy(update={"portal_session_idle_minutes": 0.01})):
        browser = await open_portal(api, await new_account(api))
        await asyncio.sleep(1.0)
        assert (await browser.get("/portal")).status_code == 401


async def test_the_cookie_never_authenticates_the_api(api: httpx.AsyncClient) -> None:
    browser = await open_portal(api, await new_account(api))
    token = browser.cookies.get("cf_portal")
    assert token
    for path in ("/api/v1/billing/balance", "/api/v1/billing/invoices"):
        resp = await browser.get(path, headers={"Cookie": f"cf_portal={token}"})
        assert (resp.status_code, resp.json()["error"]["code"]) == (401, "unauthorized"), path
    # Nor is the cookie's value an API key.
    resp = await browser.get("/api/v1/billing/balance", headers=bearer(token))
    assert resp.status_code == 401


async def test_the_overview_shows_the_figures_exactly(api: httpx.AsyncClient) -> None:
    account = await new_account(api)
    assert (await api.put("/api/v1/billing/limits", json={"account_id": account, "daily_limit": 300})).status_code \
        == 200
    assert (await track(api, account, "chat_message", 7, "u-1")).status_code == 200
    browser = await open_portal(api, account)
    page = (await browser.get("/portal")).text
    balance = (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()
    assert balance["balance"] == 4993  # 5,000 welcome credits, 7 chat messages at 1 credit
    figures = dict(re.findall(r'<dd id="([a-z-]+)">([^<]*)</dd>', page))
    assert figures["total-credits"] == "5,000"
    assert figures["usage-this-period"] == "7"
    assert figures["remaining-credits"] == "4,993"
    assert figures["balance"] == "4,993"
    assert figures["available-to-use"] == "4,993"
    assert figures["daily-used"] == "7 of 300"
    assert "Flowyte" in page and 'src="https://platform.example/logo.png"' in page
    assert f'href="{RETURN}"' in page and "Log out" in page
    assert '<span id="spend-management">Enabled</span>' in page
    assert '<span id="auto-recharge">Disabled</span>' in page
    # Overage protection (a credit line of 2,000) adds to what is available; usage in micro-credits stays exact.
    lined = await new_account(api, overage_credit_line=2000)
    assert (await track(api, lined, "llm_tokens", 25, "u-2")).status_code == 200  # 25 tokens at 0.1 credit
    figures = dict(re.findall(r'<dd id="([a-z-]+)">([^<]*)</dd>', (await (await open_portal(api, lined)).get(
        "/portal")).text))
    assert {k: figures[k] for k in ("total-credits", "usage-this-period", "remaining-credits", "balance", "overage",
                                    "available-to-use", "daily-used")} == {
        "total-credits": "5,000", "usage-this-period": "2.5", "remaining-credits": "4,997.5", "balance": "4,997.5",
        "overage": "2,000", "available-to-use": "6,997.5", "daily-used": "2.5 (no limit)"}


async def test_every_form_needs_the_sessions_csrf_token(api: httpx.AsyncClient, database_url: str) -> None:
    account = await new_account(api)
    browser = await open_portal(api, account)
    token = csrf_of((await browser.get("/portal/spend")).text)
    before = await ledger_snapshot(database_url)
    for form in ({"daily_limit": "100"}, {"daily_limit": "100", "csrf_token": "wrong"},
                 {"daily_limit": "100", "csrf_token": ""}):
        resp = await browser.post("/portal/spend", data=form)
        assert resp.status_code == 403 and "security token" in resp.text, form
    # JSON instead of a form: refused the same way.
    assert (await browser.post("/portal/spend", json={"daily_limit": "100", "csrf_token": token})).status_code == 403
    limits = (await api.get("/api/v1/billing/limits", params={"account_id": account})).json()
    assert limits["daily_limit"] is None
    # Another session's token does not work in this one.
    other = await open_portal(api, account)
    other_token = csrf_of((await other.get("/portal/spend")).text)
    assert other_token != token
    assert (await browser.post("/portal/spend", data={"daily_limit": "100", "csrf_token": other_token})
            ).status_code == 403
    assert (await browser.post("/portal/logout", data={})).status_code == 403
    assert await ledger_snapshot(database_url) == before
    # With it: saved through the API's own code.
    saved = await browser.post("/portal/spend", data={"daily_limit": "100", "monthly_limit": "", "per_agent_limit": "",
                                                      "action_on_limit": "pause", "csrf_token": token})
    assert (saved.status_code, saved.headers["location"]) == (303, "/portal/spend?ok=limits")
    limits = (await api.get("/api/v1/billing/limits", params={"account_id": account})).json()
    assert (limits["daily_limit"], limits["monthly_limit"]) == (100, None)
    # Bad input: the API's refusal on the page, nothing changed.
    bad = await browser.post("/portal/spend", data={"daily_limit": "-5", "csrf_token": token})
    assert bad.status_code == 422 and 'role="alert"' in bad.text
    assert (await api.get("/api/v1/billing/limits", params={"account_id": account})).json()["daily_limit"] == 100


async def test_every_portal_post_route_refuses_a_form_without_the_sessions_token(api: httpx.AsyncClient,
                                                                                database_url: str) -> None:
    """Every POST the portal has (read from its router, so a new form cannot be forgotten): no token, a wrong
    one, or a JSON body: 403 and nothing changed; the session itself still works afterwards."""
    from starlette.routing import Route

    from creditflow.web.portal import router

    routes = [r.path for r in router.routes
              if isinstance(r, Route) and r.path.startswith("/portal") and "POST" in (r.methods or set())]
    assert len(routes) == 18 and "/portal/buy" in routes and "/portal/spend/enabled" in routes, routes
    posts = [p for p in routes if "{" not in p] + [f"/portal/agents/{a}" for a in ("pause", "resume", "settings")]
    assert len(posts) == 20 and "/portal/agents/{action:str}" in routes
    account = await new_account(api)
    assert (await api.post("/api/v1/agents", json={"account_id": account, "id": "support-bot"})).status_code == 201
    browser = await open_portal(api, account)
    token = csrf_of((await browser.get("/portal")).text)

    async def state() -> list[Any]:
        return [(await api.get(f"/api/v1/{path}", params={"account_id": account})).json() for path in (
            "billing/profile", "billing/limits", "billing/auto-recharge", "billing/subscription", "billing/alerts",
            "billing/notification-channels", "agents/support-bot", "billing/payment-methods")]

    before, settings_before = await ledger_snapshot(database_url), await state()
    form = {"package_id": "starter", "payment_method_id": "new", "plan_id": "starter", "effective": "immediately",
            "daily_limit": "1", "tax_country": "DE", "tax_description": "VAT", "tax_value": "DE1", "enabled": "on",
            "agent_id": "support-bot", "billing_email": "x@y.example", "company": "Forged"}
    for path in posts:
        for bad in ({}, {"csrf_token": "forged"}, {"csrf_token": token[:-1]}):
            resp = await browser.post(path, data={**form, **bad})
            assert (resp.status_code, "This form has expired" in resp.text) == (403, True), (path, bad)
        assert (await browser.post(path, json={**form, "csrf_token": token})).status_code == 403, path
    assert await ledger_snapshot(database_url) == before
    assert await state() == settings_before
    assert (await browser.get("/portal")).status_code == 200  # not logged out by a forged form


async def test_logout_ends_the_session(api: httpx.AsyncClient) -> None:
    browser = await open_portal(api, await new_account(api))
    token = csrf_of((await browser.get("/portal")).text)
    stolen = browser.cookies.get("cf_portal")
    out = await browser.post("/portal/logout", data={"csrf_token": token})
    assert out.status_code == 200 and "signed out" in out.text and f'href="{RETURN}"' in out.text
    assert 'cf_portal=""' in out.headers["set-cookie"]
    # The old cookie, replayed, opens nothing.
    resp = await browser_of(api).get("/portal", headers={"Cookie": f"cf_portal={stolen}"})
    assert resp.status_code == 401


async def test_another_accounts_ids_are_refused(api: httpx.AsyncClient, sdk: stripe.StripeClient,
                                                database_url: str) -> None:
    mine, theirs = await new_account(api), await new_account(api)
    their_card = (await api.post("/api/v1/billing/payment-methods", json={
        "account_id": theirs, "payment_method_id": new_card(sdk)})).json()["id"]
    my_card = (await api.post("/api/v1/billing/payment-methods", json={
        "account_id": mine, "payment_method_id": new_card(sdk, "5555555555554444")})).json()["id"]
    browser = await open_portal(api, mine)
    token = csrf_of((await browser.get("/portal/payment-methods")).text)
    before = await ledger_snapshot(database_url)
    for action in ("default", "delete"):
        resp = await browser.post(f"/portal/payment-methods/{action}",
                                  data={"payment_method_id": their_card, "csrf_token": token})
        assert resp.status_code == 404 and "no such payment method" in resp.text.lower(), action
    theirs_listed = (await api.get("/api/v1/billing/payment-methods", params={"account_id": theirs})).json()
    assert [(c["id"], c["is_default"]) for c in theirs_listed["items"]] == [(their_card, True)]
    # An invoice id of nobody's (or another account's: the same lookup, scoped to the account) is unknown.
    missing = "inv_" + "1" * 32
    assert (await browser.get(f"/portal/invoices/{missing}/pdf")).status_code == 404
    pay = await browser.post("/portal/invoices/pay", data={"invoice_id": missing, "csrf_token": token})
    assert pay.status_code == 404
    assert (await browser.post("/portal/invoices/pay", data={"invoice_id": "x';--", "csrf_token": token})
            ).status_code == 422
    # Buying with another account's card: refused before any charge.
    buy = await browser.post("/portal/buy", data={"package_id": "starter", "payment_method_id": their_card,
                                                  "request_id": "portal-x", "csrf_token": token})
    assert buy.status_code in (404, 503), buy.text  # 503: no Temporal here; either way nothing charged
    assert await ledger_snapshot(database_url) == before
    # Its own card: deleted (detached from its Stripe customer), the page says so and lists none.
    deleted = await browser.post("/portal/payment-methods/delete", data={"payment_method_id": my_card,
                                                                       "csrf_token": token})
    assert (deleted.status_code, deleted.headers["location"]) == (303, "/portal/payment-methods?ok=deleted")
    page = (await browser.get(deleted.headers["location"])).text
    assert '<p class="notice" role="status">Card removed.</p>' in page and "No saved cards." in page
    assert (await api.get("/api/v1/billing/payment-methods", params={"account_id": mine})).json()["items"] == []
    assert sdk.v1.payment_methods.retrieve(my_card).customer is None


async def test_history_pages_and_exports_csv(api: httpx.AsyncClient) -> None:
    account = await new_account(api)
    for i in range(30):
        assert (await track(api, account, "chat_message", 1, f"h-{i}")).status_code == 200
    browser = await open_portal(api, account)
    first = (await browser.get("/portal/history")).text
    assert first.count("<tr><td>") == 25 and "Older" in first and "Newer" not in first
    older = re.search(r'href="(/portal/history\?after=[^"]+)"', first)
    assert older
    second = (await browser.get(older.group(1))).text
    assert second.count("<tr><td>") == 6 and "Newer" in second  # 30 usage rows + the welcome bonus
    # Seed 002: the amount in USD too (1 credit = $0.01), exact: a sub-cent change is not rounded away.
    assert (await track(api, account, "llm_tokens", 25, "h-llm")).status_code == 200  # 2.5 credits
    rows = re.findall(r"<tr><td>[^<]*</td><td>([^<]*)</td><td class=\"num\">([^<]*)</td><td class=\"num\">([^<]*)"
                      r"</td><td class=\"num\">([^<]*)</td>", (await browser.get("/portal/history")).text)
    assert rows[:2] == [("LLM tokens", "-2.5", "-$0.025", "4,967.5"), ("Chat message", "-1", "-$0.01", "4,970")]
    assert ("5,000", "$50.00", "5,000") in re.findall(
        r"<td class=\"num\">([^<]*)</td><td class=\"num\">([^<]*)</td><td class=\"num\">([^<]*)</td>", second)
    csv_text = (await browser.get("/portal/history.csv")).text
    lines = csv_text.strip().splitlines()
    assert lines[0] == "id,created_at,type,description,amount_credits,balance_after_credits"
    assert len(lines) == 33
    assert lines[1].endswith(",-2.5,4967.5") and lines[2].endswith(",-1,4970") and lines[-1].endswith(",5000,5000")


async def test_every_page_renders(api: httpx.AsyncClient) -> None:
    account = await new_account(api)
    assert (await track(api, account, "chat_message", 3, "p-1", agent_id="support-bot")).status_code == 200
    browser = await open_portal(api, account)
    for path in ("/portal", "/portal/usage", "/portal/buy", "/portal/invoices", "/portal/payment-methods",
                 "/portal/history", "/portal/plan", "/portal/auto-recharge", "/portal/spend", "/portal/agents",
                 "/portal/details"):
        resp = await browser.get(path)
        assert resp.status_code == 200, (path, resp.text[:2000])
        assert resp.headers["cache-control"] == "no-store" and "frame-ancestors 'none'" in \
            resp.headers["content-security-policy"]
        assert '<html lang="en">' in resp.text and "<h1>" in resp.text
    usage = (await browser.get("/portal/usage")).text
    assert "<svg" in usage and "chat: 3 credits" in usage
    css = await browser.get("/portal/static/portal.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


async def test_the_dev_demo_prints_a_portal_link_with_a_card_saved(settings: Settings, stripe_base: str) -> None:
    """`creditflow dev --demo` ends with a portal link for a demo account that has a test card (Buy credits works)."""
    from rich.console import Console

    from creditflow.embedded import DemoDriver
    from tests.conftest import serve_app

    out = io.StringIO()
    async with serve_app(create_app(settings)) as base:
        driver = DemoDriver(base, ADMIN_KEY, Console(file=out, width=200), lambda: None, 3, "http://ui.test",
                            stripe=(stripe_base, STRIPE_KEY), max_seconds=30)
        await asyncio.to_thread(driver.run)
        text = out.getvalue()
        found = re.search(r"Customer billing portal of Acme Support \(opens once, within minutes\): (\S+)", text)
        assert found, text
        async with httpx.AsyncClient(base_url=base) as browser:
            opened = await browser.get(found.group(1))
            assert opened.status_code == 303, opened.text
            page = await browser.get("/portal/buy")
            assert page.status_code == 200 and "•••• 4242 (default)" in page.text


@pytest.mark.temporal
async def test_the_dev_demos_portal_has_an_invoice_to_pay_now_and_a_paid_one_with_its_pdf(
        temporal_settings: Settings, temporal_worker: Any, stripe_base: str) -> None:
    """Issue 14's "Done means": the demo's portal link opens an account where Invoices can be tried: last month's
    invoice is due (Pay now charges the demo card), the month before is paid (its PDF downloads); a rerun of the
    demo issues no second pair."""
    from rich.console import Console

    from creditflow.embedded import DemoDriver
    from tests.conftest import serve_app

    async with serve_app(create_app(temporal_settings)) as base, httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as api:
        for _ in range(2):  # the demo run again (it reuses its accounts): no second pair of invoices
            out = io.StringIO()
            driver = DemoDriver(base, ADMIN_KEY, Console(file=out, width=200), lambda: None, 3, "http://ui.test",
                                stripe=(stripe_base, STRIPE_KEY), max_seconds=30, temporal=temporal_settings)
            await asyncio.to_thread(driver.run)
            link = re.search(r"Customer billing portal of Acme Support \(opens once, within minutes\): (\S+)",
                             out.getvalue())
            assert link, out.getvalue()
        account = re.search(r"Acme Support\s+(acc_[0-9a-f]{32})", out.getvalue())
        assert account
        # The link opens once, within minutes: the demo prints a command that makes another one, ready to paste.
        command = re.search(r"Another link: (curl .+)$", out.getvalue(), re.M)
        assert command, out.getvalue()
        made = await asyncio.to_thread(subprocess.run, command.group(1), shell=True, capture_output=True, text=True,
                                       timeout=30)
        fresh = json.loads(made.stdout)
        assert (fresh["account_id"], fresh["url"].startswith(f"{base}/portal/start/cf_pl_")) == (account.group(1), True)
        listed = (await api.get("/api/v1/billing/invoices", params={"account_id": account.group(1)})).json()
        assert sorted((i["status"], i["amount_usd"]) for i in listed["items"]) == [("open", 49), ("paid", 49)]
        [due] = [i for i in listed["items"] if i["payment_due"]]
        [paid] = [i for i in listed["items"] if not i["payment_due"]]
        async with httpx.AsyncClient(base_url=base, timeout=60) as browser:
            assert (await browser.get(link.group(1))).status_code == 303
            page = (await browser.get("/portal/invoices")).text
            assert f'<tr id="due-{due["id"]}">' in page and "Pay now" in page
            assert f'<tr id="inv-{paid["id"]}">' in page
            pdf = await browser.get(f"/portal/invoices/{paid['id']}/pdf")
            assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
            pay = await browser.post("/portal/invoices/pay", data={"csrf_token": csrf_of(page),
                                                                   "invoice_id": due["id"]})
            assert (pay.status_code, pay.headers["location"]) == (303, "/portal/invoices?ok=paid"), pay.text
        got = (await api.get(f"/api/v1/billing/invoices/{due['id']}", params={"account_id": account.group(1)}))
        assert (got.json()["status"], got.json()["amount_usd"]) == ("paid", 49)


@pytest.mark.temporal
async def test_a_plan_change_at_the_next_renewal_is_saved_and_named_and_changes_nothing_now(
        temporal_settings: Settings, temporal_worker: Any) -> None:
    """Plan > At the next renewal: the API's change is made (pending), the current plan and its credits stay, and
    the page says so by the plan's name (a redirect: reloading it sends nothing again)."""
    async for _, api in _app_client(temporal_settings):
        account = await new_account(api)
        browser = await open_portal(api, account)
        token = csrf_of((await browser.get("/portal/plan")).text)
        subscribed = await browser.post("/portal/plan", data={"csrf_token": token, "plan_id": "starter",
                                                              "effective": "immediately"})
        assert subscribed.status_code == 200 and 'id="current-plan">Starter<' in subscribed.text, subscribed.text
        before = (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()
        later = await browser.post("/portal/plan", data={"csrf_token": token, "plan_id": "growth",
                                                         "effective": "next_renewal"})
        assert (later.status_code, later.headers["location"]) == (303, "/portal/plan?ok=plan"), later.text
        current = (await api.get("/api/v1/billing/subscription", params={"account_id": account})).json()
        assert (current["plan_id"], current["pending_plan_id"]) == ("starter", "growth")
        after = (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()
        assert (after["balance"], after["plan_credits_remaining"]) == (before["balance"], 5000)
        page = (await browser.get(later.headers["location"])).text
        assert '<p class="notice" role="status">Plan changed.</p>' in page
        overview = (await browser.get("/portal")).text  # seed 001: the plan's credits left and the next renewal
        renewal = datetime.fromisoformat(current["next_renewal_at"].replace("Z", "+00:00")).astimezone(UTC)
        assert '<strong id="plan-name">Starter</strong> · $49.00/month' in overview
        assert 'Plan credits remaining: <span id="plan-credits">5,000</span> of 5,000' in overview
        assert f'<span id="next-renewal">{renewal:%Y-%m-%d %H:%M} UTC</span>' in overview
        assert 'id="current-plan">Starter</strong>' in page and "From the next renewal: <strong>Growth</strong>" in page


async def test_auto_recharge_and_billing_details_forms_save_through_the_api(api: httpx.AsyncClient,
                                                                            sdk: stripe.StripeClient) -> None:
    account = await new_account(api)
    card = (await api.post("/api/v1/billing/payment-methods", json={
        "account_id": account, "payment_method_id": new_card(sdk)})).json()["id"]
    browser = await open_portal(api, account)
    token = csrf_of((await browser.get("/portal/auto-recharge")).text)
    saved = await browser.post("/portal/auto-recharge", data={"csrf_token": token, "enabled": "on",
                                                             "threshold": "500", "recharge_amount": "2000",
                                                             "payment_method_id": card})
    assert (saved.status_code, saved.headers["location"]) == (303, "/portal/auto-recharge?ok=recharge")
    got = (await api.get("/api/v1/billing/auto-recharge", params={"account_id": account})).json()
    assert (got["enabled"], got["threshold"], got["recharge_amount"], got["payment_method_id"]) == (
        True, 500, 2000, card)
    assert '<span id="auto-recharge">Enabled</span>' in (await browser.get("/portal")).text
    off = await browser.post("/portal/auto-recharge", data={"csrf_token": token})
    assert off.status_code == 303
    assert (await api.get("/api/v1/billing/auto-recharge", params={"account_id": account})).json()["enabled"] is False
    address = await browser.post("/portal/details/address", data={"csrf_token": token, "company": "Acme GmbH",
                                                                 "city": "Berlin", "country": "DE"})
    assert address.status_code == 303, address.text
    email = await browser.post("/portal/details/email", data={"csrf_token": token,
                                                             "billing_email": "ap@acme.example"})
    assert email.status_code == 303
    profile = (await api.get("/api/v1/billing/profile", params={"account_id": account})).json()
    assert (profile["invoice_address"]["company"], profile["invoice_address"]["country"],
            profile["billing_email"]) == ("Acme GmbH", "DE", "ap@acme.example")
    bad = await browser.post("/portal/details/email", data={"csrf_token": token, "billing_email": "nope"})
    assert bad.status_code == 422


async def test_an_agents_stop_or_use_balance_is_set_on_its_own_account_only(api: httpx.AsyncClient) -> None:
    mine, theirs = await new_account(api), await new_account(api)
    for account in (mine, theirs):
        created = await api.post("/api/v1/agents", json={"account_id": account, "id": "support-bot"})
        assert created.status_code == 201, created.text
    browser = await open_portal(api, mine)
    page = (await browser.get("/portal/agents")).text
    assert '<option value="use_balance" selected>' in page
    saved = await browser.post("/portal/agents/settings", data={"csrf_token": csrf_of(page), "agent_id": "support-bot",
                                                               "on_plan_exhausted": "stop"})
    assert (saved.status_code, saved.headers["location"]) == (303, "/portal/agents?ok=agent_saved")
    agent = (await api.get("/api/v1/agents/support-bot", params={"account_id": mine})).json()
    other = (await api.get("/api/v1/agents/support-bot", params={"account_id": theirs})).json()
    assert (agent["on_plan_exhausted"], other["on_plan_exhausted"]) == ("stop", "use_balance")
    bad = await browser.post("/portal/agents/settings", data={"csrf_token": csrf_of(page), "agent_id": "support-bot",
                                                             "on_plan_exhausted": "maybe"})
    assert bad.status_code == 422
    unknown = await browser.post("/portal/agents/pause", data={"csrf_token": csrf_of(page), "agent_id": "nobody"})
    assert unknown.status_code in (404, 503)  # unknown_agent before Temporal is asked
    assert (await browser.post("/portal/agents/explode", data={"csrf_token": csrf_of(page)})).status_code == 404


async def test_tax_registrations_are_added_and_removed_on_the_details_page(api: httpx.AsyncClient) -> None:
    account = await new_account(api)
    browser = await open_portal(api, account)
    token = csrf_of((await browser.get("/portal/details")).text)
    added = await browser.post("/portal/details/tax-registrations", data={
        "csrf_token": token, "tax_country": "de", "tax_description": "European VAT number", "tax_value": "DE123456789"})
    assert (added.status_code, added.headers["location"]) == (303, "/portal/details?ok=tax_added"), added.text
    listed = await api.get("/api/v1/billing/tax-registrations", params={"account_id": account})
    [registration] = listed.json()["items"]
    assert (registration["country"], registration["value"], registration["status"]) == ("DE", "DE123456789",
                                                                                       "unverified")
    page = (await browser.get("/portal/details")).text
    assert "DE123456789" in page and '<span class="badge unverified">unverified</span>' in page
    row = re.search(rf'<tr id="tax-{registration["id"]}">(.*?)</tr>', page, re.S)  # seed 002's columns, Id first
    assert row and re.findall(r"<td[^>]*>([^<]+)<", row.group(1))[:4] == [
        registration["id"], "DE", "European VAT number", "DE123456789"], row
    bad = await browser.post("/portal/details/tax-registrations", data={
        "csrf_token": token, "tax_country": "XX", "tax_description": "x", "tax_value": "1"})
    assert bad.status_code == 422
    removed = await browser.post("/portal/details/tax-registrations/delete",
                                 data={"csrf_token": token, "registration_id": registration["id"]})
    assert removed.status_code == 303
    assert (await api.get("/api/v1/billing/tax-registrations", params={"account_id": account})).json()["items"] == []


async def test_spend_notifications_save_the_daily_threshold_and_show_the_webhook_secret_once(
        api: httpx.AsyncClient) -> None:
    account = await new_account(api)
    browser = await open_portal(api, account)
    token = csrf_of((await browser.get("/portal/spend")).text)
    bad = await browser.post("/portal/spend/notifications", data={
        "csrf_token": token, "daily_usage_threshold": "250", "webhook_url": "http://127.0.0.1/hook"})
    assert bad.status_code == 422 and 'role="alert"' in bad.text
    assert (await api.get("/api/v1/billing/alerts", params={"account_id": account})).json()[
        "daily_usage_threshold"] is None  # nothing saved
    saved = await browser.post("/portal/spend/notifications", data={
        "csrf_token": token, "daily_usage_threshold": "250", "webhook_url": "https://hooks.example.com/cf"})
    assert saved.status_code == 200, saved.text
    secret = re.search(r'<code id="webhook-secret">([^<]+)</code>', saved.text)
    assert secret and len(secret.group(1)) >= 20
    channels = (await api.get("/api/v1/billing/notification-channels", params={"account_id": account})).json()
    assert (channels["webhook_url"], channels["webhook_secret_set"]) == ("https://hooks.example.com/cf", True)
    assert (await api.get("/api/v1/billing/alerts", params={"account_id": account})).json()[
        "daily_usage_threshold"] == 250
    # Saved again unchanged: no new secret, and none shown.
    again = await browser.post("/portal/spend/notifications", data={
        "csrf_token": token, "daily_usage_threshold": "250", "webhook_url": "https://hooks.example.com/cf"})
    assert (again.status_code, again.headers["location"]) == (303, "/portal/spend?ok=notifications")
    assert "webhook-secret" not in (await browser.get("/portal/spend")).text


async def test_add_a_card_goes_to_the_hosted_card_page_in_setup_mode_and_comes_back_listed(
        settings: Settings, sdk: stripe.StripeClient, stripe_base: str, database_url: str) -> None:
    """Payment methods > Add a card: a setup-mode checkout session (the one Stripe.js card form), nothing charged;
    the card comes back listed with brand, last 4 and expiry, the default when asked."""
    from tests.support.checkout import PUBLISHABLE_KEY, card_confirmed_on_page, pay

    paying = settings.model_copy(update={"stripe_publishable_key": PUBLISHABLE_KEY,
                                         "stripe_js_url": f"{stripe_base}/js.stripe.com/v3/"})
    async for _, api in _app_client(paying):
        account = await new_account(api)
        old = (await api.post("/api/v1/billing/payment-methods", json={
            "account_id": account, "payment_method_id": new_card(sdk, "5555555555554444")})).json()["id"]
        browser = await open_portal(api, account)
        page = (await browser.get("/portal/payment-methods")).text
        request_id = re.search(r'name="request_id" value="(portal-[0-9a-f]{32})"', page)
        assert request_id and 'action="/portal/payment-methods/add"' in page
        form = {"csrf_token": csrf_of(page), "request_id": request_id.group(1), "set_default": "on"}
        before = await ledger_snapshot(database_url)
        forged = await browser.post("/portal/payment-methods/add", data={**form, "csrf_token": "nope"})
        assert forged.status_code == 403
        first = await browser.post("/portal/payment-methods/add", data=form)
        again = await browser.post("/portal/payment-methods/add", data=form)  # a double click: the same session
        assert first.status_code == again.status_code == 303
        location = first.headers["location"]
        assert location == again.headers["location"]
        found = re.fullmatch(r"http://creditflow\.test/checkout/(cs_[0-9a-f]{32})", location)
        assert found, location
        sid = found.group(1)
        session = (await api.get(f"/api/v1/checkout/sessions/{sid}")).json()
        assert (session["mode"], session["account_id"], session["amount"], session["cancel_url"]) == (
            "setup", account, 0, "http://creditflow.test/portal/payment-methods")
        csrf, seti = await card_confirmed_on_page(api, stripe_base, sid)
        saved = await pay(api, sid, csrf, seti)
        assert saved.json()["redirect_url"] == \
            f"http://creditflow.test/portal/payment-methods?ok=card_added&session_id={sid}"
        back = await browser.get(saved.json()["redirect_url"])
        assert back.status_code == 200 and '<p class="notice" role="status">Card added.</p>' in back.text
        row = re.search(rf'<tr id="card-{seti["payment_method"]}">(.*?)</tr>', back.text, re.S)
        assert row and "Visa •••• 4242" in row.group(1) and "12/2030" in row.group(1) and "Default card" in row.group(1)
        cards = (await api.get("/api/v1/billing/payment-methods", params={"account_id": account})).json()["items"]
        assert {c["id"]: c["is_default"] for c in cards} == {seti["payment_method"]: True, old: False}
        assert await ledger_snapshot(database_url) == before  # nothing charged, nothing credited


async def test_low_balance_alerts_are_edited_on_the_spend_page_through_the_api(
        api: httpx.AsyncClient, database_url: str) -> None:
    account = await new_account(api)
    put = await api.put("/api/v1/billing/alerts", json={"account_id": account, "daily_usage_threshold": 300,
                                                        "alerts": [{"threshold": 1000, "channels": ["email"]}]})
    assert put.status_code == 200, put.text
    browser = await open_portal(api, account)
    page = (await browser.get("/portal/spend")).text
    token = csrf_of(page)
    assert 'id="alert-0-threshold" name="alert-0-threshold" inputmode="numeric" value="1000"' in page
    assert 'id="alert-0-email" name="alert-0-email" checked' in page
    assert 'name="alert-1-threshold" inputmode="numeric" value=""' in page and 'id="alert-3"' not in page

    async def alerts_now() -> tuple[list[tuple[Any, list[str], bool]], Any]:
        got = (await api.get("/api/v1/billing/alerts", params={"account_id": account})).json()
        return [(a["threshold"], a["channels"], a["enabled"]) for a in got["alerts"]], got["daily_usage_threshold"]

    form = {"csrf_token": token, "alert-0-threshold": "1000", "alert-0-email": "on", "alert-0-slack": "on",
            "alert-0-enabled": "on", "alert-1-threshold": "250", "alert-1-sms": "on", "alert-2-threshold": ""}
    saved = await browser.post("/portal/spend/alerts", data=form)
    assert (saved.status_code, saved.headers["location"]) == (303, "/portal/spend?ok=alerts"), saved.text
    assert await alerts_now() == ([(1000, ["email", "slack"], True), (250, ["sms"], False)], 300)
    shown = (await browser.get("/portal/spend?ok=alerts")).text
    assert "Low-balance alerts saved." in shown and "Alert below 250 credits" in shown

    # Refused by the API's own rules, shown on the page, nothing changed; and without the token, 403.
    before = await ledger_snapshot(database_url)
    for bad in ({"alert-0-threshold": "12.5", "alert-0-email": "on"},  # not whole credits
                {"alert-0-threshold": "abc", "alert-0-email": "on"},
                {"alert-0-threshold": "500"},  # no channel
                {"alert-0-threshold": "500", "alert-0-email": "on", "alert-1-threshold": "500", "alert-1-sms": "on"}):
        resp = await browser.post("/portal/spend/alerts", data={"csrf_token": token, **bad})
        assert resp.status_code == 422 and 'role="alert"' in resp.text, (bad, resp.text[:500])
    for forged in ({}, {"csrf_token": "nope"}):
        resp = await browser.post("/portal/spend/alerts", data={**forged, "alert-0-threshold": "7",
                                                                "alert-0-email": "on"})
        assert resp.status_code == 403
    assert await alerts_now() == ([(1000, ["email", "slack"], True), (250, ["sms"], False)], 300)
    assert await ledger_snapshot(database_url) == before
    # Clearing a threshold removes that alert.
    removed = await browser.post("/portal/spend/alerts", data={"csrf_token": token, "alert-0-threshold": "",
                                                               "alert-0-email": "on", "alert-1-threshold": "250",
                                                               "alert-1-sms": "on", "alert-1-enabled": "on"})
    assert removed.status_code == 303
    assert await alerts_now() == ([(250, ["sms"], True)], 300)


async def test_notification_destinations_are_edited_on_the_spend_page_through_the_api(
        api: httpx.AsyncClient) -> None:
    account = await new_account(api)
    browser = await open_portal(api, account)
    token = csrf_of((await browser.get("/portal/spend")).text)

    async def channels() -> tuple[Any, Any, Any]:
        got = (await api.get("/api/v1/billing/notification-channels", params={"account_id": account})).json()
        return got["email"], got["slack_webhook_url"], got["sms_phone"]

    slack = "https://hooks.slack.com/services/T000/B000/secretpart"
    saved = await browser.post("/portal/spend/channels", data={
        "csrf_token": token, "email": "alerts@acme.example", "slack_webhook_url": slack, "sms_phone": "+14155550100"})
    assert (saved.status_code, saved.headers["location"]) == (303, "/portal/spend?ok=channels"), saved.text
    assert await channels() == ("alerts@acme.example", "https://hooks.slack.com/…", "+14155550100")
    page = (await browser.get("/portal/spend")).text
    assert '<span id="slack-current">https://hooks.slack.com/…</span>' in page and "secretpart" not in page
    assert 'value="alerts@acme.example"' in page and 'value="+14155550100"' in page
    # Bad values: the API's refusal on the page, nothing changed. Without the token: 403.
    for bad in ({"sms_phone": "555-CALL-NOW"}, {"slack_webhook_url": "http://127.0.0.1/hook"},
                {"email": "not-an-email"}):
        resp = await browser.post("/portal/spend/channels", data={"csrf_token": token, "email": "alerts@acme.example",
                                                                  "sms_phone": "+14155550100", **bad})
        assert resp.status_code == 422 and 'role="alert"' in resp.text, bad
    forged = await browser.post("/portal/spend/channels", data={"csrf_token": "nope", "sms_phone": ""})
    assert forged.status_code == 403
    assert await channels() == ("alerts@acme.example", "https://hooks.slack.com/…", "+14155550100")
    # An empty Slack field keeps the (hidden) URL; emptied email and phone are removed; "remove" removes Slack.
    kept = await browser.post("/portal/spend/channels", data={"csrf_token": token, "email": "", "sms_phone": "",
                                                              "slack_webhook_url": ""})
    assert kept.status_code == 303
    assert await channels() == (None, "https://hooks.slack.com/…", None)
    gone = await browser.post("/portal/spend/channels", data={"csrf_token": token, "remove_slack": "on"})
    assert gone.status_code == 303
    assert await channels() == (None, None, None)


async def test_the_usage_pages_per_agent_chart_covers_the_billing_period_exactly(
        api: httpx.AsyncClient, database_url: str, pool: AsyncConnectionPool) -> None:
    """Per agent over the billing period (the per-day chart's window, from /billing/balance's period_start), by
    the API's ``group_by=agent``: usage before the period starts is left out, a sub-credit amount stays exact."""
    account = await new_account(api)
    for agent, name in (("support-bot", "Support"), ("idle-bot", "Idle")):
        assert (await api.post("/api/v1/agents", json={"account_id": account, "id": agent, "name": name})
                ).status_code == 201
    now = datetime.now(UTC)
    async with clock_pool(database_url, now - timedelta(hours=3)) as before:
        assert (await metering.track(before, UsageEvent.build(account, "chat_message", 5, "old", "sales"))).allowed
    async with clock_pool(database_url, now - timedelta(minutes=30)) as within:
        for event in (UsageEvent.build(account, "voice_minute", "0.25", "v", "support-bot"),
                      UsageEvent.build(account, "chat_message", 2, "c", "sales")):
            assert (await metering.track(within, event)).allowed
    assert (await track(api, account, "voice_minute", "0.05", "sub", agent_id="support-bot")).status_code == 200
    start = now - timedelta(hours=1)
    await save_subscription(pool, account, plan_id="starter", pending_plan_id=None,
                            period=Period(anchor=start, index=0, start=start, end=start + timedelta(days=30)))
    page = (await (await open_portal(api, account)).get("/portal/usage")).text
    assert "<h2>Per agent this billing period</h2>" in page
    rows = re.findall(r'<tr><td>([^<]*)</td><td class="num">([^<]*)</td></tr>', page.split("Per agent")[1])
    assert rows == [("Support", "3"), ("sales", "2"), ("Idle", "0")]
    assert "<title>sales: 2 credits</title>" in page and "Support: 3 credits" in page


async def test_the_spend_management_switch_turns_the_limits_off_and_on_again_through_the_api(
        api: httpx.AsyncClient) -> None:
    """Seed 002's toggle at the top of Spend management: off keeps the limits (the form still shows them) and the
    overview says Disabled; on again they apply. Saved by the API's limits code (``enabled``), with the token."""
    account = await new_account(api)
    assert (await api.put("/api/v1/billing/limits", json={"account_id": account, "daily_limit": 5,
                                                          "monthly_limit": 100})).status_code == 200
    browser = await open_portal(api, account)
    assert '<span id="spend-management">Enabled</span>' in (await browser.get("/portal")).text
    page = (await browser.get("/portal/spend")).text
    assert 'Spend management is <span id="spend-switch">on</span>' in page
    assert 'id="enabled" name="enabled" checked' in page
    off = await browser.post("/portal/spend/enabled", data={"csrf_token": csrf_of(page)})  # an unticked box
    assert (off.status_code, off.headers["location"]) == (303, "/portal/spend?ok=spend_off")
    limits = (await api.get("/api/v1/billing/limits", params={"account_id": account})).json()
    assert (limits["enabled"], limits["daily_limit"], limits["monthly_limit"]) == (False, 5, 100)
    assert (await track(api, account, "chat_message", 7, "over-5")).status_code == 200  # not enforced
    page = (await browser.get(off.headers["location"])).text
    assert 'Spend management is <span id="spend-switch">off</span>' in page and 'name="enabled" aria' in page
    assert 'id="daily_limit" name="daily_limit" inputmode="decimal" value="5"' in page
    assert "limits are kept but not enforced" in page
    assert '<span id="spend-management">Disabled</span>' in (await browser.get("/portal")).text
    on = await browser.post("/portal/spend/enabled", data={"csrf_token": csrf_of(page), "enabled": "on"})
    assert (on.status_code, on.headers["location"]) == (303, "/portal/spend?ok=spend_on")
    limits = (await api.get("/api/v1/billing/limits", params={"account_id": account})).json()
    assert (limits["enabled"], limits["daily_limit"], limits["monthly_limit"]) == (True, 5, 100)
    refused = await track(api, account, "chat_message", 1, "after-on")
    assert (refused.status_code, refused.json()["code"]) == (429, "daily_limit_reached")
    assert '<span id="spend-management">Enabled</span>' in (await browser.get("/portal")).text
