"""GET/POST /api/v1/billing/subscription through the account workflow on the Temporal dev server, and the
recurring-charges API. Real PostgreSQL and Temporal; the cycles themselves are in tests/test_billing_cycle.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from tests.conftest import ledger_snapshot
from tests.support.api import balance, bearer, key_for, new_account
from tests.support.auto_recharge import api, settings  # noqa: F401 - fixtures: the app with a worker
from tests.support.temporal import eventually
from workflows.contract import SA_PLAN, account_workflow_id

pytestmark = pytest.mark.temporal
SUB = "/api/v1/billing/subscription"


async def test_subscribe_change_and_cancel(api: httpx.AsyncClient, pool: AsyncConnectionPool,  # noqa: F811
                                           temporal_client: Client) -> None:
    account = await new_account(api)  # 5,000 welcome credits
    writer = bearer(await key_for(api, account, "billing:write", "usage:write", "payments:write"))
    none = (await api.get(SUB, headers=writer)).json()
    assert (none["plan_id"], none["status"]) == (None, "none")

    subscribed = await api.post(SUB, headers=writer, json={"plan_id": "growth"})
    assert subscribed.status_code == 200, subscribed.text
    body = subscribed.json()
    assert (body["plan_id"], body["plan_name"], body["status"], body["monthly_fee_usd"], body["plan_credits_included"],
            body["plan_credits_remaining"], body["pending_plan_id"]) == (
        "growth", "Growth", "active", 199, 22_000, 22_000, None)
    assert body["next_renewal_at"] == body["cycle_end"]
    wallet = await balance(api, account)
    assert (wallet["balance"], wallet["plan_id"], wallet["plan_credits_remaining"]) == (27_000, "growth", 22_000)

    later = (await api.post(SUB, headers=writer, json={"plan_id": "starter"})).json()
    assert (later["plan_id"], later["pending_plan_id"], later["proration"]) == ("growth", "starter", None)
    now = (await api.post(SUB, headers=writer, json={"plan_id": "scale", "effective": "immediately"})).json()
    assert (now["plan_id"], now["pending_plan_id"]) == ("scale", None)
    p = now["proration"]
    assert (p["old_plan_id"], p["new_plan_id"]) == ("growth", "scale")
    assert p["net_cents"] == p["new_plan_charge_cents"] - p["old_plan_credit_cents"] and p["net_cents"] > 0
    assert now["plan_credits_remaining"] == 22_000 + p["plan_credits_granted"]

    handle = temporal_client.get_workflow_handle(account_workflow_id(account))
    described = await eventually(handle.describe, lambda d: d.typed_search_attributes.get(SA_PLAN) == "scale")
    assert described.typed_search_attributes.get(SA_PLAN) == "scale"
    cancel = (await api.post(SUB, headers=writer, json={"plan_id": None})).json()
    assert (cancel["plan_id"], cancel["pending_plan_id"]) == ("scale", "")


async def test_subscription_refusals_change_nothing(api: httpx.AsyncClient, database_url: str) -> None:  # noqa: F811
    account = await new_account(api)
    writer = bearer(await key_for(api, account, "billing:write", "usage:write", "payments:write"))
    reader = bearer(await key_for(api, account, "billing:read"))
    before = await ledger_snapshot(database_url)
    cases: list[tuple[dict[str, str], dict[str, Any], int, str]] = [
        (writer, {"plan_id": "platinum"}, 422, "unknown_plan"),
        (writer, {"plan_id": None}, 409, "no_subscription"),
        (writer, {"plan_id": "growth", "effective": "yesterday"}, 422, "validation_error"),
        (writer, {"plan_id": "growth", "anchor": "2025-01-31T00:00:00Z"}, 403, "forbidden"),
        (writer, {"plan_id": "growth", "surprise": True}, 422, "validation_error"),
        (reader, {"plan_id": "growth"}, 403, "insufficient_scope"),
    ]
    for headers, body, status, code in cases:
        resp = await api.post(SUB, headers=headers, json=body)
        assert (resp.status_code, resp.json().get("error", {}).get("code")) == (status, code), (body, resp.text)
    assert await ledger_snapshot(database_url) == before
    assert (await api.get(SUB, headers=writer)).json()["status"] == "none"

    charge = await api.post("/api/v1/billing/recurring-charges", json={
        "account_id": account, "description": "Phone number rental", "quantity": 2, "unit": "number",
        "unit_price": 150})
    assert charge.status_code == 201, charge.text
    assert {k: charge.json()[k] for k in ("description", "quantity", "unit", "unit_price")} == {
        "description": "Phone number rental", "quantity": 2, "unit": "number", "unit_price": 150}
    customer = await api.post("/api/v1/billing/recurring-charges", headers=writer, json={
        "description": "x", "quantity": 1, "unit_price": 1})
    assert (customer.status_code, customer.json()["error"]["code"]) == (403, "insufficient_scope")
    listed = (await api.get("/api/v1/billing/recurring-charges", headers=reader)).json()["items"]
    assert [c["id"] for c in listed] == [charge.json()["id"]]
    removed = await api.delete(f"/api/v1/billing/recurring-charges/{charge.json()['id']}",
                               params={"account_id": account})
    assert removed.status_code == 200
    assert (await api.get("/api/v1/billing/recurring-charges", headers=reader)).json()["items"] == []


def _half_up(amount: int, numerator: int, denominator: int) -> int:
    """The expected share, computed here on its own (integers, half-up to the unit): not the code under test."""
    return (2 * amount * numerator + denominator) // (2 * denominator)


def _micros_between(start: str, end: str) -> int:
    delta = datetime.fromisoformat(end.replace("Z", "+00:00")) - datetime.fromisoformat(start.replace("Z", "+00:00"))
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


async def test_the_preview_shows_what_a_change_would_credit_and_charge_and_changes_nothing(
        api: httpx.AsyncClient, database_url: str) -> None:  # noqa: F811
    """GET /subscription/preview: an immediate change prorated as of now by the change's own function (exact to the
    cent: old fee x share credited, new fee x share charged, plan credits swapped in the same share); next renewal:
    nothing prorated. Nothing is written; refusals are the change's own."""
    account = await new_account(api)
    reader = bearer(await key_for(api, account, "billing:read"))
    plans = {p["id"]: p for p in (await api.get("/api/v1/billing/plans", headers=reader)).json()["items"]}
    fresh = await api.get(f"{SUB}/preview", headers=reader, params={"plan_id": "growth", "effective": "now"})
    assert fresh.status_code == 200, fresh.text
    assert (fresh.json()["current_plan_id"], fresh.json()["plan_id"], fresh.json()["proration"]) == (
        None, "growth", None)  # subscribing starts a cycle now: nothing to prorate
    nothing = await api.get(f"{SUB}/preview", headers=reader)
    assert (nothing.status_code, nothing.json()["error"]["code"]) == (409, "no_subscription")

    anchor = (datetime.now(UTC) - timedelta(days=10, hours=5)).isoformat()
    subscribed = await api.post(SUB, json={"account_id": account, "plan_id": "growth", "anchor": anchor})
    assert subscribed.status_code == 200, subscribed.text
    cycle = subscribed.json()
    before = await ledger_snapshot(database_url)
    for effective in ("now", "immediately"):
        resp = await api.get(f"{SUB}/preview", headers=reader, params={"plan_id": "scale", "effective": effective})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        p = body["proration"]
        remaining = _micros_between(p["at"], cycle["cycle_end"])
        total = _micros_between(cycle["cycle_start"], cycle["cycle_end"])
        growth, scale = plans["growth"], plans["scale"]
        credit = _half_up(int(Decimal(str(growth["monthly_fee_usd"])) * 100), remaining, total)
        charge = _half_up(int(Decimal(str(scale["monthly_fee_usd"])) * 100), remaining, total)
        granted = _half_up(scale["included_credits"], remaining, total) - _half_up(growth["included_credits"],
                                                                                  remaining, total)
        assert (body["current_plan_id"], body["plan_id"], body["effective"], body["effective_at"]) == (
            "growth", "scale", "immediately", p["at"])
        assert (p["old_plan_id"], p["new_plan_id"], p["old_plan_credit_cents"], p["new_plan_charge_cents"],
                p["net_cents"], p["plan_credits_granted"], p["plan_credits_expired"]) == (
            "growth", "scale", credit, charge, charge - credit, granted, 0)
        assert 0 < credit < 19_900 and charge > credit  # two-thirds of a cycle left, an upgrade
    # A downgrade gives plan credits back (never more than remain).
    down = (await api.get(f"{SUB}/preview", headers=reader, params={"plan_id": "starter", "effective": "now"})).json()
    assert down["proration"]["net_cents"] < 0 and down["proration"]["plan_credits_granted"] == 0
    assert down["proration"]["plan_credits_expired"] > 0
    renewal = (await api.get(f"{SUB}/preview", headers=reader, params={"plan_id": "scale"})).json()
    assert (renewal["effective"], renewal["effective_at"], renewal["proration"]) == (
        "next_renewal", cycle["cycle_end"], None)
    for params, status, code in (({"plan_id": "growth", "effective": "now"}, 422, "validation_error"),
                                 ({"effective": "now"}, 422, "validation_error"),
                                 ({"plan_id": "platinum", "effective": "now"}, 422, "unknown_plan"),
                                 ({"plan_id": "scale", "effective": "yesterday"}, 422, "validation_error")):
        resp = await api.get(f"{SUB}/preview", headers=reader, params=params)
        assert (resp.status_code, resp.json()["error"]["code"]) == (status, code), params
    usage_only = bearer(await key_for(api, account, "usage:write"))
    assert (await api.get(f"{SUB}/preview", headers=usage_only, params={"plan_id": "scale"})).status_code == 403
    assert await ledger_snapshot(database_url) == before
    assert (await api.get(SUB, headers=reader)).json()["plan_id"] == "growth"
