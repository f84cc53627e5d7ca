"""Organizations and transfers between their workspaces (issue 13, item 2): through the API, real PostgreSQL (and for
the refund and dispute crossings real Temporal and localstripe), exact numbers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from psycopg_pool import AsyncConnectionPool

from creditflow.domain.lots import LotSource
from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.ledger import postings
from creditflow.ledger.verify import verify
from tests.conftest import ledger_snapshot
from tests.test_api_auth_and_bad_input import bearer, key_for
from tests.test_api_metering import new_account

ORGS = "/api/v1/organizations"
M = MICROS_PER_CREDIT


async def organization(api: httpx.AsyncClient, *accounts: str) -> tuple[str, dict[str, str]]:
    """An organization owning ``accounts``, and an organization key (billing:read + transfers:write)."""
    org = await api.post(ORGS, json={"name": "Enterprise"})
    assert org.status_code == 201, org.text
    org_id = org.json()["id"]
    for account in accounts:
        resp = await api.post(f"{ORGS}/{org_id}/accounts", json={"account_id": account})
        assert resp.status_code == 200, resp.text
    key = await api.post(f"{ORGS}/{org_id}/api-keys", json={"name": "treasury"})
    assert key.status_code == 201, key.text
    assert key.json()["secret"].startswith("cf_org_") and key.json()["scopes"] == ["billing:read", "transfers:write"]
    return org_id, bearer(key.json()["secret"])


async def balance(api: httpx.AsyncClient, account: str) -> Any:
    return (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()["balance"]


async def lots(pool: AsyncConnectionPool, account: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        await conn.execute("SELECT cf_settle_account_burns(%s)", (account,))
        return await (await conn.execute(
            "SELECT id, source, priority, original_micros, remaining_micros, expires_at, paid_cents, parent_lot_id,"
            " origin_lot_id, transfer_id FROM credit_lots WHERE account_id = %s"
            " ORDER BY priority, expires_at NULLS LAST, created_at, id", (account,))).fetchall()


async def history(api: httpx.AsyncClient, account: str, type_: str) -> list[dict[str, Any]]:
    resp = await api.get("/api/v1/billing/transactions", params={"account_id": account, "type": type_})
    return resp.json()["items"]


async def test_transfer_moves_credits_once_keeping_their_provenance(api: httpx.AsyncClient,
                                                                     pool: AsyncConnectionPool) -> None:
    a, b = await new_account(api), await new_account(api)  # 5,000 welcome credits each
    org, key = await organization(api, a, b)
    # An expiring promotional grant on A: it burns (and moves) first, and keeps its expiry wherever it goes.
    expiry = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    await postings.post(pool, account_id=a, type="promotional", amount_micros=300 * M, counter_book="system:promotions",
                        description="Spring promo", idempotency_key="promo-1", lot_source=LotSource.PROMOTIONAL,
                        lot_expires_at=expiry)
    assert await balance(api, a) == 5300

    body = {"from_account_id": a, "to_account_id": b, "amount": 1200, "idempotency_key": "move-1",
            "description": "Q3 budget"}
    resp = await api.post(f"{ORGS}/{org}/transfers", headers=key, json=body)
    assert resp.status_code == 201, resp.text
    transfer = resp.json()
    assert (transfer["amount"], transfer["from_account_id"], transfer["to_account_id"], transfer["replayed"]) == (
        1200, a, b, False)
    assert (await balance(api, a), await balance(api, b)) == (4100, 6200)

    # Provenance: 300 promotional credits (with their expiry) then 900 of the welcome bonus, each a new lot on B
    # linked to the lot it came from; the source lots shrank by exactly that.
    a_lots, b_lots = await lots(pool, a), await lots(pool, b)
    promo, welcome_a = a_lots
    assert (promo["source"], promo["remaining_micros"], welcome_a["remaining_micros"]) == (
        "promotional", 0, 4100 * M)
    moved = [lot for lot in b_lots if lot["transfer_id"] == transfer["id"]]
    assert [(lot["source"], lot["priority"], lot["original_micros"], lot["remaining_micros"], lot["expires_at"],
             lot["paid_cents"], lot["parent_lot_id"], lot["origin_lot_id"]) for lot in moved] == [
        ("promotional", 10, 300 * M, 300 * M, expiry, None, promo["id"], promo["id"]),
        ("welcome_bonus", 10, 900 * M, 900 * M, None, None, welcome_a["id"], welcome_a["id"])]
    assert sorted((m["source"], m["credits"], m["from_lot_id"]) for m in transfer["lots"]) == sorted(
        [("promotional", 300, promo["id"]), ("welcome_bonus", 900, welcome_a["id"])])

    # Listed in both histories, and in the organization's transfers.
    [out] = await history(api, a, "transfer_out")
    [into] = await history(api, b, "transfer_in")
    assert (out["id"], out["amount"], out["balance_after"], out["metadata"]["transfer_id"]) == (
        transfer["from_transaction_id"], -1200, 4100, transfer["id"])
    assert (into["id"], into["amount"], into["balance_after"], into["metadata"]["from_account_id"]) == (
        transfer["to_transaction_id"], 1200, 6200, a)
    assert out["description"] == f"Transfer to {b}: Q3 budget"
    listed = (await api.get(f"{ORGS}/{org}/transfers", headers=key, params={"account_id": b})).json()["items"]
    assert [t["id"] for t in listed] == [transfer["id"]]

    # The same request again (a retry): the first transfer, nothing moved twice. Another request under the key: 409.
    again = await api.post(f"{ORGS}/{org}/transfers", headers=key, json=body)
    assert again.status_code == 200 and again.json()["replayed"] is True and again.json()["id"] == transfer["id"]
    conflict = await api.post(f"{ORGS}/{org}/transfers", headers=key, json={**body, "amount": 1201})
    assert (conflict.status_code, conflict.json()["error"]["code"]) == (409, "idempotency_conflict")
    assert (await balance(api, a), await balance(api, b)) == (4100, 6200)

    # B spends: its own lots and the moved ones burn in the usual order (the moved promotional credits first).
    spent = await api.post("/api/v1/billing/track", json={"account_id": b, "feature_id": "chat_message",
                                                          "value": 100, "idempotency_key": "use-1"})
    assert spent.status_code == 200 and spent.json()["balance"] == 6100
    assert [lot["remaining_micros"] for lot in await lots(pool, b) if lot["source"] == "promotional"] == [200 * M]
    report = await verify(pool)
    assert report.violations == []


async def test_transfers_are_refused_across_organizations_and_beyond_what_is_available(
        api: httpx.AsyncClient, pool: AsyncConnectionPool, database_url: str) -> None:
    a, b, c, loose = [await new_account(api) for _ in range(4)]
    org, key = await organization(api, a, b)
    other_org, other_key = await organization(api, c)
    before = await ledger_snapshot(database_url)
    move = {"from_account_id": a, "to_account_id": c, "amount": 10, "idempotency_key": "x-1"}

    # Into another organization's workspace, from it, to an account of no organization: refused, nothing moves.
    for body in [move, {**move, "from_account_id": c, "to_account_id": a}, {**move, "to_account_id": loose}]:
        resp = await api.post(f"{ORGS}/{org}/transfers", headers=key, json=body)
        assert (resp.status_code, resp.json()["error"]["code"]) == (403, "forbidden"), body
    # Even the platform cannot move credits between organizations.
    resp = await api.post(f"{ORGS}/{org}/transfers", json=move)
    assert (resp.status_code, resp.json()["error"]["code"]) == (403, "forbidden")
    # Another organization's key on this organization.
    resp = await api.post(f"{ORGS}/{org}/transfers", headers=other_key, json={**move, "to_account_id": b})
    assert (resp.status_code, resp.json()["error"]["code"]) == (403, "forbidden")
    # A workspace's own account key (even with every account scope) does not move credits.
    own = bearer(await key_for(api, a, "billing:read", "usage:write", "billing:write", "payments:write"))
    resp = await api.post(f"{ORGS}/{org}/transfers", headers=own, json={**move, "to_account_id": b})
    assert (resp.status_code, resp.json()["error"]["code"]) == (403, "insufficient_scope")
    assert await ledger_snapshot(database_url) == before
    # More than A has available (holds reserve credits), a zero or fractional amount, the same account.
    hold = await api.post("/api/v1/billing/holds", json={"account_id": a, "feature_id": "chat_message", "value": 1000,
                                                         "idempotency_key": "h-1"})
    assert hold.status_code == 201, hold.text
    held_before = await ledger_snapshot(database_url)
    resp = await api.post(f"{ORGS}/{org}/transfers", headers=key, json={**move, "to_account_id": b, "amount": 4001})
    assert (resp.status_code, resp.json()["error"]["code"]) == (402, "insufficient_credits")
    for bad in [{"amount": 0}, {"amount": "1.5"}, {"to_account_id": a}]:
        resp = await api.post(f"{ORGS}/{org}/transfers", headers=key, json={**move, "to_account_id": b, **bad})
        assert resp.status_code == 422, (bad, resp.text)
    assert await ledger_snapshot(database_url) == held_before

    # The organization key reads its workspaces (naming one), not others.
    assert (await api.get("/api/v1/billing/balance", headers=key, params={"account_id": a})).json()["balance"] == 5000
    resp = await api.get("/api/v1/billing/balance", headers=key, params={"account_id": c})
    assert (resp.status_code, resp.json()["error"]["code"]) == (403, "forbidden")
    assert (await api.get(f"{ORGS}/{org}", headers=key)).json()["account_ids"] == [a, b]
    assert (await api.get(f"{ORGS}/{other_org}", headers=key)).status_code == 403
    # A workspace belongs to one organization.
    resp = await api.post(f"{ORGS}/{other_org}/accounts", json={"account_id": a})
    assert (resp.status_code, resp.json()["error"]["code"]) == (409, "account_in_other_organization")
    assert (await verify(pool)).violations == []


async def test_plan_credits_do_not_move(api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    """Plan credits die with their workspace's period: only the other lots are transferable."""
    a, b = await new_account(api), await new_account(api)
    org, key = await organization(api, a, b)
    async with pool.connection() as conn:  # A's welcome lot relabelled a plan lot: the 5,000 are plan credits now
        await conn.execute("UPDATE credit_lots SET source = 'plan', priority = 0 WHERE account_id = %s", (a,))
    resp = await api.post(f"{ORGS}/{org}/transfers", headers=key,
                          json={"from_account_id": a, "to_account_id": b, "amount": 1, "idempotency_key": "p-1"})
    assert (resp.status_code, resp.json()["error"]["code"]) == (402, "insufficient_credits")
    assert (await balance(api, a), await balance(api, b)) == (5000, 5000)
