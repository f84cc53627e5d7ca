"""Named credit systems (seed 003) over the HTTP API on a real database: a system is a balance of
its own, funded by grants naming it and spent only by the features mapped to it; the default wallet is untouched."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool
from temporalio.testing import WorkflowEnvironment

from creditflow.api.app import create_app
from creditflow.config import Settings
from creditflow.domain.periods import period_containing
from tests.conftest import ADMIN_KEY, STRIPE_KEY, ledger_snapshot, new_card, skip_time
from tests.support.api import new_account, track
from tests.support.credit_systems import FEATURE, SYSTEM, key_headers, transcription_system
from tests.support.cycle import ANCHOR, start_account
from tests.support.temporal import eventually, ts_env  # noqa: F401 - ts_env: a fixture
from workers.main import build_worker
from workflows.contract import QUERY_STATE, UPDATE_CHANGE_PLAN, AccountState, PlanChange, SubscriptionState


async def grant(api: httpx.AsyncClient, account_id: str, amount: object, key: str,
                system: str | None = SYSTEM) -> httpx.Response:
    body = {"account_id": account_id, "amount": amount, "reason": "included transcription", "idempotency_key": key}
    if system is not None:
        body["credit_system"] = system
    return await api.post("/api/v1/billing/wallet/credit", json=body)


async def balance(api: httpx.AsyncClient, account_id: str) -> dict[str, object]:
    resp = await api.get("/api/v1/billing/balance", params={"account_id": account_id})
    assert resp.status_code == 200, resp.text
    return resp.json()


def system_balance(amount: object, pending: object = 0) -> dict[str, object]:
    return {"credit_system": SYSTEM, "balance": amount, "pending_charges": pending,
            "available": amount - pending, "overage_credit_line": 0,  # type: ignore[operator]
            "available_to_use": amount - pending, "currency": "credits"}  # type: ignore[operator]


async def test_credit_systems_are_created_listed_and_named(api: httpx.AsyncClient) -> None:
    await transcription_system(api)
    again = await api.post("/api/v1/credit-systems", json={"id": SYSTEM, "name": "Transcription credits"})
    assert again.status_code == 200
    assert again.json() == {"id": SYSTEM, "name": "Transcription credits", "default": False, "features": [FEATURE]}
    renamed = await api.post("/api/v1/credit-systems", json={"id": SYSTEM, "name": "Other"})
    assert renamed.status_code == 409 and renamed.json()["error"]["code"] == "credit_system_exists"
    items = (await api.get("/api/v1/credit-systems")).json()["items"]
    assert [(s["id"], s["default"]) for s in items] == [("credits", True), (SYSTEM, False)]
    assert "llm_tokens" in items[0]["features"] and FEATURE not in items[0]["features"]
    assert (await api.get(f"/api/v1/credit-systems/{SYSTEM}")).json()["features"] == [FEATURE]
    unknown = await api.get("/api/v1/credit-systems/image-credits")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_credit_system"
    for bad in ("Upper", "a b", "x\u0000y", "-lead", "x" * 64):
        resp = await api.post("/api/v1/credit-systems", json={"id": bad})
        assert resp.status_code == 422, (bad, resp.text)
    assert [s["id"] for s in (await api.get("/api/v1/credit-systems")).json()["items"]] == ["credits", SYSTEM]
    features = {f["id"]: f["credit_system"] for f in (await api.get("/api/v1/features")).json()["items"]}
    assert features[FEATURE] == SYSTEM and features["llm_tokens"] == "credits"


async def test_a_features_credit_system_is_set_at_creation_and_kept(api: httpx.AsyncClient,
                                                                      database_url: str) -> None:
    await transcription_system(api)
    # Re-pricing without naming the system keeps it.
    repriced = await api.put(f"/api/v1/features/{FEATURE}", json={"channel": "transcription", "unit": "minute",
                                                                   "credits_per_unit": 4})
    assert repriced.status_code == 200 and repriced.json()["credit_system"] == SYSTEM
    before = await ledger_snapshot(database_url)
    moved = await api.put(f"/api/v1/features/{FEATURE}", json={
        "channel": "transcription", "unit": "minute", "credits_per_unit": 5, "credit_system": "credits"})
    assert moved.status_code == 409 and moved.json()["error"]["code"] == "credit_system_fixed"
    into = await api.put("/api/v1/features/llm_tokens", json={
        "channel": "llm", "unit": "token", "credits_per_unit": "0.1", "credit_system": SYSTEM})
    assert into.status_code == 409 and into.json()["error"]["code"] == "credit_system_fixed"
    unknown = await api.put("/api/v1/features/image-renders", json={
        "channel": "image", "unit": "render", "credits_per_unit": 2, "credit_system": "image-credits"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_credit_system"
    based = await api.put("/api/v1/features/transcription-premium", json={
        "channel": "transcription", "unit": "minute", "credits_per_unit": 1, "base_feature_id": "voice_minute",
        "credit_system": SYSTEM})
    assert based.status_code == 422 and based.json()["error"]["param"] == "credit_system"
    assert await ledger_snapshot(database_url) == before
    ids = {f["id"] for f in (await api.get("/api/v1/features")).json()["items"]}
    assert "image-renders" not in ids and "transcription-premium" not in ids


async def test_usage_of_a_mapped_feature_moves_only_its_systems_balance(api: httpx.AsyncClient) -> None:
    await transcription_system(api)
    acc = await new_account(api)
    granted = await grant(api, acc, 10000, "grant-1")
    assert granted.status_code == 200, granted.text
    body = granted.json()
    assert body["credit_system"] == SYSTEM and body["amount"] == 10000 and body["balances"]["balance"] == 10000
    assert body["transaction_id"].startswith("txn_") and body["replayed"] is False
    wallet = await balance(api, acc)
    assert wallet["balance"] == 5000 and wallet["available"] == 5000  # the default wallet: today's fields
    assert wallet["credit_systems"] == [system_balance(10000)]

    # Seed 003: 10 minutes at 3 credits = 30 credits; 10000 -> 9970. The wallet does not move.
    used = await track(api, acc, FEATURE, 10, "minutes-1")
    assert used.status_code == 200, used.text
    body = used.json()
    assert body["allowed"] is True and body["credits_charged"] == 30 and body["credits_per_unit"] == 3
    assert body["balance"] == 9970 and body["credit_system"] == SYSTEM
    wallet = await balance(api, acc)
    assert wallet["balance"] == 5000 and wallet["credit_systems"] == [system_balance(9970)]

    # A default feature never spends the system's credits.
    tokens = (await track(api, acc, "llm_tokens", 100, "tokens-1")).json()
    assert tokens["credits_charged"] == 10 and tokens["balance"] == 4990 and "credit_system" not in tokens
    wallet = await balance(api, acc)
    assert wallet["balance"] == 4990 and wallet["credit_systems"] == [system_balance(9970)]

    # Checks answer with the system's balance; seed 003's /entitled names the system in its balances.
    check = await api.post("/api/v1/billing/check", json={"account_id": acc, "feature_id": FEATURE, "value": 10})
    assert check.status_code == 200
    assert {k: check.json()[k] for k in ("allowed", "code", "credits_required", "credit_system")} == {
        "allowed": True, "code": "ok", "credits_required": 30, "credit_system": SYSTEM}
    assert check.json()["balances"]["available"] == 9970
    plain = (await api.post("/api/v1/billing/check", json={"account_id": acc, "feature_id": "llm_tokens"})).json()
    assert "credit_system" not in plain and plain["balances"]["available"] == 4990
    entitled = await api.post("/api/v1/entitled", json={"customer_id": acc, "feature_id": FEATURE})
    assert entitled.json()["allowed"] is True and entitled.json()["code"] == "feature_found"
    assert entitled.json()["balances"] == [{"feature_id": SYSTEM, "unlimited": False, "balance": 9970}]
    event = await api.post("/api/v1/event", json={"customer_id": acc, "feature_id": FEATURE, "value": 1,
                                                  "idempotency_key": "event-1"})
    assert event.status_code == 200 and event.json()["balance"] == 9967
    assert (await balance(api, acc))["balance"] == 4990
    # The Autumn drop-in reports the balance the feature draws on, under the system's id.
    autumn = await api.post("/api/v1/check", json={"customer_id": acc, "feature_id": FEATURE, "required_balance": 2})
    assert autumn.status_code == 200, autumn.text
    assert (autumn.json()["allowed"], autumn.json()["balance"]["feature_id"],
            autumn.json()["balance"]["current_balance"]) == (True, SYSTEM, 9967)
    autumn_plain = (await api.post("/api/v1/check", json={"customer_id": acc, "feature_id": "llm_tokens"})).json()
    assert (autumn_plain["balance"]["feature_id"], autumn_plain["balance"]["current_balance"]) == ("credits", 4990)
    customer = (await api.get(f"/api/v1/customers/{acc}")).json()
    assert sorted(customer["balances"]) == ["credits", SYSTEM]
    assert (customer["balances"][SYSTEM]["current_balance"], customer["balances"][SYSTEM]["usage"],
            customer["balances"]["credits"]["current_balance"]) == (9967, 33, 4990)
    fresh = await new_account(api)
    empty = (await api.post("/api/v1/check", json={"customer_id": fresh, "feature_id": FEATURE})).json()
    assert (empty["allowed"], empty["balance"]["feature_id"], empty["balance"]["current_balance"]) == (
        False, SYSTEM, 0)

    # An account key sees the same (its own account only).
    headers = await key_headers(api, acc, "billing:read", "usage:write")
    mine = await api.get("/api/v1/billing/balance", headers=headers)
    assert mine.json()["credit_systems"] == [system_balance(9967)]
    own = await api.post("/api/v1/billing/track", headers=headers, json={
        "feature_id": FEATURE, "value": 2, "idempotency_key": "minutes-2"})
    assert own.status_code == 200 and own.json()["balance"] == 9961
    # The account list shows accounts, not their per-system balances.
    listed = (await api.get("/api/v1/accounts", params={"limit": 100})).json()["items"]
    assert [a["id"] for a in listed] == [fresh, acc]


async def test_an_account_without_a_system_balance_is_refused_even_with_wallet_credits(
        api: httpx.AsyncClient, database_url: str) -> None:
    await transcription_system(api)
    acc = await new_account(api)
    before = await ledger_snapshot(database_url)
    refused = await track(api, acc, FEATURE, 1, "minutes-1")
    assert refused.status_code == 402, refused.text
    body = refused.json()
    assert body["code"] == "insufficient_credits" and body["credits_required"] == 3 and body["balance"] == 0
    assert body["credit_system"] == SYSTEM and body["error"]["code"] == "insufficient_credits"
    check = (await api.post("/api/v1/billing/check", json={"account_id": acc, "feature_id": FEATURE})).json()
    assert check["allowed"] is False and check["code"] == "insufficient_credits"
    assert check["balances"]["available"] == 0 and check["credit_system"] == SYSTEM
    hold = await api.post("/api/v1/billing/holds", json={"account_id": acc, "feature_id": FEATURE, "value": 2,
                                                         "idempotency_key": "hold-1"})
    assert hold.status_code == 402 and hold.json()["code"] == "insufficient_credits"
    batch = await api.post("/api/v1/billing/track/batch", json={"events": [
        {"account_id": acc, "feature_id": FEATURE, "value": 1, "idempotency_key": "b-1"}]})
    assert batch.json()["denied"] == 1 and batch.json()["results"][0]["code"] == "insufficient_credits"
    debit = await grant(api, acc, -5, "debit-1")
    assert debit.status_code == 402 and debit.json()["error"]["code"] == "insufficient_credits"
    assert await ledger_snapshot(database_url) == before  # no sub-account, no entry, nothing
    assert "credit_systems" not in await balance(api, acc)

    # 5 credits in the system: 2 minutes (6) is refused whole, 1 minute (3) goes through; the wallet is untouched.
    assert (await grant(api, acc, 5, "grant-1")).status_code == 200
    two = await track(api, acc, FEATURE, 2, "minutes-2")
    assert two.status_code == 402 and two.json()["credits_required"] == 6 and two.json()["balance"] == 5
    one = await track(api, acc, FEATURE, 1, "minutes-3")
    assert one.status_code == 200 and one.json()["balance"] == 2
    wallet = await balance(api, acc)
    assert wallet["balance"] == 5000 and wallet["credit_systems"] == [system_balance(2)]


async def test_retries_are_idempotent_per_system(api: httpx.AsyncClient) -> None:
    await transcription_system(api)
    acc = await new_account(api)
    first = (await grant(api, acc, 100, "grant-1")).json()
    again = (await grant(api, acc, 100, "grant-1")).json()
    assert again["replayed"] is True and again["transaction_id"] == first["transaction_id"]
    other = await grant(api, acc, 200, "grant-1")
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    used = (await track(api, acc, FEATURE, 10, "minutes-1")).json()
    retried = (await track(api, acc, FEATURE, 10, "minutes-1")).json()
    assert retried["replayed"] is True and retried["transaction_id"] == used["transaction_id"]
    assert retried["credits_charged"] == 30 and retried["credit_system"] == SYSTEM
    conflict = await track(api, acc, FEATURE, 11, "minutes-1")
    assert conflict.status_code == 409 and conflict.json()["code"] == "idempotency_conflict"
    batch = await api.post("/api/v1/billing/track/batch", json={"events": [
        {"account_id": acc, "feature_id": FEATURE, "value": 10, "idempotency_key": "minutes-1"},
        {"account_id": acc, "feature_id": FEATURE, "value": 5, "idempotency_key": "minutes-2"},
        {"account_id": acc, "feature_id": "chat_message", "value": 1, "idempotency_key": "chat-1"}]})
    results = batch.json()["results"]
    assert [(r["replayed"], r["credits_charged"], r.get("credit_system")) for r in results] == [
        (True, 30, SYSTEM), (False, 15, SYSTEM), (False, results[2]["credits_charged"], None)]
    wallet = await balance(api, acc)
    assert wallet["credit_systems"] == [system_balance(55)]
    assert wallet["balance"] == 5000 - results[2]["credits_charged"]


async def test_holds_reserve_and_settle_in_their_system(api: httpx.AsyncClient) -> None:
    await transcription_system(api)
    acc = await new_account(api)
    await grant(api, acc, 100, "grant-1")
    held = await api.post("/api/v1/billing/holds", json={"account_id": acc, "feature_id": FEATURE, "value": 5,
                                                         "idempotency_key": "hold-1"})
    assert held.status_code == 201, held.text
    hold = held.json()
    assert hold["held_amount"] == 15 and hold["credit_system"] == SYSTEM and hold["balances"]["available"] == 85
    assert (await balance(api, acc))["credit_systems"] == [system_balance(100, 15)]
    assert (await balance(api, acc))["pending_charges"] == 0
    settled = await api.post(f"/api/v1/billing/holds/{hold['hold_id']}/settle", json={"account_id": acc, "value": 4})
    assert settled.status_code == 200, settled.text
    assert settled.json()["credits_charged"] == 12 and settled.json()["balance"] == 88
    assert settled.json()["credit_system"] == SYSTEM
    twice = await api.post(f"/api/v1/billing/holds/{hold['hold_id']}/settle", json={"account_id": acc, "value": 4})
    assert twice.json()["replayed"] is True and twice.json()["credits_charged"] == 12
    second = (await api.post("/api/v1/billing/holds", json={"account_id": acc, "feature_id": FEATURE, "value": 2,
                                                            "idempotency_key": "hold-2"})).json()
    released = await api.post(f"/api/v1/billing/holds/{second['hold_id']}/release", json={"account_id": acc})
    assert released.status_code == 200 and released.json()["status"] == "released"
    wallet = await balance(api, acc)
    assert wallet["credit_systems"] == [system_balance(88)] and wallet["balance"] == 5000
    # Another tenant cannot settle it.
    other = await new_account(api)
    foreign = await api.post(f"/api/v1/billing/holds/{second['hold_id']}/release", json={"account_id": other})
    assert foreign.status_code == 404 and foreign.json()["error"]["code"] == "unknown_hold"


async def test_bad_input_is_refused_and_changes_nothing(api: httpx.AsyncClient, database_url: str) -> None:
    await transcription_system(api)
    acc = await new_account(api)
    other = await new_account(api)
    await grant(api, acc, 100, "grant-1")
    before = await ledger_snapshot(database_url)
    unknown = await grant(api, acc, 10, "grant-2", system="image-credits")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_credit_system"
    for bad in ("x\u0000y", "a b", ""):
        resp = await grant(api, acc, 10, "grant-3", system=bad)
        assert resp.status_code == 422, (bad, resp.text)
    missing = await grant(api, "acc_" + "0" * 32, 10, "grant-4")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_account"
    fraction = await grant(api, acc, "1.5", "grant-5")
    assert fraction.status_code == 422
    # The sub-account is not an account the API can name.
    sub = await api.get("/api/v1/billing/balance", params={"account_id": f"{acc}.{SYSTEM}"})
    assert sub.status_code == 422 and sub.json()["error"]["code"] == "invalid_id"
    # Another tenant's key can neither spend nor read nor grant this account's system credits.
    headers = await key_headers(api, other, "billing:read", "usage:write", "wallet:credit")
    before = await ledger_snapshot(database_url)
    spend = await api.post("/api/v1/billing/track", headers=headers, json={
        "account_id": acc, "feature_id": FEATURE, "value": 1, "idempotency_key": "steal-1"})
    assert spend.status_code == 403
    read = await api.get("/api/v1/billing/balance", headers=headers, params={"account_id": acc})
    assert read.status_code == 403
    credit = await api.post("/api/v1/billing/wallet/credit", headers=headers, json={
        "account_id": acc, "amount": 10, "reason": "x", "credit_system": SYSTEM, "idempotency_key": "k"})
    assert credit.status_code == 403
    unpriced = await track(api, acc, FEATURE, "0.5", "half-1")  # integer-only minutes: a fraction is refused
    assert unpriced.status_code == 422 and unpriced.json()["code"] == "invalid_quantity"
    assert await ledger_snapshot(database_url) == before
    assert (await balance(api, acc))["credit_systems"] == [system_balance(100)]
    assert "credit_systems" not in await balance(api, other)


async def test_verify_is_clean_with_credit_systems(api: httpx.AsyncClient) -> None:
    await transcription_system(api)
    acc = await new_account(api)
    await grant(api, acc, 50, "grant-1")
    await track(api, acc, FEATURE, 7, "minutes-1")
    await track(api, acc, FEATURE, 20, "minutes-2")  # refused: 60 > 29
    await grant(api, acc, -4, "debit-1")
    held = (await api.post("/api/v1/billing/holds", json={"account_id": acc, "feature_id": FEATURE, "value": 3,
                                                          "idempotency_key": "hold-1"})).json()
    assert held["allowed"] is True
    await track(api, acc, "llm_tokens", 50, "tokens-1")
    assert (await balance(api, acc))["credit_systems"] == [system_balance(25, 9)]
    one = (await api.get("/api/v1/verify", params={"account_id": acc})).json()
    assert one["ok"] is True and one["violations"] == [] and one["accounts_checked"] == 1
    everything = (await api.get("/api/v1/verify")).json()
    assert everything["ok"] is True and everything["violations"] == [] and everything["accounts_checked"] == 1


async def test_each_systems_history_is_listed_apart(api: httpx.AsyncClient) -> None:
    await transcription_system(api)
    acc = await new_account(api)
    await grant(api, acc, 100, "grant-1")
    await track(api, acc, FEATURE, 10, "minutes-1", agent_id="scribe")
    await track(api, acc, "llm_tokens", 100, "tokens-1")
    history = (await api.get("/api/v1/billing/transactions", params={"account_id": acc, "credit_system": SYSTEM}))
    assert history.status_code == 200, history.text
    assert [(t["type"], t["amount"], t["balance_after"]) for t in history.json()["items"]] == [
        ("usage", -30, 70), ("adjustment", 100, 100)]
    assert history.json()["items"][0]["metadata"]["feature_id"] == FEATURE
    wallet = (await api.get("/api/v1/billing/transactions", params={"account_id": acc})).json()
    assert [(t["type"], t["amount"]) for t in wallet["items"]] == [("usage", -10), ("welcome_bonus", 5000)]
    same = (await api.get("/api/v1/billing/transactions", params={"account_id": acc, "credit_system": "credits"}))
    assert same.json() == wallet
    items = (await api.get("/api/v1/billing/usage/items", params={"account_id": acc, "credit_system": SYSTEM})).json()
    assert [(i["feature"], i["credits"], i["agent_id"]) for i in items["items"]] == [(FEATURE, 30, "scribe")]
    rollup = (await api.get("/api/v1/billing/usage", params={"account_id": acc, "credit_system": SYSTEM})).json()
    assert [(r["channel"], r["credits"], r["events"]) for r in rollup["items"]] == [("transcription", 30, 1)]
    unknown = await api.get("/api/v1/billing/transactions", params={"account_id": acc, "credit_system": "nope"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_credit_system"
    bad = await api.get("/api/v1/billing/transactions", params={"account_id": acc, "credit_system": "a\u0000b"})
    assert bad.status_code == 422
    # A fresh account's balance in the system has no history yet.
    fresh = await new_account(api)
    empty = (await api.get("/api/v1/billing/transactions", params={"account_id": fresh, "credit_system": SYSTEM}))
    assert empty.status_code == 200 and empty.json()["items"] == [] and empty.json()["total"] == 0


async def test_concurrent_usage_never_takes_a_system_below_zero(api: httpx.AsyncClient) -> None:
    await transcription_system(api)
    acc = await new_account(api)
    await grant(api, acc, 30, "grant-1")  # ten minutes' worth
    answers = await asyncio.gather(*(track(api, acc, FEATURE, 1, f"minute-{i}") for i in range(25)))
    assert sorted(a.status_code for a in answers) == [200] * 10 + [402] * 15
    wallet = await balance(api, acc)
    assert wallet["credit_systems"] == [system_balance(0)] and wallet["balance"] == 5000
    report = (await api.get("/api/v1/verify", params={"account_id": acc})).json()
    assert report["ok"] is True, report["violations"]


async def test_a_paused_agent_spends_nothing_in_any_system(api: httpx.AsyncClient, pool: AsyncConnectionPool,
                                                           database_url: str) -> None:
    from creditflow.ledger import agents

    await transcription_system(api)
    acc = await new_account(api)
    await grant(api, acc, 100, "grant-1")
    created = await api.post("/api/v1/agents", json={"account_id": acc, "id": "scribe"})
    assert created.status_code == 201, created.text
    first = await track(api, acc, FEATURE, 1, "minutes-1", agent_id="scribe")
    assert first.status_code == 200
    await agents.set_status(pool, acc, "scribe", paused=True, actor="operator", reason="test")
    before = await ledger_snapshot(database_url)
    paused = await track(api, acc, FEATURE, 1, "minutes-2", agent_id="scribe")
    assert (paused.status_code, paused.json()["code"], paused.json()["credit_system"]) == (403, "agent_paused", SYSTEM)
    check = (await api.post("/api/v1/billing/check", json={"account_id": acc, "feature_id": FEATURE,
                                                           "agent_id": "scribe"})).json()
    assert (check["allowed"], check["code"]) == (False, "agent_paused")
    hold = await api.post("/api/v1/billing/holds", json={"account_id": acc, "feature_id": FEATURE, "value": 1,
                                                         "agent_id": "scribe", "idempotency_key": "hold-1"})
    assert (hold.status_code, hold.json()["code"]) == (403, "agent_paused")
    batch = (await api.post("/api/v1/billing/track/batch", json={"events": [
        {"account_id": acc, "feature_id": FEATURE, "value": 1, "agent_id": "scribe", "idempotency_key": "minutes-3"},
        {"account_id": acc, "feature_id": FEATURE, "value": 1, "agent_id": "other", "idempotency_key": "minutes-4"},
    ]})).json()
    assert [r["code"] for r in batch["results"]] == ["agent_paused", "ok"]
    # What it recorded before the pause still replays; the wallet refuses it too, as always.
    replay = await track(api, acc, FEATURE, 1, "minutes-1", agent_id="scribe")
    assert replay.status_code == 200 and replay.json()["replayed"] is True
    wallet = await track(api, acc, "chat_message", 1, "chat-1", agent_id="scribe")
    assert wallet.json()["code"] == "agent_paused"
    after = await ledger_snapshot(database_url)
    assert after["journal"][0] == before["journal"][0] + 1  # only the other agent's event
    assert (await balance(api, acc))["credit_systems"] == [system_balance(94)]


async def test_free_usage_in_a_system_never_granted_is_recorded(api: httpx.AsyncClient) -> None:
    await transcription_system(api)
    free = await api.put("/api/v1/features/transcription-preview", json={
        "channel": "transcription", "unit": "minute", "credits_per_unit": 0, "credit_system": SYSTEM})
    assert free.status_code == 200, free.text
    acc = await new_account(api)
    used = await track(api, acc, "transcription-preview", 5, "preview-1")
    assert used.status_code == 200, used.text
    assert (used.json()["credits_charged"], used.json()["balance"], used.json()["credit_system"]) == (0, 0, SYSTEM)
    again = await track(api, acc, "transcription-preview", 5, "preview-1")
    assert again.json()["replayed"] is True
    hold = await api.post("/api/v1/billing/holds", json={"account_id": acc, "feature_id": "transcription-preview",
                                                         "value": 3, "idempotency_key": "hold-1"})
    assert hold.status_code == 201 and hold.json()["held_amount"] == 0
    assert (await balance(api, acc))["credit_systems"] == [system_balance(0)]
    history = (await api.get("/api/v1/billing/usage/items", params={"account_id": acc, "credit_system": SYSTEM}))
    assert [(i["feature"], i["quantity"], i["credits"]) for i in history.json()["items"]] == [
        ("transcription-preview", 5, 0)]


async def test_a_default_feature_seen_once_costs_no_lookup_on_the_hot_path(
        pool: AsyncConnectionPool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hot path's cost for default-system features is unchanged: once a process has seen a feature, tracking it
    reads nothing more than before (its system is cached; the lookup below would fail the test if called)."""
    from creditflow.ledger import credit_systems, metering
    from creditflow.ledger.accounts import create_account

    acc = (await create_account(pool, name="Acme", billing_email="billing@acme.test")).id
    first = await metering.track(pool, metering.UsageEvent.build(acc, "llm_tokens", 10, "t-1"))
    assert first.allowed and first.credit_system is None

    async def no_lookup(*_: object) -> str:
        raise AssertionError("the feature's credit system was looked up again")

    monkeypatch.setattr(credit_systems, "feature_system", no_lookup)
    second = await metering.track(pool, metering.UsageEvent.build(acc, "llm_tokens", 10, "t-2"))
    batch = await metering.track_batch(pool, [metering.UsageEvent.build(acc, "llm_tokens", 10, "t-3")])
    assert second.allowed and second.charged_micros == 1_000_000 and batch[0].allowed


