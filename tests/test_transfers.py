"""Organizations and transfers between their workspaces: through the API, real PostgreSQL (and for
the refund and dispute crossings real Temporal and localstripe), exact numbers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool

from creditflow.domain.lots import LotSource
from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.ledger import postings
from creditflow.ledger.verify import verify
from tests.conftest import ledger_snapshot
from tests.support.api import bearer, key_for, new_account
from tests.support.auto_recharge import relay  # noqa: F401 - fixture: the outbox relay running
from tests.support.payments import TOPUP, save_card
from tests.support.temporal import eventually
from tests.support.webhooks import Clients, clients_for, event, settings, sign  # noqa: F401 - fixtures

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
    # The platform lists and revokes organization keys; a revoked key stops at once.
    [listed] = (await api.get(f"{ORGS}/{org}/api-keys")).json()["items"]
    assert (listed["organization_id"], listed["account_id"], "secret" in listed) == (org, None, False)
    assert (await api.delete(f"{ORGS}/{org}/api-keys/{listed['id']}")).json()["revoked_at"] is not None
    resp = await api.get(f"{ORGS}/{org}", headers=key)
    assert (resp.status_code, resp.json()["error"]["code"]) == (401, "unauthorized")
    # A workspace belongs to one organization.
    resp = await api.post(f"{ORGS}/{other_org}/accounts", json={"account_id": a})
    assert (resp.status_code, resp.json()["error"]["code"]) == (409, "account_in_other_organization")
    assert (await verify(pool)).violations == []


async def test_a_destination_drawing_on_its_overage_line_is_refused(api: httpx.AsyncClient,
                                                                      database_url: str) -> None:
    """Credits arriving on a negative balance would repay the line and lose their lot (and provenance)."""
    a, b = await new_account(api), await new_account(api, overage_credit_line=1000)
    org, key = await organization(api, a, b)
    used = await api.post("/api/v1/billing/track", json={"account_id": b, "feature_id": "chat_message",
                                                         "value": 5500, "idempotency_key": "u-1"})
    assert used.status_code == 200 and used.json()["balance"] == -500
    before = await ledger_snapshot(database_url)
    resp = await api.post(f"{ORGS}/{org}/transfers", headers=key, json={
        "from_account_id": a, "to_account_id": b, "amount": 800, "idempotency_key": "d-1"})
    assert (resp.status_code, resp.json()["error"]["code"]) == (409, "destination_in_overage")
    assert await ledger_snapshot(database_url) == before
    # Nor can B send any: its lots are empty (it is drawing on its line).
    resp = await api.post(f"{ORGS}/{org}/transfers", headers=key, json={
        "from_account_id": b, "to_account_id": a, "amount": 1, "idempotency_key": "d-2"})
    assert (resp.status_code, resp.json()["error"]["code"]) == (402, "insufficient_credits")


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


async def test_concurrent_duplicates_move_once_and_crossing_transfers_do_not_deadlock(
        api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    a, b = await new_account(api), await new_account(api)
    org, key = await organization(api, a, b)
    body = {"from_account_id": a, "to_account_id": b, "amount": 250, "idempotency_key": "same"}
    answers = await asyncio.gather(*(api.post(f"{ORGS}/{org}/transfers", headers=key, json=body) for _ in range(6)))
    assert sorted(r.status_code for r in answers) == [200] * 5 + [201]
    assert len({r.json()["id"] for r in answers}) == 1
    assert (await balance(api, a), await balance(api, b)) == (4750, 5250)

    def crossing(i: int) -> dict[str, Any]:
        src, dst = (a, b) if i % 2 else (b, a)
        return {"from_account_id": src, "to_account_id": dst, "amount": 10 + i, "idempotency_key": f"x-{i}"}

    answers = await asyncio.gather(*(api.post(f"{ORGS}/{org}/transfers", headers=key, json=crossing(i))
                                     for i in range(20)))
    assert [r.status_code for r in answers] == [201] * 20
    a_to_b = sum(10 + i for i in range(20) if i % 2)
    b_to_a = sum(10 + i for i in range(20) if not i % 2)
    assert (await balance(api, a), await balance(api, b)) == (4750 - a_to_b + b_to_a, 5250 + a_to_b - b_to_a)
    assert len(await history(api, a, "transfer_out")) == 11 and len(await history(api, b, "transfer_in")) == 11
    assert (await verify(pool)).violations == []


# --- a purchase's credits moved, then refunded or disputed ------------------------------------------------------


@pytest.fixture
async def cf0(temporal_settings: Any, temporal_worker: Any) -> Any:
    """The real app on Temporal and localstripe, accounts created without a welcome bonus (round numbers)."""
    async with clients_for(temporal_settings.model_copy(update={"welcome_bonus_credits": 0})) as clients:
        yield clients


async def buy(cf: Clients, sdk: stripe.StripeClient, account: str, usd: int) -> dict[str, Any]:
    await save_card(cf.admin, sdk, account)
    paid = await cf.admin.post(TOPUP, json={"account_id": account, "amount_usd": usd, "request_id": f"buy-{usd}"})
    assert paid.status_code == 200 and paid.json()["status"] == "succeeded", paid.text
    return paid.json()


async def move(cf: Clients, org: str, key: dict[str, str], src: str, dst: str, amount: int, idem: str) -> Any:
    resp = await cf.admin.post(f"{ORGS}/{org}/transfers", headers=key, json={
        "from_account_id": src, "to_account_id": dst, "amount": amount, "idempotency_key": idem})
    assert resp.status_code == 201, resp.text
    return resp.json()


async def rows_of(pool: AsyncConnectionPool, account: str, type_: str) -> list[tuple[int, str]]:
    async with pool.connection() as conn:
        found = await (await conn.execute(
            "SELECT amount_micros, idempotency_key FROM journal WHERE account_id = %s AND type = %s ORDER BY seq",
            (account, type_))).fetchall()
    return [(r["amount_micros"] // M, r["idempotency_key"]) for r in found]


@pytest.mark.temporal
async def test_a_refund_of_the_purchase_takes_back_from_where_its_credits_went(
        cf0: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient) -> None:
    a, b = await new_account(cf0.admin), await new_account(cf0.admin)
    org, key = await organization(cf0.admin, a, b)
    bought = await buy(cf0, sdk, a, 25)  # 2,500 credits for $25
    moved = await move(cf0, org, key, a, b, 2000, "m-1")
    [part] = moved["lots"]
    assert (part["source"], part["credits"]) == ("purchase", 2000)
    used = await cf0.admin.post("/api/v1/billing/track", json={"account_id": b, "feature_id": "chat_message",
                                                               "value": 300, "idempotency_key": "u-1"})
    assert used.status_code == 200 and used.json()["balance"] == 1700
    assert (await balance(cf0.admin, a), await balance(cf0.admin, b)) == (500, 1700)

    # B holds the credits but did not buy them: it cannot refund them (not its purchase).
    b_payer = bearer(await key_for(cf0.admin, b, "payments:write"))
    resp = await cf0.admin.post("/api/v1/billing/refunds", headers=b_payer,
                                json={"payment_intent_id": bought["payment_intent_id"], "request_id": "r-b"})
    assert (resp.status_code, resp.json()["error"]["code"]) == (404, "unknown_purchase")

    # A refunds 2,000 of the 2,200 credits left of its purchase: 500 from its own lot, 1,500 from B's moved lot.
    a_payer = bearer(await key_for(cf0.admin, a, "payments:write"))
    resp = await cf0.admin.post("/api/v1/billing/refunds", headers=a_payer, json={
        "payment_intent_id": bought["payment_intent_id"], "credits": 2000, "request_id": "r-1"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["status"], body["credits"], body["amount_usd"], body["balance"]) == ("succeeded", 2000, 20, 0)
    assert (await balance(cf0.admin, a), await balance(cf0.admin, b)) == (0, 200)
    assert await rows_of(pool, a, "refund") == [(-500, f"sys:refund:{body['refund_id']}")]
    assert await rows_of(pool, b, "refund") == [(-1500, f"sys:refund:{body['refund_id']}:{part['lot_id']}")]
    # Listed in B's history too, naming the purchase's workspace.
    [seen] = await history(cf0.admin, b, "refund")
    assert (seen["amount"], seen["balance_after"], seen["metadata"]["origin_account_id"]) == (-1500, 200, a)
    # The same request again refunds nothing more; more than what is left (200) is refused.
    again = await cf0.admin.post("/api/v1/billing/refunds", headers=a_payer, json={
        "payment_intent_id": bought["payment_intent_id"], "credits": 2000, "request_id": "r-1"})
    assert again.status_code == 200 and again.json()["refund_id"] == body["refund_id"]
    more = await cf0.admin.post("/api/v1/billing/refunds", headers=a_payer, json={
        "payment_intent_id": bought["payment_intent_id"], "credits": 201, "request_id": "r-2"})
    assert (more.status_code, more.json()["error"]["code"]) == (422, "refund_exceeds_remaining")
    assert (await balance(cf0.admin, a), await balance(cf0.admin, b)) == (0, 200)
    assert (await verify(pool)).violations == []


@pytest.mark.temporal
async def test_a_dispute_of_the_purchase_takes_back_from_every_workspace_and_a_win_gives_it_back(
        cf0: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient, relay: Any) -> None:  # noqa: F811
    a, b, c = [await new_account(cf0.admin) for _ in range(3)]
    org, key = await organization(cf0.admin, a, b, c)
    bought = await buy(cf0, sdk, a, 25)  # 2,500 credits for $25
    to_b = await move(cf0, org, key, a, b, 1000, "m-1")
    to_c = await move(cf0, org, key, b, c, 400, "m-2")  # moved on again: still the same purchase's credits
    [b_lot], [c_lot] = to_b["lots"], to_c["lots"]
    assert (c_lot["from_lot_id"], c_lot["origin_lot_id"]) == (b_lot["lot_id"], b_lot["origin_lot_id"])
    used = await cf0.admin.post("/api/v1/billing/track", json={"account_id": b, "feature_id": "chat_message",
                                                               "value": 100, "idempotency_key": "u-1"})
    assert used.status_code == 200
    assert [await balance(cf0.admin, x) for x in (a, b, c)] == [1500, 500, 400]

    # The whole $25 is disputed: it claims 2,500 credits; 2,400 are left (100 were used) wherever they went.
    dispute = {"id": "dp_moved", "object": "dispute", "payment_intent": bought["payment_intent_id"],
               "charge": "ch_x", "amount": 2500, "reason": "fraudulent", "status": "needs_response"}
    body = event("charge.dispute.created", dispute, event_id="evt_dp_moved")
    for _ in range(2):  # delivered twice: applied once
        assert (await cf0.deliver(body, sign(body))).status_code == 200
    await eventually(lambda: rows_of(pool, c, "dispute"), lambda r: len(r) == 1, timeout=30)
    assert await rows_of(pool, a, "dispute") == [(-1500, "sys:dispute:dp_moved")]
    assert await rows_of(pool, b, "dispute") == [(-500, f"sys:dispute:dp_moved:{b_lot['lot_id']}")]
    assert await rows_of(pool, c, "dispute") == [(-400, f"sys:dispute:dp_moved:{c_lot['lot_id']}")]
    assert [await balance(cf0.admin, x) for x in (a, b, c)] == [0, 0, 0]
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT claimed_micros, taken_micros FROM disputes WHERE id = 'dp_moved'"
                                        )).fetchone()
    assert (row["claimed_micros"] // M, row["taken_micros"] // M) == (2500, 2400)
    assert (await verify(pool)).violations == []

    # Won: each workspace gets back exactly what was taken from it, into the lot it was taken from.
    won = event("charge.dispute.closed", {**dispute, "status": "won"}, event_id="evt_dp_moved_won")
    for _ in range(2):
        assert (await cf0.deliver(won, sign(won))).status_code == 200
    await eventually(lambda: rows_of(pool, c, "dispute_reversal"), lambda r: len(r) == 1, timeout=30)
    assert await rows_of(pool, a, "dispute_reversal") == [(1500, "sys:dispute_won:dp_moved")]
    assert await rows_of(pool, b, "dispute_reversal") == [(500, f"sys:dispute_won:dp_moved:{b_lot['lot_id']}")]
    assert await rows_of(pool, c, "dispute_reversal") == [(400, f"sys:dispute_won:dp_moved:{c_lot['lot_id']}")]
    assert [await balance(cf0.admin, x) for x in (a, b, c)] == [1500, 500, 400]
    assert [lot["remaining_micros"] // M for lot in await lots(pool, c)] == [400]
    assert (await verify(pool)).violations == []


@pytest.mark.temporal
async def test_a_stripe_refund_after_everything_moved_takes_from_the_destination_and_a_failure_restores_it(
        cf0: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient, relay: Any) -> None:  # noqa: F811
    a, b = await new_account(cf0.admin), await new_account(cf0.admin)
    org, key = await organization(cf0.admin, a, b)
    bought = await buy(cf0, sdk, a, 25)
    [part] = (await move(cf0, org, key, a, b, 2500, "all"))["lots"]
    # $10 refunded in the Stripe dashboard: 1,000 credits; A's lot is empty, so they come from B.
    charge = {"id": "ch_moved", "object": "charge", "payment_intent": bought["payment_intent_id"], "amount": 2500,
              "amount_refunded": 1000, "refunds": {"object": "list", "data": [{"id": "re_moved", "amount": 1000}]}}
    body = event("charge.refunded", charge, event_id="evt_re_moved")
    assert (await cf0.deliver(body, sign(body))).json()["outcome"] == "routed"
    await eventually(lambda: rows_of(pool, b, "refund"), lambda r: len(r) == 1, timeout=30)
    assert await rows_of(pool, a, "refund") == [(0, "sys:stripe_refund:re_moved")]
    assert await rows_of(pool, b, "refund") == [(-1000, f"sys:stripe_refund:re_moved:{part['lot_id']}")]
    assert (await balance(cf0.admin, a), await balance(cf0.admin, b)) == (0, 1500)
    assert (await verify(pool)).violations == []
    # Stripe then reports that refund failed: the credits go back to B's lot, once.
    failed = {"id": "re_moved", "object": "refund", "payment_intent": bought["payment_intent_id"], "amount": 1000,
              "status": "failed", "failure_reason": "lost_or_stolen_card"}
    for n in range(2):
        body = event("charge.refund.updated", failed, event_id=f"evt_re_moved_failed_{n}")
        assert (await cf0.deliver(body, sign(body))).status_code == 200
    assert await rows_of(pool, b, "refund_reversal") == [
        (1000, f"sys:stripe_refund_failed:re_moved:{part['lot_id']}")]
    assert await rows_of(pool, a, "refund_reversal") == [(0, "sys:stripe_refund_failed:re_moved")]
    assert (await balance(cf0.admin, a), await balance(cf0.admin, b)) == (0, 2500)
    assert (await verify(pool)).violations == []


async def test_verify_reports_a_transfer_that_lost_its_balance_or_provenance(api: httpx.AsyncClient,
                                                                            pool: AsyncConnectionPool) -> None:
    a, b = await new_account(api), await new_account(api)
    org, key = await organization(api, a, b)
    transfer = (await api.post(f"{ORGS}/{org}/transfers", headers=key, json={
        "from_account_id": a, "to_account_id": b, "amount": 700, "idempotency_key": "v-1"})).json()
    [part] = transfer["lots"]
    assert (await verify(pool)).violations == []
    async with pool.connection() as conn:  # corruptions no API can make: a source relabelled, an amount changed
        await conn.execute("UPDATE credit_lots SET source = 'purchase', priority = 20 WHERE id = %s", (part["lot_id"],))
        await conn.execute("UPDATE transfers SET amount_micros = amount_micros + 1 WHERE id = %s", (transfer["id"],))
    found = {(v.check, v.ids["lot_id"] if "lot_id" in v.ids else v.ids["transfer_id"])
             for v in (await verify(pool)).violations}
    assert found == {("transfer_keeps_provenance", part["lot_id"]), ("transfer_balanced", transfer["id"])}


@pytest.mark.temporal
async def test_a_refused_refund_gives_each_part_back_to_its_own_lot(
        cf0: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient) -> None:
    a, b = await new_account(cf0.admin), await new_account(cf0.admin)
    org, key = await organization(cf0.admin, a, b)
    bought = await buy(cf0, sdk, a, 25)
    [part] = (await move(cf0, org, key, a, b, 2000, "m-1"))["lots"]
    # As in test_refunds: the charge row pointed at an unpaid PaymentIntent, which localstripe refuses to refund.
    unpaid = sdk.v1.payment_intents.create(params={"amount": 2500, "currency": "usd", "payment_method_types": ["card"]})
    async with pool.connection() as conn:
        await conn.execute("UPDATE stripe_charges SET payment_intent_id = %s WHERE account_id = %s", (unpaid.id, a))
    lots_before = (await lots(pool, a), await lots(pool, b))
    resp = await cf0.admin.post("/api/v1/billing/refunds", json={
        "account_id": a, "payment_intent_id": unpaid.id, "credits": 2500, "request_id": "refused"})
    assert (resp.status_code, resp.json()["error"]["code"]) == (422, "payment_request_invalid"), resp.text
    refund_id = resp.json()["error"]["details"]["refund_id"]
    assert (await balance(cf0.admin, a), await balance(cf0.admin, b)) == (500, 2000)
    assert (await lots(pool, a), await lots(pool, b)) == lots_before
    assert await rows_of(pool, a, "refund") == [(-500, f"sys:refund:{refund_id}")]
    assert await rows_of(pool, a, "refund_reversal") == [(500, f"sys:refund_release:{refund_id}")]
    assert await rows_of(pool, b, "refund") == [(-2000, f"sys:refund:{refund_id}:{part['lot_id']}")]
    assert await rows_of(pool, b, "refund_reversal") == [(2000, f"sys:refund_release:{refund_id}:{part['lot_id']}")]
    async with pool.connection() as conn:  # the real PaymentIntent back, for verify's charge checks
        await conn.execute("UPDATE stripe_charges SET payment_intent_id = %s WHERE account_id = %s",
                           (bought["payment_intent_id"], a))
    assert (await verify(pool)).violations == []
