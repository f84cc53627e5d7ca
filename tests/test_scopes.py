"""API key scopes: one route -> scope table, every route in it, and keys that can meter but never
move money. Real app, real PostgreSQL (and for the card charge, real Temporal and localstripe)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import stripe
from fastapi.routing import APIRoute
from psycopg_pool import AsyncConnectionPool

from creditflow.api.app import create_app
from creditflow.api.keys import Scope
from creditflow.api.scopes import PENDING_ROUTES, PUBLIC_ROUTES, ROUTE_SCOPES
from creditflow.config import Settings
from tests.conftest import ADMIN_KEY, STRIPE_KEY, ledger_snapshot
from tests.support.api import bearer, key_for, new_account

MIGRATION = Path(__file__).resolve().parent.parent / "creditflow/ledger/migrations/0031_1_scopes.sql"
MONEY = {Scope.PAYMENTS_WRITE, Scope.WALLET_CREDIT, Scope.TRANSFERS_WRITE}


@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    """Stripe (localstripe) configured, so a refused card charge is refused by the scope, not by a missing Stripe."""
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=5000, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=stripe_base, stripe_retry_max_wait_seconds=0.1)


def api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    """Every APIRoute of the app, through included routers."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from api_routes(route.original_router.routes)
        elif hasattr(route, "routes"):
            yield from api_routes(route.routes)


def declared_scopes(route: APIRoute) -> list[Scope]:
    """The scopes a route's ``require(...)`` dependencies name."""
    found: list[Scope] = []

    def walk(dependant: Any) -> None:
        for sub in dependant.dependencies:
            scope = getattr(sub.call, "declared_scope", None)
            if scope is not None:
                found.append(scope)
            walk(sub)

    walk(route.dependant)
    return found


def app_routes() -> list[tuple[str, str, APIRoute]]:
    app = create_app(Settings())
    return [(method, route.path_format, route) for route in api_routes(app.routes) for method in route.methods]


def test_every_route_has_a_declared_scope_in_the_one_table() -> None:
    routes = app_routes()
    assert len(routes) >= 80
    missing = [(m, p) for m, p, _ in routes if (m, p) not in ROUTE_SCOPES and (m, p) not in PUBLIC_ROUTES]
    assert missing == [], f"add these routes to creditflow/api/scopes.py ROUTE_SCOPES: {missing}"
    stale = sorted(set(ROUTE_SCOPES) - {(m, p) for m, p, _ in routes} - set(PENDING_ROUTES))
    assert stale == [], f"ROUTE_SCOPES names routes that do not exist: {stale}"
    for method, path, route in routes:
        declared = declared_scopes(route)
        if (method, path) in PUBLIC_ROUTES:
            assert declared == [], (method, path)
            continue
        # Each protected route authenticates through require(...), and the scope named there is the table's.
        assert len(declared) >= 1, f"{method} {path} has no require(...) dependency"
        assert all(s in ROUTE_SCOPES[(method, path)] for s in declared), (method, path, declared)


def test_the_table_separates_reading_metering_settings_and_money() -> None:
    t = ROUTE_SCOPES
    b = "/api/v1/billing"
    for route in [("POST", f"{b}/track"), ("POST", f"{b}/holds"), ("POST", "/api/v1/event"),
                  ("POST", f"{b}/holds/{{hold_id}}/settle")]:
        assert t[route] == {Scope.USAGE_WRITE}, route
    assert t[("POST", f"{b}/check")] == t[("POST", "/api/v1/entitled")] == {Scope.BILLING_READ, Scope.USAGE_WRITE}
    for route in [("PUT", f"{b}/limits"), ("PUT", f"{b}/alerts"), ("PUT", f"{b}/notification-channels"),
                  ("POST", "/api/v1/agents"), ("PUT", f"{b}/invoice-address"), ("POST", f"{b}/tax-registrations")]:
        assert t[route] == {Scope.BILLING_WRITE}, route
    for route in [("POST", f"{b}/wallet/topup"), ("PUT", f"{b}/auto-recharge"), ("PUT", f"{b}/wallet/auto-reload"),
                  ("POST", f"{b}/subscription"), ("POST", f"{b}/refunds"), ("POST", f"{b}/payment-methods")]:
        assert t[route] == {Scope.PAYMENTS_WRITE}, route
    assert t[("POST", f"{b}/wallet/credit")] == {Scope.WALLET_CREDIT}
    # Every GET reads with billing:read or is the platform's.
    assert all(s in ({Scope.BILLING_READ}, {Scope.ADMIN}) for (m, _), s in t.items() if m == "GET")


def _fill(path: str, ids: dict[str, str]) -> str:
    for name, value in ids.items():
        path = path.replace("{" + name + "}", value)
    return path


