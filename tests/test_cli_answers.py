"""On-call answers from the CLI: one transaction in full, filtered history, an agent's audit trail, --json."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from typer.testing import CliRunner, Result

from creditflow import agents_cli, ops_cli
from creditflow.agents_cli import agents_app
from creditflow.config import get_settings
from creditflow.ledger import agents
from creditflow.ops_cli import wallet_app
from tests.support.api import new_account, track
from tests.support.cli import cli_environment

runner = CliRunner()


@pytest.fixture
def cli_env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with cli_environment(monkeypatch, database_url, consoles=(ops_cli.console, agents_cli.console)):
        yield


async def invoke(app: object, *args: str) -> Result:
    """The command in a thread: it runs its own event loop (asyncio.run), as from a shell."""
    return await asyncio.to_thread(runner.invoke, app, list(args))  # type: ignore[arg-type]


async def cli_json(app: object, *args: str, code: int = 0) -> Any:
    result = await invoke(app, *args, "--json")
    assert result.exit_code == code, result.output
    assert result.stdout.strip(), (args, result.output, result.exception)
    return json.loads(result.stdout)


async def usage_account(api: httpx.AsyncClient) -> tuple[str, str]:
    """An account with agent bot-1, two chat messages and 1,500 LLM tokens by it; returns (account, txn id)."""
    account = await new_account(api)
    resp = await api.post("/api/v1/agents", json={"account_id": account, "id": "bot-1", "name": "Support bot"})
    assert resp.status_code == 201, resp.text
    for i in range(2):
        assert (await track(api, account, "chat_message", 1, f"chat-{i}", agent_id="bot-1")).status_code == 200
    tokens = await track(api, account, "llm_tokens", 1500, "conv-42-turn-3", agent_id="bot-1",
                         metadata={"conversation_id": "conv-42", "model": "small"})
    assert tokens.status_code == 200, tokens.text
    return account, tokens.json()["transaction_id"]


async def test_wallet_show_answers_why_charged(api: httpx.AsyncClient, cli_env: None) -> None:
    account, txn = await usage_account(api)
    view = await cli_json(wallet_app, "show", txn, "--account", account)
    assert view["id"] == txn and view["type"] == "usage" and view["amount"] == -150  # 1,500 tokens x 0.1
    assert (view["feature_id"], view["quantity"], view["credits_per_unit"]) == ("llm_tokens", 1500, 0.1)
    assert (view["agent_id"], view["idempotency_key"]) == ("bot-1", "conv-42-turn-3")
    assert view["metadata"] == {"conversation_id": "conv-42", "model": "small"}
    [rate] = view["rate_version"]["rate_card"]
    assert rate["feature_id"] == "llm_tokens" and rate["credits_per_unit"] == 0.1 and isinstance(rate["rate_id"], int)
    assert view["caused_by"] == {"kind": "usage", "workflow_id": None,
                                 "via": "metering call (POST /api/v1/billing/track)"}
    # The readable view has the same facts.
    table = await invoke(wallet_app, *["show", txn, "--account", account])
    assert table.exit_code == 0 and "conv-42-turn-3" in table.output and "llm_tokens" in table.output

    # A usage row is found through its account: without it, a clear refusal.
    refused = await cli_json(wallet_app, "show", txn, code=1)
    assert refused["error"]["code"] == "not_found" and "--account" in refused["error"]["message"]
    assert (await cli_json(wallet_app, "show", "txn_123", code=1))["error"]["code"] == "invalid_id"

    # A money movement needs no account: the welcome bonus.
    history = await cli_json(wallet_app, "history", account, "--type", "welcome_bonus")
    [bonus] = history["items"]
    shown = await cli_json(wallet_app, "show", bonus["id"])
    assert (shown["amount"], shown["caused_by"]["kind"]) == (5000, "account_created")


async def test_history_filters_and_unknown_values_refused(api: httpx.AsyncClient, pool: AsyncConnectionPool,
                                                          cli_env: None) -> None:
    account, _ = await usage_account(api)
    assert (await track(api, account, "chat_message", 1, "no-agent")).status_code == 200
    everything = await cli_json(wallet_app, "history", account)
    assert everything["total"] == 5 and everything["sum"] == 5000 - 2 - 150 - 1
    by_agent = await cli_json(wallet_app, "history", account, "--agent", "bot-1")
    assert by_agent["total"] == 3 and by_agent["sum"] == -152
    chats = await cli_json(wallet_app, "history", account, "--agent", "bot-1", "--feature", "chat_message", "--type",
                     "usage")
    assert [i["idempotency_key"] for i in chats["items"]] == ["chat-1", "chat-0"] and chats["sum"] == -2
    future = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    assert (await cli_json(wallet_app, "history", account, "--since", future))["total"] == 0
    assert (await cli_json(wallet_app, "history", account, "--until", future))["total"] == 5
    assert (await cli_json(wallet_app, "history", account, "--type", "refund"))["total"] == 0  # a type, none yet

    typo = await cli_json(wallet_app, "history", account, "--type", "usge", code=1)
    assert typo["error"]["code"] == "validation_error" and "usage" in typo["error"]["message"]
    wrong_feature = await cli_json(wallet_app, "history", account, "--feature", "chat_mesage", code=1)
    assert wrong_feature["error"]["code"] == "unknown_feature"
    wrong_agent = await cli_json(wallet_app, "history", account, "--agent", "bot-2", code=1)
    assert wrong_agent["error"]["code"] == "unknown_agent"
    human = await invoke(wallet_app, *["history", account, "--type", "usge"])
    assert human.exit_code == 1 and "validation_error" in human.output and "0 of 0" not in human.output


async def test_agents_list_and_events_say_when_paused_and_until_when(api: httpx.AsyncClient,
                                                                     pool: AsyncConnectionPool,
                                                                     cli_env: None) -> None:
    account, _ = await usage_account(api)
    resume_at = datetime(2031, 1, 2, tzinfo=UTC)
    # The account workflow's writer (what its pause activities call): a system pause for the daily limit.
    await agents.set_status(pool, account, "bot-1", paused=True, actor="system", reason="daily limit reached",
                            resume_at=resume_at)
    [listed] = await cli_json(agents_app, "list", account)
    assert (listed["status"], listed["paused_by"], listed["pause_reason"]) == ("paused", "system",
                                                                              "daily limit reached")
    assert listed["resume_at"] == "2031-01-02T00:00:00Z" and listed["paused_at"]
    assert listed["month_spent"] == 152
    table = await invoke(agents_app, *["list", account])
    assert table.exit_code == 0 and "2031-01-02" in table.output

    await agents.set_status(pool, account, "bot-1", paused=False, actor="operator ada (CLI)", reason="raised")
    trail = await cli_json(agents_app, "events", account, "bot-1")
    assert [(e["action"], e["actor"], e["reason"]) for e in trail["events"]] == [
        ("paused", "system", "daily limit reached"), ("resumed", "operator ada (CLI)", "raised")]
    assert all(e["created_at"] for e in trail["events"]) and trail["agent"]["status"] == "active"
    assert (await cli_json(agents_app, "events", account, "ghost", code=1))["error"]["code"] == "unknown_agent"


async def test_json_on_the_other_operator_commands(api: httpx.AsyncClient, cli_env: None) -> None:
    from creditflow.cli import app

    features = await cli_json(app, "ratecard", "show")
    tokens = next(f for f in features if f["id"] == "llm_tokens")
    assert tokens["credits_per_unit"] == 0.1 and tokens["unit"]
    assert await cli_json(app, "payment-events", "failed") == []
    account = await new_account(api)
    found = await cli_json(app, "charges", account)
    assert found == {"auto_recharge": None, "charges": []}
    assert (await cli_json(app, "charges", account, "--kind", "recharge", code=1))["error"]["code"] == \
        "validation_error"
    shown = await cli_json(app, "accounts", "show", account)
    assert shown["id"] == account and shown["balance"]["balance"] == 5000
    assert (await cli_json(app, "wallet", "balance", account))["balance"] == 5000


@pytest.fixture
def api_server(settings: Any) -> Iterator[str]:
    """The real app served over HTTP in a thread (the CLI is a separate client, as on an on-call laptop)."""
    import threading
    import time

    import uvicorn

    from creditflow.api.app import create_app
    from tests.conftest import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the API did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


async def test_operator_answers_through_the_api_with_an_admin_key(
        api: httpx.AsyncClient, pool: AsyncConnectionPool, cli_env: None, api_server: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from creditflow.cli import app
    from tests.conftest import ADMIN_KEY

    account, txn = await usage_account(api)
    await agents.set_status(pool, account, "bot-1", paused=True, actor="system", reason="daily limit reached",
                            resume_at=datetime(2031, 1, 2, tzinfo=UTC))
    commands = [("wallet", "history", account, "--agent", "bot-1"), ("wallet", "show", txn, "--account", account),
                ("agents", "list", account), ("agents", "events", account, "bot-1"), ("charges", account)]
    from_database = [await cli_json(app, *c) for c in commands]

    monkeypatch.delenv("CREDITFLOW_DATABASE_URL")
    monkeypatch.setenv("CREDITFLOW_API_URL", api_server)
    monkeypatch.setenv("CREDITFLOW_ADMIN_API_KEY", ADMIN_KEY)
    get_settings.cache_clear()
    from_api = [await cli_json(app, *c) for c in commands]
    assert from_api == from_database
    assert from_api[0]["total"] == 3 and from_api[2][0]["status"] == "paused"
    typo = await cli_json(app, "wallet", "history", account, "--type", "usge", code=1)
    assert typo["error"]["code"] == "validation_error"
    table = await invoke(app, "agents", "list", account)
    assert table.exit_code == 0 and "2031-01-02" in table.output

    monkeypatch.setenv("CREDITFLOW_ADMIN_API_KEY", "cf_admin_wrong_key_123")
    get_settings.cache_clear()
    assert (await cli_json(app, "charges", account, code=1))["error"]["code"] == "unauthorized"


async def test_verify_and_reconciliation_answers_through_the_api_with_an_admin_key(
        api: httpx.AsyncClient, pool: AsyncConnectionPool, cli_env: None, api_server: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The runbook's "a reconciliation difference" needs no database credentials either: `verify` and
    `reconcile --list|--show` print the same through the API as from the database."""
    from creditflow import reconcile_cli, verify_cli
    from creditflow.cli import app
    from creditflow.payments.reconcile import complete_run, open_run
    from tests.conftest import ADMIN_KEY

    account, _ = await usage_account(api)
    now = datetime.now(UTC)
    run_id = f"test:{now.timestamp()}"
    await open_run(pool, run_id, trigger="manual", since=now - timedelta(hours=1), now=now)
    await complete_run(pool, run_id, violations=0)
    commands = [("verify", "--account", account), ("reconcile", "--list"), ("reconcile", "--show", run_id)]
    for console in (reconcile_cli.console, verify_cli.console):
        monkeypatch.setattr(console, "width", 250)
    from_database = [await cli_json(app, *c) for c in commands]
    tables = [(await invoke(app, *c)).output for c in commands]

    monkeypatch.delenv("CREDITFLOW_DATABASE_URL")
    monkeypatch.setenv("CREDITFLOW_API_URL", api_server)
    monkeypatch.setenv("CREDITFLOW_ADMIN_API_KEY", ADMIN_KEY)
    get_settings.cache_clear()
    from_api = [await cli_json(app, *c) for c in commands]
    for answer in (from_database[0], from_api[0]):
        answer.pop("checked_at")
    assert from_api == from_database
    assert from_api[0]["ok"] is True and from_api[0]["account_id"] == account and from_api[0]["accounts_checked"] == 1
    assert [r["id"] for r in from_api[1]["items"]] == [run_id] and from_api[2]["status"] == "completed"
    assert [(await invoke(app, *c)).output for c in commands][1:] == tables[1:]
    assert "no violation" in (await invoke(app, *commands[0])).output
    missing = await cli_json(app, "reconcile", "--show", "test:nope", code=1)
    assert missing["error"]["code"] == "not_found"


