"""Customer-webhook deliveries through the API: the list (status, attempts, last answer) and redelivery, end to end
with a real receiver, the real worker on the Temporal dev server, localstripe and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from creditflow.config import Settings
from creditflow.notify.log import Notification
from creditflow.notify.service import NotificationService, event_id
from tests.conftest import ADMIN_KEY, STRIPE_KEY, ledger_snapshot
from tests.receivers import http_receiver
from tests.support.api import app_client, bearer, key_for, new_account
from tests.support.notifications import readme_verifier, set_channels
from tests.support.payments import save_card
from tests.support.temporal import eventually

pytestmark = pytest.mark.temporal

DELIVERIES = "/api/v1/webhooks/deliveries"


@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    """Stripe on localstripe; the receivers are plain-http servers on 127.0.0.1 (allowed here, not in production)."""
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=5000, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=stripe_base, stripe_retry_max_wait_seconds=0.1, topup_poll_interval_seconds=0.3,
                    notify_allow_http_urls=True, notify_allow_private_urls=True, webhook_timeout_seconds=5)


@pytest.fixture
async def api(temporal_settings: Settings, temporal_worker: Any) -> AsyncIterator[httpx.AsyncClient]:
    async for client in app_client(temporal_settings):
        yield client


async def listed(api: httpx.AsyncClient, headers: dict[str, str], **params: Any) -> dict[str, Any]:
    resp = await api.get(DELIVERIES, headers=headers, params=params)
    assert resp.status_code == 200, resp.text
    return resp.json()


async def settled(api: httpx.AsyncClient, headers: dict[str, str], count: int) -> list[dict[str, Any]]:
    """The list once it has ``count`` deliveries and none is pending."""
    async def read() -> list[dict[str, Any]]:
        return (await listed(api, headers))["items"]
    return await eventually(read, lambda items: len(items) == count and all(d["status"] != "pending" for d in items))


async def test_a_receipt_webhook_is_listed_and_redelivered_as_the_same_event_without_moving_money(
        api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient, database_url: str) -> None:
    account = await new_account(api)
    await save_card(api, sdk, account)
    writer = bearer(await key_for(api, account, "billing:read", "billing:write", "payments:write"))
    async with http_receiver([500, 200]) as hook:  # the first attempt fails, the retry succeeds
        secret = (await set_channels(api, account, webhook_url=f"{hook.url}/in"))["webhook_secret"]
        resp = await api.post("/api/v1/billing/wallet/topup", headers=writer,
                              json={"amount_usd": 25, "request_id": "order-1"})
        assert resp.status_code == 200, resp.text

        [first] = await settled(api, writer, 1)
        sent = hook.requests[-1].json()
        assert first == {"id": first["id"], "event_id": sent["id"], "type": "topup.receipt", "url": f"{hook.url}/in",
                         "status": "succeeded", "attempts": 2, "response_code": 200, "error": "HTTP 500: ok",
                         "redelivery_of": None, "event_created_at": first["event_created_at"],
                         "created_at": first["created_at"], "updated_at": first["updated_at"],
                         "delivered_at": first["delivered_at"]}
        assert first["id"].startswith("whd_") and sent["type"] == "topup.receipt"
        assert sent["data"]["credits"] == 2500 and len(hook.requests) == 2
        before = await ledger_snapshot(database_url)
        balance = (await api.get("/api/v1/billing/balance", headers=writer)).json()

        again = await api.post(f"{DELIVERIES}/{first['id']}/redeliver", headers={**writer, "Idempotency-Key": "rd-1"})
        assert again.status_code == 202, again.text
        redelivery = again.json()
        assert redelivery["id"] != first["id"] and redelivery["redelivery_of"] == first["id"]
        assert redelivery["event_id"] == first["event_id"] and redelivery["type"] == "topup.receipt"
        assert redelivery["status"] in ("pending", "succeeded")

        newest, oldest = await settled(api, writer, 2)
        assert oldest == first
        assert {k: newest[k] for k in ("id", "status", "attempts", "response_code", "error", "event_id",
                                       "redelivery_of", "url", "event_created_at")} == {
            "id": redelivery["id"], "status": "succeeded", "attempts": 1, "response_code": 200, "error": None,
            "event_id": first["event_id"], "redelivery_of": first["id"], "url": f"{hook.url}/in",
            "event_created_at": first["event_created_at"]}
        # The same event, byte for byte (id, created, data), signed anew with the account's secret.
        assert len(hook.requests) == 3
        assert hook.requests[2].body == hook.requests[1].body
        assert hook.requests[2].headers["creditflow-event-id"] == first["event_id"]
        assert readme_verifier()(hook.requests[2].body, hook.requests[2].headers["creditflow-signature"], secret)

        # The same key again: the same redelivery, nothing sent. The same key for another delivery: a conflict.
        replay = await api.post(f"{DELIVERIES}/{first['id']}/redeliver", headers={**writer, "Idempotency-Key": "rd-1"})
        assert replay.status_code == 202 and replay.json()["id"] == redelivery["id"]
        conflict = await api.post(f"{DELIVERIES}/{redelivery['id']}/redeliver",
                                  headers={**writer, "Idempotency-Key": "rd-1"})
        assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_conflict"
        # Redelivering a redelivery sends the event once more, as a redelivery of the first delivery.
        third = await api.post(f"{DELIVERIES}/{redelivery['id']}/redeliver",
                               headers={**writer, "Idempotency-Key": "rd-2"})
        assert third.status_code == 202 and third.json()["redelivery_of"] == first["id"]
        await settled(api, writer, 3)
        await asyncio.sleep(0.5)
        assert len(hook.requests) == 4 and hook.requests[3].body == hook.requests[1].body

    assert await ledger_snapshot(database_url) == before  # no money moved
    assert (await api.get("/api/v1/billing/balance", headers=writer)).json() == balance

    # Paging: newest first, cursors, total.
    page = await listed(api, writer, limit=2)
    assert (page["total"], page["has_more"], len(page["items"])) == (3, True, 2)
    rest = await listed(api, writer, limit=2, starting_after=page["items"][-1]["id"])
    assert ([d["id"] for d in rest["items"]], rest["has_more"]) == ([first["id"]], False)
    back = await listed(api, writer, limit=5, ending_before=first["id"])
    assert [d["id"] for d in back["items"]] == [d["id"] for d in page["items"]]

    # Tenants: another account sees none of it and cannot redeliver it; reading keys cannot redeliver.
    other = await new_account(api)
    stranger = bearer(await key_for(api, other, "billing:read", "billing:write"))
    assert (await listed(api, stranger))["items"] == []
    assert (await listed(api, stranger))["total"] == 0
    refused = await api.post(f"{DELIVERIES}/{first['id']}/redeliver", headers={**stranger, "Idempotency-Key": "x"})
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
    bad_cursor = await api.get(DELIVERIES, headers=stranger, params={"starting_after": first["id"]})
    assert bad_cursor.status_code == 422 and bad_cursor.json()["error"]["param"] == "starting_after"
    reader = bearer(await key_for(api, account, "billing:read"))
    forbidden = await api.post(f"{DELIVERIES}/{first['id']}/redeliver", headers={**reader, "Idempotency-Key": "y"})
    assert forbidden.status_code == 403


async def test_redelivery_refusals_change_nothing(api: httpx.AsyncClient, pool: AsyncConnectionPool,
                                                  settings: Settings) -> None:
    account = await new_account(api)
    writer = bearer(await key_for(api, account, "billing:read", "billing:write"))
    async with http_receiver() as hook:
        await set_channels(api, account, webhook_url=f"{hook.url}/in")
        await NotificationService(pool, settings).send(Notification(
            account_id=account, kind="balance.low", dedup_key=f"balance.low:{account}:1", channels=["webhook"],
            payload={"balance_micros": 1_000_000, "threshold_micros": 5_000_000}))
        [delivery] = (await listed(api, writer))["items"]
        assert delivery["event_id"] == event_id(f"balance.low:{account}:1") and delivery["status"] == "succeeded"
        url = f"{DELIVERIES}/{delivery['id']}/redeliver"

        no_key = await api.post(url, headers=writer)
        assert no_key.status_code == 422 and no_key.json()["error"]["param"] == "Idempotency-Key"
        malformed = await api.post(f"{DELIVERIES}/whd_nope/redeliver", headers={**writer, "Idempotency-Key": "k"})
        assert malformed.status_code == 422
        unknown = await api.post(f"{DELIVERIES}/whd_{'0' * 24}ffffffff/redeliver",
                                 headers={**writer, "Idempotency-Key": "k"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
        # Five at once with one key: one redelivery, sent once.
        answers = await asyncio.gather(*(api.post(url, headers={**writer, "Idempotency-Key": "same"})
                                         for _ in range(5)))
        assert [a.status_code for a in answers] == [202] * 5 and len({a.json()["id"] for a in answers}) == 1
        await settled(api, writer, 2)
        await asyncio.sleep(0.5)
        assert len(hook.requests) == 2
        await set_channels(api, account, webhook_url=None)
        gone = await api.post(url, headers={**writer, "Idempotency-Key": "k"})
        assert gone.status_code == 409 and gone.json()["error"]["code"] == "no_webhook_url"
        assert (await listed(api, writer))["total"] == 2 and len(hook.requests) == 2


@pytest.fixture
def strict_worker_settings(temporal_settings: Settings) -> Settings:
    """The worker as in production: customer URLs on loopback or private addresses are refused when it sends."""
    return temporal_settings.model_copy(update={"notify_allow_private_urls": False, "notify_max_attempts": 2})


async def test_a_redelivery_goes_through_the_send_time_ssrf_check(
        temporal_client: Client, pool: AsyncConnectionPool, settings: Settings,
        strict_worker_settings: Settings) -> None:
    from workers.main import build_worker

    async with build_worker(temporal_client, pool, strict_worker_settings), \
            http_receiver() as hook:
        async for api in app_client(strict_worker_settings.model_copy(update={"notify_allow_private_urls": True})):
            account = await new_account(api)
            writer = bearer(await key_for(api, account, "billing:read", "billing:write"))
            await set_channels(api, account, webhook_url=f"{hook.url}/in")  # the API's settings allow it
            await NotificationService(pool, settings).send(Notification(
                account_id=account, kind="balance.low", dedup_key=f"balance.low:{account}:2", channels=["webhook"],
                payload={"balance_micros": 1_000_000, "threshold_micros": 5_000_000}))
            [delivery] = (await listed(api, writer))["items"]
            resp = await api.post(f"{DELIVERIES}/{delivery['id']}/redeliver",
                                  headers={**writer, "Idempotency-Key": "ssrf-1"})
            assert resp.status_code == 202, resp.text
            newest, _ = await settled(api, writer, 2)
            assert (newest["status"], newest["attempts"], newest["response_code"]) == ("failed", 1, None)
            assert newest["error"].startswith("destination refused")
            assert len(hook.requests) == 1  # only the first delivery reached the receiver


async def test_a_redelivery_refused_by_a_down_temporal_is_recorded_and_sent_when_repeated(
        temporal_settings: Settings, temporal_worker: Any, pool: AsyncConnectionPool, settings: Settings) -> None:
    from tests.conftest import free_port

    down = temporal_settings.model_copy(update={"temporal_address": f"127.0.0.1:{free_port()}"})
    async with http_receiver() as hook:
        async for api in app_client(down):
            account = await new_account(api)
            writer = bearer(await key_for(api, account, "billing:read", "billing:write"))
            await set_channels(api, account, webhook_url=f"{hook.url}/in")
            await NotificationService(pool, settings).send(Notification(
                account_id=account, kind="balance.low", dedup_key=f"balance.low:{account}:3", channels=["webhook"],
                payload={"balance_micros": 1_000_000, "threshold_micros": 5_000_000}))
            [delivery] = (await listed(api, writer))["items"]
            url = f"{DELIVERIES}/{delivery['id']}/redeliver"
            refused = await api.post(url, headers={**writer, "Idempotency-Key": "down-1"})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "workflow_unavailable"
            assert refused.headers["retry-after"]
            newest, _ = (await listed(api, writer))["items"]
            assert (newest["status"], newest["attempts"], newest["redelivery_of"]) == ("pending", 0, delivery["id"])
        async for api in app_client(temporal_settings):  # Temporal is back: the same request sends it, once
            again = await api.post(url, headers={**writer, "Idempotency-Key": "down-1"})
            assert again.status_code == 202 and again.json()["id"] == newest["id"]
            newest, _ = await settled(api, writer, 2)
            assert (newest["status"], newest["attempts"], newest["response_code"]) == ("succeeded", 1, 200)
        assert len(hook.requests) == 2 and hook.requests[1].body == hook.requests[0].body
