"""Agents paused and resumed by the account workflow: limits reached on the hot path pause agents
through the outbox, raised limits and new periods resume what the system paused (never an operator's pause),
operators pause by API update or by a signal from the ``temporal`` CLI. Real PostgreSQL, real Temporal (the dev
server; the time-skipping test server for the next-day resume), no mocks.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from creditflow.config import Settings
from creditflow.ledger import agents
from tests.conftest import _temporal_cli
from tests.support.api import new_account, track
from tests.support.auto_recharge import api, relay, settings  # noqa: F401 - fixtures (worker + relay running)
from tests.support.plans import AGENTS, set_limits
from tests.support.temporal import eventually
from workers.main import build_worker
from workflows.contract import (
    ACCOUNT_WORKFLOW,
    SIGNAL_OUTBOX_EVENT,
    AccountWorkflowInput,
    OutboxEvent,
    account_workflow_id,
)

pytestmark = pytest.mark.temporal


async def status_of(pool: AsyncConnectionPool, account: str, agent: str) -> str:
    return (await agents.get_agent(pool, account, agent)).status


async def notices(pool: AsyncConnectionPool, account: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute(
            "SELECT kind, payload FROM notifications_log WHERE account_id = %s AND kind LIKE ANY (%s) ORDER BY id",
            (account, ["agent.%", "limit.%"]))).fetchall()


async def test_limit_pauses_the_agent_and_a_raised_limit_resumes_it(api: httpx.AsyncClient,  # noqa: F811
                                                                    pool: AsyncConnectionPool,
                                                                    relay: Any) -> None:  # noqa: F811
    account = await new_account(api)
    await api.post(AGENTS, json={"account_id": account, "id": "voice-1", "monthly_limit": 30})
    assert (await track(api, account, "chat_message", 30, "u-1", agent_id="voice-1")).status_code == 200

    # Reaching the limit exactly is the crossing: the workflow pauses the agent (system, until next month).
    await eventually(lambda: status_of(pool, account, "voice-1"), lambda s: s == "paused", timeout=20)
    agent = await agents.get_agent(pool, account, "voice-1")
    assert (agent.paused_by, agent.pause_reason) == ("system", "agent_monthly_limit")
    assert agent.resume_at is not None and agent.resume_at.day == 1
    denied = await track(api, account, "chat_message", 1, "u-2", agent_id="voice-1")
    assert (denied.status_code, denied.json()["code"]) == (403, "agent_paused")

    # Raising the limit resumes it (the system paused it, for that limit).
    patched = await api.patch(f"{AGENTS}/voice-1", json={"account_id": account, "monthly_limit": 100})
    assert patched.status_code == 200
    await eventually(lambda: status_of(pool, account, "voice-1"), lambda s: s == "active", timeout=20)
    assert (await track(api, account, "chat_message", 1, "u-3", agent_id="voice-1")).status_code == 200
    found = await eventually(lambda: notices(pool, account), lambda ns: len(ns) == 3)
    assert [n["kind"] for n in found] == ["limit.reached", "agent.paused", "agent.resumed"]
    assert (found[1]["payload"]["agent_id"], found[1]["payload"]["paused_by"]) == ("voice-1", "system")
    events = (await api.get(f"{AGENTS}/voice-1/events", params={"account_id": account})).json()["items"]
    assert [(e["action"], e["actor"], e["reason"]) for e in events] == [
        ("paused", "system", "agent_monthly_limit"), ("resumed", "system", "limit raised")]


async def test_operator_pause_is_not_lifted_by_the_system(api: httpx.AsyncClient, pool: AsyncConnectionPool,  # noqa: F811
                                                          relay: Any) -> None:  # noqa: F811
    account = await new_account(api)
    await api.post(AGENTS, json={"account_id": account, "id": "chat-1"})
    paused = await api.post(f"{AGENTS}/chat-1/pause", json={"account_id": account, "reason": "abuse review"})
    assert paused.status_code == 200, paused.text
    assert (paused.json()["status"], paused.json()["paused_by"], paused.json()["pause_reason"]) == (
        "paused", "admin", "abuse review")
    again = await api.post(f"{AGENTS}/chat-1/pause", json={"account_id": account})
    assert (again.status_code, again.json()["error"]["code"]) == (409, "invalid_transition")
    unknown = await api.post(f"{AGENTS}/ghost/pause", json={"account_id": account})
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "unknown_agent")

    await set_limits(api, account, daily_limit=1000)  # limits.changed: the workflow re-checks system pauses
    await asyncio.sleep(1.0)
    assert await status_of(pool, account, "chat-1") == "paused"
    resumed = await api.post(f"{AGENTS}/chat-1/resume", json={"account_id": account})
    assert (resumed.status_code, resumed.json()["status"]) == (200, "active")
    not_paused = await api.post(f"{AGENTS}/chat-1/resume", json={"account_id": account})
    assert (not_paused.status_code, not_paused.json()["error"]["code"]) == (409, "invalid_transition")


async def test_temporal_cli_signal_pauses_an_agent(api: httpx.AsyncClient, pool: AsyncConnectionPool,  # noqa: F811
                                                   temporal_client: Client, temporal_settings: Settings,
                                                   relay: Any) -> None:  # noqa: F811
    account = await new_account(api)
    await api.post(AGENTS, json={"account_id": account, "id": "ops-target"})
    # The relay started the account's workflow with its account.created event.
    await eventually(lambda: temporal_client.get_workflow_handle(account_workflow_id(account)).describe(),
                     lambda d: d is not None, timeout=20)
    command = [_temporal_cli(), "workflow", "signal", "--address", temporal_settings.temporal_address,
               "--namespace", temporal_settings.temporal_namespace, "--workflow-id", account_workflow_id(account),
               "--name", "pause_agent", "--input",
               json.dumps({"agent_id": "ops-target", "actor": "oncall (temporal CLI)", "reason": "runaway loop"})]
    result = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    await eventually(lambda: status_of(pool, account, "ops-target"), lambda s: s == "paused", timeout=20)
    agent = await agents.get_agent(pool, account, "ops-target")
    assert (agent.paused_by, agent.pause_reason) == ("oncall (temporal CLI)", "runaway loop")
    denied = await track(api, account, "chat_message", 1, "after-signal", agent_id="ops-target")
    assert denied.json()["code"] == "agent_paused"


async def test_system_pause_ends_at_the_next_utc_day(pool: AsyncConnectionPool,
                                                     temporal_settings: Settings) -> None:
    """Time-skipping: a daily limit pauses every active agent until 00:00 UTC, then they are resumed; an
    operator's pause stays."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(Path(_temporal_cli()).parent / "temporal-test-server"),
        data_converter=pydantic_data_converter)
    try:
        from creditflow.ledger.accounts import create_account

        account = (await create_account(pool, name="Acme", billing_email="b@acme.test")).id
        for agent_id in ("a-1", "a-2"):
            await agents.create_agent(pool, account, agent_id)
        await agents.set_status(pool, account, "a-2", paused=True, actor="operator", reason="manual")
        queue = temporal_settings.temporal_task_queue + "-ts"
        async with build_worker(env.client, pool, temporal_settings, task_queue=queue):
            now = await env.get_current_time()
            reached = OutboxEvent(dedup_key=f"limit.reached:{account}:daily:test", kind="limit.reached",
                                  payload={"scope": "daily", "period": now.date().isoformat(), "limit_micros": 1,
                                           "spent_micros": 1, "action": "pause"}, created_at=now)
            # The test server has no creditflow search attributes: start without them.
            handle = await env.client.start_workflow(
                ACCOUNT_WORKFLOW, AccountWorkflowInput(account_id=account, publish_search_attributes=False),
                id=account_workflow_id(account), task_queue=queue, start_signal=SIGNAL_OUTBOX_EVENT,
                start_signal_args=[reached])
            await eventually(lambda: status_of(pool, account, "a-1"), lambda s: s == "paused", timeout=20)
            first = await agents.get_agent(pool, account, "a-1")
            assert (first.paused_by, first.pause_reason) == ("system", "daily_limit")
            await env.sleep(timedelta(days=1, hours=1))
            await eventually(lambda: status_of(pool, account, "a-1"), lambda s: s == "active", timeout=20)
            assert await status_of(pool, account, "a-2") == "paused"  # the operator's pause is untouched
            await handle.terminate("test over")
    finally:
        await env.shutdown()


