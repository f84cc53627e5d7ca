"""Autumn's official Python SDK (``autumn-python`` 0.2, strict response validation on) pointed at the real app
(a drop-in for Autumn's clients): customers, check, track, exact balances, and which answers the SDK may retry."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
from autumn import (
    APIStatusError,
    AsyncAutumn,
    BadRequestError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    UnprocessableEntityError,
)

from creditflow.api.app import create_app
from creditflow.config import Settings
from tests.conftest import ADMIN_KEY


@dataclass
class Harness:
    sdk: AsyncAutumn
    api: httpx.AsyncClient
    app: object
    requests: list[httpx.Request] = field(default_factory=list)

    def client(self, key: str = ADMIN_KEY, **options: object) -> AsyncAutumn:
        return self.sdk.with_options(secret_key=key, **options)  # type: ignore[arg-type]


@pytest.fixture
async def autumn(settings: Settings) -> AsyncIterator[Harness]:
    """The SDK on the real app over an ASGI transport; every request the SDK sends is recorded (retries too)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        seen: list[httpx.Request] = []

        async def record(request: httpx.Request) -> None:
            seen.append(request)

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, event_hooks={"request": [record]}) as http, \
                httpx.AsyncClient(transport=transport, base_url="http://creditflow.test",
                                  headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as api:
            sdk = AsyncAutumn(secret_key=ADMIN_KEY, base_url="http://creditflow.test/api/v1", http_client=http,
                              max_retries=2, _strict_response_validation=True)
            yield Harness(sdk, api, app, seen)


async def test_sdk_customer_check_track_check_exact_balances(autumn: Harness) -> None:
    sdk = autumn.sdk
    customer = await sdk.customers.create(id="user-1", name="Ada", email="ada@acme.test")
    assert customer.id == "user-1" and customer.name == "Ada" and customer.email == "ada@acme.test"
    assert customer.autumn_id is not None and customer.autumn_id.startswith("acc_")
    assert customer.balances["credits"].current_balance == 5000
    again = await sdk.customers.create(id="user-1")  # get-or-create: no email needed to get
    assert again.autumn_id == customer.autumn_id and again.balances["credits"].current_balance == 5000
    assert autumn.requests[0].headers["x-api-version"] == "2.0.0"

    first = await sdk.check(customer_id="user-1", feature_id="chat_message", required_balance=3)
    assert first.allowed is True and first.customer_id == "user-1" and first.required_balance == 3
    assert first.balance is not None and first.balance.feature_id == "credits"
    assert (first.balance.current_balance, first.balance.usage, first.balance.granted_balance) == (5000, 0, 5000)

    tracked = await sdk.track(customer_id="user-1", feature_id="chat_message", value=3, idempotency_key="msg-1",
                              properties={"model": "small"})
    assert tracked.customer_id == "user-1" and tracked.value == 3
    assert tracked.balance is not None and tracked.balance.current_balance == 4997
    raw = tracked.model_dump()
    assert raw.get("code") == "event_received" and str(raw.get("id", "")).startswith("txn_")
    retried = await sdk.track(customer_id="user-1", feature_id="chat_message", value=3, idempotency_key="msg-1",
                              properties={"model": "small"})
    assert retried.model_dump()["replayed"] is True and retried.model_dump()["id"] == raw["id"]

    second = await sdk.check(customer_id="user-1", feature_id="chat_message", required_balance=3)
    assert second.allowed is True and second.balance is not None
    assert (second.balance.current_balance, second.balance.usage, second.balance.granted_balance) == (4997, 3, 5000)

    sent = await sdk.check(customer_id="user-1", feature_id="chat_message", required_balance=2, send_event=True)
    assert sent.allowed is True and sent.balance is not None and sent.balance.current_balance == 4995
    too_much = await sdk.check(customer_id="user-1", feature_id="chat_message", required_balance=5000)
    assert too_much.allowed is False and too_much.model_dump()["code"] == "insufficient_credits"
    refused = await sdk.check(customer_id="user-1", feature_id="chat_message", required_balance=5000,
                              send_event=True)
    assert refused.allowed is False and refused.balance is not None and refused.balance.current_balance == 4995

    got = await sdk.customers.get("user-1")
    assert got.balances["credits"].current_balance == 4995 and got.balances["credits"].usage == 5
    ledger = await autumn.api.get("/api/v1/billing/balance", params={"account_id": customer.autumn_id})
    assert ledger.json()["balance"] == 4995


async def test_sdk_errors_are_parsed_and_final_refusals_are_not_retried(autumn: Harness) -> None:
    sdk = autumn.sdk
    await sdk.customers.create(id="user-2", email="bo@acme.test")
    await sdk.track(customer_id="user-2", feature_id="chat_message", value=3, idempotency_key="k-1")

    before = len(autumn.requests)
    with pytest.raises(ConflictError) as conflict:  # the SDK retries a 409 unless told not to
        await sdk.track(customer_id="user-2", feature_id="chat_message", value=4, idempotency_key="k-1")
    assert conflict.value.response.headers["x-should-retry"] == "false"
    assert conflict.value.body["code"] == "idempotency_conflict"  # type: ignore[index]
    assert len(autumn.requests) == before + 1

    with pytest.raises(APIStatusError) as broke:
        await sdk.track(customer_id="user-2", feature_id="chat_message", value=5000)
    assert broke.value.status_code == 402 and broke.value.body["code"] == "insufficient_credits"  # type: ignore[index]
    assert broke.value.response.headers["x-should-retry"] == "false"

    with pytest.raises(NotFoundError) as missing:
        await sdk.customers.get("nobody")
    assert missing.value.body["code"] == "unknown_account"  # type: ignore[index]
    with pytest.raises(NotFoundError):
        await sdk.track(customer_id="nobody", feature_id="chat_message", value=1)
    with pytest.raises(BadRequestError) as version:
        await autumn.client(api_version="1.2.0").check(customer_id="user-2", feature_id="chat_message")
    assert version.value.body["code"] == "unsupported_version"  # type: ignore[index]
    with pytest.raises(UnprocessableEntityError) as entity:
        await sdk.track(customer_id="user-2", feature_id="chat_message", entity_id="seat-1")
    assert entity.value.body["error"]["param"] == "entity_id"  # type: ignore[index]
    with pytest.raises(UnprocessableEntityError) as email:  # creating needs creditflow's billing email
        await sdk.customers.create(id="user-x")
    assert email.value.body["error"]["param"] == "email"  # type: ignore[index]
    with pytest.raises(UnprocessableEntityError) as name:  # validated as the native route validates it
        await sdk.customers.create(id="user-x", email="x@acme.test", name="   ")
    assert name.value.body["error"]["param"] == "name"  # type: ignore[index]

    with pytest.raises(UnprocessableEntityError):  # usage is never negative (Autumn's "give back" value)
        await sdk.track(customer_id="user-2", feature_id="chat_message", value=-1, idempotency_key="k-neg")
    unpriced = await sdk.check(customer_id="user-2", feature_id="no_such_feature")
    assert unpriced.allowed is False and unpriced.model_dump()["code"] == "unknown_feature"
    for _ in range(2):  # check + send_event with the Idempotency-Key header: recorded once
        keyed = await sdk.check(customer_id="user-2", feature_id="chat_message", required_balance=1,
                                send_event=True, extra_headers={"Idempotency-Key": "chk-1"})
        assert keyed.allowed is True and keyed.balance is not None and keyed.balance.current_balance == 4996

    balance = await autumn.api.get("/api/v1/billing/balance",
                                   params={"account_id": (await sdk.customers.get("user-2")).autumn_id})
    assert balance.json()["balance"] == 4996  # the first track and the keyed check, once each


async def test_account_key_reads_its_own_customer_and_cannot_create(autumn: Harness) -> None:
    customer = await autumn.sdk.customers.create(id="user-3", email="cy@acme.test")
    resp = await autumn.api.post(f"/api/v1/accounts/{customer.autumn_id}/api-keys",
                                 json={"scopes": ["billing:read"], "name": "reader"})
    assert resp.status_code == 201, resp.text
    reader = autumn.client(resp.json()["secret"])
    assert (await reader.customers.get("user-3")).balances["credits"].current_balance == 5000
    assert (await reader.check(customer_id="user-3", feature_id="chat_message")).allowed is True
    with pytest.raises(PermissionDeniedError):  # a read key never records usage, send_event or not
        await reader.check(customer_id="user-3", feature_id="chat_message", send_event=True)
    with pytest.raises(PermissionDeniedError):
        await reader.customers.create(id="user-4", email="d@acme.test")


async def test_a_fault_on_a_keyless_track_is_not_retried_but_a_keyed_one_is(autumn: Harness) -> None:
    """A keyless track cannot be told apart from its retry: on a fault the SDK is told not to retry it. With a key,
    a retry replays, so the SDK may retry. (The fault: the app's database pool is closed.)"""
    await autumn.sdk.customers.create(id="user-5", email="e@acme.test")
    await autumn.app.state.pool.close()  # type: ignore[attr-defined]
    before = len(autumn.requests)
    with pytest.raises(APIStatusError) as keyless:
        await autumn.sdk.track(customer_id="user-5", feature_id="chat_message", value=1)
    assert keyless.value.status_code >= 500 and keyless.value.response.headers["x-should-retry"] == "false"
    assert len(autumn.requests) == before + 1
    with pytest.raises(APIStatusError) as keyed:
        await autumn.client(max_retries=1).track(customer_id="user-5", feature_id="chat_message", value=1,
                                                 idempotency_key="k-5")
    assert keyed.value.response.headers["x-should-retry"] == "true"
    assert len(autumn.requests) == before + 1 + 2


class LoseFirstAnswer(httpx.AsyncBaseTransport):
    """The app commits the request, then the connection drops before its answer arrives (once, for ``path``)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, path: str) -> None:
        self.inner, self.path, self.dropped = inner, path, 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path == self.path and not self.dropped:
            self.dropped += 1
            await response.aread()
            raise httpx.ReadError("connection lost after the request was processed", request=request)
        return response


async def test_a_keyless_track_retried_after_a_lost_answer_is_not_charged_twice(autumn: Harness) -> None:
    """The SDK retries a connection lost after the commit on its own (``x-stainless-retry-count: 1``), with no key to
    tell the retry from a new event: the retry is refused (``409 retry_without_idempotency_key``, not retried), so
    the event is charged once and the app learns the outcome of its call is unknown. With a key the retry replays."""
    customer = await autumn.sdk.customers.create(id="user-6", email="f@acme.test")
    lossy = LoseFirstAnswer(httpx.ASGITransport(app=autumn.app), "/api/v1/track")  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=lossy) as http:
        sdk = AsyncAutumn(secret_key=ADMIN_KEY, base_url="http://creditflow.test/api/v1", http_client=http,
                          max_retries=2, _strict_response_validation=True)
        with pytest.raises(ConflictError) as retried:
            await sdk.with_options(max_retries=2).track(customer_id="user-6", feature_id="chat_message", value=3)
        assert retried.value.body["code"] == "retry_without_idempotency_key"  # type: ignore[index]
        assert retried.value.response.headers["x-should-retry"] == "false"
        assert lossy.dropped == 1
        balance = await autumn.api.get("/api/v1/billing/balance", params={"account_id": customer.autumn_id})
        assert balance.json()["balance"] == 4997  # 5,000 - 3, once

        lossy.dropped = 0
        keyed = await sdk.track(customer_id="user-6", feature_id="chat_message", value=3, idempotency_key="m-6")
        assert lossy.dropped == 1 and keyed.model_dump()["replayed"] is True
        with pytest.raises(ConflictError):  # check + send_event records usage too: the same rule
            await sdk.check(customer_id="user-6", feature_id="chat_message", required_balance=1, send_event=True,
                            extra_headers={"x-stainless-retry-count": "1"})
    balance = await autumn.api.get("/api/v1/billing/balance", params={"account_id": customer.autumn_id})
    assert balance.json()["balance"] == 4994  # and the keyed track once