async def test_a_usage_key_meters_but_reaches_no_money_moving_route(api: httpx.AsyncClient, database_url: str
                                                                    ) -> None:
    account = await new_account(api)
    org = (await api.post("/api/v1/organizations", json={"name": "Org"})).json()["id"]
    meter = bearer(await key_for(api, account, "usage:write"))
    tracked = await api.post("/api/v1/billing/track", headers=meter,
                             json={"feature_id": "chat_message", "value": 2, "idempotency_key": "m-1"})
    assert (tracked.status_code, tracked.json()["balance"]) == (200, 4998)
    checked = await api.post("/api/v1/billing/check", headers=meter, json={"feature_id": "chat_message", "value": 1})
    assert checked.status_code == 200 and checked.json()["allowed"] is True
    # Reading the history and changing settings are other scopes.
    assert (await api.get("/api/v1/billing/transactions", headers=meter)).status_code == 403
    assert (await api.put("/api/v1/billing/limits", headers=meter, json={"daily_limit": 10})).status_code == 403

    before = await ledger_snapshot(database_url)
    ids = {"payment_method_id": "pm_1", "organization_id": org, "account_id": account, "invoice_id": "inv_" + "0" * 32}
    bodies: dict[str, dict[str, Any]] = {
        "/api/v1/billing/wallet/topup": {"amount_usd": 25, "request_id": "r-1"},
        "/api/v1/billing/auto-recharge": {"enabled": True, "threshold": 100, "recharge_amount": 1000},
        "/api/v1/billing/wallet/auto-reload": {"enabled": True, "threshold": 100, "recharge_amount": 1000},
        "/api/v1/billing/subscription": {"plan_id": "pro", "effective": "immediately"},
        "/api/v1/billing/refunds": {"payment_intent_id": "pi_1", "request_id": "r-2"},
        "/api/v1/billing/payment-methods": {"payment_method_id": "pm_1"},
        "/api/v1/billing/wallet/credit": {"account_id": account, "amount": 100, "reason": "x",
                                          "idempotency_key": "c-1"},
        "/api/v1/organizations/{organization_id}/transfers": {"from_account_id": account, "to_account_id": account,
                                                              "amount": 1, "idempotency_key": "t-1"},
    }
    existing = {(m, p) for m, p, _ in app_routes()}
    money = sorted(route for route, scopes in ROUTE_SCOPES.items() if scopes & MONEY and route in existing)
    assert len(money) >= 11  # 12 with the invoice payment route (PENDING_ROUTES) merged
    for method, path in money:
        resp = await api.request(method, _fill(path, ids), headers=meter, json=bodies.get(path))
        assert resp.status_code == 403, (method, path, resp.text)
        error = resp.json()["error"]
        assert error["code"] == "insufficient_scope", (method, path)
        assert Scope.USAGE_WRITE not in error["details"]["required_scopes"]
    assert await ledger_snapshot(database_url) == before
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        charges = await (await conn.execute("SELECT count(*) FROM stripe_charges")).fetchone()
        refunds = await (await conn.execute("SELECT count(*) FROM refunds")).fetchone()
    assert charges == (0,) and refunds == (0,)


