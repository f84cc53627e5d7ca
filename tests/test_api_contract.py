"""The OpenAPI document tells the truth: every success answer declares its body (a schema of ``{}`` can never be
violated, so schemathesis's conformance check would pass whatever came back), each list answers the shape it
declares and pages with cursors, operation ids are explicit, and what moves credits takes ``Idempotency-Key``."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis

from creditflow.api.app import create_app
from creditflow.api.openapi import build_openapi
from creditflow.config import Settings
from tests.support.api import assert_error, new_account
from tests.support.auto_recharge import api, relay, settings  # noqa: F401 - fixtures (worker + relay running)

ORGS = "/api/v1/organizations"
# Routes that keep another product's contract (the Autumn SDK drop-in: docs/autumn-compatibility.md; its answers are
# checked by the autumn-python SDK's own strict models in tests/test_autumn_sdk.py) and binary answers.
OWN_CONTRACT = {"/api/v1/customers", "/api/v1/customers/{customer_id}", "/api/v1/check", "/api/v1/track"}


def _document() -> dict[str, Any]:
    return build_openapi(create_app(Settings()))


def test_every_success_answer_declares_its_body() -> None:
    empty = []
    for path, methods in _document()["paths"].items():
        for method, operation in methods.items():
            for status, response in operation["responses"].items():
                if not status.startswith("2") or path in OWN_CONTRACT:
                    continue
                content = response.get("content")
                schema = (content or {}).get("application/json", {}).get("schema")
                if content is None or schema == {} or (schema is None and "application/pdf" not in content):
                    empty.append(f"{method.upper()} {path} {status}")
    assert empty == []


def test_every_operation_names_the_error_statuses_it_can_answer() -> None:
    """Not only through ``4XX``/``5XX`` ranges: the middlewares' and the key check's statuses on every operation, its
    own on top (track's denials), each with the error object (``/readyz`` answers its own body)."""
    missing = []
    document = _document()
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            responses = operation["responses"]
            needed = {"400", "422"} | ({"401", "403"} if operation.get("security") else set()) | (
                {"413"} if "requestBody" in operation else set()) | ({"503"} if path != "/healthz" else set())
            missing += [f"{method.upper()} {path} {status}" for status in sorted(needed - set(responses))]
            for status in needed & set(responses):
                if path != "/readyz":
                    assert responses[status]["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorBody"}, (path, status)
            if "503" in responses and path != "/readyz":
                assert "Retry-After" in responses["503"]["headers"], path
    assert missing == []
    track = document["paths"]["/api/v1/billing/track"]["post"]["responses"]
    assert {"402", "403", "404", "409", "429"} <= set(track)
    assert document["paths"]["/api/v1/accounts/{account_id}"]["get"]["responses"]["404"]


def test_operation_ids_are_explicit() -> None:
    ids = [op["operationId"] for methods in _document()["paths"].values() for op in methods.values()]
    # FastAPI's generated ids repeat the path and the method (track_api_v1_billing_track_post, readyz_readyz_get)
    assert [i for i in ids if i.endswith(("_get", "_post", "_put", "_patch", "_delete"))] == []
    assert "ops.readyz" in ids and len(ids) == len(set(ids))


async def _conforms(client: httpx.AsyncClient, response: httpx.Response) -> Any:
    """The answer's status is declared by its operation (not only through a 2XX/4XX range) and its body matches."""
    document = schemathesis.openapi.from_dict((await client.get("/openapi.json")).json())
    request = response.request
    template = request.url.path
    operation = None
    for candidate in document.get_all_operations():
        op = candidate.ok()
        if op.method.upper() == request.method and _matches(op.path, template):
            operation = op
    assert operation is not None, template
    assert str(response.status_code) in operation.definition.raw["responses"], (template, response.status_code)
    operation.validate_response(response)
    return response.json()


def _matches(template: str, path: str) -> bool:
    parts, given = template.split("/"), path.split("/")
    return len(parts) == len(given) and all(p == g or p.startswith("{") for p, g in zip(parts, given, strict=True))


async def test_organization_lists_answer_their_declared_shape_and_page_with_cursors(
        api: httpx.AsyncClient) -> None:  # noqa: F811
    a, b = await new_account(api), await new_account(api)
    org = (await api.post(ORGS, json={"name": "Enterprise"})).json()["id"]
    for account in (a, b):
        assert (await api.post(f"{ORGS}/{org}/accounts", json={"account_id": account})).status_code == 200
    for name in ("treasury", "finance"):
        assert (await api.post(f"{ORGS}/{org}/api-keys", json={"name": name})).status_code == 201
    keys = await _conforms(api, await api.get(f"{ORGS}/{org}/api-keys"))
    assert [k["name"] for k in keys["items"]] == ["finance", "treasury"] and keys["has_more"] is False

    moved = []
    for i in range(3):  # the header is the idempotency key, as on every other POST that moves credits
        resp = await api.post(f"{ORGS}/{org}/transfers", headers={"Idempotency-Key": f"move-{i}"},
                              json={"from_account_id": a, "to_account_id": b, "amount": 10 + i})
        assert (await _conforms(api, resp))["idempotency_key"] == f"move-{i}"
        moved.append(resp.json()["id"])
    replay = await api.post(f"{ORGS}/{org}/transfers", headers={"Idempotency-Key": "move-0"},
                            json={"from_account_id": a, "to_account_id": b, "amount": 10})
    assert (await _conforms(api, replay))["replayed"] is True and replay.status_code == 200
    mismatch = await api.post(f"{ORGS}/{org}/transfers", headers={"Idempotency-Key": "move-9"},
                              json={"from_account_id": a, "to_account_id": b, "amount": 1, "idempotency_key": "x"})
    assert_error(mismatch, 400, "idempotency_key_mismatch")

    first = await _conforms(api, await api.get(f"{ORGS}/{org}/transfers", params={"limit": 2}))
    assert [t["id"] for t in first["items"]] == moved[:0:-1] and first["has_more"] is True
    rest = await _conforms(api, await api.get(f"{ORGS}/{org}/transfers",
                                              params={"limit": 2, "starting_after": moved[1]}))
    assert [t["id"] for t in rest["items"]] == [moved[0]] and rest["has_more"] is False
    back = await _conforms(api, await api.get(f"{ORGS}/{org}/transfers",
                                              params={"limit": 1, "ending_before": moved[0]}))
    assert [t["id"] for t in back["items"]] == [moved[1]] and back["has_more"] is True
    other = (await api.post(ORGS, json={"name": "Other"})).json()["id"]
    foreign = await api.get(f"{ORGS}/{other}/transfers", params={"starting_after": moved[0]})
    assert assert_error(foreign, 422, "validation_error")["param"] == "starting_after"


@pytest.mark.temporal
async def test_an_agents_trail_pages_with_cursors(api: httpx.AsyncClient, relay: Any) -> None:  # noqa: F811
    """The trail used to stop at its first 100 events, with nothing saying so."""
    account = await new_account(api)
    assert (await api.post("/api/v1/agents", json={"account_id": account, "id": "voice-1"})).status_code == 201
    for i in range(2):
        for action in ("pause", "resume"):
            resp = await api.post(f"/api/v1/agents/voice-1/{action}", json={"account_id": account, "reason": f"r{i}"})
            assert resp.status_code == 200, resp.text
    trail = f"/api/v1/agents/voice-1/events?account_id={account}"
    every = await _conforms(api, await api.get(trail))
    assert [(e["action"], e["reason"]) for e in every["items"]] == [
        ("paused", "r0"), ("resumed", "r0"), ("paused", "r1"), ("resumed", "r1")] and every["has_more"] is False
    ids = [e["id"] for e in every["items"]]
    first = await _conforms(api, await api.get(f"{trail}&limit=3"))
    assert ([e["id"] for e in first["items"]], first["has_more"]) == (ids[:3], True)
    rest = await _conforms(api, await api.get(f"{trail}&limit=3&starting_after={ids[2]}"))
    assert ([e["id"] for e in rest["items"]], rest["has_more"]) == (ids[3:], False)
    back = await _conforms(api, await api.get(f"{trail}&limit=2&ending_before={ids[3]}"))
    assert ([e["id"] for e in back["items"]], back["has_more"]) == (ids[1:3], True)
    both = await api.get(f"{trail}&starting_after={ids[0]}&ending_before={ids[3]}")
    assert assert_error(both, 422, "validation_error")["param"] == "ending_before"


def test_duplicate_paths_are_marked_deprecated_and_the_names_to_use_are_not() -> None:
    paths = _document()["paths"]
    aliases = [("get", "/api/v1/billing/wallet"), ("get", "/api/v1/billing/wallet/auto-reload"),
               ("put", "/api/v1/billing/wallet/auto-reload"), ("post", "/api/v1/billing/auto-recharge"),
               ("post", "/api/v1/billing/limits"), ("post", "/api/v1/billing/alerts"),
               ("post", "/api/v1/billing/checkout")]
    names = [("get", "/api/v1/billing/balance"), ("get", "/api/v1/billing/auto-recharge"),
             ("put", "/api/v1/billing/auto-recharge"), ("put", "/api/v1/billing/limits"),
             ("put", "/api/v1/billing/alerts"), ("post", "/api/v1/checkout/sessions")]
    assert [(m, p) for m, p in aliases if not paths[p][m].get("deprecated")] == []
    assert [(m, p) for m, p in names if paths[p][m].get("deprecated")] == []
