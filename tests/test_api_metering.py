"""The metering API end to end over HTTP on a real database: exact amounts, idempotency, holds."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import ledger_snapshot
from tests.support.api import balance, new_account, track


async def test_new_account_gets_welcome_bonus(api: httpx.AsyncClient) -> None:
    acc = await new_account(api, external_id="cust-1")
    body = await balance(api, acc)
    assert body["balance"] == 5000 and body["pending_charges"] == 0 and body["available"] == 5000
    assert body["currency"] == "credits" and body["last_updated"].endswith("Z")
    txns = (await api.get("/api/v1/billing/transactions", params={"account_id": acc})).json()
    assert txns["total"] == 1
    [welcome] = txns["items"]
    assert welcome["type"] == "welcome_bonus" and welcome["amount"] == 5000 and welcome["balance_after"] == 5000
    assert welcome["description"] == "Welcome credits for new account"
    again = await api.post("/api/v1/accounts", json={"name": "Acme", "billing_email": "b@acme.test",
                                                     "external_id": "cust-1"})
    assert again.status_code == 409
    error = again.json()["error"]
    assert {k: error[k] for k in ("code", "details", "type")} == {
        "code": "account_exists", "details": {"account_id": acc}, "type": "invalid_request_error"}


async def test_tokens_are_charged_exactly(api: httpx.AsyncClient) -> None:
    acc = await new_account(api)
    resp = await track(api, acc, "llm_tokens", 2450, "evt-1", agent_id="agent_xyz",
                       metadata={"tokens_used": 2450})
    assert resp.status_code == 200
    body = resp.json()
    assert body["allowed"] is True and body["code"] == "ok"
    assert body["credits_charged"] == 245 and body["balance"] == 4755 and body["credits_per_unit"] == 0.1
    assert '"credits_charged":245,' in resp.text  # a whole JSON number, not "245" or 245.0
    # 5 tokens at 0.1 = half a credit: exact, written as a JSON number with its digits.
    half = await track(api, acc, "llm_tokens", 5, "evt-2")
    assert '"credits_charged":0.5,' in half.text and '"balance":4754.5,' in half.text
    txns = (await api.get("/api/v1/billing/transactions", params={"account_id": acc, "type": "usage"})).json()
    assert [t["amount"] for t in txns["items"]] == [-0.5, -245]
    assert txns["items"][1]["metadata"]["agent_id"] == "agent_xyz"
    assert txns["items"][1]["metadata"]["tokens_used"] == 2450
    assert txns["items"][1]["balance_after"] == 4755


async def test_tollfree_is_voice_rate_plus_two(api: httpx.AsyncClient) -> None:
    acc = await new_account(api)
    body = (await track(api, acc, "voice_minute_tollfree", "2.5", "call-1")).json()
    assert body["credits_per_unit"] == 12 and body["credits_charged"] == 30 and body["balance"] == 4970
    # Re-pricing voice moves toll-free with it: the surcharge stays a flat 2/min.
    put = await api.put("/api/v1/features/voice_minute", json={"channel": "voice", "unit": "minute",
                                                               "integer_only": False, "credits_per_unit": 7})
    assert put.status_code == 200 and put.json()["credits_per_unit"] == 7
    body = (await track(api, acc, "voice_minute_tollfree", 1, "call-2")).json()
    assert body["credits_per_unit"] == 9 and body["credits_charged"] == 9


async def test_same_key_replays_different_payload_conflicts(api: httpx.AsyncClient, database_url: str) -> None:
    acc = await new_account(api)
    first = (await track(api, acc, "chat_message", 3, "msg-1")).json()
    snapshot = await ledger_snapshot(database_url)
    replay = await track(api, acc, "chat_message", 3, "msg-1")
    assert replay.status_code == 200
    assert replay.json()["replayed"] is True and replay.json()["transaction_id"] == first["transaction_id"]
    conflict = await track(api, acc, "chat_message", 4, "msg-1")
    assert conflict.status_code == 409 and conflict.json()["code"] == "idempotency_conflict"
    assert await ledger_snapshot(database_url) == snapshot
    assert (await balance(api, acc))["balance"] == 4997


async def test_concurrent_duplicates_have_one_effect(api: httpx.AsyncClient) -> None:
    acc = await new_account(api)
    responses = await asyncio.gather(*[track(api, acc, "voice_minute", 3, "call-dup") for _ in range(10)])
    bodies = [r.json() for r in responses]
    assert all(b["allowed"] for b in bodies)
    assert len({b["transaction_id"] for b in bodies}) == 1
    assert sum(not b["replayed"] for b in bodies) == 1
    assert (await balance(api, acc))["balance"] == 4970


async def test_insufficient_credits_writes_nothing(api: httpx.AsyncClient, database_url: str) -> None:
    acc = await new_account(api)
    snapshot = await ledger_snapshot(database_url)
    resp = await track(api, acc, "voice_minute", 501, "too-long")
    assert resp.status_code == 402
    body = resp.json()
    assert body["allowed"] is False and body["code"] == "insufficient_credits" and body["credits_required"] == 5010
    assert body["error"]["code"] == "insufficient_credits"
    assert await ledger_snapshot(database_url) == snapshot
    # The exact affordable amount is allowed and lands on zero.
    ok = (await track(api, acc, "voice_minute", 500, "exact")).json()
    assert ok["allowed"] and ok["balance"] == 0


async def test_overage_credit_line_allows_negative_down_to_the_line(api: httpx.AsyncClient) -> None:
    acc = await new_account(api, overage_credit_line=1000)
    assert (await balance(api, acc))["available_to_use"] == 6000
    ok = (await track(api, acc, "voice_minute", 590, "big-call")).json()
    assert ok["allowed"] and ok["balance"] == -900
    denied = await track(api, acc, "voice_minute", 11, "over-line")
    assert denied.status_code == 402
    credit = await api.post("/api/v1/billing/wallet/credit", json={
        "account_id": acc, "amount": 2000, "reason": "goodwill", "idempotency_key": "adj-1"})
    assert credit.status_code == 200 and credit.json()["balances"]["balance"] == 1100


async def test_check_writes_nothing_and_reports(api: httpx.AsyncClient, database_url: str) -> None:
    acc = await new_account(api)
    snapshot = await ledger_snapshot(database_url)
    ok = (await api.post("/api/v1/billing/check", json={"account_id": acc, "feature_id": "voice_minute",
                                                        "value": 500})).json()
    assert ok["allowed"] is True and ok["credits_required"] == 5000 and ok["balances"]["available"] == 5000
    no = (await api.post("/api/v1/billing/check", json={"account_id": acc, "feature_id": "voice_minute",
                                                        "value": "500.1"})).json()
    assert no["allowed"] is False and no["code"] == "insufficient_credits"
    unknown = await api.post("/api/v1/billing/check", json={"account_id": acc, "feature_id": "teleportation"})
    assert unknown.status_code == 200 and unknown.json()["allowed"] is False
    assert unknown.json()["code"] == "unknown_feature"
    await api.put("/api/v1/features/video_minute", json={"channel": "video", "unit": "minute",
                                                         "credits_per_unit": 3,
                                                         "effective_at": "2099-01-01T00:00:00Z"})
    snapshot = await ledger_snapshot(database_url)
    unpriced = (await api.post("/api/v1/billing/check", json={"account_id": acc,
                                                              "feature_id": "video_minute"})).json()
    assert unpriced["allowed"] is False and unpriced["code"] == "feature_not_priced"
    assert await ledger_snapshot(database_url) == snapshot


async def test_hold_settle_release_and_expiry(api: httpx.AsyncClient) -> None:
    acc = await new_account(api)
    hold = await api.post("/api/v1/billing/holds", json={"account_id": acc, "feature_id": "voice_minute",
                                                         "value": 10, "idempotency_key": "call-9"})
    assert hold.status_code == 201
    hold_id = hold.json()["hold_id"]
    assert hold.json()["held_amount"] == 100
    body = await balance(api, acc)
    assert (body["balance"], body["pending_charges"], body["available"]) == (5000, 100, 4900)
    settled = await api.post(f"/api/v1/billing/holds/{hold_id}/settle", json={"account_id": acc, "value": "3.5"})
    assert settled.status_code == 200 and settled.json()["credits_charged"] == 35
    again = await api.post(f"/api/v1/billing/holds/{hold_id}/settle", json={"account_id": acc, "value": "3.5"})
    assert again.json()["replayed"] is True and again.json()["transaction_id"] == settled.json()["transaction_id"]
    body = await balance(api, acc)
    assert (body["balance"], body["pending_charges"], body["available"]) == (4965, 0, 4965)

    second = (await api.post("/api/v1/billing/holds", json={"account_id": acc, "feature_id": "voice_minute",
                                                            "value": 20, "idempotency_key": "call-10"})).json()
    released = await api.post(f"/api/v1/billing/holds/{second['hold_id']}/release", json={"account_id": acc})
    assert released.status_code == 200 and released.json()["released"] == 200
    assert (await balance(api, acc))["pending_charges"] == 0

    short = (await api.post("/api/v1/billing/holds", json={"account_id": acc, "feature_id": "voice_minute",
                                                           "value": 5, "idempotency_key": "call-11",
                                                           "ttl_seconds": 1})).json()
    assert (await balance(api, acc))["pending_charges"] == 50
    await asyncio.sleep(1.2)
    body = await balance(api, acc)
    assert (body["pending_charges"], body["available"]) == (0, 4965)
    # The usage happened anyway: a late settle still charges it.
    late = await api.post(f"/api/v1/billing/holds/{short['hold_id']}/settle", json={"account_id": acc, "value": 2})
    assert late.json()["credits_charged"] == 20 and late.json()["balance"] == 4945


async def test_hold_beyond_available_is_refused(api: httpx.AsyncClient, database_url: str) -> None:
    acc = await new_account(api)
    snapshot = await ledger_snapshot(database_url)
    resp = await api.post("/api/v1/billing/holds", json={"account_id": acc, "feature_id": "voice_minute",
                                                         "value": 501, "idempotency_key": "huge-call"})
    assert resp.status_code == 402 and resp.json()["code"] == "insufficient_credits"
    assert await ledger_snapshot(database_url) == snapshot


async def test_usage_items_and_daily_rollups(api: httpx.AsyncClient) -> None:
    acc = await new_account(api)
    await track(api, acc, "voice_minute", "2.5", "u1", agent_id="support")
    await track(api, acc, "voice_minute", 1, "u2", agent_id="sales")
    await track(api, acc, "chat_message", 4, "u3", agent_id="support")
    items = (await api.get("/api/v1/billing/usage/items", params={"account_id": acc})).json()["items"]
    assert sorted((i["channel"], i["feature"], i["quantity"], i["credits"], i["agent_id"]) for i in items) == [
        ("chat", "chat_message", 4, 4, "support"),
        ("voice", "voice_minute", 1, 10, "sales"),
        ("voice", "voice_minute", 2.5, 25, "support"),
    ]
    support = (await api.get("/api/v1/billing/usage/items", params={"account_id": acc,
                                                                    "agent_id": "sales"})).json()["items"]
    assert len(support) == 1
    future = (await api.get("/api/v1/billing/usage/items", params={"account_id": acc,
                                                                   "start": "2099-01-01T00:00:00Z"})).json()
    assert future["items"] == []
    rollups = (await api.get("/api/v1/billing/usage", params={"account_id": acc})).json()["items"]
    assert [(r["channel"], r["quantity"], r["credits"], r["events"]) for r in rollups] == [
        ("chat", 4, 4, 1), ("voice", 3.5, 35, 2)]


async def test_transactions_paginate_with_cursor(api: httpx.AsyncClient) -> None:
    acc = await new_account(api)
    for i in range(5):
        await track(api, acc, "chat_message", 1, f"p{i}")
    first = (await api.get("/api/v1/billing/transactions", params={"account_id": acc, "limit": 4})).json()
    assert first["total"] == 6 and len(first["items"]) == 4 and first["next_cursor"]
    rest = (await api.get("/api/v1/billing/transactions",
                          params={"account_id": acc, "limit": 4, "cursor": first["next_cursor"]})).json()
    assert [t["type"] for t in rest["items"]] == ["usage", "welcome_bonus"] and rest["next_cursor"] is None
    balances_after = [t["balance_after"] for t in first["items"] + rest["items"]]
    assert balances_after == [4995, 4996, 4997, 4998, 4999, 5000]


async def test_batch_track(api: httpx.AsyncClient) -> None:
    a, b = await new_account(api), await new_account(api)
    events = [{"account_id": acc, "feature_id": "chat_message", "value": 1, "idempotency_key": f"b-{acc}-{i}"}
              for i in range(3) for acc in (a, b)]
    events.append({"account_id": a, "feature_id": "voice_minute", "value": 1000, "idempotency_key": "b-huge"})
    resp = await api.post("/api/v1/billing/track/batch", json={"events": events})
    assert resp.status_code == 200
    body = resp.json()
    assert body["allowed"] == 6 and body["denied"] == 1
    assert body["results"][-1]["code"] == "insufficient_credits"
    assert (await balance(api, a))["balance"] == 4997 and (await balance(api, b))["balance"] == 4997


async def test_rate_versions_apply_from_their_effective_time(api: httpx.AsyncClient) -> None:
    acc = await new_account(api)
    await api.put("/api/v1/features/chat_message", json={"channel": "chat", "unit": "message",
                                                         "credits_per_unit": 3, "effective_at": "2099-01-01T00:00:00Z"})
    features = {f["id"]: f for f in (await api.get("/api/v1/features")).json()["items"]}
    assert features["chat_message"]["credits_per_unit"] == 1
    assert features["chat_message"]["scheduled"][0]["credits_per_unit"] == "3.000000"
    assert (await track(api, acc, "chat_message", 1, "r1")).json()["credits_charged"] == 1
    await api.put("/api/v1/features/chat_message", json={"channel": "chat", "unit": "message",
                                                         "credits_per_unit": "1.5"})
    assert (await track(api, acc, "chat_message", 2, "r2")).json()["credits_charged"] == 3
    items = (await api.get("/api/v1/billing/usage/items", params={"account_id": acc})).json()["items"]
    assert sorted(i["credits_per_unit"] for i in items) == [1, 1.5]


@pytest.mark.parametrize("amount", [1000, -300])
async def test_manual_adjustment(api: httpx.AsyncClient, amount: int) -> None:
    acc = await new_account(api)
    resp = await api.post("/api/v1/billing/wallet/credit", json={
        "account_id": acc, "amount": amount, "reason": "support ticket 42", "idempotency_key": "adj"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["balances"]["balance"] == 5000 + amount
    txn = (await api.get("/api/v1/billing/transactions", params={"account_id": acc, "type": "adjustment"})).json()
    assert txn["items"][0]["amount"] == amount and txn["items"][0]["description"] == "support ticket 42"