async def test_cli_pauses_lists_and_resumes(api: httpx.AsyncClient, pool: AsyncConnectionPool,  # noqa: F811
                                            temporal_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from creditflow import agents_cli
    from creditflow.cli import app
    from creditflow.config import get_settings

    account = await new_account(api)
    await api.post(AGENTS, json={"account_id": account, "id": "cli-bot", "name": "CLI bot"})
    for name, value in {"DATABASE_URL": temporal_settings.database_url,
                        "TEMPORAL_ADDRESS": temporal_settings.temporal_address,
                        "TEMPORAL_TASK_QUEUE": temporal_settings.temporal_task_queue}.items():
        monkeypatch.setenv(f"CREDITFLOW_{name}", value)
    monkeypatch.setattr(agents_cli.console, "width", 250)
    get_settings.cache_clear()
    runner = CliRunner()
    try:  # in a thread: the CLI runs its own event loop while the worker keeps running on this one
        paused = await asyncio.to_thread(runner.invoke, app, ["agents", "pause", account, "cli-bot", "--reason",
                                                              "cost spike", "--actor", "oncall"])
        assert paused.exit_code == 0, paused.output
        assert "agent cli-bot: paused (cost spike)" in paused.output
        twice = await asyncio.to_thread(runner.invoke, app, ["agents", "pause", account, "cli-bot"])
        assert twice.exit_code == 1 and "invalid_transition" in twice.output
        listed = await asyncio.to_thread(runner.invoke, app, ["agents", "list", account])
        assert "cli-bot" in listed.output and "paused" in listed.output and "oncall" in listed.output
        resumed = await asyncio.to_thread(runner.invoke, app, ["agents", "resume", account, "cli-bot"])
        assert resumed.exit_code == 0 and "agent cli-bot: active" in resumed.output
    finally:
        get_settings.cache_clear()
    assert await status_of(pool, account, "cli-bot") == "active"
