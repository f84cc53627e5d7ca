"""The metering routes' fast path (creditflow/api/fast_path.py) answers exactly what the regular FastAPI route
answers: for each request below, sent once to an account with the fast path and once to an identical account
without it, the status, the body (ids aside) and the ledger are the same; and the plain requests did go fast."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from creditflow.api import billing
from tests.support.api import balance, bearer, key_for, new_account

ENDPOINTS = (billing.track, billing.track_batch, billing.check)
TRACK, CHECK, BATCH = "/api/v1/billing/track", "/api/v1/billing/check", "/api/v1/billing/track/batch"


def _event(key: str, value: Any = 2, feature: str = "chat_message") -> dict[str, Any]:
    return {"feature_id": feature, "value": value, "idempotency_key": key}


# (name, path, body or raw bytes, extra headers, which key: "usage" | "read" | "admin" | "unknown" | None,
#  whether the fast path answers it: with its answer or the endpoint's own refusal)
CASES: list[tuple[str, str, Any, dict[str, str], str | None, bool]] = [
    ("track", TRACK, _event("k1"), {}, "usage", True),
    ("track replayed", TRACK, _event("k1"), {}, "usage", True),
    ("track idempotency header", TRACK, {"feature_id": "chat_message", "value": 1}, {"Idempotency-Key": "h1"},
     "usage", True),
    ("track header and body keys differ", TRACK, _event("k2"), {"Idempotency-Key": "other"}, "usage", True),
    ("track conflicting replay", TRACK, _event("k1", value=3), {}, "usage", True),
    ("track fractional llm tokens", TRACK, _event("k3", "12.5", "llm_tokens"), {}, "usage", True),
    ("track decimal strings version", TRACK, _event("k4"), {"Creditflow-Version": "2026-12-05"}, "usage", True),
    ("track unknown feature", TRACK, _event("k5", feature="nope"), {}, "usage", True),
    ("track more than the balance", TRACK, _event("k6", value=10_000_000), {}, "usage", True),
    ("track another account", TRACK, {**_event("k7"), "account_id": "acc_" + "0" * 32}, {}, "usage", True),
    ("track admin key", TRACK, _event("k8"), {}, "admin", True),
    ("track read-only key", TRACK, _event("k9"), {}, "read", False),
    ("track unknown key", TRACK, _event("k10"), {}, "unknown", False),
    ("track no key", TRACK, _event("k11"), {}, None, False),
    ("track text/plain", TRACK, _event("k12"), {"Content-Type": "text/plain"}, "usage", False),
    ("track negative value", TRACK, _event("k13", value=-1), {}, "usage", True),
    ("track missing feature", TRACK, {"value": 1, "idempotency_key": "k14"}, {}, "usage", False),
    ("track duplicate key in JSON", TRACK, b'{"feature_id":"chat_message","feature_id":"x","value":1}', {}, "usage",
     False),
    ("track NUL in key", TRACK, _event("k\u000015"), {}, "usage", False),
    ("track not JSON", TRACK, b"{", {}, "usage", False),
    ("check", CHECK, {"feature_id": "llm_tokens", "value": 500}, {}, "usage", True),
    ("check read-only key", CHECK, {"feature_id": "llm_tokens", "value": 500}, {}, "read", True),
    ("check bad value", CHECK, {"feature_id": "llm_tokens", "value": "1e-999999999"}, {}, "usage", False),
    ("batch", BATCH, {"events": [_event("b1"), _event("b2", "7.25", "llm_tokens"), _event("b1")]}, {}, "usage",
     True),
    ("batch one bad event", BATCH, {"events": [_event("b3"), _event("b4", value=0)]}, {}, "usage", True),
    ("batch events not a list", BATCH, {"events": "b5"}, {}, "usage", False),
    ("batch read-only key", BATCH, {"events": [_event("b6")]}, {}, "read", False),
]

_IDS = re.compile(r"(acc|txn|key|req)_[0-9a-zA-Z]+|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _comparable(resp: httpx.Response) -> tuple[int, str, str]:
    """Status, content type and body with every id (accounts, transactions, request ids) blanked."""
    return resp.status_code, resp.headers.get("content-type", ""), _IDS.sub("ID", resp.text)


async def _account(api: httpx.AsyncClient) -> dict[str, str]:
    account = await new_account(api)
    return {"id": account, "usage": await key_for(api, account, "usage:write"),
            "read": await key_for(api, account, "billing:read")}


async def _send(api: httpx.AsyncClient, account: dict[str, str], case: tuple[Any, ...]) -> httpx.Response:
    _, path, body, headers, key, _fast = case
    auth: dict[str, str] = {}
    if key == "admin":
        body = {**body, "account_id": account["id"]}
        auth = dict(api.headers)
    elif key == "unknown":
        auth = bearer("cf_sk_" + "x" * 40)
    elif key is not None:
        auth = bearer(account[key])
    send_headers = {k: v for k, v in api.headers.items() if k.lower() != "authorization"}
    send_headers.update(auth)
    send_headers.update(headers)
    async with httpx.AsyncClient(transport=api._transport, base_url=api.base_url, headers=send_headers) as client:
        if isinstance(body, bytes):
            return await client.post(path, content=body, headers={"Content-Type": "application/json", **headers})
        if headers.get("Content-Type") == "text/plain":
            import json

            return await client.post(path, content=json.dumps(body).encode())
        return await client.post(path, json=body)


async def test_the_fast_path_answers_what_the_route_answers(api: httpx.AsyncClient,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    fast_answers: list[str] = []

    def counting(endpoint: Callable[..., Any]) -> Callable[[Any], Awaitable[Any]]:
        original = endpoint.fast_path  # type: ignore[attr-defined]

        async def fast(request: Any) -> Any:
            try:
                response = await original(request)
            except Exception:  # the endpoint's own refusal, raised from the fast path as from the route
                fast_answers.append(request.url.path)
                raise
            if response is not None:
                fast_answers.append(request.url.path)
            return response

        return fast

    with_fast, without_fast = await _account(api), await _account(api)
    start = (await balance(api, with_fast["id"]))["balance"]
    for endpoint in ENDPOINTS:
        monkeypatch.setattr(endpoint, "fast_path", counting(endpoint))
    fast_responses = []
    for case in CASES:
        before = len(fast_answers)
        fast_responses.append(await _send(api, with_fast, case))
        assert (len(fast_answers) > before) == case[5], f"{case[0]}: fast path taken = {len(fast_answers) > before}"
    for endpoint in ENDPOINTS:
        monkeypatch.delattr(endpoint, "fast_path")
    for case, fast_response in zip(CASES, fast_responses, strict=True):
        regular = await _send(api, without_fast, case)
        assert _comparable(fast_response) == _comparable(regular), case[0]
    figures = [{k: v for k, v in (await balance(api, a["id"])).items() if k not in ("account_id", "last_updated")}
               for a in (with_fast, without_fast)]
    assert figures[0] == figures[1]
    assert figures[0]["balance"] < start  # the accepted events were charged
