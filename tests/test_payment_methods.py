"""Payment methods and Stripe customers against a real localstripe (started once per session), never a mock.

Covers the gateway's error mapping (declines, unknown ids, Stripe unreachable), exactly-once customer
creation under concurrency, tenant isolation of cards, and the account workflow creating the customer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool

from creditflow.config import Settings
from creditflow.errors import CreditflowError
from creditflow.payments.customers import ensure_customer
from creditflow.payments.gateway import ACCOUNT_METADATA_KEY, StripeGateway
from tests.conftest import ADMIN_KEY, STRIPE_KEY, free_port, ledger_snapshot, new_card
from tests.support.api import bearer, key_for, new_account

BASE = "/api/v1/billing/payment-methods"


@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    """The conftest settings, with Stripe pointing at localstripe (the ``api`` fixture uses these)."""
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=5000, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=stripe_base, stripe_retry_max_wait_seconds=0.1)


def card(pm_id: str, last4: str = "4242", name: str | None = "Ada Lovelace", is_default: bool = True,
         exp_month: int = 12, exp_year: int = 2030) -> dict[str, Any]:
    return {"id": pm_id, "brand": "visa", "last4": last4, "exp_month": exp_month, "exp_year": exp_year,
            "name_on_card": name, "is_default": is_default}


def error(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def core(body: dict[str, Any]) -> dict[str, Any]:
    """An error body's code, message and details (type, param and request_id are checked in test_api_hardening)."""
    return {"error": {k: body["error"][k] for k in ("code", "message", "details")}}


async def customer_rows(pool: AsyncConnectionPool) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute("SELECT account_id, customer_id FROM stripe_customers ORDER BY 1")).fetchall()


def stripe_customers_of(sdk: stripe.StripeClient, account_id: str) -> list[Any]:
    page = sdk.v1.customers.list(params={"limit": 100})
    return [c for c in page.auto_paging_iter()
            if (c.to_dict().get("metadata") or {}).get(ACCOUNT_METADATA_KEY) == account_id]


async def test_attach_list_default_detach(api: httpx.AsyncClient, pool: AsyncConnectionPool,
                                          sdk: stripe.StripeClient) -> None:
    account = await new_account(api)
    writer = bearer(await key_for(api, account, "billing:write", "usage:write", "payments:write"))
    reader = bearer(await key_for(api, account, "billing:read"))
    assert (await api.get(BASE, headers=reader)).json() == {"items": []}
    assert await customer_rows(pool) == []  # listing never creates a customer

    first = new_card(sdk)
    resp = await api.post(BASE, headers=writer, json={"payment_method_id": first})
    assert resp.status_code == 201, resp.text
    assert resp.json() == card(first)  # the first card becomes the default
    [row] = await customer_rows(pool)
    assert row["account_id"] == account
    customer = sdk.v1.customers.retrieve(row["customer_id"])
    assert customer.metadata.to_dict() == {ACCOUNT_METADATA_KEY: account}
    assert (customer.email, customer.name) == ("billing@acme.test", "Acme")

    second = new_card(sdk, "5555555555554444", name="Grace Hopper", exp_month=3, exp_year=2031)
    resp = await api.post(BASE, headers=writer, json={"payment_method_id": second, "set_default": False})
    assert resp.status_code == 201
    assert resp.json() == card(second, "4444", "Grace Hopper", is_default=False, exp_month=3, exp_year=2031)

    listed = (await api.get(BASE, headers=reader)).json()["items"]
    assert sorted(listed, key=lambda c: c["last4"]) == [
        card(first), card(second, "4444", "Grace Hopper", is_default=False, exp_month=3, exp_year=2031)]

    resp = await api.post(f"{BASE}/{second}/default", headers=writer)
    assert resp.status_code == 200
    assert resp.json() == card(second, "4444", "Grace Hopper", exp_month=3, exp_year=2031)
    assert sdk.v1.customers.retrieve(row["customer_id"]).invoice_settings.default_payment_method == second
    defaults = {c["id"]: c["is_default"] for c in (await api.get(BASE, headers=reader)).json()["items"]}
    assert defaults == {first: False, second: True}

    # Attaching a card the account already has is a no-op (a retried request).
    resp = await api.post(BASE, headers=writer, json={"payment_method_id": first})
    assert resp.status_code == 201 and resp.json() == card(first, is_default=False)

    # Removing the default card leaves the account without a default.
    resp = await api.delete(f"{BASE}/{second}", headers=writer)
    assert resp.status_code == 200 and resp.json() == {"id": second, "detached": True}
    assert (await api.get(BASE, headers=reader)).json() == {"items": [card(first, is_default=False)]}
    assert sdk.v1.payment_methods.retrieve(second).customer is None
    assert sdk.v1.customers.retrieve(row["customer_id"]).invoice_settings.default_payment_method is None
    again = await api.delete(f"{BASE}/{second}", headers=writer)
    assert again.status_code == 404 and again.json()["error"]["code"] == "unknown_payment_method"

    # A read-only key cannot change cards; an admin key names the account.
    denied = await api.post(f"{BASE}/{first}/default", headers=reader)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "insufficient_scope"
    resp = await api.post(f"{BASE}/{first}/default", params={"account_id": account})
    assert resp.status_code == 200 and resp.json() == card(first)
    assert (await api.get(BASE, params={"account_id": account})).json() == {"items": [card(first)]}
    assert await customer_rows(pool) == [row]
    assert len(stripe_customers_of(sdk, account)) == 1


