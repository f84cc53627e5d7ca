"""Low-balance alerts and the daily-usage notification threshold: the settings API (round trip, bad input and
tenants: nothing changes on a refusal), the balance watch on the hot path (one outbox row per threshold and
crossing, re-armed above), and the alert activities on real channels (aiosmtpd, HTTP receivers): each channel
once per event, however often the activity runs, with the received bodies asserted exactly."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker

from activities.alerts import (
    AlertActivities,
    BalanceAlertInput,
    BalanceAlertsResult,
    DailyUsageAlertInput,
    alert_dedup_key,
)
from creditflow.config import Settings
from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.notify.service import event_id
from tests.alerts_probe_workflow import AlertsProbeWorkflow
from tests.conftest import ledger_snapshot
from tests.receivers import http_receiver, smtp_server
from tests.support.api import bearer, key_for, new_account, track
from tests.support.ledger import assert_invariants
from tests.support.notifications import FOOTER, configured, readme_verifier, set_channels

ALERTS = "/api/v1/billing/alerts"
AUTO_RECHARGE = "/api/v1/billing/auto-recharge"
M = MICROS_PER_CREDIT
SEED = {"alerts": [{"threshold": 5000, "channels": ["email", "slack"]},
                   {"threshold": 1000, "channels": ["email", "slack", "sms"]}]}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The receivers of these tests are plain-http servers on 127.0.0.1, which production settings refuse."""
    return settings.model_copy(update={"notify_allow_http_urls": True, "notify_allow_private_urls": True})


# --- helpers ----------------------------------------------------------------------------------------------------


async def outbox_rows(pool: AsyncConnectionPool, account: str, kind: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute(
            "SELECT dedup_key, payload FROM outbox WHERE account_id = %s AND kind = %s ORDER BY id",
            (account, kind))).fetchall()


async def watch_of(pool: AsyncConnectionPool, account: str) -> tuple[list[int], int | None]:
    """The hot path's view: the watched thresholds and the daily-usage threshold on the balances row."""
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT watch_below_micros, daily_usage_alert_micros FROM balances WHERE account_id = %s",
            (account,))).fetchone()
    assert row is not None
    return list(row["watch_below_micros"]), row["daily_usage_alert_micros"]


