"""Notifications on real channels: a real SMTP server (aiosmtpd) and real HTTP receivers for Slack, SMS and
customer webhooks; the sent-log on the real database; the webhook signature checked with the snippet of
docs/concepts.md."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import re
import time
import uuid
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest
from jinja2 import TemplateError
from psycopg_pool import AsyncConnectionPool
from pydantic import SecretStr
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker

from activities.notifications import NotificationActivities
from creditflow.api.app import create_app
from creditflow.config import Settings
from creditflow.notify.channels import webhook_body
from creditflow.notify.log import Notification, NotificationRecord
from creditflow.notify.service import NotificationPending, NotificationService, event_id
from creditflow.notify.signing import signature_header
from creditflow.notify.templates import DEFAULT_CHANNELS, render
from tests.conftest import ADMIN_KEY, free_port
from tests.notify_probe_workflow import NotifyProbeWorkflow
from tests.receivers import http_receiver, smtp_server
from tests.support.api import bearer, key_for, new_account
from tests.support.notifications import FOOTER, SMS_FROM, SMS_SID, SMS_TOKEN, configured, readme_verifier, set_channels


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The receivers of these tests are plain-http servers on 127.0.0.1, which production settings refuse."""
    return settings.model_copy(update={"notify_allow_http_urls": True, "notify_allow_private_urls": True})


