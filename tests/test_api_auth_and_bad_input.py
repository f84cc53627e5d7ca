"""API keys and scopes, and bad input: always a 4xx with a stable code, and the ledger untouched."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import ledger_snapshot
from tests.support.api import bearer, key_for, new_account


async def test_account_keys_are_scoped_to_their_account(api: httpx.AsyncClient, database_url: str) -> None:
    mine, theirs = await new_account(api), await new_account(api)
    reader = await key_for(api, mine, "billing:read")
    writer = await key_for(api, mine, "billing:write", "usage:write", "payments:write")

    balance = await api.get("/api/v1/billing/balance", headers=bearer(reader))
    assert balance.status_code == 200 and balance.json()["account_id"] == mine
    event = {"feature_id": "chat_message", "value": 1, "idempotency_key": "k1"}
    ok = await api.post("/api/v1/billing/track", json=event, headers=bearer(writer))
    assert ok.status_code == 200 and ok.json()["balance"] == 4999

    snapshot = await ledger_snapshot(database_url)
    denied = await api.post("/api/v1/billing/track", json={**event, "idempotency_key": "k2"}, headers=bearer(reader))
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "insufficient_scope"
    other = await api.post("/api/v1/billing/track", json={**event, "account_id": theirs, "idempotency_key": "k3"},
                           headers=bearer(writer))
    assert other.status_code == 403 and other.json()["error"]["code"] == "forbidden"
    peek = await api.get("/api/v1/billing/balance", params={"account_id": theirs}, headers=bearer(reader))
    assert peek.status_code == 403
    peek_account = await api.get(f"/api/v1/accounts/{theirs}", headers=bearer(reader))
    assert peek_account.status_code == 403
    admin_only = await api.post("/api/v1/billing/wallet/credit", headers=bearer(writer), json={
        "account_id": mine, "amount": 100, "reason": "free money", "idempotency_key": "x"})
    assert admin_only.status_code == 403
    create = await api.post("/api/v1/accounts", headers=bearer(writer), json={"name": "x", "billing_email": "a@b.co"})
    assert create.status_code == 403
    assert await ledger_snapshot(database_url) == snapshot


async def test_missing_wrong_and_revoked_keys(api: httpx.AsyncClient) -> None:
    acc = await new_account(api)
    secret = await key_for(api, acc, "billing:read")
    no_key = await api.get("/api/v1/billing/balance", headers={"Authorization": ""})
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "unauthorized"
    wrong = await api.get("/api/v1/billing/balance", headers=bearer("cf_sk_not-a-real-key"))
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
    keys = (await api.get(f"/api/v1/accounts/{acc}/api-keys")).json()["items"]
    assert len(keys) == 1 and "secret" not in keys[0] and keys[0]["scopes"] == ["billing:read"]
    revoked = await api.delete(f"/api/v1/accounts/{acc}/api-keys/{keys[0]['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    after = await api.get("/api/v1/billing/balance", headers=bearer(secret))
    assert after.status_code == 401


async def test_admin_must_name_the_account(api: httpx.AsyncClient) -> None:
    resp = await api.get("/api/v1/billing/balance")
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "validation_error"


def _bad_tracks(acc: str) -> list[tuple[dict[str, object], int, str]]:
    base = {"account_id": acc, "feature_id": "chat_message", "value": 1, "idempotency_key": "bad"}
    return [
        ({**base, "value": -5}, 422, "invalid_quantity"),
        ({**base, "value": 0}, 422, "invalid_quantity"),
        ({**base, "value": "1e12"}, 422, "invalid_quantity"),
        ({**base, "value": 10**30}, 422, "invalid_quantity"),
        ({**base, "value": "1.5"}, 422, "invalid_quantity"),  # chat messages are whole
        ({**base, "feature_id": "llm_tokens", "value": "0.0000001"}, 422, "invalid_quantity"),
        ({**base, "feature_id": "phone_number", "value": 999_999_999}, 422, "amount_too_large"),
        ({**base, "value": True}, 422, "validation_error"),
        ({**base, "value": "abc"}, 422, "validation_error"),
        ({**base, "value": "NaN"}, 422, "validation_error"),
        ({**base, "value": None}, 422, "validation_error"),
        ({**base, "feature_id": "teleportation"}, 404, "unknown_feature"),
        ({**base, "account_id": "acc_" + "0" * 32}, 404, "unknown_account"),
        ({**base, "account_id": "not-an-id"}, 422, "invalid_id"),
        ({**base, "account_id": "acc_123; DROP TABLE accounts"}, 422, "invalid_id"),
        ({**base, "idempotency_key": ""}, 422, "validation_error"),
        ({**base, "idempotency_key": "x" * 500}, 422, "validation_error"),
        ({**base, "agent_id": "bad agent id with spaces"}, 422, "validation_error"),
        ({**base, "unexpected": 1}, 422, "validation_error"),
        ({k: v for k, v in base.items() if k != "idempotency_key"}, 422, "validation_error"),
    ]


async def test_bad_track_input_changes_nothing(api: httpx.AsyncClient, database_url: str) -> None:
    acc = await new_account(api)
    snapshot = await ledger_snapshot(database_url)
    for body, status, code in _bad_tracks(acc):
        resp = await api.post("/api/v1/billing/track", json=body)
        assert (resp.status_code, resp.json()["error"]["code"]) == (status, code), (body, resp.text)
    raw = await api.post("/api/v1/billing/track", content=b"{not json", headers={"Content-Type": "application/json"})
    assert raw.status_code == 422 and raw.json()["error"]["code"] == "validation_error"
    assert await ledger_snapshot(database_url) == snapshot


@pytest.mark.parametrize(("amount", "code"), [
    (0, "invalid_amount"), ("12.5", "invalid_amount"), (10**12, "invalid_amount"), (True, "validation_error"),
    ("ten", "validation_error"), (-999_999, "insufficient_credits"),
])
async def test_bad_manual_credit_changes_nothing(api: httpx.AsyncClient, database_url: str, amount: object,
                                                 code: str) -> None:
    acc = await new_account(api)
    snapshot = await ledger_snapshot(database_url)
    resp = await api.post("/api/v1/billing/wallet/credit", json={
        "account_id": acc, "amount": amount, "reason": "x", "idempotency_key": "adj"})
    assert 400 <= resp.status_code < 500 and resp.json()["error"]["code"] == code, resp.text
    assert await ledger_snapshot(database_url) == snapshot


async def test_bad_account_and_feature_requests(api: httpx.AsyncClient, database_url: str) -> None:
    snapshot = await ledger_snapshot(database_url)
    cases = [
        ("post", "/api/v1/accounts", {"name": "", "billing_email": "a@b.co"}, 422, "validation_error"),
        ("post", "/api/v1/accounts", {"name": "A", "billing_email": "not-an-email"}, 422, "validation_error"),
        ("post", "/api/v1/accounts", {"name": "A", "billing_email": "a@b.co", "overage_credit_line": -5},
         422, "invalid_amount"),
        ("post", "/api/v1/accounts", {"name": "A", "billing_email": "a@b.co", "overage_credit_line": "0.5"},
         422, "invalid_amount"),
        ("put", "/api/v1/features/chat_message", {"channel": "chat", "unit": "message", "credits_per_unit": -1},
         422, "invalid_rate"),
        ("put", "/api/v1/features/chat_message", {"channel": "chat", "unit": "message",
                                                  "credits_per_unit": "0.0000001"}, 422, "invalid_rate"),
        ("put", "/api/v1/features/x", {"channel": "c", "unit": "u", "credits_per_unit": 1,
                                       "base_feature_id": "nope"}, 404, "unknown_feature"),
        ("get", "/api/v1/accounts/acc_" + "f" * 32, None, 404, "unknown_account"),
        ("get", "/api/v1/accounts/garbage", None, 422, "invalid_id"),
        ("post", "/api/v1/billing/holds/hold_" + "0" * 32 + "/settle",
         {"account_id": "acc_" + "0" * 32, "value": 1}, 404, "unknown_account"),
    ]
    for method, url, body, status, code in cases:
        resp = await api.request(method, url, json=body)
        assert (resp.status_code, resp.json()["error"]["code"]) == (status, code), (url, body, resp.text)
    assert await ledger_snapshot(database_url) == snapshot


async def test_another_accounts_hold_is_invisible(api: httpx.AsyncClient, database_url: str) -> None:
    mine, theirs = await new_account(api), await new_account(api)
    hold = (await api.post("/api/v1/billing/holds", json={"account_id": theirs, "feature_id": "voice_minute",
                                                          "value": 1, "idempotency_key": "h"})).json()
    writer = await key_for(api, mine, "billing:write", "usage:write", "payments:write")
    snapshot = await ledger_snapshot(database_url)
    for action, body in (("settle", {"value": 1}), ("release", {})):
        resp = await api.post(f"/api/v1/billing/holds/{hold['hold_id']}/{action}", json=body,
                              headers=bearer(writer))
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_hold"
    assert await ledger_snapshot(database_url) == snapshot


async def test_openapi_docs_are_served(api: httpx.AsyncClient) -> None:
    spec = (await api.get("/openapi.json")).json()
    assert "/api/v1/billing/track" in spec["paths"] and "/api/v1/billing/check" in spec["paths"]
    assert (await api.get("/docs")).status_code == 200
    assert (await api.get("/healthz")).json() == {"status": "ok"}


async def test_every_error_carries_the_request_id_of_its_response(api: httpx.AsyncClient) -> None:
    """An error body names the request it answers, the same id as the X-Request-Id header."""
    r = await api.get("/api/v1/billing/balance", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    rid = r.headers["x-request-id"]
    assert rid.startswith("req_") and r.json()["error"]["request_id"] == rid
    given = await api.get("/api/v1/billing/balance",
                                 headers={"Authorization": "Bearer nope", "X-Request-Id": "platform-trace.42"})
    assert given.headers["x-request-id"] == "platform-trace.42"
    assert given.json()["error"]["request_id"] == "platform-trace.42"
    bad = await api.get("/api/v1/billing/balance",
                               headers={"Authorization": "Bearer nope", "X-Request-Id": "x" * 200})
    assert bad.headers["x-request-id"].startswith("req_")