async def alert_tables(database_url: str) -> tuple[Any, ...]:
    """Everything a refused request must leave as it was, besides the ledger."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        alerts = await (await conn.execute("SELECT * FROM balance_alerts ORDER BY account_id, threshold_micros")
                        ).fetchall()
        watches = await (await conn.execute(
            "SELECT account_id, watch_below_micros, daily_usage_alert_micros, day_spent_micros FROM balances"
            " ORDER BY account_id")).fetchall()
        outbox = await (await conn.execute("SELECT count(*) FROM outbox")).fetchone()
    return alerts, watches, outbox


async def spend(api: httpx.AsyncClient, account: str, events: int, credits: int, prefix: str) -> None:
    """``events`` concurrent chat events of ``credits`` credits each (chat_message is 1 credit)."""
    answers = await asyncio.gather(*(track(api, account, "chat_message", credits, f"{prefix}-{n}")
                                     for n in range(events)))
    assert all(r.status_code == 200 and r.json()["allowed"] for r in answers), [r.text for r in answers]


async def credit(api: httpx.AsyncClient, account: str, amount: int, key: str) -> None:
    resp = await api.post("/api/v1/billing/wallet/credit", json={
        "account_id": account, "amount": amount, "reason": "goodwill", "idempotency_key": key})
    assert resp.status_code == 200, resp.text


def alert_view(threshold: int, channels: list[str], stamps: dict[str, Any], *, enabled: bool = True,
               armed: bool = True) -> dict[str, Any]:
    return {"threshold": threshold, "channels": channels, "enabled": enabled, "armed": armed, **stamps}


def stamps_of(body: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {a["threshold"]: {"created_at": a["created_at"], "updated_at": a["updated_at"]} for a in body["alerts"]}


# --- the settings API -------------------------------------------------------------------------------------------


async def test_alert_settings_round_trip(api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    account = await new_account(api)
    writer = bearer(await key_for(api, account, "billing:write", "usage:write", "payments:write"))
    reader = bearer(await key_for(api, account, "billing:read"))
    empty = await api.get(ALERTS, headers=reader)
    assert empty.status_code == 200
    assert empty.text == f'{{"account_id":"{account}","alerts":[],"daily_usage_threshold":null,"max_alerts":10}}'

    # The seed's request, as documented (POST, no account_id with an account key).
    saved = await api.post(ALERTS, headers=writer, json=SEED)
    assert saved.status_code == 200, saved.text
    body = saved.json()
    stamps = stamps_of(body)
    assert body == {"account_id": account, "alerts": [
        alert_view(5000, ["email", "slack"], stamps[5000]),  # 5000 available: at the threshold is armed
        alert_view(1000, ["email", "slack", "sms"], stamps[1000])], "daily_usage_threshold": None, "max_alerts": 10}
    assert '"threshold":5000,' in saved.text and stamps[5000]["created_at"].endswith("Z")
    assert (await api.get(ALERTS, headers=reader)).json() == body
    assert await watch_of(pool, account) == ([1000 * M, 5000 * M], None)

    # PUT replaces the list: 5000 removed, 1000 changed (keeps its created_at), 250 added disabled; channels
    # come back in one order whatever the request's; the daily-usage threshold is set.
    changed = await api.put(ALERTS, headers=writer, json={
        "alerts": [{"threshold": "250", "channels": ["sms"], "enabled": False},
                   {"threshold": 1000, "channels": ["webhook", "email"]}],
        "daily_usage_threshold": 300})
    assert changed.status_code == 200, changed.text
    new_stamps = stamps_of(changed.json())
    assert new_stamps[1000]["created_at"] == stamps[1000]["created_at"]
    assert new_stamps[1000]["updated_at"] >= stamps[1000]["updated_at"]
    assert changed.json() == {"account_id": account, "alerts": [
        alert_view(1000, ["email", "webhook"], new_stamps[1000]),
        alert_view(250, ["sms"], new_stamps[250], enabled=False, armed=False)],
        "daily_usage_threshold": 300, "max_alerts": 10}
    assert await watch_of(pool, account) == ([1000 * M], 300 * M)  # a disabled alert is not watched

    # The same list again changes nothing (not even updated_at); the daily threshold, absent, is kept.
    again = await api.put(ALERTS, headers=writer, json={
        "alerts": [{"threshold": 1000, "channels": ["email", "webhook"]},
                   {"threshold": 250, "channels": ["sms"], "enabled": False}]})
    assert again.json() == changed.json()
    only_daily = await api.post(ALERTS, headers=writer, json={"daily_usage_threshold": None})
    assert only_daily.json() == {**changed.json(), "daily_usage_threshold": None}
    assert await watch_of(pool, account) == ([1000 * M], None)

    # The watch is the union with auto-recharge's threshold (one entry where they meet); admins name the account.
    recharge = await api.put(AUTO_RECHARGE, json={"account_id": account, "enabled": True, "threshold": 2000,
                                                  "recharge_amount": 1000})
    assert recharge.status_code == 200, recharge.text
    both = await api.put(ALERTS, json={"account_id": account, "alerts": [
        {"threshold": 2000, "channels": ["email"]}, {"threshold": 700, "channels": ["email"]}]})
    assert both.status_code == 200, both.text
    assert await watch_of(pool, account) == ([700 * M, 2000 * M], None)
    cleared = await api.put(ALERTS, json={"account_id": account, "alerts": []})
    assert cleared.json()["alerts"] == []
    assert await watch_of(pool, account) == ([2000 * M], None)
    off = await api.put(AUTO_RECHARGE, json={"account_id": account, "enabled": False})
    assert off.status_code == 200
    assert await watch_of(pool, account) == ([], None)
    admin_view = await api.get(ALERTS, params={"account_id": account})
    assert admin_view.json() == cleared.json()


async def test_bad_alert_settings_change_nothing(api: httpx.AsyncClient, database_url: str) -> None:
    account = await new_account(api)
    other = await new_account(api)
    writer = bearer(await key_for(api, account, "billing:write", "usage:write", "payments:write"))
    reader = bearer(await key_for(api, account, "billing:read"))
    ok = {"alerts": [{"threshold": 3000, "channels": ["email"]}]}
    assert (await api.put(ALERTS, headers=writer, json={**ok, "daily_usage_threshold": 100})).status_code == 200
    before = (await ledger_snapshot(database_url), await alert_tables(database_url))
    settings_before = (await api.get(ALERTS, headers=reader)).json()

    def one(**alert: Any) -> dict[str, Any]:
        return {"alerts": [{"threshold": 4000, "channels": ["email"], **alert}]}

    eleven = {"alerts": [{"threshold": 100 * (n + 1), "channels": ["email"]} for n in range(11)]}
    cases: list[tuple[dict[str, str], dict[str, Any], int, str]] = [
        (writer, one(threshold=-1), 422, "amount_out_of_range"),
        (writer, one(threshold=0), 422, "amount_out_of_range"),
        (writer, one(threshold=10**7 + 1), 422, "amount_out_of_range"),
        (writer, one(threshold="12.5"), 422, "invalid_amount"),
        (writer, one(threshold=1.5), 422, "invalid_amount"),  # parsed exactly, not whole credits
        (writer, one(threshold=True), 422, "validation_error"),
        (writer, one(threshold="lots"), 422, "validation_error"),
        (writer, one(threshold=None), 422, "validation_error"),
        (writer, one(channels=[]), 422, "validation_error"),
        (writer, one(channels=["fax"]), 422, "validation_error"),
        (writer, one(channels=["email", "email"]), 422, "validation_error"),
        (writer, one(channels="email"), 422, "validation_error"),
        (writer, one(enabled="maybe"), 422, "validation_error"),
        (writer, one(surprise=1), 422, "validation_error"),
        (writer, {"alerts": [{"channels": ["email"]}]}, 422, "validation_error"),
        (writer, {"alerts": [{"threshold": 4000, "channels": ["email"]}, {"threshold": "4000", "channels": ["sms"]}]},
         422, "validation_error"),  # one threshold twice
        (writer, {"alerts": [{"threshold": 4000, "channels": ["email"]}, {"threshold": 0, "channels": ["sms"]}]},
         422, "amount_out_of_range"),  # the first alert is not saved either
        (writer, eleven, 422, "validation_error"),
        (writer, {"alerts": None}, 422, "validation_error"),
        (writer, {"alerts": "all"}, 422, "validation_error"),
        (writer, {}, 422, "validation_error"),
        (writer, {**ok, "daily_usage_threshold": 0}, 422, "amount_out_of_range"),
        (writer, {**ok, "daily_usage_threshold": "0.5"}, 422, "invalid_amount"),
        (writer, {**ok, "daily_usage_threshold": False}, 422, "validation_error"),
        (writer, {**ok, "surprise": 1}, 422, "validation_error"),
        (writer, {**ok, "account_id": other}, 403, "forbidden"),
        (reader, ok, 403, "insufficient_scope"),
        ({"Authorization": "Bearer cf_sk_wrong"}, ok, 401, "unauthorized"),
        ({}, ok, 422, "validation_error"),  # the admin key must name the account
        ({}, {**ok, "account_id": "acc_" + "0" * 32}, 404, "unknown_account"),
        ({}, {**ok, "account_id": "not-an-id"}, 422, "invalid_id"),
    ]
    for headers, body, status, code in cases:
        for method in ("PUT", "POST"):
            resp = await api.request(method, ALERTS, headers=headers, json=body)
            assert (resp.status_code, resp.json().get("error", {}).get("code")) == (status, code), (body, resp.text)
    problem = (await api.put(ALERTS, headers=writer, json=one(channels=["fax"]))).json()["error"]["details"]
    assert problem["problems"][0]["field"] == "alerts.0.channels.0"
    problem = (await api.put(ALERTS, headers=writer, json=one(threshold=0))).json()["error"]["details"]
    assert problem == {"problems": [{"field": "alerts.0.threshold",
                                     "message": "threshold must be between 1 and 10,000,000 credits"}]}

    peek = await api.get(ALERTS, headers=reader, params={"account_id": other})
    assert (peek.status_code, peek.json()["error"]["code"]) == (403, "forbidden")
    admin_missing = await api.get(ALERTS)
    assert (admin_missing.status_code, admin_missing.json()["error"]["code"]) == (422, "validation_error")
    assert (await ledger_snapshot(database_url), await alert_tables(database_url)) == before
    assert (await api.get(ALERTS, headers=reader)).json() == settings_before


# --- the balance watch on the hot path ----------------------------------------------------------------------------


async def test_each_alert_fires_once_per_crossing_and_rearms(api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    account = await new_account(api)
    await credit(api, account, 1000, "c-1")  # 6000: both seed thresholds armed
    assert (await api.post(ALERTS, json={"account_id": account, **SEED})).status_code == 200

    # 20 concurrent events of 250 credits: 6000 -> 1000 exactly. 5000 is crossed once (by the event that took
    # the balance from 5000 to 4750: events are serialized per account); 1000 is reached, not crossed.
    await spend(api, account, 20, 250, "a")
    [first] = await outbox_rows(pool, account, "balance.below_threshold")
    assert first["payload"] == {"threshold_micros": 5000 * M, "available_micros": 4750 * M, "balance_micros": 4750 * M}
    assert first["dedup_key"].startswith(f"below:{account}:{5000 * M}:")
    view = (await api.get(ALERTS, params={"account_id": account})).json()
    assert [(a["threshold"], a["armed"]) for a in view["alerts"]] == [(5000, False), (1000, True)]

    assert (await track(api, account, "chat_message", 1, "one")).status_code == 200  # 999: crosses 1000
    await spend(api, account, 5, 10, "b")  # further down: no new crossing
    rows = await outbox_rows(pool, account, "balance.below_threshold")
    assert [r["payload"] for r in rows[1:]] == [
        {"threshold_micros": 1000 * M, "available_micros": 999 * M, "balance_micros": 999 * M}]

    # Back above both (a credit), then 20 concurrent events down through 5000 again: one more row, for 5000.
    await credit(api, account, 5040, "c-2")  # 949 + 5040 = 5989
    await spend(api, account, 20, 100, "c")  # 5989 -> 3989, crossing 5000 at 4989
    rows = await outbox_rows(pool, account, "balance.below_threshold")
    assert [(r["payload"]["threshold_micros"], r["payload"]["available_micros"]) for r in rows] == [
        (5000 * M, 4750 * M), (1000 * M, 999 * M), (5000 * M, 4989 * M)]
    assert len({r["dedup_key"] for r in rows}) == 3

    # A hold lowers the available balance: it crosses too (alerts watch what can be spent).
    hold = await api.post("/api/v1/billing/holds", json={"account_id": account, "feature_id": "voice_minute",
                                                         "value": 300, "idempotency_key": "h-1"})
    assert hold.status_code == 201, hold.text  # 3,000 credits held: 989 available
    rows = await outbox_rows(pool, account, "balance.below_threshold")
    assert rows[-1]["payload"] == {"threshold_micros": 1000 * M, "available_micros": 989 * M,
                                   "balance_micros": 3989 * M}
    assert len(rows) == 4
    await assert_invariants(pool)


async def test_daily_usage_threshold_is_reached_once_per_day(api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    account = await new_account(api)
    await spend(api, account, 1, 100, "early")  # before the threshold is set: counted when it is saved
    day = datetime.now(UTC).date().isoformat()
    saved = await api.put(ALERTS, json={"account_id": account, "daily_usage_threshold": 400})
    assert saved.status_code == 200 and saved.json()["daily_usage_threshold"] == 400
    await spend(api, account, 20, 20, "a")  # 100 + 400: 400 reached at the 15th event
    [event] = await outbox_rows(pool, account, "usage.daily_threshold")
    period = event["payload"]["period"]
    assert period in (day, datetime.now(UTC).date().isoformat())
    assert event == {"dedup_key": f"usage.daily_threshold:{account}:daily:{period}", "payload": {
        "scope": "daily", "period": period, "limit_micros": 400 * M, "spent_micros": 400 * M}}
    await spend(api, account, 3, 50, "b")
    assert len(await outbox_rows(pool, account, "usage.daily_threshold")) == 1
    await assert_invariants(pool)


# --- the activities on real channels -------------------------------------------------------------------------------


async def test_balance_alert_activity_sends_each_channel_once(api: httpx.AsyncClient, pool: AsyncConnectionPool,
                                                               settings: Settings, database_url: str) -> None:
    account = await new_account(api)
    async with (smtp_server() as smtp, http_receiver() as slack,
                http_receiver([201], b'{"sid": "SM0001", "status": "queued"}') as sms,
                http_receiver([500, 200]) as hook):
        config = await set_channels(api, account, email="alerts@acme.test",
                                    slack_webhook_url=f"{slack.url}/services/T0/B0/secret",
                                    sms_phone="+14155550100", webhook_url=f"{hook.url}/hooks/creditflow")
        assert (await api.put(ALERTS, json={"account_id": account, "alerts": [
            {"threshold": 4000, "channels": ["webhook", "email"]}, {"threshold": 1000, "channels": ["slack"]}]})
                ).status_code == 200
        hold = await api.post("/api/v1/billing/holds", json={"account_id": account, "feature_id": "voice_minute",
                                                             "value": 50, "idempotency_key": "h-1"})
        assert hold.status_code == 201, hold.text  # 500 held: 4,500 available
        assert (await track(api, account, "chat_message", 600, "t-1")).status_code == 200  # 3,900 available
        [row] = await outbox_rows(pool, account, "balance.below_threshold")
        event = BalanceAlertInput(account_id=account, dedup_key=row["dedup_key"], **row["payload"])
        assert (event.threshold_micros, event.available_micros, event.balance_micros) == (
            4000 * M, 3900 * M, 4400 * M)

        activities = AlertActivities(pool, configured(settings, smtp=smtp, sms=sms))
        env = ActivityEnvironment()
        policy = RetryPolicy(maximum_attempts=3)
        env.info = dataclasses.replace(env.info, attempt=1, retry_policy=policy)
        with pytest.raises(ApplicationError) as pending:  # the webhook answered 500: retried, not failed
            await env.run(activities.fire_balance_alerts, event)
        assert pending.value.type == "notification_pending" and not pending.value.non_retryable
        env.info = dataclasses.replace(env.info, attempt=2, retry_policy=policy)
        result = await env.run(activities.fire_balance_alerts, event)  # the retry: only the webhook again
        key = alert_dedup_key(row["dedup_key"])
        [fired] = result.fired
        assert (fired.threshold_micros, fired.channels, fired.dedup_key) == (4000 * M, ["email", "webhook"], key)
        assert {d.channel: (d.status, d.attempts) for d in fired.deliveries} == {
            "log": ("sent", 1), "email": ("sent", 1), "webhook": ("sent", 2)}
        again = await env.run(activities.fire_balance_alerts, event)  # a redelivered event, a second run
        assert again.fired[0].deliveries == fired.deliveries

        [(sender, recipients, message)] = smtp.messages
        assert (sender, recipients) == ("billing@creditflow.test", ["alerts@acme.test"])
        assert message["Subject"] == "Low balance: 3,900 credits left"
        assert message["Message-ID"] == f"<{event_id(key)}@creditflow>"
        assert message.get_content() == (
            "Hello Acme,\n\nYour credit balance fell below your alert threshold of 4,000 credits.\n\n"
            "  Balance:    3,900 credits\n  Threshold:  4,000 credits\n\n"
            "Top up or turn on auto-recharge to keep your agents running.\n" + FOOTER.format(account=account))

        assert len(hook.requests) == 2  # the 500, then the delivery
        failed_try, delivered = hook.requests
        assert failed_try.body == delivered.body  # the same event, byte for byte, on every attempt
        created = delivered.json()["created"]
        assert delivered.body == (
            f'{{"account_id":"{account}","created":{created},"data":{{"available":3900,"available_micros":{3900 * M},'
            f'"balance":4400,"balance_micros":{4400 * M},"threshold":4000,"threshold_micros":{4000 * M}}},'
            f'"id":"{event_id(key)}",'
            f'"type":"balance.low"}}').encode()
        assert delivered.headers["creditflow-event-type"] == "balance.low"
        assert readme_verifier()(delivered.body, delivered.headers["creditflow-signature"], config["webhook_secret"])
        assert slack.requests == [] and sms.requests == []  # not configured on this alert

        # The 1,000 alert: Slack only, once.
        assert (await track(api, account, "chat_message", 3000, "t-2")).status_code == 200  # 900 available
        row = (await outbox_rows(pool, account, "balance.below_threshold"))[-1]
        second = BalanceAlertInput(account_id=account, dedup_key=row["dedup_key"], **row["payload"])
        assert second.threshold_micros == 1000 * M
        for _ in range(2):
            result = await env.run(activities.fire_balance_alerts, second)
            assert statuses_of(result) == {"log": ("sent", 1), "slack": ("sent", 1)}
        [posted] = slack.requests
        assert posted.json() == {"text": ":warning: *Acme* balance is 900 credits (alert threshold 1,000 credits)."}
        assert len(smtp.messages) == 1 and len(hook.requests) == 2

        # Nothing fires for a threshold with no enabled alert (auto-recharge's), nor for auto-recharge's
        # "enabled below the threshold" event, nor once the alert was disabled after the crossing.
        other = BalanceAlertInput(account_id=account, dedup_key="below:x:2000000000:1", threshold_micros=2000 * M,
                                  available_micros=900 * M)
        assert await env.run(activities.fire_balance_alerts, other) == BalanceAlertsResult()
        settings_event = event.model_copy(update={"dedup_key": "below:y", "source": "settings"})
        assert await env.run(activities.fire_balance_alerts, settings_event) == BalanceAlertsResult()
        await api.put(ALERTS, json={"account_id": account, "alerts": [
            {"threshold": 4000, "channels": ["email"], "enabled": False}]})
        later = event.model_copy(update={"dedup_key": "below:z"})
        assert await env.run(activities.fire_balance_alerts, later) == BalanceAlertsResult()
        assert len(smtp.messages) == 1 and len(slack.requests) == 1 and sms.requests == []
    await assert_invariants(pool)


def statuses_of(result: BalanceAlertsResult) -> dict[str, tuple[str, int]]:
    [fired] = result.fired
    return {d.channel: (d.status, d.attempts) for d in fired.deliveries}


async def test_daily_usage_alert_activity_sends_once(api: httpx.AsyncClient, pool: AsyncConnectionPool,
                                                     settings: Settings) -> None:
    account = await new_account(api)
    async with smtp_server() as smtp, http_receiver() as hook:
        config = await set_channels(api, account, webhook_url=f"{hook.url}/in")
        assert (await api.put(ALERTS, json={"account_id": account, "daily_usage_threshold": 400})).status_code == 200
        activities = AlertActivities(pool, configured(settings, smtp=smtp))
        event = DailyUsageAlertInput(account_id=account, dedup_key=f"usage.daily_threshold:{account}:daily:2026-11-22",
                                     limit_micros=400 * M, spent_micros=400_500_000, period="2026-11-22")
        env = ActivityEnvironment()
        first = await env.run(activities.send_daily_usage_alert, event)
        second = await env.run(activities.send_daily_usage_alert, event)
        key = alert_dedup_key(event.dedup_key)
        assert first.fired and first.dedup_key == key and second.deliveries == first.deliveries
        assert {d.channel: (d.status, d.attempts) for d in first.deliveries} == {
            "log": ("sent", 1), "email": ("sent", 1), "webhook": ("sent", 1)}  # every channel with a destination

        [(_, recipients, message)] = smtp.messages
        assert recipients == ["billing@acme.test"]
        assert message["Subject"] == "Daily usage alert: 400.5 credits used on 2026-11-22"
        assert message.get_content() == (
            "Hello Acme,\n\nYour usage on 2026-11-22 (UTC) reached your daily notification threshold of 400 credits."
            "\n\n  Used that day:  400.5 credits\n  Threshold:      400 credits\n\n"
            "This is a notification only: usage continues. Set a daily limit to stop usage at an amount.\n"
            + FOOTER.format(account=account))
        [delivered] = hook.requests
        created = delivered.json()["created"]
        assert delivered.body == (
            f'{{"account_id":"{account}","created":{created},"data":{{"limit":400,"limit_micros":{400 * M},'
            f'"period":"2026-11-22","spent":400.5,"spent_micros":400500000}},"id":"{event_id(key)}",'
            f'"type":"usage.daily_threshold"}}').encode()
        assert readme_verifier()(delivered.body, delivered.headers["creditflow-signature"], config["webhook_secret"])

        # Turned off since the event was written: nothing is sent.
        await api.put(ALERTS, json={"account_id": account, "daily_usage_threshold": None})
        off = await env.run(activities.send_daily_usage_alert, event.model_copy(update={"dedup_key": "other"}))
        assert not off.fired and off.deliveries == []
        assert len(smtp.messages) == 1 and len(hook.requests) == 1


@pytest.mark.temporal
async def test_workflow_helper_fires_alerts_and_a_failing_channel_never_fails_the_workflow(
        api: httpx.AsyncClient, pool: AsyncConnectionPool, settings: Settings, temporal_client: Client) -> None:
    account = await new_account(api)
    queue = f"alerts-{uuid.uuid4().hex[:12]}"
    async with http_receiver() as hook, http_receiver([500]) as slack:
        await set_channels(api, account, webhook_url=f"{hook.url}/in", slack_webhook_url=f"{slack.url}/s")
        await api.put(ALERTS, json={"account_id": account, "alerts": [
            {"threshold": 1000, "channels": ["webhook", "slack"]}]})
        activities = AlertActivities(pool, settings.model_copy(update={"notify_max_attempts": 2}))
        async with Worker(temporal_client, task_queue=queue, workflows=[AlertsProbeWorkflow],
                          activities=[activities.fire_balance_alerts]):
            event = BalanceAlertInput(account_id=account, dedup_key=f"below:{account}:{1000 * M}:42",
                                      threshold_micros=1000 * M, available_micros=999 * M, balance_micros=999 * M)
            result = await temporal_client.execute_workflow(AlertsProbeWorkflow.run, event, id=f"probe-{queue}",
                                                            task_queue=queue, result_type=BalanceAlertsResult)
            assert result is not None
            assert statuses_of(result) == {"log": ("sent", 1), "slack": ("failed", 2), "webhook": ("sent", 1)}
            assert len(hook.requests) == 1 and len(slack.requests) == 2