PLANS = """
currency: USD
plans:
  - id: scribe
    name: Scribe
    monthly_fee_usd: 10
    included_credits: 1000
    included_system_credits:
      transcription-credits: 500
"""


async def system_journal(pool: AsyncConnectionPool, account: str) -> list[tuple[str, int]]:
    async with pool.connection() as conn:
        rows = await (await conn.execute("SELECT type, amount_micros FROM journal WHERE account_id = %s ORDER BY seq",
                                         (f"{account}.{SYSTEM}",))).fetchall()
    return [(r["type"], r["amount_micros"] // 1_000_000) for r in rows]


@pytest.mark.temporal
async def test_a_plan_grants_credits_in_its_system_that_expire_with_the_period(
        ts_env: WorkflowEnvironment, pool: AsyncConnectionPool, database_url: str,  # noqa: F811
        stripe_base: str, sdk: stripe.StripeClient, tmp_path: Path) -> None:
    """Seed 003: "add these credits as a product item within a product, such as 50 credits per month"."""
    (tmp_path / "plans.yaml").write_text(PLANS)
    settings = Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                        welcome_bonus_credits=5000, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                        stripe_api_base=stripe_base, stripe_retry_max_wait_seconds=0.1,
                        plans_path=tmp_path / "plans.yaml")
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://creditflow.test",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as api:
        # The catalog's credit system exists from start-up; a feature is mapped to it.
        assert (await api.get(f"/api/v1/credit-systems/{SYSTEM}")).json()["name"] == "Transcription Credits"
        plans = (await api.get("/api/v1/billing/plans")).json()["items"]
        assert plans[0]["included_system_credits"] == {SYSTEM: 500}
        feature = await api.put(f"/api/v1/features/{FEATURE}", json={
            "channel": "transcription", "unit": "minute", "credits_per_unit": 3, "credit_system": SYSTEM})
        assert feature.status_code == 200, feature.text
        account = await new_account(api)
        attached = await api.post("/api/v1/billing/payment-methods", json={"account_id": account,
                                                                          "payment_method_id": new_card(sdk)})
        assert attached.status_code == 201, attached.text
        queue = f"cs-{account[-8:]}"
        async with build_worker(ts_env.client, pool, settings, task_queue=queue):
            handle = await start_account(ts_env.client, queue, account)
            state: SubscriptionState = await handle.execute_update(
                UPDATE_CHANGE_PLAN, PlanChange(plan_id="scribe", anchor=ANCHOR), result_type=SubscriptionState)
            first = period_containing(ANCHOR, await ts_env.get_current_time())
            wallet = await balance(api, account)
            assert (wallet["balance"], wallet["plan_credits_remaining"]) == (6000, 1000)
            assert wallet["credit_systems"] == [system_balance(500)]
            used = await track(api, account, FEATURE, 10, "minutes-1")
            assert used.json()["balance"] == 470 and used.json()["credit_system"] == SYSTEM
            assert (await balance(api, account))["plan_credits_remaining"] == 1000  # the wallet's plan credits

            await skip_time(ts_env, state.period_end - await ts_env.get_current_time() + timedelta(minutes=1))

            def renewed(s: AccountState) -> bool:
                return s.subscription is not None and s.subscription.period_index == first.index + 1

            await eventually(lambda: handle.query(QUERY_STATE, result_type=AccountState), renewed, timeout=60)
            await eventually(lambda: system_journal(pool, account), lambda rows: len(rows) == 4, timeout=30)
        assert await system_journal(pool, account) == [
            ("plan_grant", 500), ("usage", -30), ("plan_expiry", -470), ("plan_grant", 500)]
        wallet = await balance(api, account)
        assert wallet["credit_systems"] == [system_balance(500)] and wallet["plan_credits_remaining"] == 1000
        report = (await api.get("/api/v1/verify", params={"account_id": account})).json()
        assert report["ok"] is True, report["violations"]