async def test_declined_card(api: httpx.AsyncClient, sdk: stripe.StripeClient) -> None:
    account = await new_account(api)
    declined = new_card(sdk, "4000000000000002")
    resp = await api.post(BASE, json={"account_id": account, "payment_method_id": declined})
    assert resp.status_code == 402
    assert core(resp.json()) == error("card_declined", "Your card was declined.",
                                {"stripe_code": "card_declined", "decline_code": None})
    assert (await api.get(BASE, params={"account_id": account})).json() == {"items": []}
    assert sdk.v1.payment_methods.retrieve(declined).customer is None


async def test_cards_of_another_account_are_unknown(api: httpx.AsyncClient, sdk: stripe.StripeClient) -> None:
    mine, theirs = await new_account(api), await new_account(api)
    my_card = new_card(sdk)
    assert (await api.post(BASE, json={"account_id": mine, "payment_method_id": my_card})).status_code == 201
    my_customer = sdk.v1.payment_methods.retrieve(my_card).customer
    intruder = bearer(await key_for(api, theirs, "billing:write", "usage:write", "payments:write"))
    # The other account has its own customer, so every call below reaches the ownership check.
    assert (await api.post(BASE, headers=intruder, json={"payment_method_id": new_card(sdk)})).status_code == 201

    unknown = error("unknown_payment_method", "no such payment method")
    for resp in (await api.delete(f"{BASE}/{my_card}", headers=intruder),
                 await api.post(f"{BASE}/{my_card}/default", headers=intruder),
                 await api.post(BASE, headers=intruder, json={"payment_method_id": my_card, "set_default": True})):
        assert resp.status_code == 404 and core(resp.json()) == unknown
    assert my_card not in {c["id"] for c in (await api.get(BASE, headers=intruder)).json()["items"]}
    forbidden = await api.get(BASE, headers=intruder, params={"account_id": mine})
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"

    # Untouched: still attached to its owner, still the owner's default.
    assert sdk.v1.payment_methods.retrieve(my_card).customer == my_customer
    assert (await api.get(BASE, params={"account_id": mine})).json() == {"items": [card(my_card)]}


async def test_bad_ids(api: httpx.AsyncClient, sdk: stripe.StripeClient, database_url: str) -> None:
    account = await new_account(api)
    unknown = error("unknown_payment_method", "no such payment method")
    for bad in ("card_123", "pm_", "pm_abc!", " pm_abc", 42):
        resp = await api.post(BASE, json={"account_id": account, "payment_method_id": bad})
        assert resp.status_code == 422 and resp.json()["error"]["code"] == "validation_error", bad
    resp = await api.post(BASE, json={"account_id": account, "payment_method_id": "pm_doesnotexist1"})
    assert resp.status_code == 404 and core(resp.json()) == unknown

    attached = await api.post(BASE, json={"account_id": account, "payment_method_id": new_card(sdk)})
    assert attached.status_code == 201
    before = await ledger_snapshot(database_url)
    for path in ("pm_doesnotexist1", "pm_bad%21", "card_123", "pm_" + "a" * 300):
        for resp in (await api.delete(f"{BASE}/{path}", params={"account_id": account}),
                     await api.post(f"{BASE}/{path}/default", params={"account_id": account})):
            assert resp.status_code == 404 and core(resp.json()) == unknown, path
    assert await ledger_snapshot(database_url) == before

    no_account = await api.get(BASE)
    assert no_account.status_code == 422 and no_account.json()["error"]["code"] == "validation_error"
    missing = "acc_" + "0" * 32
    resp = await api.post(BASE, json={"account_id": missing, "payment_method_id": new_card(sdk)})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_account"
    resp = await api.get(BASE, params={"account_id": missing})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_account"
    extra = await api.post(BASE, json={"account_id": account, "payment_method_id": "pm_x1", "cvc": "123"})
    assert extra.status_code == 422


