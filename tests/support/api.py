"""HTTP helpers for tests: create accounts, meter usage, read balances, API keys, error bodies, an app client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx

from creditflow.api.app import create_app
from creditflow.config import Settings
from tests.conftest import ADMIN_KEY


async def key_for(api: httpx.AsyncClient, account_id: str, *scopes: str) -> str:
    resp = await api.post(f"/api/v1/accounts/{account_id}/api-keys", json={"name": "svc", "scopes": list(scopes)})
    assert resp.status_code == 201, resp.text
    assert resp.json()["secret"].startswith("cf_sk_")
    return resp.json()["secret"]


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


ERROR_KEYS = {"code", "type", "message", "param", "details", "request_id"}


def assert_error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert set(error) == ERROR_KEYS, error
    assert error["code"] == code, error
    assert error["request_id"] == resp.headers["x-request-id"]
    return error


async def new_account(api: httpx.AsyncClient, **extra: object) -> str:
    resp = await api.post("/api/v1/accounts", json={"name": "Acme", "billing_email": "billing@acme.test", **extra})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


async def track(api: httpx.AsyncClient, account_id: str, feature: str, value: object, key: str,
                **extra: object) -> httpx.Response:
    return await api.post("/api/v1/billing/track", json={
        "account_id": account_id, "feature_id": feature, "value": value, "idempotency_key": key, **extra})


async def balance(api: httpx.AsyncClient, account_id: str) -> dict[str, object]:
    resp = await api.get("/api/v1/billing/balance", params={"account_id": account_id})
    assert resp.status_code == 200, resp.text
    return resp.json()


async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://creditflow.test",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as client:
        yield client
