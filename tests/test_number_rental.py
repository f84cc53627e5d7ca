"""Number rental in the wallet (seed 004; migration 0030_2): a wallet-only account pays each recurring
charge from the wallet every month as a usage item with channel ``number``; a plan account keeps it on its invoice
(never both); a month the wallet cannot cover draws on the overage line, else is recorded unpaid and notified.
Through the HTTP API with the production worker (Temporal dev server); the months on the time-skipping server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from creditflow.config import Settings
from creditflow.domain.money import MICROS_PER_CREDIT
from tests.conftest import _temporal_cli, skip_time
from tests.support.api import app_client, balance, new_account
from tests.support.ledger import assert_invariants
from tests.support.plans import subscribe
from tests.support.temporal import eventually
from workers.main import build_worker
from workflows.contract import RentalInput, rental_workflow_id
from workflows.rental import RentalWorkflow

CHARGES = "/api/v1/billing/recurring-charges"


@pytest.fixture
async def wf_api(temporal_settings: Settings, temporal_worker: Any) -> AsyncIterator[httpx.AsyncClient]:
    async for client in app_client(temporal_settings):
        yield client


async def months(pool: AsyncConnectionPool, account: str) -> list[tuple[str, str, int]]:
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT period_key, status, amount_micros FROM rental_charges WHERE account_id = %s ORDER BY period_key",
            (account,))).fetchall()
    return [(r["period_key"], r["status"], r["amount_micros"]) for r in rows]


async def rent(api: httpx.AsyncClient, account: str, numbers: int = 3) -> dict[str, Any]:
    resp = await api.post(CHARGES, json={"account_id": account, "description": "Phone number rental",
                                         "quantity": numbers, "unit": "number", "unit_price": 150})
    assert resp.status_code == 201, resp.text
    return resp.json()


@pytest.mark.temporal
async def test_wallet_only_pays_rentals_from_the_wallet_plan_accounts_on_the_invoice(
        wf_api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    api = wf_api
    # Wallet only: 3 numbers x 150 credits, charged now as a usage item of channel "number".
    wallet = await new_account(api)
    await rent(api, wallet)
    paid = await eventually(lambda: months(pool, wallet), lambda ms: len(ms) == 1, timeout=30)
    assert [(s, a) for _, s, a in paid] == [("paid", 450 * MICROS_PER_CREDIT)]
    assert (await balance(api, wallet))["balance"] == 4550
    items = (await api.get("/api/v1/billing/usage/items", params={"account_id": wallet})).json()["items"]
    assert [(i["channel"], i["feature"], i["quantity"], i["credits_per_unit"], i["credits"]) for i in items] == [
        ("number", "phone_number", 3, 150, 450)]

    # Not enough in the wallet and no credit line: unpaid, nothing charged, the customer told.
    poor = await new_account(api)
    debit = await api.post("/api/v1/billing/wallet/credit", json={"account_id": poor, "amount": -4900,
                                                                  "reason": "t", "idempotency_key": "d"})
    assert debit.status_code in (200, 201), debit.text
    await rent(api, poor)
    assert [s for _, s, _ in await eventually(lambda: months(pool, poor), lambda ms: len(ms) == 1, timeout=30)] == [
        "unpaid"]
    assert (await balance(api, poor))["balance"] == 100

    async def failed_notices() -> list[dict[str, Any]]:
        async with pool.connection() as conn:
            return await (await conn.execute("SELECT payload FROM notifications_log WHERE account_id = %s"
                                             " AND kind = 'recurring_charge.failed'", (poor,))).fetchall()

    [notice] = await eventually(failed_notices, lambda ns: len(ns) == 1, timeout=30)
    assert (notice["payload"]["amount_micros"], notice["payload"]["quantity"]) == (450 * MICROS_PER_CREDIT, 3)

    # With an overage credit line the rental draws on it.
    lined = await new_account(api, overage_credit_line=1000)
    await api.post("/api/v1/billing/wallet/credit", json={"account_id": lined, "amount": -4900, "reason": "t",
                                                          "idempotency_key": "d"})
    await rent(api, lined)
    await eventually(lambda: months(pool, lined), lambda ms: [s for _, s, _ in ms] == ["paid"], timeout=30)
    assert (await balance(api, lined))["balance"] == -350

    # A plan account: on the invoice, never from the wallet.
    planned = await new_account(api)
    await subscribe(pool, planned, credits=100)
    await rent(api, planned)
    await eventually(lambda: months(pool, planned), lambda ms: [s for _, s, _ in ms] == ["invoiced"], timeout=30)
    assert (await balance(api, planned))["balance"] == 5100
    await assert_invariants(pool)


async def test_a_rental_is_charged_every_month_until_removed(pool: AsyncConnectionPool, settings: Settings,
                                                              api: httpx.AsyncClient) -> None:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(Path(_temporal_cli()).parent / "temporal-test-server"),
        data_converter=pydantic_data_converter)
    try:
        account = await new_account(api)
        charge = (await api.get(CHARGES, params={"account_id": account})).json()["items"]
        assert charge == []
        from creditflow.ledger import subscriptions

        rental = await subscriptions.add_recurring(pool, account, description="Phone number rental", quantity=2,
                                                   unit="number", unit_price_credits=Decimal(150))
        queue = f"rental-{uuid.uuid4().hex[:8]}"
        async with build_worker(env.client, pool, settings.model_copy(update={"temporal_task_queue": queue})):
            handle = await env.client.start_workflow(
                RentalWorkflow.run, RentalInput(account_id=account, charge_id=rental.id, anchor=rental.created_at),
                id=rental_workflow_id(account, rental.id), task_queue=queue)
            await eventually(lambda: months(pool, account), lambda ms: len(ms) == 1, timeout=30)
            for expected in (2, 3):
                await skip_time(env, timedelta(days=31))
                await eventually(lambda: months(pool, account), lambda ms, n=expected: len(ms) == n, timeout=30)
            removed = await api.delete(f"{CHARGES}/{rental.id}", params={"account_id": account})
            assert removed.status_code == 200, removed.text
            await skip_time(env, timedelta(days=31))
            assert await asyncio.wait_for(handle.result(), 30) == "removed"
        got = await months(pool, account)
        assert [(s, a) for _, s, a in got] == [("paid", 300 * MICROS_PER_CREDIT)] * 3
        assert len({k for k, _, _ in got}) == 3
        assert (await balance(api, account))["balance"] == 4100
        await assert_invariants(pool)
    finally:
        await env.shutdown()


async def test_a_month_paid_from_the_wallet_is_not_invoiced_again(pool: AsyncConnectionPool,
                                                                   api: httpx.AsyncClient) -> None:
    """A wallet-only account that paid this month's rental and then subscribes: the first plan period's invoice
    does not bill that charge again (the next periods do, and the wallet no longer pays it)."""
    from creditflow.domain.periods import next_period
    from creditflow.ledger import rentals, subscriptions
    from tests.support.plans import CATALOG

    account = await new_account(api)
    rental = await subscriptions.add_recurring(pool, account, description="Phone number rental", quantity=2,
                                               unit="number", unit_price_credits=Decimal(150))
    month = await rentals.charge(pool, account, rental.id, rental.created_at)
    assert (month.status, month.amount_micros) == ("paid", 300 * MICROS_PER_CREDIT)
    period = await subscribe(pool, account, credits=100)  # started 3 days ago: overlaps the paid month
    closed = await subscriptions.close_period(pool, account, period, CATALOG.get("growth"))
    assert closed.recurring == []
    later = await subscriptions.close_period(pool, account, next_period(next_period(period)), CATALOG.get("growth"))
    assert [r["id"] for r in later.recurring] == [rental.id]