async def test_customer_created_once_under_concurrency(api: httpx.AsyncClient, pool: AsyncConnectionPool,
                                                       settings: Settings, sdk: stripe.StripeClient) -> None:
    account = await new_account(api)
    gateway = StripeGateway.from_settings(settings)
    ids = await asyncio.gather(*(ensure_customer(pool, gateway, account) for _ in range(10)))
    assert len(set(ids)) == 1 and ids[0].startswith("cus_")
    assert await customer_rows(pool) == [{"account_id": account, "customer_id": ids[0]}]
    [customer] = stripe_customers_of(sdk, account)
    assert customer.id == ids[0]
    assert await ensure_customer(pool, gateway, account) == ids[0]
    assert len(stripe_customers_of(sdk, account)) == 1


async def test_stripe_unreachable(api: httpx.AsyncClient, pool: AsyncConnectionPool, settings: Settings,
                                  database_url: str) -> None:
    from creditflow.api.app import create_app

    account = await new_account(api)
    with_customer = await new_account(api)
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO stripe_customers (account_id, customer_id) VALUES (%s, 'cus_gone1')",
                           (with_customer,))
    dead = settings.model_copy(update={"stripe_api_base": f"http://127.0.0.1:{free_port()}",
                                       "stripe_max_attempts": 3, "stripe_retry_max_wait_seconds": 0.05})
    app = create_app(dead)
    before = await ledger_snapshot(database_url)
    unavailable = error("payment_provider_unavailable", "the payment provider is unavailable; try again later")
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://creditflow.test",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
            started = time.monotonic()
            resp = await client.post(BASE, json={"account_id": account, "payment_method_id": "pm_abc123"})
            assert resp.status_code == 503 and core(resp.json()) == unavailable
            assert time.monotonic() - started < 5
            resp = await client.get(BASE, params={"account_id": with_customer})
            assert resp.status_code == 503 and core(resp.json()) == unavailable
            resp = await client.delete(f"{BASE}/pm_abc123", params={"account_id": with_customer})
            assert resp.status_code == 503 and core(resp.json()) == unavailable
    assert await customer_rows(pool) == [{"account_id": with_customer, "customer_id": "cus_gone1"}]
    assert await ledger_snapshot(database_url) == before


async def test_unconfigured_stripe_fails_fast(pool: AsyncConnectionPool, api: httpx.AsyncClient) -> None:
    """No API base and the shipped placeholder key: no network call, a clear code, nothing stored."""
    account = await new_account(api)
    gateway = StripeGateway.from_settings(Settings())
    with pytest.raises(CreditflowError) as caught:
        await ensure_customer(pool, gateway, account)
    assert (caught.value.code, caught.value.status) == ("payment_provider_not_configured", 503)
    assert await customer_rows(pool) == []


@pytest.mark.temporal
async def test_account_workflow_creates_the_customer(pool: AsyncConnectionPool, temporal_client: Any,
                                                     temporal_settings: Settings, temporal_worker: Any,
                                                     sdk: stripe.StripeClient) -> None:
    from creditflow.client import CreditflowClient
    from creditflow.ledger.accounts import create_account
    from tests.support.temporal import eventually
    from workers.relay import OutboxRelay

    account = await create_account(pool, name="Acme", billing_email="billing@acme.test")
    assert await OutboxRelay(pool, temporal_client, temporal_settings).run_once() == 1
    client = CreditflowClient(temporal_client, temporal_settings.temporal_task_queue)
    state = await eventually(lambda: client.account_state(account.id), lambda s: s.stripe_customer_id is not None)
    assert await customer_rows(pool) == [{"account_id": account.id, "customer_id": state.stripe_customer_id}]
    assert [c.id for c in stripe_customers_of(sdk, account.id)] == [state.stripe_customer_id]
