"""No 500, ever: malformed numbers, NUL bytes, oversized and ambiguous bodies are 4xx with a code and change
nothing; a worker that is down gives 202 pending or a retryable 503; a lost database connection is a structured
503 with Retry-After; anything unexpected is the same error object, with the request id."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import subprocess
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import schemathesis

from creditflow.api.app import create_app
from creditflow.config import Settings
from creditflow.sdk import OPERATIONS, ApiError, AsyncCreditflow, Balance, CheckResult, Creditflow, TopUp, TrackResult
from tests.conftest import ADMIN_KEY, ledger_snapshot, serve_app
from tests.support.api import assert_error, new_account
from tests.support.dev_stack import Dev, clean_env, start


@pytest.mark.parametrize("value", ["1e-999999999", "1E+999999999", "-1e-999999999", "1e-31", "1e31"])
async def test_numbers_no_amount_can_be_are_refused_on_every_metering_route(
        api: httpx.AsyncClient, database_url: str, value: str) -> None:
    acc = await new_account(api)
    before = await ledger_snapshot(database_url)
    for as_number in (False, True):
        raw = value if as_number else json.dumps(value)
        body = f'{{"account_id": "{acc}", "feature_id": "llm_tokens", "value": {raw}, "idempotency_key": "k"}}'
        for path in ("/api/v1/billing/track", "/api/v1/billing/holds"):
            resp = await api.post(path, content=body, headers={"Content-Type": "application/json"})
            error = assert_error(resp, 422, "validation_error")
            assert error["param"] == "value" and error["type"] == "invalid_request_error"
        check = await api.post("/api/v1/billing/check", content=body.replace(', "idempotency_key": "k"', ""),
                               headers={"Content-Type": "application/json"})
        assert_error(check, 422, "validation_error")
        event = body.replace('"account_id"', '"customer_id"')
        assert_error(await api.post("/api/v1/event", content=event, headers={"Content-Type": "application/json"}),
                     422, "validation_error")
    assert await ledger_snapshot(database_url) == before


async def test_nul_bytes_anywhere_are_refused_before_anything_runs(api: httpx.AsyncClient,
                                                                   database_url: str) -> None:
    acc = await new_account(api)
    ok = await api.post("/api/v1/agents", json={"account_id": acc, "id": "bot"})
    assert ok.status_code == 201, ok.text
    before = await ledger_snapshot(database_url)
    nul = "a\x00b"
    cases = [
        ("POST", "/api/v1/agents", {"account_id": acc, "id": "bot2", "metadata": {"k": nul}}),
        ("POST", "/api/v1/agents", {"account_id": acc, "id": "bot3", "metadata": {nul: 1}}),
        ("PATCH", "/api/v1/agents/bot", {"account_id": acc, "metadata": {"k": nul}}),
        ("PATCH", "/api/v1/agents/bot", {"account_id": acc, "name": nul}),
        ("POST", "/api/v1/event", {"customer_id": nul, "feature_id": "chat_message"}),
        ("POST", "/api/v1/entitled", {"customer_id": nul, "feature_id": "chat_message"}),
        ("POST", "/api/v1/accounts", {"name": "Acme", "billing_email": f"bill{nul}@acme.test"}),
        ("PUT", "/api/v1/billing/notification-channels", {"account_id": acc, "email": f"x{nul}@acme.test"}),
        ("PUT", "/api/v1/billing/billing-email", {"account_id": acc, "billing_email": f"x{nul}@acme.test"}),
        ("POST", "/api/v1/billing/refunds", {"account_id": acc, "payment_intent_id": f"pi_{nul}", "request_id": "r"}),
        ("POST", "/api/v1/billing/track", {"account_id": acc, "feature_id": "chat_message", "value": 1,
                                           "idempotency_key": "k", "metadata": {"note": nul}}),
    ]
    for method, path, body in cases:
        resp = await api.request(method, path, json=body)
        assert_error(resp, 422, "validation_error")
    for method, path in [("GET", "/api/v1/agents/a%00b"), ("POST", "/api/v1/agents/a%00b/pause"),
                         ("GET", f"/api/v1/agents/bot?account_id={acc}%00"),
                         ("GET", "/api/v1/billing/balance?account_id=%00")]:
        resp = await api.request(method, path, params=None, json={"account_id": acc} if method == "POST" else None)
        error = assert_error(resp, 422, "validation_error")
        assert error["param"] in ("path", "query")
    assert await ledger_snapshot(database_url) == before


async def test_bodies_that_are_ambiguous_huge_or_deep_are_4xx(api: httpx.AsyncClient, database_url: str) -> None:
    acc = await new_account(api)
    before = await ledger_snapshot(database_url)
    json_headers = {"Content-Type": "application/json"}
    track = "/api/v1/billing/track"
    dup = f'{{"account_id": "{acc}", "feature_id": "chat_message", "value": 1, "value": 1000, "idempotency_key": "d"}}'
    error = assert_error(await api.post(track, content=dup, headers=json_headers), 422, "validation_error")
    assert "twice" in error["details"]["problems"][0]["message"] and error["param"] == "body"
    deep = '{"metadata": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert_error(await api.post(track, content=deep, headers=json_headers), 422, "validation_error")
    digits = f'{{"account_id": "{acc}", "feature_id": "chat_message", "value": {"9" * 5000}, "idempotency_key": "n"}}'
    assert_error(await api.post(track, content=digits, headers=json_headers), 422, "validation_error")
    nan = f'{{"account_id": "{acc}", "feature_id": "chat_message", "value": NaN, "idempotency_key": "n"}}'
    assert_error(await api.post(track, content=nan, headers=json_headers), 422, "validation_error")
    malformed = await api.post(track, content=b"{not json", headers=json_headers)
    assert_error(malformed, 422, "validation_error")
    not_utf8 = await api.post(track, content=b'{"feature_id": "\xff"}', headers=json_headers)
    assert_error(not_utf8, 422, "validation_error")
    huge = await api.post("/api/v1/billing/subscription", json={"account_id": acc, "plan_id": "p" * 10_000_000})
    assert_error(huge, 413, "request_too_large")
    long_plan = await api.post("/api/v1/billing/subscription", json={"account_id": acc, "plan_id": "p" * 100_000})
    assert_error(long_plan, 422, "validation_error")
    assert len(long_plan.content) < 2000  # the input is not echoed back
    long_pi = await api.post("/api/v1/billing/refunds", json={
        "account_id": acc, "payment_intent_id": "pi_" + "x" * 3_000_000, "request_id": "r"})
    assert_error(long_pi, 422, "validation_error")  # a 4xx: a retry cannot help (was 503 workflow_unavailable)
    assert len(long_pi.content) < 2000
    assert await ledger_snapshot(database_url) == before


async def test_small_refusals_say_what_is_wrong(api: httpx.AsyncClient) -> None:
    for name in ("   ", "\t\n", "\u3000", "\u200b"):
        resp = await api.post("/api/v1/accounts", json={"name": name, "billing_email": "a@acme.test"})
        error = assert_error(resp, 422, "validation_error")
        assert error["param"] == "name"
    negative = await api.put("/api/v1/features/voice_minute_x", json={
        "channel": "voice", "unit": "minute", "credits_per_unit": -1})
    error = assert_error(negative, 422, "invalid_rate")
    assert "negative" in error["message"] and "pydantic" not in error["message"]
    unknown = await api.get("/api/v1/accounts/acc_nope")
    error = assert_error(unknown, 422, "invalid_id")
    assert error["param"] == "account_id"


async def test_track_denials_carry_the_same_error_object(api: httpx.AsyncClient) -> None:
    acc = await new_account(api)
    resp = await api.post("/api/v1/billing/track", json={
        "account_id": acc, "feature_id": "chat_message", "value": 1_000_000, "idempotency_key": "big"})
    error = assert_error(resp, 402, "insufficient_credits")
    assert error["type"] == "usage_denied" and resp.json()["allowed"] is False


async def test_unexpected_errors_are_the_error_object_logged_once(settings: Settings,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(settings)

    async def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/api/v1/test-broken", broken)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://creditflow.test",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        resp = await client.get("/api/v1/test-broken", headers={"X-Request-Id": "trace-42"})
    error = assert_error(resp, 500, "internal_error")
    assert error["type"] == "api_error" and error["request_id"] == "trace-42"
    logged = [r for r in caplog.records if r.name == "creditflow.api"]
    assert len(logged) == 1 and logged[0].exc_info is not None and logged[0].request_id == "trace-42"  # type: ignore[attr-defined]


# --- faults: the database connection terminated; the worker down -----------------------------------------------


@pytest.fixture
async def api_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://creditflow.test",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as client:
        yield client


async def test_terminated_database_connections_give_a_retryable_503(api_client: httpx.AsyncClient,
                                                                    database_url: str) -> None:
    api = api_client
    acc = await new_account(api)
    stop = asyncio.Event()

    async def terminator() -> None:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            while not stop.is_set():
                await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                   " WHERE datname = current_database() AND pid <> pg_backend_pid()")
                await asyncio.sleep(0.02)

    async def one(i: int) -> httpx.Response:
        return await api.post("/api/v1/billing/track", json={
            "account_id": acc, "feature_id": "chat_message", "value": 1, "idempotency_key": f"t{i}"})

    task = asyncio.create_task(terminator())
    try:
        responses = [r for batch in range(10) for r in await asyncio.gather(*(one(batch * 20 + i) for i in range(20)))]
    finally:
        stop.set()
        await task
    statuses = {r.status_code for r in responses}
    assert statuses <= {200, 503}, statuses
    unavailable = [r for r in responses if r.status_code == 503]
    for r in unavailable:
        error = assert_error(r, 503, "database_unavailable")
        assert error["type"] == "api_error" and r.headers["retry-after"] == "1"
    assert unavailable, "the terminator should have hit some requests"
    # Retrying the refused ones with the same keys (as Retry-After says; the pool drops the dead connections it
    # still holds as it meets them) charges each event exactly once.
    charged = sum(r.status_code == 200 for r in responses)
    for i, r in enumerate(responses):
        if r.status_code == 503:
            for _ in range(30):
                again = await one(i)
                if again.status_code != 503:
                    break
            assert again.status_code == 200, again.text
            charged += 1
    balance = (await api.get("/api/v1/billing/balance", params={"account_id": acc})).json()["balance"]
    assert charged == 200 and balance == 5000 - 200


async def test_worker_down_gives_202_pending_or_a_retryable_503(temporal_settings: Settings,
                                                                database_url: str) -> None:
    """Temporal is up but no worker polls the queue: nothing decides within the wait. Top-ups and refunds answer
    202 pending (the same request later gets the answer); pause/resume and plan changes 503 with Retry-After."""
    no_worker = temporal_settings.model_copy(update={"topup_answer_timeout_seconds": 1.0})
    app = create_app(no_worker)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://creditflow.test",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as api:
        acc = await new_account(api)
        assert (await api.post("/api/v1/agents", json={"account_id": acc, "id": "bot"})).status_code == 201
        before = await ledger_snapshot(database_url)
        for _ in range(2):  # the repeat joins the same workflow: still pending, never a second charge
            topup = await api.post("/api/v1/billing/wallet/topup",
                                   json={"account_id": acc, "amount_usd": 25, "request_id": "r-1"})
            assert topup.status_code == 202, topup.text
            assert topup.json()["status"] == "pending" and topup.json()["request_id"] == "r-1"
        refund = await api.post("/api/v1/billing/refunds", json={
            "account_id": acc, "payment_intent_id": "pi_123", "request_id": "rf-1"})
        assert refund.status_code == 202 and refund.json()["status"] == "pending", refund.text
        document = schemathesis.openapi.from_dict((await api.get("/openapi.json")).json())
        for answer in (topup, refund):  # the pending bodies are the ones the OpenAPI declares for 202
            document.find_operation_by_path("POST", answer.request.url.path).validate_response(answer)
        pause = await api.post("/api/v1/agents/bot/pause", json={"account_id": acc})
        error = assert_error(pause, 503, "workflow_unavailable")
        assert pause.headers["retry-after"] == "1" and error["type"] == "api_error"
        plan = await api.post("/api/v1/billing/subscription", json={"account_id": acc, "plan_id": "starter"})
        assert_error(plan, 503, "workflow_unavailable")
        assert await ledger_snapshot(database_url) == before


# --- conventions: Idempotency-Key, Creditflow-Version ---------------------------------------------------------------


async def test_idempotency_key_header_with_stripe_semantics(api: httpx.AsyncClient, database_url: str) -> None:
    acc = await new_account(api)
    event = {"account_id": acc, "feature_id": "chat_message", "value": 1}
    first = await api.post("/api/v1/billing/track", json=event, headers={"Idempotency-Key": "evt-1"})
    assert first.status_code == 200 and first.json()["replayed"] is False and first.json()["balance"] == 4999
    again = await api.post("/api/v1/billing/track", json=event, headers={"Idempotency-Key": "evt-1"})
    assert again.status_code == 200 and again.json()["replayed"] is True
    assert again.json()["transaction_id"] == first.json()["transaction_id"]
    # The body field is an alias of the header: the same key, the same event.
    alias = await api.post("/api/v1/billing/track", json={**event, "idempotency_key": "evt-1"})
    assert alias.json()["replayed"] is True and alias.json()["transaction_id"] == first.json()["transaction_id"]
    before = await ledger_snapshot(database_url)
    other = await api.post("/api/v1/billing/track", json={**event, "value": 2}, headers={"Idempotency-Key": "evt-1"})
    error = assert_error(other, 409, "idempotency_conflict")
    assert error["type"] == "idempotency_error"
    mismatch = await api.post("/api/v1/billing/track", json={**event, "idempotency_key": "evt-2"},
                              headers={"Idempotency-Key": "evt-1"})
    error = assert_error(mismatch, 400, "idempotency_key_mismatch")
    assert error["type"] == "idempotency_error" and error["param"] == "idempotency_key"
    missing = await api.post("/api/v1/billing/track", json=event)
    assert assert_error(missing, 422, "validation_error")["param"] == "idempotency_key"
    bad = await api.post("/api/v1/billing/track", json=event, headers={"Idempotency-Key": "x" * 300})
    assert assert_error(bad, 422, "validation_error")["param"] == "Idempotency-Key"
    assert await ledger_snapshot(database_url) == before
    hold = await api.post("/api/v1/billing/holds", json={**event, "feature_id": "voice_minute", "value": 2},
                          headers={"Idempotency-Key": "call-1"})
    assert hold.status_code == 201, hold.text
    credit = {"account_id": acc, "amount": 100, "reason": "goodwill"}
    made = await api.post("/api/v1/billing/wallet/credit", json=credit, headers={"Idempotency-Key": "adj-1"})
    replay = await api.post("/api/v1/billing/wallet/credit", json=credit, headers={"Idempotency-Key": "adj-1"})
    assert made.status_code == replay.status_code == 200, made.text
    assert replay.json()["transaction_id"] == made.json()["transaction_id"]
    ev = await api.post("/api/v1/event", json={"customer_id": acc, "feature_id": "chat_message"},
                        headers={"Idempotency-Key": "ev-1"})
    ev2 = await api.post("/api/v1/event", json={"customer_id": acc, "feature_id": "chat_message"},
                         headers={"Idempotency-Key": "ev-1"})
    assert ev.json()["idempotency_key"] == "ev-1" and ev2.json()["replayed"] is True


async def test_creditflow_version_is_echoed_and_unknown_versions_refused(api: httpx.AsyncClient) -> None:
    plain = await api.get("/healthz")
    assert plain.headers["creditflow-version"] == "2026-12-01"
    pinned = await api.get("/healthz", headers={"Creditflow-Version": "2026-12-01"})
    assert pinned.status_code == 200 and pinned.headers["creditflow-version"] == "2026-12-01"
    unknown = await api.get("/api/v1/billing/plans", headers={"Creditflow-Version": "1999-01-01"})
    error = assert_error(unknown, 400, "unsupported_version")
    assert error["param"] == "Creditflow-Version" and unknown.headers["creditflow-version"] == "2026-12-01"


@pytest.fixture
def dev_runs() -> Iterator[list[Dev]]:
    """Stacks started by a test, stopped even when it fails (a leaked stack holds ports and data)."""
    runs: list[Dev] = []
    yield runs
    for run in runs:
        run.kill()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_docs_api_examples_run_as_written(tmp_path: Path, dev_runs: list[Dev]) -> None:
    """The ```bash blocks of docs/api.md, in order, in one ``set -euo pipefail`` bash session, against a real
    ``creditflow dev --data-dir D`` (API, worker, Temporal, localstripe): they run as written, with the answers the
    text says."""
    data_dir = tmp_path / "data"
    stack = start(dev_runs, data_dir, tmp_path / "dev.log")
    doc = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    script = "set -euo pipefail\n" + "\n".join(re.findall(r"^```bash\n(.*?)^```", doc, re.S | re.M))
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env={**clean_env(), "D": str(data_dir)},
                          capture_output=True, text=True, timeout=600)
    stack.stop()
    text = proc.stdout
    assert proc.returncode == 0, (text, proc.stderr)
    assert "jq" not in script.replace("no `jq`", "")
    for expected in ('"code": "invalid_id"', '"param": "value"', "usage_denied", "\ntrue\n",
                     "idempotency_conflict", "idempotency_key_mismatch", "creditflow-version: 2026-12-01",
                     "unsupported_version", "'4999' '4999'", '{"type": "number", "title": "Available"}',
                     '"type": "string", "pattern"', "2026-12-05", "cust-", "Initech", "starting_after",
                     "'Track'", "3.1.0 17", '{"title": "Threshold", "type": "number"}',
                     "https://hooks.example.com/creditflow", "balance.low", "2 True", "not_found"):
        assert expected in text, (expected, text)


# --- the typed Python client ---------------------------------------------------------------------------------------


async def test_sdk_operations_match_the_openapi(api: httpx.AsyncClient) -> None:
    schema = (await api.get("/openapi.json")).json()
    results = {"track": TrackResult, "check": CheckResult, "balance": Balance, "topup": TopUp}
    for name, (method, path, operation_id) in OPERATIONS.items():
        operation = schema["paths"][path][method.lower()]
        assert operation["operationId"] == operation_id
        ok = next(code for code in operation["responses"] if code.startswith("2"))
        ref = operation["responses"][ok]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        declared = set(schema["components"]["schemas"][ref]["properties"])
        known = {f.name for f in dataclasses.fields(results[name])} - {"extra", "error"}
        assert known <= declared, (name, known - declared)


async def test_sdk_tracks_checks_reads_balances_and_parses_errors(settings: Settings) -> None:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with AsyncCreditflow(ADMIN_KEY, "http://creditflow.test", transport=transport) as admin:
            async with httpx.AsyncClient(transport=transport, base_url="http://creditflow.test",
                                         headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as raw:
                acc = await new_account(raw)
                scopes = ["billing:write", "usage:write", "payments:write"]
                key = (await raw.post(f"/api/v1/accounts/{acc}/api-keys", json={"scopes": scopes})).json()["secret"]
            assert (await admin.balance(acc)).balance == 5000
        async with AsyncCreditflow(key, "http://creditflow.test", transport=transport, max_retries=0) as cf:
            first = await cf.track("llm_tokens", 15, idempotency_key="k1")
            assert first.allowed and first.credits_charged == Decimal("1.5") and first.balance == Decimal("4998.5")
            again = await cf.track("llm_tokens", 15, idempotency_key="k1")
            assert again.replayed and again.transaction_id == first.transaction_id
            denied = await cf.track("chat_message", 1_000_000, idempotency_key="k2")
            assert not denied.allowed and denied.error is not None and denied.error["type"] == "usage_denied"
            check = await cf.check("chat_message", 10)
            assert check.allowed and check.credits_required == 10
            balance = await cf.balance()
            assert balance.account_id == acc and balance.available == Decimal("4998.5")
            with pytest.raises(ApiError) as conflict:
                await cf.track("llm_tokens", 1, idempotency_key="k1")
            assert (conflict.value.status, conflict.value.code, conflict.value.type) == (
                409, "idempotency_conflict", "idempotency_error")
            with pytest.raises(ApiError) as down:  # no Temporal in this stack: 503, with Retry-After
                await cf.topup(package_id="starter", idempotency_key="order-1")
            assert down.value.code == "workflow_unavailable" and down.value.retry_after == 1
            assert down.value.request_id and down.value.request_id.startswith("req_")
        async with serve_app(app) as base:  # the synchronous client, over a real socket
            def sync_calls() -> tuple[Decimal, bool]:
                with Creditflow(key, base) as client:
                    tracked = client.track("chat_message", 1, idempotency_key="sync-1")
                    return client.balance().balance, tracked.allowed
            assert await asyncio.to_thread(sync_calls) == (Decimal("4997.5"), True)


# --- cursor pagination ---------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_topups_page_with_cursors(temporal_settings: Settings, temporal_client: Any, pool: Any,
                                        stripe_base: str, sdk: Any) -> None:
    from pydantic import SecretStr

    from tests.conftest import STRIPE_KEY, new_card
    from workers.main import build_worker

    stack = temporal_settings.model_copy(update={"stripe_api_key": SecretStr(STRIPE_KEY),
                                                  "stripe_api_base": stripe_base, "stripe_retry_max_wait_seconds": 0.1})
    app = create_app(stack)
    async with build_worker(temporal_client, pool, stack), app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://creditflow.test", timeout=60,
            headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as api:
        acc = await new_account(api)
        card = await api.post("/api/v1/billing/payment-methods", json={"account_id": acc,
                                                                        "payment_method_id": new_card(sdk)})
        assert card.status_code == 201, card.text
        for i in range(5):
            done = await api.post("/api/v1/billing/wallet/topup", json={"account_id": acc, "amount_usd": 10 + i},
                                  headers={"Idempotency-Key": f"order-{i}"})
            assert done.status_code == 200 and done.json()["status"] == "succeeded", done.text
        path = "/api/v1/billing/wallet/topups"
        everything = (await api.get(path, params={"account_id": acc})).json()
        assert [t["request_id"] for t in everything["items"]] == [f"order-{i}" for i in (4, 3, 2, 1, 0)]
        assert everything["has_more"] is False
        seen, after = [], None
        for expected_more in (True, True, False):
            page = (await api.get(path, params={"account_id": acc, "limit": 2,
                                                **({"starting_after": after} if after else {})})).json()
            seen += [t["request_id"] for t in page["items"]]
            assert page["has_more"] is expected_more
            after = page["items"][-1]["id"]
        assert seen == [f"order-{i}" for i in (4, 3, 2, 1, 0)]
        oldest = everything["items"][-1]["id"]
        back = (await api.get(path, params={"account_id": acc, "limit": 2, "ending_before": oldest})).json()
        assert [t["request_id"] for t in back["items"]] == ["order-2", "order-1"] and back["has_more"] is True
        unknown = await api.get(path, params={"account_id": acc, "starting_after": "chg_" + "0" * 32})
        assert assert_error(unknown, 422, "validation_error")["param"] == "starting_after"
        both = await api.get(path, params={"account_id": acc, "starting_after": oldest, "ending_before": oldest})
        assert_error(both, 422, "validation_error")


async def test_agents_page_with_cursors(api: httpx.AsyncClient) -> None:
    acc = await new_account(api)
    for agent in ("e", "a", "d", "b", "c"):
        assert (await api.post("/api/v1/agents", json={"account_id": acc, "id": agent})).status_code == 201
    everything = (await api.get("/api/v1/agents", params={"account_id": acc})).json()
    assert [a["id"] for a in everything["items"]] == ["a", "b", "c", "d", "e"] and everything["has_more"] is False
    first = (await api.get("/api/v1/agents", params={"account_id": acc, "limit": 2})).json()
    assert [a["id"] for a in first["items"]] == ["a", "b"] and first["has_more"] is True
    rest = (await api.get("/api/v1/agents", params={"account_id": acc, "limit": 3, "starting_after": "b"})).json()
    assert [a["id"] for a in rest["items"]] == ["c", "d", "e"] and rest["has_more"] is False
    back = (await api.get("/api/v1/agents", params={"account_id": acc, "limit": 2, "ending_before": "e"})).json()
    assert [a["id"] for a in back["items"]] == ["c", "d"] and back["has_more"] is True