async def delivery_rows(database_url: str, dedup_key: str) -> dict[str, dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(database_url, row_factory=psycopg.rows.dict_row) as conn:
        rows = await (await conn.execute(
            "SELECT channel, status, attempts, last_error, destination, provider_id, sent_at"
            " FROM notification_deliveries WHERE dedup_key = %s", (dedup_key,))).fetchall()
    return {row["channel"]: row for row in rows}


def statuses(record: NotificationRecord) -> dict[str, tuple[str, int]]:
    return {d.channel: (d.status, d.attempts) for d in record.deliveries}


RECEIPT = {"charge_id": "chg_" + "1" * 32, "request_id": "r1", "payment_intent_id": "pi_123",
           "transaction_id": "txn_1", "amount_cents": 2550, "amount": "$25.50", "credits": 2550,
           "package_id": None, "description": "Credit top-up"}


# --- email, once per dedup key --------------------------------------------------------------------------------


async def test_receipt_email_goes_out_once_per_dedup_key(api: httpx.AsyncClient, pool: AsyncConnectionPool,
                                                         settings: Settings, database_url: str) -> None:
    account = await new_account(api)
    async with smtp_server() as smtp:
        service = NotificationService(pool, configured(settings, smtp=smtp))
        note = Notification(account_id=account, kind="receipt", dedup_key="receipt:chg_1", payload=RECEIPT)
        first = await service.send(note)
        again = await service.send(note)  # a retried activity, or the same event twice

        assert len(smtp.messages) == 1
        sender, recipients, message = smtp.messages[0]
        assert sender == "billing@creditflow.test" and recipients == ["billing@acme.test"]
        assert message["To"] == "billing@acme.test"
        assert message["Subject"] == "Receipt: 2,550 credits for $25.50"
        assert message["Message-ID"] == f"<{event_id('receipt:chg_1')}@creditflow>"
        assert message.get_content() == (
            "Hello Acme,\n\nThank you for your purchase. 2,550 credits were added to your wallet.\n\n"
            "  Amount paid:  $25.50\n  Credits:      2,550\n  Description:  Credit top-up\n"
            "  Payment:      pi_123\n  Reference:    chg_" + "1" * 32 + "\n" + FOOTER.format(account=account))
        assert first.created and not again.created and first.id == again.id
        assert statuses(first) == statuses(again) == {"log": ("sent", 1), "email": ("sent", 1)}

        # Two attempts at once (a timed-out attempt still running): still one email.
        other = note.model_copy(update={"dedup_key": "receipt:chg_2"})
        results = await asyncio.gather(service.send(other), service.send(other), return_exceptions=True)
        assert all(isinstance(r, NotificationRecord | NotificationPending) for r in results), results
        assert len(smtp.messages) == 2
    rows = await delivery_rows(database_url, "receipt:chg_2")
    assert rows["email"]["status"] == "sent" and rows["email"]["attempts"] == 1
    assert rows["email"]["destination"] == "billing@acme.test"


# --- every channel, exact bodies --------------------------------------------------------------------------------


async def test_every_channel_delivers_exact_bodies(api: httpx.AsyncClient, pool: AsyncConnectionPool,
                                                   settings: Settings, database_url: str) -> None:
    account = await new_account(api)
    async with (smtp_server() as smtp, http_receiver() as slack,
                http_receiver([201], b'{"sid": "SM0001", "status": "queued"}') as sms,
                http_receiver() as hook):
        config = await set_channels(api, account, email="alerts@acme.test",
                                    slack_webhook_url=f"{slack.url}/services/T0/B0/secretpart",
                                    sms_phone="+14155550100", webhook_url=f"{hook.url}/hooks/creditflow")
        service = NotificationService(pool, configured(settings, smtp=smtp, sms=sms))
        payload = {"balance_micros": 1_234_500_000, "threshold_micros": 5_000_000_000}
        note = Notification(account_id=account, kind="balance.low", dedup_key="balance.low:1", payload=payload)
        before = int(time.time())
        record = await service.send(note)  # no channels named: the kind's defaults, all four configured

        assert statuses(record) == {c: ("sent", 1) for c in ("log", "email", "slack", "sms", "webhook")}
        [(_, recipients, message)] = smtp.messages
        assert recipients == ["alerts@acme.test"]  # the override, not the billing email
        assert message["Subject"] == "Low balance: 1,234.5 credits left"
        assert message.get_content() == (
            "Hello Acme,\n\nYour credit balance fell below your alert threshold of 5,000 credits.\n\n"
            "  Balance:    1,234.5 credits\n  Threshold:  5,000 credits\n\n"
            "Top up or turn on auto-recharge to keep your agents running.\n" + FOOTER.format(account=account))

        [posted] = slack.requests
        assert (posted.method, posted.path) == ("POST", "/services/T0/B0/secretpart")
        assert posted.json() == {"text": ":warning: *Acme* balance is 1,234.5 credits (alert threshold 5,000 credits)."}

        [text] = sms.requests
        assert text.path == f"/2010-04-01/Accounts/{SMS_SID}/Messages.json"
        assert text.headers["authorization"] == "Basic " + base64.b64encode(f"{SMS_SID}:{SMS_TOKEN}".encode()).decode()
        assert text.form() == {"To": "+14155550100", "From": SMS_FROM,
                               "Body": "creditflow: balance 1,234.5 credits, below your 5,000 credit alert."}

        [event] = hook.requests
        assert event.path == "/hooks/creditflow" and event.headers["content-type"] == "application/json"
        assert event.headers["creditflow-event-id"] == event_id("balance.low:1")
        assert event.headers["creditflow-event-type"] == "balance.low"
        body = event.json()
        assert before - 5 <= body["created"] <= int(time.time())
        assert body == {"id": event_id("balance.low:1"), "type": "balance.low", "created": body["created"],
                        "account_id": account, "data": {**payload, "balance": 1234.5, "threshold": 5000}}
        assert event.body == (f'{{"account_id":"{account}","created":{body["created"]},"data":'
                              f'{{"balance":1234.5,"balance_micros":1234500000,"threshold":5000,'
                              f'"threshold_micros":5000000000}},'
                              f'"id":"{event_id("balance.low:1")}","type":"balance.low"}}').encode()
        assert readme_verifier()(event.body, event.headers["creditflow-signature"], config["webhook_secret"])

    rows = await delivery_rows(database_url, "balance.low:1")
    assert rows["sms"]["provider_id"] == "SM0001" and rows["sms"]["destination"] == "+14155550100"
    assert rows["slack"]["destination"] == f"{slack.url}/…"  # the Slack URL's path is a credential
    assert rows["email"]["provider_id"] == f"<{event_id('balance.low:1')}@creditflow>"


async def test_a_send_interrupted_by_a_dead_worker_is_retried_once_its_lease_runs_out(
        api: httpx.AsyncClient, pool: AsyncConnectionPool, settings: Settings, database_url: str) -> None:
    account = await new_account(api)
    async with http_receiver() as hook:
        await set_channels(api, account, webhook_url=f"{hook.url}/in")
        service = NotificationService(pool, settings)
        note = Notification(account_id=account, kind="invoice.issued", dedup_key="inv:2", channels=["webhook"],
                            payload={"number": "CF-0002", "period": "2026-11", "total_cents": 4_900})
        record = await service.send(note)
        assert statuses(record) == {"log": ("sent", 1), "webhook": ("sent", 1)}
        # As if a worker had claimed the channel and died before recording the outcome.
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute("UPDATE notification_deliveries SET status = 'sending', sent_at = NULL,"
                               " claimed_until = now() + interval '1 minute' WHERE dedup_key = 'inv:2'"
                               " AND channel = 'webhook'")
        with pytest.raises(NotificationPending):  # the lease is live: another attempt may be sending right now
            await service.send(note)
        assert len(hook.requests) == 1
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute("UPDATE notification_deliveries SET claimed_until = now() - interval '1 second'"
                               " WHERE dedup_key = 'inv:2' AND channel = 'webhook'")
        record = await service.send(note)  # the lease ran out: sent again, with the same event id
        assert statuses(record)["webhook"] == ("sent", 2)
        assert [r.headers["creditflow-event-id"] for r in hook.requests] == [event_id("inv:2")] * 2


# --- failures ---------------------------------------------------------------------------------------------------


async def test_failing_channel_is_reported_after_n_attempts_and_others_deliver(
        api: httpx.AsyncClient, pool: AsyncConnectionPool, settings: Settings, database_url: str) -> None:
    account = await new_account(api)
    refused = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    async with (smtp_server() as smtp, http_receiver([500], b'{"error": "boom"}') as slack,
                http_receiver([503, 200]) as hook):
        await set_channels(api, account, slack_webhook_url=f"{slack.url}/services/x",
                           sms_phone="+14155550100", webhook_url=f"{hook.url}/in")
        cfg = configured(settings, smtp=smtp, notify_max_attempts=3, sms_api_base=refused,
                         sms_account_sid=SMS_SID, sms_auth_token=SecretStr(SMS_TOKEN), sms_from_number=SMS_FROM)
        service = NotificationService(pool, cfg)
        note = Notification(account_id=account, kind="limit.reached", dedup_key="limit:daily:2026-11-22",
                            payload={"scope": "daily", "limit_micros": 10_000_000_000,
                                     "spent_micros": 10_000_000_000, "action": "pause"})

        with pytest.raises(NotificationPending) as first:  # Temporal would retry the activity
            await service.send(note)
        assert statuses(first.value.record) == {"log": ("sent", 1), "email": ("sent", 1), "slack": ("pending", 1),
                                                "sms": ("pending", 1), "webhook": ("pending", 1)}
        with pytest.raises(NotificationPending) as second:  # the webhook's receiver is back: sent now
            await service.send(note)
        assert statuses(second.value.record)["webhook"] == ("sent", 2)
        final = await service.send(note)  # the third attempt of slack and sms: reported failed, no exception
        again = await service.send(note)  # nothing left to try

        assert statuses(final) == statuses(again) == {
            "log": ("sent", 1), "email": ("sent", 1), "slack": ("failed", 3), "sms": ("failed", 3),
            "webhook": ("sent", 2)}
        assert final.delivery("slack").error == 'HTTP 500: {"error": "boom"}'  # type: ignore[union-attr]
        assert "ConnectError" in (final.delivery("sms").error or "")  # type: ignore[union-attr]
        assert len(smtp.messages) == 1 and len(slack.requests) == 3 and len(hook.requests) == 2
        assert smtp.messages[0][2]["Subject"] == "Spending limit reached: daily"
    rows = await delivery_rows(database_url, note.dedup_key)
    assert rows["slack"]["status"] == "failed" and rows["slack"]["last_error"].startswith("HTTP 500")


async def test_permanent_refusals_fail_at_once_and_smtp_rejection_is_reported(
        api: httpx.AsyncClient, pool: AsyncConnectionPool, settings: Settings) -> None:
    account = await new_account(api)
    async with smtp_server("550 5.1.1 mailbox unavailable") as smtp, http_receiver([404], b"no_service") as slack:
        await set_channels(api, account, slack_webhook_url=f"{slack.url}/services/revoked")
        service = NotificationService(pool, configured(settings, smtp=smtp))
        note = Notification(account_id=account, kind="agent.paused", dedup_key="agent.paused:a1:1",
                            payload={"agent_id": "a1", "agent_name": "Support bot", "reason": "daily limit"},
                            channels=["email", "slack"])
        record = await service.send(note)  # no retry: a revoked hook or an unknown mailbox will not heal
        assert statuses(record) == {"log": ("sent", 1), "email": ("failed", 1), "slack": ("failed", 1)}
        assert record.delivery("slack").error == "HTTP 404: no_service"  # type: ignore[union-attr]
        assert (record.delivery("email").error or "").startswith("SMTP 550")  # type: ignore[union-attr]
        assert slack.requests[0].json() == {
            "text": ":pause_button: Agent *Support bot* of *Acme* paused by system: daily limit."}
        assert smtp.messages == []


async def test_unconfigured_channels_are_skipped_not_retried(api: httpx.AsyncClient, pool: AsyncConnectionPool,
                                                             settings: Settings) -> None:
    """The defaults (no SMTP, no SMS account): what `creditflow dev` and the workflow tests run with."""
    account = await new_account(api)
    await set_channels(api, account, sms_phone="+14155550100")
    service = NotificationService(pool, settings)
    receipt = await service.send(Notification(account_id=account, kind="receipt", dedup_key="r:1", payload=RECEIPT))
    assert statuses(receipt) == {"log": ("sent", 1), "email": ("skipped", 0)}
    assert receipt.delivery("email").error == "not_configured"  # type: ignore[union-attr]
    named = await service.send(Notification(account_id=account, kind="balance.low", dedup_key="b:1",
                                            payload={"balance_micros": 0, "threshold_micros": 1},
                                            channels=["sms", "slack", "webhook"]))
    assert {d.channel: (d.status, d.error) for d in named.deliveries} == {
        "log": ("sent", None), "slack": ("skipped", "no_destination"), "sms": ("skipped", "not_configured"),
        "webhook": ("skipped", "no_destination")}


async def test_a_template_error_fails_text_channels_but_the_webhook_still_goes(
        api: httpx.AsyncClient, pool: AsyncConnectionPool, settings: Settings) -> None:
    account = await new_account(api)
    async with smtp_server() as smtp, http_receiver() as hook:
        await set_channels(api, account, webhook_url=f"{hook.url}/in")
        service = NotificationService(pool, configured(settings, smtp=smtp))
        record = await service.send(Notification(  # a float amount is refused, never rounded
            account_id=account, kind="balance.low", dedup_key="b:float",
            payload={"balance_micros": 1.5, "threshold_micros": 5}))
        assert statuses(record) == {"log": ("sent", 1), "email": ("failed", 1), "webhook": ("sent", 1)}
        assert (record.delivery("email").error or "").startswith("template_error")  # type: ignore[union-attr]
        assert smtp.messages == [] and len(hook.requests) == 1


# --- signatures ---------------------------------------------------------------------------------------------------


async def test_webhook_signature_verifies_with_the_readme_snippet_and_rotation(
        api: httpx.AsyncClient, pool: AsyncConnectionPool, settings: Settings) -> None:
    verify = readme_verifier()
    account = await new_account(api)
    async with http_receiver() as hook:
        secret = (await set_channels(api, account, webhook_url=f"{hook.url}/in"))["webhook_secret"]
        assert secret.startswith("whsec_")
        service = NotificationService(pool, settings)
        payload = {"agent_id": "a1", "agent_name": "Sales", "reason": "operator", "paused_by": "operator"}
        await service.send(Notification(account_id=account, kind="agent.paused", dedup_key="p:1", payload=payload))
        [event] = hook.requests
        header = event.headers["creditflow-signature"]
        assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", header)
        assert verify(event.body, header, secret)
        assert not verify(event.body.replace(b"operator", b"0perator"), header, secret)  # tampered body
        assert not verify(event.body, header, "whsec_" + "0" * 64)  # another secret
        assert not verify(event.body, "v1=" + header.split("v1=")[1], secret)  # no timestamp
        stale = int(time.time()) - 301
        assert not verify(event.body, signature_header(secret, stale, event.body), secret)  # a replay
        assert verify(event.body, signature_header(secret, stale + 2, event.body), secret)

        rotated = (await set_channels(api, account, rotate_webhook_secret=True))["webhook_secret"]
        assert rotated.startswith("whsec_") and rotated != secret
        await service.send(Notification(account_id=account, kind="agent.resumed", dedup_key="r:1",
                                         payload={"agent_id": "a1", "resumed_by": "operator"}))
        latest = hook.requests[-1]
        assert verify(latest.body, latest.headers["creditflow-signature"], rotated)
        assert not verify(latest.body, latest.headers["creditflow-signature"], secret)


# --- the activity and the workflow helper ------------------------------------------------------------------------


async def test_activity_retries_pending_channels_and_reports_them_failed_on_its_last_attempt(
        api: httpx.AsyncClient, pool: AsyncConnectionPool, settings: Settings) -> None:
    account = await new_account(api)
    async with http_receiver([500]) as slack:
        await set_channels(api, account, slack_webhook_url=f"{slack.url}/s")
        activities = NotificationActivities(pool, settings)
        note = Notification(account_id=account, kind="invoice.past_due", dedup_key="inv:1:past_due",
                            channels=["slack"], payload={"number": "CF-0001", "total_cents": 12_000,
                                                         "amount_due_cents": 12_000, "due_date": "2026-11-01",
                                                         "days_past_due": 21})
        env = ActivityEnvironment()
        policy = RetryPolicy(maximum_attempts=2)
        env.info = dataclasses.replace(env.info, attempt=1, retry_policy=policy)
        with pytest.raises(ApplicationError) as pending:
            await env.run(activities.send_notification, note)
        assert pending.value.type == "notification_pending" and not pending.value.non_retryable
        env.info = dataclasses.replace(env.info, attempt=2, retry_policy=policy)
        record = await env.run(activities.send_notification, note)
        assert statuses(record) == {"log": ("sent", 1), "slack": ("failed", 2)}
        assert slack.requests[0].json() == {
            "text": ":alarm_clock: Invoice CF-0001 of *Acme* is 21 days past due: $120.00 unpaid."}
        unknown = note.model_copy(update={"account_id": "acc_" + "0" * 32, "dedup_key": "x"})
        with pytest.raises(ApplicationError) as refused:
            await env.run(activities.send_notification, unknown)
        assert refused.value.non_retryable


@pytest.mark.temporal
async def test_workflow_helper_completes_whatever_the_channels_do(
        api: httpx.AsyncClient, pool: AsyncConnectionPool, settings: Settings, temporal_client: Client) -> None:
    account = await new_account(api)
    client = temporal_client  # the session's dev server, with the pydantic data converter
    queue = f"notify-{uuid.uuid4().hex[:12]}"
    async with http_receiver([500]) as slack, http_receiver() as hook:
        await set_channels(api, account, slack_webhook_url=f"{slack.url}/s", webhook_url=f"{hook.url}/in")
        activities = NotificationActivities(pool, settings.model_copy(update={"notify_max_attempts": 2}))
        async with Worker(client, task_queue=queue, workflows=[NotifyProbeWorkflow],
                          activities=[activities.send_notification]):
            note = Notification(account_id=account, kind="auto_recharge.disabled", dedup_key="ar:disabled:1",
                                payload={"consecutive_failures": 3, "reason": "too_many_failures",
                                         "amount": "$25.00", "credits": 2500})
            record = await client.execute_workflow(NotifyProbeWorkflow.run, note, id=f"probe-{queue}",
                                                   task_queue=queue, result_type=NotificationRecord)
            assert record is not None
            assert statuses(record) == {"log": ("sent", 1), "email": ("skipped", 0), "slack": ("failed", 2),
                                        "webhook": ("sent", 1)}
            assert len(hook.requests) == 1 and len(slack.requests) == 2
            # An account that does not exist: the activity refuses, the workflow still completes.
            lost = note.model_copy(update={"account_id": "acc_" + "0" * 32, "dedup_key": "ar:lost"})
            assert await client.execute_workflow(NotifyProbeWorkflow.run, lost, id=f"probe-lost-{queue}",
                                                 task_queue=queue, result_type=NotificationRecord) is None


# --- templates ---------------------------------------------------------------------------------------------------

SAMPLES: dict[str, dict[str, Any]] = {
    "topup.receipt": RECEIPT,
    "refund.succeeded": {"refund_id": "ref_1", "credits": 1000, "amount_cents": 1000},
    "refund.failed": {"refund_id": "ref_1", "credits": 1000, "amount_cents": 1000, "error_message": "expired card"},
    "auto_recharge.succeeded": {"amount_cents": 2500, "credits": 2500, "balance_micros": 2_612_500_000},
    "auto_recharge.failed": {"amount": "$25.00", "credits": 2500, "error_message": "Your card was declined.",
                             "decline_code": "insufficient_funds", "consecutive_failures": 2, "threshold": "12.5"},
    "auto_recharge.disabled": {"consecutive_failures": 3, "reason": "too_many_failures", "balance": "7.25"},
    "auto_recharge.daily_cap_reached": {"max_per_day": 5, "next_attempt_at": "2026-11-23T00:00:00+00:00"},
    "balance.low": {"balance_micros": 999_999, "threshold_micros": 1_000_000},
    "limit.reached": {"scope": "agent_monthly", "limit": "500", "spent_micros": 500_100_000,
                      "action": "alert_only", "agent_id": "a1"},
    "usage.daily_threshold": {"limit_micros": 5_000_000_000, "spent_micros": 5_000_500_000, "period": "2026-11-22"},
    "invoice.issued": {"number": "CF-0002", "period": "2026-11", "total_cents": 4_900, "due_date": "2026-12-01"},
    "invoice.past_due": {"number": "CF-0001", "amount_due_cents": 100, "due_date": "2026-11-01", "days_past_due": 3},
    "agent.paused": {"agent_id": "a1"},
    "agent.resumed": {"agent_id": "a1"},
    "recurring_charge.failed": {"charge_id": "rc_1", "description": "Phone number rental", "quantity": 3,
                                "amount_micros": 450_000_000, "period": "2026-12-05"},
}


def test_every_kind_renders_every_part_with_exact_amounts() -> None:
    assert set(SAMPLES) == set(DEFAULT_CHANNELS)
    for kind, payload in SAMPLES.items():
        text = render(kind, payload, account_id="acc_1", account_name="Acme")
        assert text.email_subject and "\n" not in text.email_subject, kind
        assert text.email_body.startswith("Hello Acme,\n\n") and text.email_body.endswith("the account.\n"), kind
        assert text.slack and text.sms and "\n" not in text.sms, kind
    assert render("balance.low", SAMPLES["balance.low"], account_id="a", account_name="A").sms == (
        "creditflow: balance 0.999999 credits, below your 1 credit alert.")
    assert render("limit.reached", SAMPLES["limit.reached"], account_id="a", account_name="A").email_subject == (
        "Spending limit reached: agent monthly (a1)")
    assert render("auto_recharge.failed", SAMPLES["auto_recharge.failed"], account_id="a",
                  account_name="A").email_body.splitlines()[2:4] == [
        "We could not charge $25.00 to your saved card for an auto-recharge of 2,500 credits:",
        "Your card was declined (insufficient_funds)."]
    big = render("balance.low", {"balance_micros": Decimal("123456789012345678"), "threshold_micros": "-1"},
                 account_id="a", account_name="A")
    assert big.email_subject == "Low balance: 123,456,789,012.345678 credits left"
    generic = render("something.new", {"b": 2, "a": "x"}, account_id="acc_1", account_name="Acme")
    assert generic.email_subject == "creditflow notification: something.new"
    assert generic.email_body == ("Hello Acme,\n\ncreditflow has a notification for your account: something.new.\n\n"
                                  "  a: x\n  b: 2\n" + FOOTER.format(account="acc_1"))
    with pytest.raises(TemplateError):
        render("balance.low", {"balance_micros": 0.1, "threshold_micros": 1}, account_id="a", account_name="A")
    with pytest.raises(TemplateError):
        render("topup.receipt", {"credits": 1}, account_id="a", account_name="A")  # amount_cents missing


def test_webhook_body_is_exact_json() -> None:
    from creditflow.notify.channels import Outgoing
    from creditflow.notify.destinations import Destinations

    dest = Destinations(account_id="acc_1", account_name="A", billing_email="a@b.co")
    out = Outgoing(kind="k", event_id="ntf_x", created=1, payload={"amount": Decimal("0.1"), "n": 10**20},
                   rendered=None, destinations=dest)
    assert webhook_body(out) == b'{"account_id":"acc_1","created":1,"data":{"amount":0.1,"n":100000000000000000000},' \
                                b'"id":"ntf_x","type":"k"}'


# --- the API ---------------------------------------------------------------------------------------------------


async def test_channels_api_defaults_secret_shown_once_and_partial_updates(api: httpx.AsyncClient) -> None:
    account = await new_account(api)
    empty = (await api.get("/api/v1/billing/notification-channels", params={"account_id": account})).json()
    assert empty == {"account_id": account, "billing_email": "billing@acme.test", "email": None,
                     "effective_email": "billing@acme.test", "slack_webhook_url": None, "sms_phone": None,
                     "webhook_url": None, "webhook_secret_set": False, "webhook_secret": None, "updated_at": None}
    created = await set_channels(api, account, webhook_url="https://hooks.acme.example/creditflow",
                                 slack_webhook_url="https://hooks.slack.com/services/T0/B0/XYZ")
    secret = created["webhook_secret"]
    assert re.fullmatch(r"whsec_[0-9a-f]{64}", secret) and created["webhook_secret_set"]
    assert created["slack_webhook_url"] == "https://hooks.slack.com/…"
    shown = (await api.get("/api/v1/billing/notification-channels", params={"account_id": account})).json()
    assert shown["webhook_secret"] is None and shown["webhook_secret_set"]
    # Fields left out keep their value; the secret is not shown (nor changed) again.
    phone = await set_channels(api, account, sms_phone="+447700900123")
    assert phone["webhook_secret"] is None and phone["webhook_url"] == "https://hooks.acme.example/creditflow"
    assert phone["sms_phone"] == "+447700900123" and phone["slack_webhook_url"] == "https://hooks.slack.com/…"
    # Removing the URL removes its secret; setting one again makes a new one.
    removed = await set_channels(api, account, webhook_url=None, slack_webhook_url=None)
    assert not removed["webhook_secret_set"] and removed["webhook_url"] is None and removed["slack_webhook_url"] is None
    again = await set_channels(api, account, webhook_url="https://hooks.acme.example/v2")
    assert again["webhook_secret"] not in (None, secret)


@pytest.mark.parametrize("body, field", [
    ({"email": "not-an-email"}, "email"),
    ({"email": "a@b"}, "email"),
    ({"sms_phone": "4155550100"}, "sms_phone"),
    ({"sms_phone": "+1 415 555 0100"}, "sms_phone"),
    ({"webhook_url": "ftp://hooks.acme.example/x"}, "webhook_url"),
    ({"webhook_url": "not a url"}, "webhook_url"),
    ({"webhook_url": "https://user:pw@hooks.acme.example/x"}, "webhook_url"),
    ({"slack_webhook_url": "hooks.slack.com/services/x"}, "slack_webhook_url"),
    ({"webhook_secret": "whsec_mine"}, "webhook_secret"),  # creditflow makes secrets, callers cannot
    ({"rotate_webhook_secret": True}, "rotate_webhook_secret"),  # nothing to rotate
    ({"sms_phone": 14155550100}, "sms_phone"),
])
async def test_channels_api_bad_input_changes_nothing(api: httpx.AsyncClient, database_url: str,
                                                      body: dict[str, Any], field: str) -> None:
    account = await new_account(api)
    await set_channels(api, account, sms_phone="+14155550100")
    before = (await api.get("/api/v1/billing/notification-channels", params={"account_id": account})).json()
    resp = await api.put("/api/v1/billing/notification-channels",
                         json={"account_id": account, "email": "ok@acme.test", **body})
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "validation_error"
    assert [p["field"] for p in error["details"]["problems"]] == [field]
    after = (await api.get("/api/v1/billing/notification-channels", params={"account_id": account})).json()
    assert after == before


async def test_channels_api_refuses_plain_http_and_internal_hosts_by_default(
        settings: Settings, database_url: str) -> None:
    defaults = settings.model_copy(update={"notify_allow_http_urls": False, "notify_allow_private_urls": False})
    app = create_app(defaults)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://creditflow.test",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as api:
        account = await new_account(api)
        for url in ("http://hooks.acme.example/x", "https://127.0.0.1/x", "https://localhost:8443/x",
                    "https://10.0.0.7/x", "https://169.254.169.254/latest/meta-data", "https://[::1]/x"):
            for field in ("webhook_url", "slack_webhook_url"):
                resp = await api.put("/api/v1/billing/notification-channels", json={"account_id": account, field: url})
                assert resp.status_code == 422, (url, resp.text)
                assert resp.json()["error"]["details"]["problems"][0]["field"] == field
        ok = await set_channels(api, account, webhook_url="https://hooks.acme.example/x")
        assert ok["webhook_secret_set"]
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            assert (await (await conn.execute("SELECT count(*) FROM notification_channels")).fetchone()) == (1,)


async def test_channels_api_scopes_and_accounts(api: httpx.AsyncClient) -> None:
    mine, theirs = await new_account(api), await new_account(api)
    reader, writer = await key_for(api, mine, "billing:read"), await key_for(api, mine, "billing:write")
    path = "/api/v1/billing/notification-channels"
    assert (await api.get(path, headers=bearer(reader))).json()["account_id"] == mine

    denied = await api.put(path, json={"sms_phone": "+14155550100"}, headers=bearer(reader))
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "insufficient_scope"
    other = await api.put(path, json={"account_id": theirs, "sms_phone": "+14155550100"}, headers=bearer(writer))
    assert other.status_code == 403 and other.json()["error"]["code"] == "forbidden"
    peek = await api.get(path, params={"account_id": theirs}, headers=bearer(reader))
    assert peek.status_code == 403 and peek.json()["error"]["code"] == "forbidden"
    anonymous = await api.get(path, headers={"Authorization": ""})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "unauthorized"
    unnamed = await api.put(path, json={"sms_phone": "+14155550100"})  # an admin key must name the account
    assert unnamed.status_code == 422 and unnamed.json()["error"]["code"] == "validation_error"
    unknown = await api.put(path, json={"account_id": "acc_" + "0" * 32, "sms_phone": "+14155550100"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_account"
    malformed = await api.get(path, params={"account_id": "acc_nope"})
    assert malformed.status_code == 422 and malformed.json()["error"]["code"] == "invalid_id"
    for account in (mine, theirs):
        view = (await api.get(path, params={"account_id": account})).json()
        assert view["sms_phone"] is None and view["updated_at"] is None

    ok = await api.put(path, json={"sms_phone": "+14155550100"}, headers=bearer(writer))
    assert ok.status_code == 200 and ok.json()["account_id"] == mine and ok.json()["sms_phone"] == "+14155550100"
