"""Admin account listing, search and lookup by external id; cursor pagination on every list (stable
under inserts)."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
from psycopg_pool import AsyncConnectionPool

from creditflow.config import Settings
from creditflow.invoicing import store
from creditflow.invoicing.store import InvoiceRequest
from creditflow.notify.channels import Outgoing, webhook_body
from creditflow.notify.destinations import Destinations
from creditflow.notify.events import WEBHOOK_EVENTS, envelopes
from creditflow.notify.templates import DEFAULT_CHANNELS, TEMPLATES_DIR, canonical_kind
from creditflow.payments.reconcile import open_run
from tests.support.api import assert_error, new_account


async def test_accounts_list_search_page_and_lookup_by_external_id(api: httpx.AsyncClient) -> None:
    tag = uuid.uuid4().hex[:10]
    ids = [await new_account(api, name=f"Acme {tag} {i}", external_id=f"ext-{tag}-{i}") for i in range(5)]
    other = await new_account(api, name="Globex", billing_email=f"ap-{tag}@globex.test")
    path = "/api/v1/accounts"
    everything = (await api.get(path, params={"q": f"acme {tag}"})).json()
    assert [a["id"] for a in everything["items"]] == ids[::-1] and everything["has_more"] is False
    assert everything["items"][0]["name"] == f"Acme {tag} 4" and everything["items"][0]["balance"]["balance"] == 5000
    seen, after = [], None
    for expected_more in (True, True, False):
        page = (await api.get(path, params={"q": f"ACME {tag}", "limit": 2,
                                            **({"starting_after": after} if after else {})})).json()
        seen += [a["id"] for a in page["items"]]
        assert page["has_more"] is expected_more
        after = page["items"][-1]["id"]
    assert seen == ids[::-1]
    back = (await api.get(path, params={"q": tag, "limit": 2, "ending_before": ids[1]})).json()
    assert [a["id"] for a in back["items"]] == [ids[3], ids[2]] and back["has_more"] is True
    by_email = (await api.get(path, params={"q": f"ap-{tag}@"})).json()
    assert [a["id"] for a in by_email["items"]] == [other]
    by_external = (await api.get(path, params={"external_id": f"ext-{tag}-3"})).json()
    assert [a["id"] for a in by_external["items"]] == [ids[3]] and by_external["has_more"] is False
    assert (await api.get(path, params={"external_id": f"ext-{tag}-9"})).json()["items"] == []
    assert (await api.get(path, params={"q": "100%_" + tag})).json()["items"] == []  # LIKE wildcards are literal
    active = (await api.get(path, params={"q": tag, "status": "active"})).json()
    assert len(active["items"]) == 6
    assert (await api.get(path, params={"q": tag, "status": "closed"})).json()["items"] == []
    unknown = await api.get(path, params={"starting_after": "acc_" + "0" * 32})
    assert assert_error(unknown, 422, "validation_error")["param"] == "starting_after"
    assert_error(await api.get(path, params={"limit": 0}), 422, "validation_error")


async def test_accounts_list_is_admin_only(api: httpx.AsyncClient) -> None:
    acc = await new_account(api)
    key = (await api.post(f"/api/v1/accounts/{acc}/api-keys", json={"scopes": ["billing:read"]})).json()["secret"]
    resp = await api.get("/api/v1/accounts", headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 403, resp.text
    assert resp.json()["error"]["type"] == "permission_error"


async def _track(api: httpx.AsyncClient, acc: str, n: int) -> list[str]:
    """``n`` usage events, oldest first; their transaction ids."""
    ids = []
    for i in range(n):
        resp = await api.post("/api/v1/billing/track", json={"account_id": acc, "feature_id": "chat_message",
                                                             "value": 1}, headers={"Idempotency-Key": f"msg-{i}"})
        assert resp.status_code == 200, resp.text
        ids.append(resp.json()["transaction_id"])
    return ids


async def _pages(api: httpx.AsyncClient, path: str, params: dict[str, object],
                 limit: int) -> list[tuple[list[str], bool]]:
    """Every page of ``path`` forward with ``starting_after``: (ids, has_more) per page."""
    pages, after = [], None
    while True:
        resp = await api.get(path, params={**params, "limit": limit, **({"starting_after": after} if after else {})})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        pages.append(([item["id"] for item in body["items"]], body["has_more"]))
        if not body["has_more"]:
            return pages
        after = body["items"][-1]["id"]


async def test_usage_items_and_transactions_page_with_cursors(api: httpx.AsyncClient) -> None:
    acc = await new_account(api)
    tracked = await _track(api, acc, 5)
    newest = tracked[::-1]
    usage = "/api/v1/billing/usage/items"
    assert await _pages(api, usage, {"account_id": acc}, 2) == [(newest[:2], True), (newest[2:4], True),
                                                                 (newest[4:], False)]
    back = (await api.get(usage, params={"account_id": acc, "limit": 2, "ending_before": tracked[1]})).json()
    assert [i["id"] for i in back["items"]] == [tracked[3], tracked[2]] and back["has_more"] is True
    txns = "/api/v1/billing/transactions"
    everything = (await api.get(txns, params={"account_id": acc})).json()
    assert [t["id"] for t in everything["items"]][:5] == newest and everything["total"] == 6  # + welcome bonus
    assert everything["has_more"] is False
    welcome = everything["items"][5]["id"]
    assert await _pages(api, txns, {"account_id": acc}, 4) == [(newest[:4], True), ([newest[4], welcome], False)]
    first = (await api.get(txns, params={"account_id": acc, "limit": 4})).json()
    old_style = (await api.get(txns, params={"account_id": acc, "limit": 4, "cursor": first["next_cursor"]})).json()
    assert [t["id"] for t in old_style["items"]] == [newest[4], welcome]  # next_cursor still works
    back = (await api.get(txns, params={"account_id": acc, "limit": 2, "ending_before": welcome})).json()
    assert [t["id"] for t in back["items"]] == [newest[3], newest[4]] and back["has_more"] is True
    other = await new_account(api)
    for path in (usage, txns):
        foreign = await api.get(path, params={"account_id": other, "starting_after": tracked[0]})
        assert assert_error(foreign, 422, "validation_error")["param"] == "starting_after"
        unknown = await api.get(path, params={"account_id": acc, "ending_before": "txn_" + "0" * 32})
        assert assert_error(unknown, 422, "validation_error")["param"] == "ending_before"
        wrong_kind = await api.get(path, params={"account_id": acc, "starting_after": "acc_" + "0" * 32})
        assert_error(wrong_kind, 422, "validation_error")


async def test_invoices_page_with_cursors(api: httpx.AsyncClient, pool: AsyncConnectionPool,
                                          settings: Settings) -> None:
    """Invoices stored directly (as tests/test_invoices.py does), issued a day apart, newest first."""
    acc = await new_account(api)
    begin = datetime(2026, 1, 1, tzinfo=UTC)
    ids = []
    for i in range(5):
        start = begin + timedelta(days=i)
        record, _ = await store.prepare(
            pool, InvoiceRequest(account_id=acc, period_start=start, period_end=start + timedelta(days=1),
                                 period_key=f"day-{i}", plan_id="starter"),
            catalog=settings.plan_catalog(), seller_name="Creditflow Inc.", issued_at=start + timedelta(days=1),
            due_days=14)
        await store.mark_open(pool, record.id)
        ids.append(record.id)
    newest = ids[::-1]
    path = "/api/v1/billing/invoices"
    assert await _pages(api, path, {"account_id": acc}, 2) == [(newest[:2], True), (newest[2:4], True),
                                                                (newest[4:], False)]
    back = (await api.get(path, params={"account_id": acc, "limit": 2, "ending_before": ids[0]})).json()
    assert [i["id"] for i in back["items"]] == [ids[2], ids[1]] and back["has_more"] is True
    assert back["payments_due"] == {"count": 5, "amount_usd": 245}  # the sum is over all, not the page
    unknown = await api.get(path, params={"account_id": acc, "starting_after": "inv_" + "0" * 32})
    assert assert_error(unknown, 422, "validation_error")["param"] == "starting_after"


async def test_api_keys_page_with_cursors(api: httpx.AsyncClient) -> None:
    acc = await new_account(api)
    ids = []
    for i in range(5):
        created = await api.post(f"/api/v1/accounts/{acc}/api-keys", json={"name": f"k{i}", "scopes": ["billing:read"]})
        assert created.status_code == 201, created.text
        ids.append(created.json()["id"])
    path = f"/api/v1/accounts/{acc}/api-keys"
    newest = ids[::-1]
    assert await _pages(api, path, {}, 2) == [(newest[:2], True), (newest[2:4], True), (newest[4:], False)]
    everything = (await api.get(path)).json()
    assert [k["name"] for k in everything["items"]] == ["k4", "k3", "k2", "k1", "k0"] and not everything["has_more"]
    back = (await api.get(path, params={"limit": 2, "ending_before": ids[0]})).json()
    assert [k["id"] for k in back["items"]] == [ids[2], ids[1]] and back["has_more"] is True
    other = await new_account(api)
    foreign = await api.get(f"/api/v1/accounts/{other}/api-keys", params={"starting_after": ids[0]})
    assert assert_error(foreign, 422, "validation_error")["param"] == "starting_after"


async def test_reconciliation_runs_page_with_cursors(api: httpx.AsyncClient, pool: AsyncConnectionPool) -> None:
    """Runs opened directly (the workflow is tests/test_reconcile.py's); other tests' runs may share the list."""
    now = datetime.now(UTC)
    mine = [f"reconcile:manual:{uuid.uuid4().hex}" for _ in range(5)]
    for run_id in mine:
        await open_run(pool, run_id, trigger="manual", since=now - timedelta(hours=1), now=now)
    path = "/api/v1/reconciliation/runs"
    pages = await _pages(api, path, {}, 2)
    listed = [run_id for ids, _ in pages for run_id in ids]
    assert len(listed) == len(set(listed)) and all(len(ids) == 2 for ids, _ in pages[:-1])
    assert [run_id for run_id in listed if run_id in mine] == mine[::-1]
    back = (await api.get(path, params={"limit": 2, "ending_before": mine[0]})).json()
    assert [r["id"] for r in back["items"]] == listed[listed.index(mine[0]) - 2:listed.index(mine[0])]
    unknown = await api.get(path, params={"starting_after": "reconcile:manual:nope"})
    assert assert_error(unknown, 422, "validation_error")["param"] == "starting_after"


# --- the OpenAPI webhooks section ----------------------------------------------------------------------------------

ROOT = Path(__file__).parent.parent
_CONSTANT = re.compile(r'^([A-Z_]+) = (?:"([a-z_.]+)"|([A-Z_]+))', re.M)
# Producers whose kind is a variable: the literals it is set from are matched by the patterns below.
VARIABLE_KINDS = {("workflows/account_agents.py", "kind"), ("workflows/account_state.py", "kind"),
                  ("workflows/invoice.py", "kind"), ("workflows/refund.py", "kind"),
                  # A webhook redelivery sends again the kind of a notification already recorded: no new kind.
                  ("creditflow/notify/deliveries.py", "done")}


def sent_kinds() -> set[str]:
    """Every notification kind the source can send: ``Notification(kind=...)`` literals and constants, the helpers'
    literal kinds (``_notify("...")``, ``notify_customer("...")``, ``_email(inv, "...")``) and
    ``kind = "a" if ... else "b"``."""
    files = [p for d in ("workflows", "activities", "creditflow") for p in (ROOT / d).rglob("*.py")]
    sources = {str(p.relative_to(ROOT)): p.read_text() for p in files}
    constants: dict[str, str] = {}
    for text in sources.values():
        for name, literal, _alias in _CONSTANT.findall(text):
            if literal:
                constants[name] = literal
    for text in sources.values():  # NAME = OTHER_NAME
        for name, _literal, alias in _CONSTANT.findall(text):
            if alias and alias in constants:
                constants[name] = constants[alias]
    kinds, variables = set(), set()
    for path, text in sources.items():
        for call in re.finditer(r"Notification\((.{0,300}?)\bkind=([A-Za-z_]+|\"[a-z_.]+\")", text, re.S):
            arg = call.group(2)
            if arg.startswith('"'):
                kinds.add(arg.strip('"'))
            elif arg in constants:
                kinds.add(constants[arg])
            else:
                variables.add((path, arg))
        kinds.update(re.findall(r'(?:_notify|notify_customer)\(\s*"([a-z_.]+)"', text))
        kinds.update(re.findall(r'_email\(\s*\w+,\s*"([a-z_.]+)"', text))
        for a, b in re.findall(r'kind = "([a-z_.]+)" if .+ else "([a-z_.]+)"', text):
            kinds.update((a, b))
    assert variables == VARIABLE_KINDS, variables
    return {canonical_kind(kind) for kind in kinds}


def test_every_webhook_event_kind_is_declared() -> None:
    sent = sent_kinds()
    assert {"topup.receipt", "balance.low", "limit.reached", "payment.disputed", "agent.resumed", "invoice.paid",
            "recurring_charge.failed", "auto_recharge.daily_cap_reached", "usage.daily_threshold"} <= sent
    templated = {p.name.removesuffix(".j2") for p in TEMPLATES_DIR.glob("*.j2") if not p.name.startswith("_")}
    assert sent | templated | set(DEFAULT_CHANNELS) == set(WEBHOOK_EVENTS)


async def test_openapi_declares_a_typed_webhook_per_event_kind(api: httpx.AsyncClient) -> None:
    schema = (await api.get("/openapi.json")).json()
    assert schema["openapi"].startswith("3.1")
    assert set(schema["webhooks"]) == set(WEBHOOK_EVENTS)
    components = schema["components"]["schemas"]
    for kind, hook in schema["webhooks"].items():
        ref = hook["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        body = components[ref]
        assert set(body["required"]) == {"id", "type", "created", "account_id", "data"}
        assert body["properties"]["type"]["const"] == kind
        assert "$ref" in body["properties"]["data"]
    low = components["BalanceLow"]
    assert low["properties"]["threshold"] == {"title": "Threshold", "type": "number"}
    assert low["properties"]["threshold_micros"]["type"] == "integer"


def test_webhook_bodies_carry_amounts_in_credits_and_match_their_kind() -> None:
    dest = Destinations(account_id="acc_1", account_name="A", billing_email="a@b.co")
    out = Outgoing(kind="balance.low", event_id="ntf_1", created=1, rendered=None, destinations=dest,
                   payload={"threshold_micros": 4_990_000_000, "available_micros": 4_989_500_000})
    body = json.loads(webhook_body(out), parse_float=Decimal)
    assert body["data"] == {"threshold_micros": 4_990_000_000, "threshold": 4990,
                            "available_micros": 4_989_500_000, "available": Decimal("4989.5")}
    envelopes()["balance.low"].model_validate(body)
    receipt = Outgoing(kind="topup.receipt", event_id="ntf_2", created=1, rendered=None, destinations=dest,
                       payload={"charge_id": "chg_1", "amount_cents": 2550, "amount": "$25.50", "credits": 2550})
    data = json.loads(webhook_body(receipt), parse_float=Decimal)["data"]
    assert data["amount_usd"] == Decimal("25.5") and data["amount"] == "$25.50" and data["credits"] == 2550
    envelopes()["topup.receipt"].model_validate({"id": "ntf_2", "type": "topup.receipt", "created": 1,
                                                 "account_id": "acc_1", "data": data})