async def test_scopes_admit_exactly_their_routes(api: httpx.AsyncClient) -> None:
    account = await new_account(api)
    reader = bearer(await key_for(api, account, "billing:read"))
    settings_key = bearer(await key_for(api, account, "billing:write"))
    crediter = bearer(await key_for(api, account, "wallet:credit"))
    track = {"feature_id": "chat_message", "value": 1, "idempotency_key": "k-1"}

    # billing:read reads and checks, never meters.
    assert (await api.get("/api/v1/billing/balance", headers=reader)).json()["balance"] == 5000
    assert (await api.post("/api/v1/billing/check", headers=reader,
                           json={"feature_id": "chat_message", "value": 1})).status_code == 200
    denied = await api.post("/api/v1/billing/track", headers=reader, json=track)
    assert (denied.status_code, denied.json()["error"]["code"]) == (403, "insufficient_scope")
    assert denied.json()["error"]["details"] == {"required_scopes": ["usage:write"]}
    # billing:write: settings (and reading them), not metering or money.
    limits = await api.put("/api/v1/billing/limits", headers=settings_key, json={"daily_limit": 300})
    assert limits.status_code == 200, limits.text
    assert (await api.get("/api/v1/billing/limits", headers=settings_key)).status_code == 200
    assert (await api.post("/api/v1/billing/track", headers=settings_key, json=track)).status_code == 403
    topup = await api.post("/api/v1/billing/wallet/topup", headers=settings_key,
                           json={"amount_usd": 25, "request_id": "r-1"})
    assert (topup.status_code, topup.json()["error"]["details"]) == (403, {"required_scopes": ["payments:write"]})
    # wallet:credit: manual credits on its own account only, when the platform gives it.
    credit = {"amount": 250, "reason": "make-good", "idempotency_key": "c-1"}
    resp = await api.post("/api/v1/billing/wallet/credit", headers=crediter, json={**credit, "account_id": account})
    assert resp.status_code == 200, resp.text
    assert (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()["balance"] == 5250
    other = await new_account(api)
    resp = await api.post("/api/v1/billing/wallet/credit", headers=crediter, json={**credit, "account_id": other})
    assert (resp.status_code, resp.json()["error"]["code"]) == (403, "forbidden")
    # The platform chooses: an account key never gets admin or an organization's scope.
    for bad in (["admin"], ["transfers:write"], ["billing:read", "nonsense"]):
        resp = await api.post(f"/api/v1/accounts/{account}/api-keys", json={"scopes": bad})
        assert (resp.status_code, resp.json()["error"]["code"]) == (422, "validation_error"), bad
    # Admin-only routes stay admin-only for every account scope.
    everything = bearer(await key_for(api, account, "billing:read", "usage:write", "billing:write", "payments:write",
                                      "wallet:credit"))
    resp = await api.get("/api/v1/verify", headers=everything)
    assert (resp.status_code, resp.json()["error"]["details"]) == (403, {"required_scopes": ["admin"]})


async def test_existing_keys_keep_what_they_could_do(api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    """Keys stored before scopes were split (billing:write meant metering, settings and money) are migrated by
    0031_1 to the scopes their old one implied; billing:read keys are left as they were."""
    account = await new_account(api)
    old_writer = await key_for(api, account, "billing:write")
    old_reader = await key_for(api, account, "billing:read")
    async with pool.connection() as conn:  # as they were stored before the migration
        await conn.execute("UPDATE api_keys SET scopes = '{billing:write}' WHERE account_id = %s"
                           " AND 'billing:write' = ANY (scopes)", (account,))
    track = {"feature_id": "chat_message", "value": 1, "idempotency_key": "k-1"}
    assert (await api.post("/api/v1/billing/track", headers=bearer(old_writer), json=track)).status_code == 403

    async with pool.connection() as conn:
        await conn.execute(MIGRATION.read_text())
        await conn.execute(MIGRATION.read_text())  # idempotent
        rows = await (await conn.execute("SELECT scopes FROM api_keys WHERE account_id = %s ORDER BY created_at",
                                         (account,))).fetchall()
    assert [r["scopes"] for r in rows] == [["billing:read", "billing:write", "payments:write", "usage:write"],
                                           ["billing:read"]]
    api._transport.app.state.key_cache.clear()  # type: ignore[attr-defined]  # as after a restart (keys were cached)
    writer, reader = bearer(old_writer), bearer(old_reader)
    assert (await api.post("/api/v1/billing/track", headers=writer, json=track)).json()["balance"] == 4999
    assert (await api.put("/api/v1/billing/limits", headers=writer, json={"daily_limit": 300})).status_code == 200
    # payments:write: past the scope check (no card saved: refused for that reason, not for the scope).
    resp = await api.put("/api/v1/billing/auto-recharge", headers=writer,
                         json={"enabled": True, "threshold": 100, "recharge_amount": 1000})
    assert resp.status_code != 403 or resp.json()["error"]["code"] != "insufficient_scope", resp.text
    assert (await api.post("/api/v1/billing/wallet/credit", headers=writer,
                           json={"account_id": account, "amount": 1, "reason": "x", "idempotency_key": "c"})
            ).status_code == 403  # manual credits were never an account key's
    assert (await api.post("/api/v1/billing/check", headers=reader,
                           json={"feature_id": "chat_message", "value": 1})).status_code == 200
    assert (await api.post("/api/v1/billing/track", headers=reader, json=track)).status_code == 403


@pytest.mark.temporal
async def test_a_usage_key_cannot_charge_the_saved_card(database_url: str,
                                                        temporal_settings: Settings, temporal_worker: Any,
                                                        sdk: stripe.StripeClient, pool: AsyncConnectionPool) -> None:
    """With a card saved, the same top-up request is refused for a usage:write key (no PaymentIntent, no charge,
    ledger untouched) and charges once for a payments:write key."""
    from tests.support.api import app_client
    from tests.support.payments import TOPUP, charges, customer_of, intents_of, save_card

    async for api in app_client(temporal_settings):
        account = await new_account(api)
        await save_card(api, sdk, account)
        meter = bearer(await key_for(api, account, "usage:write"))
        payer = bearer(await key_for(api, account, "payments:write"))
        before = await ledger_snapshot(database_url)
        recharge = {"enabled": True, "threshold": 6000, "recharge_amount": 1000}
        for path, body in [(TOPUP, {"amount_usd": 25, "request_id": "r-1"}),
                           ("/api/v1/billing/auto-recharge", recharge)]:
            resp = await api.request("PUT" if "auto" in path else "POST", path, headers=meter, json=body)
            assert (resp.status_code, resp.json()["error"]["code"]) == (403, "insufficient_scope")
        assert await ledger_snapshot(database_url) == before
        assert intents_of(sdk, await customer_of(pool, account)) == [] and await charges(pool, account) == []
        paid = await api.post(TOPUP, headers=payer, json={"amount_usd": 25, "request_id": "r-1"})
        assert paid.status_code == 200, paid.text
        assert (paid.json()["status"], paid.json()["credits"], paid.json()["balance"]) == ("succeeded", 2500, 7500)
        assert len(await charges(pool, account)) == 1
