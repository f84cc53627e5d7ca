"""API version 2026-12-05: every amount answered as a decimal string, the same values as the default version's exact
JSON numbers; requests take both in every version; /openapi.json declares one type per amount for each version; the
Python client opts in."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import httpx
import schemathesis

from creditflow.api.app import create_app
from creditflow.config import Settings
from creditflow.sdk import DECIMAL_STRINGS_VERSION, AsyncCreditflow
from tests.conftest import ADMIN_KEY
from tests.support.api import bearer, key_for, new_account

STRINGS = {"Creditflow-Version": "2026-12-05"}
DEFAULT = {"Creditflow-Version": "2026-12-01"}


def exact(response: httpx.Response) -> Any:
    """The body as written: JSON numbers as Decimal/int, never floats."""
    return json.loads(response.content, parse_float=Decimal)


def same_values(numbers: Any, strings: Any, where: str = "$") -> list[str]:
    """Asserts the two answers are equal except that amounts (numbers of the first) are decimal strings with the
    same digits in the second; returns where those amounts are."""
    if isinstance(numbers, dict):
        assert isinstance(strings, dict) and numbers.keys() == strings.keys(), where
        return [w for k in numbers for w in same_values(numbers[k], strings[k], f"{where}.{k}")]
    if isinstance(numbers, list):
        assert isinstance(strings, list) and len(numbers) == len(strings), where
        pairs = enumerate(zip(numbers, strings, strict=True))
        return [w for i, (a, b) in pairs for w in same_values(a, b, f"{where}[{i}]")]
    if isinstance(numbers, int | Decimal) and not isinstance(numbers, bool) and isinstance(strings, str):
        assert strings == str(numbers), (where, numbers, strings)
        return [where]
    assert numbers == strings, (where, numbers, strings)
    return []


async def test_the_same_calls_answer_the_same_amounts_as_numbers_or_as_decimal_strings(api: httpx.AsyncClient) -> None:
    account = await new_account(api)
    key = bearer(await key_for(api, account, "billing:read", "billing:write", "usage:write"))
    document = schemathesis.openapi.from_dict((await api.get("/openapi.json", headers=STRINGS)).json())
    agent = await api.post("/api/v1/agents", headers=key, json={"id": "bot", "metadata": {"weight": 1.5, "n": 2}})
    assert agent.status_code == 201, agent.text
    tracked = await api.post("/api/v1/billing/track", headers={**key, "Idempotency-Key": "t-1"},
                             json={"feature_id": "llm_tokens", "value": 15, "agent_id": "bot"})
    assert tracked.status_code == 200, tracked.text
    replay = await api.post("/api/v1/billing/track", headers={**key, **STRINGS, "Idempotency-Key": "t-1"},
                            json={"feature_id": "llm_tokens", "value": "15", "agent_id": "bot"})
    assert replay.status_code == 200 and replay.headers["creditflow-version"] == "2026-12-05"
    first, again = exact(tracked), exact(replay)
    assert (first["credits_charged"], first["balance"]) == (Decimal("1.5"), Decimal("4998.5"))
    assert (again["credits_charged"], again["balance"], again["replayed"]) == ("1.5", "4998.5", True)
    assert same_values({**first, "replayed": True}, again) == [
        f"$.{k}" for k in first if isinstance(first[k], int | Decimal) and not isinstance(first[k], bool)
        and k in again and isinstance(again[k], str)]

    calls = [("GET", "/api/v1/billing/balance", None), ("GET", "/api/v1/billing/transactions", None),
             ("GET", "/api/v1/billing/usage/items", None), ("GET", "/api/v1/billing/usage", None),
             ("GET", "/api/v1/billing/spend", None), ("GET", "/api/v1/agents", None),
             ("GET", "/api/v1/agents/bot", None), ("GET", "/api/v1/billing/plans", None),
             ("POST", "/api/v1/billing/check", {"feature_id": "llm_tokens", "value": "7"}),
             ("POST", "/api/v1/billing/check", {"feature_id": "voice_minute", "value": 2.5})]
    amounts: dict[str, list[str]] = {}
    for method, path, body in calls:
        plain = await api.request(method, path, headers=key, json=body)
        pinned = await api.request(method, path, headers={**key, **DEFAULT}, json=body)
        strings = await api.request(method, path, headers={**key, **STRINGS}, json=body)
        assert plain.status_code == strings.status_code == 200, (path, plain.text, strings.text)
        assert plain.content == pinned.content, path  # no header is the default version
        amounts[path + (f" {body['feature_id']}" if body else "")] = same_values(exact(plain), exact(strings))
        document.find_operation_by_path(method, path).validate_response(strings)  # matches the strings document
    assert amounts["/api/v1/billing/balance"] == [
        "$.balance", "$.pending_charges", "$.available", "$.overage_credit_line", "$.available_to_use",
        "$.total_credits", "$.usage_this_period", "$.remaining_credits"]
    assert amounts["/api/v1/billing/transactions"] == [
        "$.items[0].amount", "$.items[0].balance_after", "$.items[1].amount", "$.items[1].balance_after"]
    assert amounts["/api/v1/billing/usage/items"] == [
        "$.items[0].quantity", "$.items[0].credits_per_unit", "$.items[0].credits"]
    assert amounts["/api/v1/billing/spend"] == ["$.today", "$.yesterday", "$.this_month",
                                                "$.agents[0].spent_this_month"]
    assert amounts["/api/v1/billing/check voice_minute"] and amounts["/api/v1/billing/check llm_tokens"]
    # Customer metadata comes back as it was given, in every version.
    bot = exact(await api.get("/api/v1/agents/bot", headers={**key, **STRINGS}))
    assert bot["metadata"] == {"weight": Decimal("1.5"), "n": 2}
    # Integers stay integers: the micros of a transaction.
    txn = exact(await api.get("/api/v1/billing/transactions", headers={**key, **STRINGS}))["items"][0]
    assert txn["amount"] == "-1.5"
    assert all(not isinstance(v, str) or not k.endswith("_micros") for k, v in txn.items())


async def test_requests_take_numbers_and_strings_in_every_version(api: httpx.AsyncClient) -> None:
    account = await new_account(api)
    key = bearer(await key_for(api, account, "usage:write", "billing:read"))
    answers = []
    for i, (version, value) in enumerate([(DEFAULT, 15), (DEFAULT, "15"), (STRINGS, 15), (STRINGS, "15")]):
        resp = await api.post("/api/v1/billing/track", headers={**key, **version, "Idempotency-Key": f"k{i}"},
                              json={"feature_id": "llm_tokens", "value": value})
        assert resp.status_code == 200, resp.text
        answers.append(exact(resp)["credits_charged"])
    assert answers == [Decimal("1.5"), Decimal("1.5"), "1.5", "1.5"]
    bad = await api.post("/api/v1/billing/track", headers={**key, **STRINGS, "Idempotency-Key": "k9"},
                         json={"feature_id": "llm_tokens", "value": "1.5e-999999999"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error"


async def test_the_openapi_document_of_each_version_declares_one_type_per_amount(api: httpx.AsyncClient) -> None:
    plain = (await api.get("/openapi.json")).json()
    strings = (await api.get("/openapi.json", headers=STRINGS)).json()
    assert (plain["info"]["x-creditflow-version"], strings["info"]["x-creditflow-version"]) == (
        "2026-12-01", "2026-12-05")
    balance_p, balance_s = (doc["components"]["schemas"]["Balance"]["properties"]["available"]
                            for doc in (plain, strings))
    assert balance_p["type"] == "number"
    assert (balance_s["type"], balance_s["format"]) == ("string", "decimal")
    value_p, value_s = (doc["components"]["schemas"]["TrackRequest"]["properties"]["value"]
                        for doc in (plain, strings))
    assert value_p["type"] == "number" and value_s["type"] == "string"

    def amount_types(node: Any) -> set[str]:
        """Every type an amount is declared with anywhere: never both ``number`` and ``string`` for one."""
        found: set[str] = set()
        if isinstance(node, dict):
            for branch in (node.get("anyOf") or []):
                kinds = {b.get("type") for b in node["anyOf"]}
                assert not {"number", "string"} <= kinds, node
                found |= amount_types(branch)
            found |= {t for v in node.values() for t in amount_types(v)}
            if node.get("format") == "decimal" or node.get("type") == "number":
                found.add(node["type"])
        elif isinstance(node, list):
            found |= {t for v in node for t in amount_types(v)}
        return found

    assert amount_types(plain["paths"]) | amount_types(plain["components"]) >= {"number"}
    assert "string" in amount_types(strings["components"])
    # Webhook bodies are not answers to a request: their amounts are numbers whatever the version.
    assert strings["components"]["schemas"]["BalanceLow"]["properties"]["threshold"]["type"] == "number"


async def test_the_python_client_opts_in_to_decimal_strings(settings: Settings) -> None:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://creditflow.test",
                                     headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as raw:
            account = await new_account(raw)
            key = await key_for(raw, account, "usage:write", "billing:read")
        results = {}
        for version in ("2026-12-01", DECIMAL_STRINGS_VERSION):
            async with AsyncCreditflow(key, "http://creditflow.test", transport=transport, version=version,
                                       max_retries=0) as cf:
                tracked = await cf.track("llm_tokens", 15, idempotency_key=f"sdk-{version}")
                results[version] = (tracked.credits_charged, (await cf.balance()).available,
                                    (await cf.check("voice_minute", "2.5")).credits_required)
        assert results["2026-12-01"] == (Decimal("1.5"), Decimal("4998.5"), Decimal(25))
        assert results[DECIMAL_STRINGS_VERSION] == (Decimal("1.5"), Decimal("4997"), Decimal(25))
        assert all(isinstance(v, Decimal) for r in results.values() for v in r)