async def test_wallet_balance_and_credit_through_the_api_with_an_admin_key(
        api: httpx.AsyncClient, database_url: str, cli_env: None, api_server: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An SLA credit by on-call needs no database credentials: `wallet credit` posts through the API (the same
    ledger function, the same idempotency key) and `wallet balance` reads it back; the database sees the same."""
    from creditflow.cli import app
    from tests.conftest import ADMIN_KEY

    account, _ = await usage_account(api)
    from_database = await cli_json(app, "wallet", "balance", account)
    credit = ("wallet", "credit", account, "--amount", "250", "--reason", "SLA credit", "--idempotency-key", "sla-1")

    monkeypatch.delenv("CREDITFLOW_DATABASE_URL")
    monkeypatch.setenv("CREDITFLOW_API_URL", api_server)
    monkeypatch.setenv("CREDITFLOW_ADMIN_API_KEY", ADMIN_KEY)
    get_settings.cache_clear()
    assert await cli_json(app, "wallet", "balance", account) == from_database
    posted = await cli_json(app, *credit)
    assert posted["amount"] == 250 and posted["replayed"] is False
    assert posted["balances"]["balance"] == from_database["balance"] + 250
    assert (await invoke(app, *credit)).output.strip().endswith(
        f"balance {from_database['balance'] + 250} (replayed)")
    refused = await cli_json(app, "wallet", "credit", account, "--amount", "-100000", "--reason", "oops", code=1)
    assert refused["error"]["code"] == "insufficient_credits"

    monkeypatch.setenv("CREDITFLOW_DATABASE_URL", database_url)  # the database again: it holds the same entry
    get_settings.cache_clear()
    def after(balance: dict[str, Any]) -> dict[str, Any]:
        return {k: balance[k] for k in posted["balances"]}

    assert after(await cli_json(app, "wallet", "balance", account)) == posted["balances"]
    # The key records who posted it (the admin key through the API, "cli" here): reused from the other side it is
    # refused, never credited twice.
    assert (await cli_json(app, *credit, code=1))["error"]["code"] == "idempotency_conflict"
    assert after(await cli_json(app, "wallet", "balance", account)) == posted["balances"]


async def test_payment_event_failures_listed_and_redriven_through_the_api_with_an_admin_key(
        api: httpx.AsyncClient, pool: AsyncConnectionPool, cli_env: None, api_server: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The runbook's outbox question ends with `payment-events failed` and `redrive`: both work with an admin key
    and no database credentials, and the re-drive lands in the outbox as from the database."""
    from creditflow import payment_events_cli
    from creditflow.cli import app
    from creditflow.ledger import payment_event_failures
    from tests.conftest import ADMIN_KEY

    monkeypatch.setattr(payment_events_cli.console, "width", 250)
    account, _ = await usage_account(api)
    await payment_event_failures.record(pool, account, "stripe:evt_lost_refund", "payment.refunded",
                                        {"payment_intent_id": "pi_x"}, "unknown_charge", "no charge for pi_x")
    listing = ("payment-events", "failed", "--account-id", account)
    from_database = await cli_json(app, *listing)
    table = (await invoke(app, *listing)).output

    monkeypatch.delenv("CREDITFLOW_DATABASE_URL")
    monkeypatch.setenv("CREDITFLOW_API_URL", api_server)
    monkeypatch.setenv("CREDITFLOW_ADMIN_API_KEY", ADMIN_KEY)
    get_settings.cache_clear()
    assert await cli_json(app, *listing) == from_database
    assert (await invoke(app, *listing)).output == table
    assert [(f["kind"], f["error_code"], f["redrives"]) for f in from_database] == [
        ("payment.refunded", "unknown_charge", 0)]
    redriven = await cli_json(app, "payment-events", "redrive", str(from_database[0]["id"]))
    assert redriven == {"outbox_dedup_key": "stripe:evt_lost_refund#redrive-1"}
    assert [f["redrives"] for f in await cli_json(app, *listing)] == [1]
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT kind FROM outbox WHERE dedup_key = %s",
                                        (redriven["outbox_dedup_key"],))).fetchone()
    assert row is not None and row["kind"] == "payment.refunded"
    missing = await cli_json(app, "payment-events", "redrive", "999999", code=1)
    assert missing["error"]["code"] == "not_found"
