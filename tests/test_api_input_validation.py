"""Input the API refuses with a 422 and no change: non-JSON numbers and NULs in metadata, NULs and lone surrogates
in queries and text (PostgreSQL cannot store them), lenient number spellings, the key prefixes the system uses
for its own writes; and naive datetimes read as UTC. Real app, real PostgreSQL."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import ledger_snapshot
from tests.support.api import new_account


@pytest.mark.parametrize("metadata", [
    '{"x": NaN}', '{"x": Infinity}', '{"x": 1e100}', '{"x": "a\\u0000b"}', '{"x": "\\ud800"}',
    '{"\\u0000": 1}', '{"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}}',
])
async def test_bad_metadata_is_refused_and_changes_nothing(api: httpx.AsyncClient, database_url: str,
                                                           metadata: str) -> None:
    acc = await new_account(api)
    snapshot = await ledger_snapshot(database_url)
    body = (f'{{"account_id": "{acc}", "feature_id": "chat_message", "value": 1, "idempotency_key": "m",'
            f' "metadata": {metadata}}}')
    for path, payload in (("/api/v1/billing/track", body),
                          ("/api/v1/billing/track/batch", f'{{"events": [{body}]}}')):
        resp = await api.post(path, content=payload.encode(), headers={"Content-Type": "application/json"})
        assert resp.status_code == 422 and resp.json()["error"]["code"] == "validation_error", (path, resp.text)
    assert await ledger_snapshot(database_url) == snapshot


@pytest.mark.parametrize(("path", "params"), [
    ("/api/v1/billing/usage/items", {"agent_id": "a\x00b"}),
    ("/api/v1/billing/transactions", {"type": "usage\x00"}),
    ("/api/v1/billing/transactions", {"cursor": "abc\x00"}),
])
async def test_nul_in_query_strings_is_a_422(api: httpx.AsyncClient, path: str, params: dict[str, str]) -> None:
    acc = await new_account(api)
    resp = await api.get(path, params={"account_id": acc, **params})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "validation_error"


@pytest.mark.parametrize("body", [
    {"name": "a\x00b", "billing_email": "a@b.co"},
    {"name": "\ud800", "billing_email": "a@b.co"},
])
async def test_nul_in_text_fields_is_a_422(api: httpx.AsyncClient, database_url: str, body: dict[str, str]) -> None:
    snapshot = await ledger_snapshot(database_url)
    content = httpx.Request("POST", "/", json=body).content if "\ud800" not in body["name"] else \
        b'{"name": "\\ud800", "billing_email": "a@b.co"}'
    resp = await api.post("/api/v1/accounts", content=content, headers={"Content-Type": "application/json"})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "validation_error"
    assert await ledger_snapshot(database_url) == snapshot


@pytest.mark.parametrize("value", ["1_000", " 1 ", "1,5", "0x10"])
async def test_lenient_number_spellings_are_refused(api: httpx.AsyncClient, value: str) -> None:
    acc = await new_account(api)
    resp = await api.post("/api/v1/billing/track", json={"account_id": acc, "feature_id": "chat_message",
                                                         "value": value, "idempotency_key": "n"})
    assert resp.status_code == 422


async def test_reserved_key_prefixes_are_refused(api: httpx.AsyncClient) -> None:
    acc = await new_account(api)
    for key in ("hold:hold_abc", "adj:1", "sys:welcome_bonus"):
        resp = await api.post("/api/v1/billing/track", json={"account_id": acc, "feature_id": "chat_message",
                                                             "value": 1, "idempotency_key": key})
        assert resp.status_code == 422 and resp.json()["error"]["code"] == "validation_error"
    # An operator's adjustment key cannot collide with a tenant's usage key.
    await api.post("/api/v1/billing/track", json={"account_id": acc, "feature_id": "chat_message", "value": 1,
                                                  "idempotency_key": "k1"})
    credit = await api.post("/api/v1/billing/wallet/credit", json={"account_id": acc, "amount": 10,
                                                                   "reason": "x", "idempotency_key": "k1"})
    assert credit.status_code == 200 and credit.json()["replayed"] is False


async def test_naive_window_bounds_are_utc(api: httpx.AsyncClient) -> None:
    acc = await new_account(api)
    await api.post("/api/v1/billing/track", json={"account_id": acc, "feature_id": "chat_message", "value": 1,
                                                  "idempotency_key": "w"})
    items = (await api.get("/api/v1/billing/usage/items",
                           params={"account_id": acc, "start": "2000-01-01T00:00:00", "end": "2999-01-01T00:00:00"}))
    assert items.status_code == 200 and len(items.json()["items"]) == 1
