"""GET /api/v1/billing/plans: the catalog with exact amounts, for billing:read keys and admin keys."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from creditflow.api.app import create_app
from creditflow.config import Settings
from creditflow.domain.plans import PlanCatalogError
from tests.conftest import ADMIN_KEY
from tests.support.api import bearer, key_for, new_account

EXPECTED = {
    "currency": "USD",
    "items": [
        {"id": "starter", "name": "Starter", "description": "For a first agent in production.",
         "monthly_fee_usd": 49, "included_credits": 5000, "rates": {"voice_minute": 9},
         "overage_rates": {"voice_minute": 10}},
        {"id": "growth", "name": "Growth", "description": "For teams running several agents on voice and chat.",
         "monthly_fee_usd": 199, "included_credits": 22000,
         "rates": {"voice_minute": 8, "transfer_minute": 4, "chat_message": 0.8},
         "overage_rates": {"voice_minute": 9, "transfer_minute": 5, "chat_message": 1}},
        {"id": "scale", "name": "Scale", "description": "For high-volume contact centers.",
         "monthly_fee_usd": 499, "included_credits": 60000,
         "rates": {"voice_minute": 7, "transfer_minute": 3, "chat_message": 0.5, "llm_tokens": 0.08},
         "overage_rates": {"voice_minute": 8, "transfer_minute": 4, "chat_message": 0.8, "llm_tokens": 0.1}},
    ],
}


async def test_plans_for_admin_and_read_keys(api: httpx.AsyncClient) -> None:
    admin = await api.get("/api/v1/billing/plans")
    assert admin.status_code == 200
    assert admin.json() == EXPECTED
    # Exact JSON numbers, written from Decimals: no float artefacts, whole amounts as integers.
    assert '"chat_message":0.5,"llm_tokens":0.08},' in admin.text
    assert '"monthly_fee_usd":199,' in admin.text

    account = await new_account(api)
    reader = await key_for(api, account, "billing:read")
    as_reader = await api.get("/api/v1/billing/plans", headers=bearer(reader))
    assert (as_reader.status_code, as_reader.json()) == (200, EXPECTED)
    nobody = await api.get("/api/v1/billing/plans", headers={"Authorization": ""})
    assert (nobody.status_code, nobody.json()["error"]["code"]) == (401, "unauthorized")


async def test_a_configured_catalog_is_served(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "plans.yaml"
    path.write_text("plans:\n  - {id: solo, name: Solo, monthly_fee_usd: 9.99, included_credits: 1000}\n")
    app = create_app(settings.model_copy(update={"plans_path": path}))
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with (app.router.lifespan_context(app),
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://creditflow.test",
                                  headers=headers) as client):
        resp = await client.get("/api/v1/billing/plans")
    assert resp.json() == {"currency": "USD", "items": [
        {"id": "solo", "name": "Solo", "description": "", "monthly_fee_usd": 9.99, "included_credits": 1000,
         "rates": {}, "overage_rates": {}}]}
    assert '"monthly_fee_usd":9.99,' in resp.text


def test_a_bad_catalog_stops_the_app_from_starting(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "plans.yaml"
    path.write_text("plans: []\n")
    with pytest.raises(PlanCatalogError, match="the catalog has no plans"):
        create_app(settings.model_copy(update={"plans_path": path}))
