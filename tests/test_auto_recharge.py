"""Auto-recharge end to end: the balance watch on the hot path, the outbox relay, the account workflow's
single-flight and policy, ``AutoRechargeWorkflow`` charging localstripe, the ledger credit. Real PostgreSQL,
real Temporal dev server, real localstripe; no mocks. Tests that charge end with the reconciliation: every
succeeded PaymentIntent has exactly one ledger credit and vice versa.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from creditflow.config import Settings
from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.domain.recharge import next_utc_midnight
from tests.conftest import ledger_snapshot
from tests.support.api import balance, bearer, key_for, new_account, track
from tests.support.auto_recharge import (  # noqa: F401 - fixtures
    SETTINGS,
    api,
    recharge_charges,
    recharge_rows,
    relay,
    settings,
)
from tests.support.ledger import assert_invariants
from tests.support.payments import DECLINED_AT_CHARGE, customer_of, intents_of, save_card
from tests.support.temporal import HISTORIES, eventually, record_and_replay, state_of
from workers.relay import OutboxRelay
from workflows.account import AccountWorkflow
from workflows.contract import AccountState, AutoRechargeOutcome, account_workflow_id, auto_recharge_workflow_id

pytestmark = pytest.mark.temporal

RELOAD = "/api/v1/billing/wallet/auto-reload"


# --- helpers ----------------------------------------------------------------------------------------


async def below_events(pool: AsyncConnectionPool, account: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute(
            "SELECT dedup_key, payload FROM outbox WHERE account_id = %s AND kind = 'balance.below_threshold'"
            " ORDER BY id", (account,))).fetchall()


async def notices(pool: AsyncConnectionPool, account: str, prefix: str = "auto_recharge.") -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute(
            "SELECT kind, dedup_key, payload FROM notifications_log WHERE account_id = %s AND kind LIKE %s"
            " ORDER BY id", (account, prefix + "%"))).fetchall()


async def recharge_runs(client: Client, account: str) -> list[Any]:
    """Every ``recharge:{account}:*`` workflow, by sequence number."""
    runs = []
    seq = 1
    while True:
        try:
            runs.append(await client.get_workflow_handle(auto_recharge_workflow_id(account, seq)).describe())
        except Exception:
            return runs
        seq += 1


async def spend(api: httpx.AsyncClient, account: str, messages: int, prefix: str) -> list[httpx.Response]:  # noqa: F811
    """``messages`` concurrent chat messages of 1 credit... in bulk: each event is ``value`` messages."""
    return list(await asyncio.gather(*(track(api, account, "chat_message", 200, f"{prefix}-{n}")
                                       for n in range(messages))))


# --- the balance watch (hot path) -------------------------------------------------------------------


async def test_watch_emits_once_per_crossing(api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:  # noqa: F811
    account = await new_account(api)
    resp = await api.put(SETTINGS, json={"account_id": account, "enabled": True, "threshold": 1000,
                                         "recharge_amount": 1000})
    assert resp.status_code == 200, resp.text

    # 20 concurrent events of 200 credits: 5000 -> 1000 exactly (not below), then one more crosses.
    assert all(r.status_code == 200 for r in await spend(api, account, 20, "a"))
    assert await below_events(pool, account) == []
    assert (await track(api, account, "chat_message", 1, "b-1")).status_code == 200
    [event] = await below_events(pool, account)
    assert event["payload"] == {"threshold_micros": 1000 * MICROS_PER_CREDIT,
                                "available_micros": 999 * MICROS_PER_CREDIT, "balance_micros": 999 * MICROS_PER_CREDIT}
    assert event["dedup_key"].startswith(f"below:{account}:{1000 * MICROS_PER_CREDIT}:")
    # Further usage below the threshold is not a new crossing.
    assert (await track(api, account, "chat_message", 10, "b-2")).status_code == 200
    assert len(await below_events(pool, account)) == 1
    # Back above (a manual credit), then below again: a second crossing. A hold counts (available).
    credit = await api.post("/api/v1/billing/wallet/credit", json={
        "account_id": account, "amount": 500, "reason": "goodwill", "idempotency_key": "g-1"})
    assert credit.status_code == 200, credit.text
    hold = await api.post("/api/v1/billing/holds", json={"account_id": account, "feature_id": "voice_minute",
                                                         "value": 50, "idempotency_key": "h-1"})
    assert hold.status_code == 201, hold.text
    events = await below_events(pool, account)
    assert [e["payload"]["available_micros"] for e in events] == [999 * MICROS_PER_CREDIT, 989 * MICROS_PER_CREDIT]
    await assert_invariants(pool)


async def test_disabled_settings_do_not_watch(api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:  # noqa: F811
    account = await new_account(api)
    await api.put(SETTINGS, json={"account_id": account, "enabled": True, "threshold": 4000, "recharge_amount": 1000})
    off = await api.put(SETTINGS, json={"account_id": account, "enabled": False})
    assert off.json()["status"] == "disabled" and off.json()["threshold"] == 4000
    assert (await track(api, account, "chat_message", 2000, "x")).status_code == 200
    assert await below_events(pool, account) == []


async def test_enabling_below_the_threshold_asks_at_once(api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:  # noqa: F811
    account = await new_account(api)
    resp = await api.put(SETTINGS, json={"account_id": account, "enabled": True, "threshold": 6000,
                                         "recharge_amount": 1000})
    assert resp.status_code == 200
    [event] = await below_events(pool, account)
    assert event["payload"] == {"threshold_micros": 6000 * MICROS_PER_CREDIT,
                                "available_micros": 5000 * MICROS_PER_CREDIT, "source": "settings"}


# --- the settings API -------------------------------------------------------------------------------


async def test_settings_in_credits_and_in_usd(api: httpx.AsyncClient, sdk: stripe.StripeClient) -> None:  # noqa: F811
    account = await new_account(api)
    writer = bearer(await key_for(api, account, "billing:write", "usage:write", "payments:write"))
    empty = await api.get(SETTINGS, headers=writer)
    assert empty.status_code == 200
    nulls = dict.fromkeys(("threshold", "recharge_amount", "threshold_usd", "amount_usd", "payment_method_id",
                           "disabled_reason", "last_attempt_at", "last_status", "last_error", "updated_at"))
    assert empty.json() == {"account_id": account, "enabled": False, "status": "not_configured", **nulls,
                            "consecutive_failures": 0, "max_recharges_per_day": 10, "max_consecutive_failures": 3}

    card = await save_card(api, sdk, account)
    resp = await api.post(SETTINGS, headers=writer, json={"enabled": True, "threshold": 1000,
                                                          "recharge_amount": 10000, "payment_method_id": card})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert {k: body[k] for k in ("enabled", "status", "threshold", "recharge_amount", "threshold_usd", "amount_usd",
                                 "payment_method_id", "disabled_reason")} == {
        "enabled": True, "status": "active", "threshold": 1000, "recharge_amount": 10000, "threshold_usd": 10,
        "amount_usd": 100, "payment_method_id": card, "disabled_reason": None}

    # The prepaid-wallet document's shape: PUT /billing/wallet/auto-reload with thresholdUsd / amountUsd.
    reload = await api.put(RELOAD, headers=writer, json={"enabled": True, "thresholdUsd": 20, "amountUsd": "50.5"})
    assert reload.status_code == 200, reload.text
    got = json.loads((await api.get(RELOAD, headers=writer)).text, parse_float=Decimal)
    assert (got["threshold"], got["recharge_amount"], got["threshold_usd"], got["amount_usd"],
            got["payment_method_id"]) == (2000, 5050, 20, Decimal("50.5"), None)


async def test_bad_settings_change_nothing(api: httpx.AsyncClient, database_url: str,  # noqa: F811
                                           sdk: stripe.StripeClient) -> None:
    account = await new_account(api)
    other = await new_account(api)
    others_card = await save_card(api, sdk, other)
    await save_card(api, sdk, account)
    writer = bearer(await key_for(api, account, "billing:write", "usage:write", "payments:write"))
    reader = bearer(await key_for(api, account, "billing:read"))
    ok = {"enabled": True, "threshold": 1000, "recharge_amount": 1000}
    await api.put(SETTINGS, headers=writer, json=ok)
    before = await ledger_snapshot(database_url)
    settings_before = (await api.get(SETTINGS, headers=writer)).json()
    cases: list[tuple[dict[str, Any], dict[str, Any], int, str]] = [
        (writer, {**ok, "threshold": -1}, 422, "amount_out_of_range"),
        (writer, {**ok, "threshold": 0}, 422, "amount_out_of_range"),
        (writer, {**ok, "threshold": "12.5"}, 422, "invalid_amount"),
        (writer, {**ok, "threshold": True}, 422, "validation_error"),
        (writer, {**ok, "threshold": "lots"}, 422, "validation_error"),
        (writer, {**ok, "recharge_amount": 100}, 422, "amount_out_of_range"),  # under $5
        (writer, {**ok, "recharge_amount": 10**12}, 422, "amount_out_of_range"),
        (writer, {**ok, "threshold_usd": 10}, 422, "validation_error"),  # both units
        (writer, {**ok, "surprise": 1}, 422, "validation_error"),
        (writer, {"threshold": 1000}, 422, "validation_error"),  # enabled missing
        (writer, {**ok, "payment_method_id": "pm_nope"}, 404, "unknown_payment_method"),
        (writer, {**ok, "payment_method_id": others_card}, 404, "unknown_payment_method"),
        (writer, {**ok, "account_id": other}, 403, "forbidden"),
        (reader, ok, 403, "insufficient_scope"),
        ({"Authorization": "Bearer cf_sk_wrong"}, ok, 401, "unauthorized"),
    ]
    for headers, body, status, code in cases:
        for path in (SETTINGS, RELOAD):
            resp = await api.put(path, headers=headers, json=body)
            assert (resp.status_code, resp.json().get("error", {}).get("code")) == (status, code), (body, resp.text)
    admin_missing = await api.put(SETTINGS, json=ok)  # an admin key must name the account
    assert admin_missing.json()["error"]["code"] == "validation_error"
    unknown = await api.put(SETTINGS, json={**ok, "account_id": "acc_" + "0" * 32})
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "unknown_account")
    assert await ledger_snapshot(database_url) == before
    assert (await api.get(SETTINGS, headers=writer)).json() == settings_before


# --- recharges through the workflows ----------------------------------------------------------------


async def test_crossing_recharges_once(api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient,  # noqa: F811
                                       temporal_client: Client, relay: OutboxRelay) -> None:  # noqa: F811
    account = await new_account(api)
    card = await save_card(api, sdk, account)
    await api.put(SETTINGS, json={"account_id": account, "enabled": True, "threshold": 1000, "recharge_amount": 2000})

    # 21 concurrent events of 200 credits: 5000 -> 800, crossing 1000 once.
    assert all(r.status_code == 200 for r in await spend(api, account, 21, "use"))
    [row] = await eventually(lambda: recharge_rows(pool, account), lambda rows: len(rows) == 1, timeout=30)
    [pi] = [p for p in intents_of(sdk, await customer_of(pool, account)) if p.status == "succeeded"]
    assert (pi.amount, pi.payment_method) == (2000, card)
    assert row["amount_micros"] == 2000 * MICROS_PER_CREDIT
    assert row["balance_after_micros"] == 2800 * MICROS_PER_CREDIT
    assert row["idempotency_key"] == f"sys:topup:{pi.id}"
    assert row["description"] == f"Stripe Payment Intent {pi.id} via Auto Recharge call"
    assert (await balance(api, account))["balance"] == 2800

    txns = (await api.get("/api/v1/billing/transactions", params={"account_id": account, "type": "auto_recharge"}
                          )).json()["items"]
    assert [(t["type"], t["amount"], t["balance_after"], t["metadata"]["payment_intent_id"]) for t in txns] == [
        ("auto_recharge", 2000, 2800, pi.id)]
    [charge] = await recharge_charges(pool, account)
    assert (charge["request_id"], charge["status"], charge["payment_intent_id"]) == ("recharge-1", "succeeded", pi.id)
    outcome = await asyncio.wait_for(temporal_client.get_workflow_handle(
        auto_recharge_workflow_id(account, 1), result_type=AutoRechargeOutcome).result(), 20)
    assert (outcome.status, outcome.payment_intent_id, outcome.transaction_id) == ("succeeded", pi.id, txns[0]["id"])
    [run] = await recharge_runs(temporal_client, account)
    assert run.id == auto_recharge_workflow_id(account, 1) and run.status == WorkflowExecutionStatus.COMPLETED
    state: AccountState = await eventually(lambda: state_of(temporal_client, account),
                                           lambda s: s.recharge.last_status == "succeeded")
    assert (state.recharge.seq, state.recharge.consecutive_failures, state.recharge_in_flight) == (1, 0, None)
    [receipt] = await notices(pool, account)
    assert (receipt["kind"], receipt["payload"]["credits"], receipt["payload"]["payment_intent_id"]) == (
        "auto_recharge.succeeded", 2000, pi.id)
    got = (await eventually(lambda: api.get(SETTINGS, params={"account_id": account}),
                            lambda r: r.json()["last_status"] is not None)).json()
    assert (got["last_status"], got["consecutive_failures"], got["enabled"]) == ("succeeded", 0, True)
    await assert_invariants(pool)
    await record_and_replay(temporal_client, run.id, "recharge_v1_succeeded")
    # The account workflow's history (still running) with its child recharge replays too.
    history = await temporal_client.get_workflow_handle(account_workflow_id(account)).fetch_history()
    result = await Replayer(workflows=[AccountWorkflow], data_converter=pydantic_data_converter).replay_workflow(
        history)
    assert result.replay_failure is None
    path = HISTORIES / "account_workflow_v2_auto_recharge.json"
    if not path.exists() or os.environ.get("CREDITFLOW_RECORD_HISTORIES") == "1":
        path.write_text(history.to_json())


async def test_declining_card_backs_off_then_disables(api: httpx.AsyncClient, pool: AsyncConnectionPool,  # noqa: F811
                                                      sdk: stripe.StripeClient, temporal_client: Client,
                                                      relay: OutboxRelay) -> None:  # noqa: F811
    account = await new_account(api)
    await save_card(api, sdk, account, DECLINED_AT_CHARGE)
    await api.put(SETTINGS, json={"account_id": account, "enabled": True, "threshold": 1000, "recharge_amount": 2000})

    assert all(r.status_code == 200 for r in await spend(api, account, 21, "use"))
    got = await eventually(lambda: api.get(SETTINGS, params={"account_id": account}),
                           lambda r: r.json()["status"] == "disabled", timeout=60)
    assert (got.json()["enabled"], got.json()["disabled_reason"], got.json()["consecutive_failures"]) == (
        False, "too_many_failures", 3)

    runs = await recharge_runs(temporal_client, account)
    assert [r.id for r in runs] == [auto_recharge_workflow_id(account, n) for n in (1, 2, 3)]
    for earlier, later in zip(runs, runs[1:], strict=False):  # one at a time, never overlapping
        assert earlier.close_time is not None and earlier.close_time <= later.start_time
    assert [c["status"] for c in await recharge_charges(pool, account)] == ["failed"] * 3
    assert [c["failure_code"] for c in await recharge_charges(pool, account)] == ["card_declined"] * 3
    assert await recharge_rows(pool, account) == []
    assert [p for p in intents_of(sdk, await customer_of(pool, account)) if p.status == "succeeded"] == []
    kinds = [n["kind"] for n in await eventually(lambda: notices(pool, account), lambda ns: len(ns) == 4)]
    assert kinds == ["auto_recharge.failed"] * 3 + ["auto_recharge.disabled"]
    assert (await balance(api, account))["balance"] == 800

    # Disabled means no watch: more usage emits nothing new.
    before = len(await below_events(pool, account))
    await api.post("/api/v1/billing/wallet/credit", json={"account_id": account, "amount": 1000, "reason": "x",
                                                          "idempotency_key": "c-1"})
    assert (await track(api, account, "chat_message", 1500, "after")).status_code == 200
    assert len(await below_events(pool, account)) == before

    # Saving the settings again re-enables with a clean slate.
    again = await api.put(SETTINGS, json={"account_id": account, "enabled": True, "threshold": 1000,
                                          "recharge_amount": 2000})
    assert (again.json()["status"], again.json()["consecutive_failures"], again.json()["disabled_reason"]) == (
        "active", 0, None)
    await assert_invariants(pool)
    await record_and_replay(temporal_client, runs[0].id, "recharge_v1_declined")


async def test_daily_cap_stops_attempts(api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient,  # noqa: F811
                                        temporal_client: Client, temporal_settings: Settings) -> None:
    # A worker (and relay) of their own with a cap of 2 attempts a day, before 5 failures could disable it.
    capped = temporal_settings.model_copy(update={
        "auto_recharge_max_per_day": 2, "auto_recharge_max_consecutive_failures": 5,
        "temporal_task_queue": temporal_settings.temporal_task_queue + "-capped"})
    from workers.main import build_worker

    account = await new_account(api)
    await save_card(api, sdk, account, DECLINED_AT_CHARGE)
    async with build_worker(temporal_client, pool, capped):
        relay = OutboxRelay(pool, temporal_client, capped)
        task = asyncio.create_task(relay.run())
        try:
            await api.put(SETTINGS, json={"account_id": account, "enabled": True, "threshold": 6000,
                                          "recharge_amount": 2000})
            state = await eventually(lambda: state_of(temporal_client, account),
                                     lambda s: s.recharge_reason == "daily_cap_reached", timeout=30)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert state.recharge_wake_at == next_utc_midnight(datetime.now(UTC))
    assert (state.recharge.seq, state.recharge.attempts_today, state.recharge.consecutive_failures) == (2, 2, 2)
    assert len(await recharge_runs(temporal_client, account)) == 2
    found = await eventually(lambda: notices(pool, account), lambda ns: len(ns) == 3)
    assert [n["kind"] for n in found] == ["auto_recharge.failed", "auto_recharge.failed",
                                          "auto_recharge.daily_cap_reached"]
    got = (await api.get(SETTINGS, params={"account_id": account})).json()
    assert (got["enabled"], got["consecutive_failures"], got["last_error"]) == (True, 2, "card_declined")


async def test_no_saved_card_fails_clearly(api: httpx.AsyncClient, pool: AsyncConnectionPool,  # noqa: F811
                                           sdk: stripe.StripeClient, relay: OutboxRelay) -> None:  # noqa: F811
    account = await new_account(api)
    await api.put(SETTINGS, json={"account_id": account, "enabled": True, "threshold": 6000, "recharge_amount": 2000})
    found = await eventually(lambda: notices(pool, account), lambda ns: len(ns) == 4, timeout=30)
    assert [n["kind"] for n in found] == ["auto_recharge.failed"] * 3 + ["auto_recharge.disabled"]
    assert [(n["payload"]["error_code"], n["payload"]["seq"], n["payload"]["consecutive_failures"])
            for n in found] == [("no_payment_method", 1, 1), ("no_payment_method", 2, 2),
                                ("no_payment_method", 3, 3), ("no_payment_method", 3, 3)]
    assert await recharge_charges(pool, account) == []
    assert intents_of(sdk, await customer_of(pool, account)) == []
    got = (await api.get(SETTINGS, params={"account_id": account})).json()
    assert (got["status"], got["disabled_reason"], got["last_error"]) == ("disabled", "too_many_failures",
                                                                          "no_payment_method")
    assert (await balance(api, account))["balance"] == 5000
