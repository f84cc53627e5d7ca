"""Agents: the consumers that spend an account's credits (a voice or chat agent), their settings and status.

Settings (name, monthly limit, behaviour when plan credits run out) are written here by the API. The
status (``active`` / ``paused``) is written only by the account workflow, through ``set_status``, which
refuses transitions that make no sense and keeps the audit trail (``agent_events``). The hot path reads
the row in its transaction (migration 0009), so a pause holds from the next event on.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.errors import CreditflowError
from creditflow.ids import check_token
from creditflow.ledger.db import to_jsonb
from creditflow.ledger.limits import emit_limits_changed

ON_PLAN_EXHAUSTED = ("stop", "use_balance")
PAUSED_BY_SYSTEM = "system"
# Why the system paused a stop agent that ran out of plan credits (migration 0030_1).
PLAN_CREDITS_EXHAUSTED = "plan_credits_exhausted"


class Agent(BaseModel):
    account_id: str
    id: str
    name: str
    status: str
    paused_by: str | None = None
    pause_reason: str | None = None
    paused_at: datetime | None = None
    resume_at: datetime | None = None
    monthly_limit_micros: int | None = None
    limit_action: str | None = None
    on_plan_exhausted: str = "use_balance"
    month_spent_micros: int = 0
    # Seed 001's limit per agent: plan credits it may take per billing period (None: no limit), what it took this
    # period, and until when a stop agent resumed by a top-up may use the wallet.
    plan_limit_micros: int | None = None
    plan_spent_micros: int = 0
    wallet_until: datetime | None = None
    metadata: dict[str, Any] | None = None
    created_at: datetime
    updated_at: datetime


class AgentEvent(BaseModel):
    id: int
    agent_id: str
    action: str
    actor: str
    reason: str | None
    created_at: datetime


_COLUMNS = ("account_id, id, name, status, paused_by, pause_reason, paused_at, resume_at, monthly_limit_micros,"
            " limit_action, on_plan_exhausted, CASE WHEN month_start = date_trunc('month', cf_utc_today())::date"
            " THEN month_spent_micros ELSE 0 END AS month_spent_micros, metadata, created_at, updated_at,"
            " plan_limit_micros, wallet_until, CASE WHEN plan_period_start = (SELECT period_start FROM subscriptions s"
            " WHERE s.account_id = agents.account_id AND s.status = 'active') THEN plan_spent_micros ELSE 0 END"
            " AS plan_spent_micros")


async def _exists(conn: Any, account_id: str) -> None:
    if await (await conn.execute("SELECT 1 FROM accounts WHERE id = %s", (account_id,))).fetchone() is None:
        raise CreditflowError("unknown_account", f"no account {account_id}")


async def get_agent(pool: AsyncConnectionPool, account_id: str, agent_id: str) -> Agent:
    async with pool.connection() as conn:
        await _exists(conn, account_id)
        row = await (await conn.execute(f"SELECT {_COLUMNS} FROM agents WHERE account_id = %s AND id = %s",
                                        (account_id, agent_id))).fetchone()
    if row is None:
        raise CreditflowError("unknown_agent", f"no agent {agent_id}")
    return Agent(**row)


async def list_agents(pool: AsyncConnectionPool, account_id: str, limit: int | None = None,
                      starting_after: str | None = None, ending_before: str | None = None) -> list[Agent]:
    """The account's agents by id; ``limit`` and the cursors (agent ids) page through them (None: all)."""
    where, params, order = "", (), "id"
    if starting_after is not None:
        where, params = " AND id > %s", (starting_after,)
    elif ending_before is not None:
        where, params, order = " AND id < %s", (ending_before,), "id DESC"
    async with pool.connection() as conn:
        await _exists(conn, account_id)
        rows = await (await conn.execute(
            f"SELECT {_COLUMNS} FROM agents WHERE account_id = %s{where} ORDER BY {order}"
            + (" LIMIT %s" if limit is not None else ""),
            (account_id, *params, *((limit,) if limit is not None else ())))).fetchall()
    if order == "id DESC":
        rows.reverse()
    return [Agent(**row) for row in rows]


async def create_agent(pool: AsyncConnectionPool, account_id: str, agent_id: str, *, name: str = "",
                       monthly_limit_micros: int | None = None, limit_action: str | None = None,
                       on_plan_exhausted: str = "use_balance", metadata: dict[str, Any] | None = None,
                       plan_limit_micros: int | None = None) -> Agent:
    """Register an agent (``agent_exists`` if the id is taken in this account). Its spend this month so far
    is counted from the journal, so a limit set now includes earlier usage."""
    check_token(agent_id, "agent id")
    async with pool.connection() as conn, conn.transaction():
        locked = await (await conn.execute("SELECT 1 FROM balances WHERE account_id = %s FOR UPDATE",
                                           (account_id,))).fetchone()
        if locked is None:
            raise CreditflowError("unknown_account", f"no account {account_id}")
        try:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO agents (account_id, id, name, monthly_limit_micros, limit_action, on_plan_exhausted,"
                    " metadata, plan_limit_micros) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    (account_id, agent_id, name, monthly_limit_micros, limit_action, on_plan_exhausted,
                     to_jsonb(metadata), plan_limit_micros))
        except psycopg.errors.UniqueViolation:
            raise CreditflowError("agent_exists", f"agent {agent_id} already exists") from None
        await conn.execute("SELECT cf_refresh_spend(%s)", (account_id,))
    return await get_agent(pool, account_id, agent_id)


async def update_agent(pool: AsyncConnectionPool, account_id: str, agent_id: str,
                       changes: dict[str, Any]) -> Agent:
    """Change settings (``name``, ``monthly_limit_micros``, ``limit_action``, ``on_plan_exhausted``,
    ``metadata``); a changed limit tells the account workflow (it may resume an agent paused for it)."""
    allowed = {"name", "monthly_limit_micros", "limit_action", "on_plan_exhausted", "metadata", "plan_limit_micros"}
    unknown = set(changes) - allowed
    if unknown:
        raise CreditflowError("validation_error", f"cannot change {', '.join(sorted(unknown))}")
    async with pool.connection() as conn, conn.transaction():
        locked = await (await conn.execute("SELECT 1 FROM balances WHERE account_id = %s FOR UPDATE",
                                           (account_id,))).fetchone()
        if locked is None:
            raise CreditflowError("unknown_account", f"no account {account_id}")
        if changes:
            sets = ", ".join(f"{column} = %({column})s" for column in sorted(changes))
            params = {**changes, "a": account_id, "i": agent_id}
            if "metadata" in params:
                params["metadata"] = to_jsonb(params["metadata"])
            row = await (await conn.execute(
                f"UPDATE agents SET {sets}, updated_at = now() WHERE account_id = %(a)s AND id = %(i)s"
                " RETURNING id", params)).fetchone()
        else:
            row = await (await conn.execute("SELECT id FROM agents WHERE account_id = %s AND id = %s",
                                            (account_id, agent_id))).fetchone()
        if row is None:
            raise CreditflowError("unknown_agent", f"no agent {agent_id}")
        if {"monthly_limit_micros", "limit_action", "plan_limit_micros", "on_plan_exhausted"} & set(changes):
            await conn.execute("SELECT cf_refresh_spend(%s)", (account_id,))
            await emit_limits_changed(conn, account_id)
    return await get_agent(pool, account_id, agent_id)


async def set_status(pool: AsyncConnectionPool, account_id: str, agent_id: str, *, paused: bool, actor: str,
                     reason: str | None = None, resume_at: datetime | None = None,
                     wallet_until_renewal: bool = False) -> tuple[Agent, int]:
    """Pause or resume (the account workflow's writer). Pausing a paused agent or resuming an active one is
    ``invalid_transition``; every change is appended to ``agent_events`` (its id is returned with the agent).
    ``wallet_until_renewal``: a stop agent resumed by a top-up may use the wallet until the cycle renews."""
    async with pool.connection() as conn, conn.transaction():
        row = await (await conn.execute(
            "SELECT status FROM agents WHERE account_id = %s AND id = %s FOR UPDATE", (account_id, agent_id))
        ).fetchone()
        if row is None:
            await _exists(conn, account_id)
            raise CreditflowError("unknown_agent", f"no agent {agent_id}")
        if (row["status"] == "paused") == paused:
            raise CreditflowError("invalid_transition", f"agent {agent_id} is already {row['status']}",
                                  details={"status": row["status"]})
        if paused:
            await conn.execute(
                "UPDATE agents SET status = 'paused', paused_by = %s, pause_reason = %s, paused_at = now(),"
                " resume_at = %s, updated_at = now() WHERE account_id = %s AND id = %s",
                (actor, reason, resume_at, account_id, agent_id))
        else:
            await conn.execute(
                "UPDATE agents SET status = 'active', paused_by = NULL, pause_reason = NULL, paused_at = NULL,"
                " resume_at = NULL, updated_at = now(), wallet_until = CASE WHEN %s THEN (SELECT period_end FROM"
                " subscriptions WHERE account_id = %s AND status = 'active') ELSE wallet_until END"
                " WHERE account_id = %s AND id = %s", (wallet_until_renewal, account_id, account_id, agent_id))
        event = await (await conn.execute(
            "INSERT INTO agent_events (account_id, agent_id, action, actor, reason) VALUES (%s, %s, %s, %s, %s)"
            " RETURNING id", (account_id, agent_id, "paused" if paused else "resumed", actor, reason))).fetchone()
    assert event is not None
    return await get_agent(pool, account_id, agent_id), int(event["id"])


async def last_event_id(pool: AsyncConnectionPool, account_id: str, agent_id: str) -> int:
    """The id of the agent's latest audit event (0: none yet)."""
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT coalesce(max(id), 0) AS id FROM agent_events WHERE account_id = %s AND agent_id = %s",
            (account_id, agent_id))).fetchone()
    return int(row["id"]) if row else 0


async def changed_since(pool: AsyncConnectionPool, account_id: str, agent_id: str, after: int, *, paused: bool,
                        actor: str) -> bool:
    """Did ``actor`` pause (or resume) the agent after audit event ``after``, and is that still its status?"""
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT e.action FROM agent_events e JOIN agents a ON a.account_id = e.account_id AND a.id = e.agent_id"
            " WHERE e.account_id = %s AND e.agent_id = %s AND e.id > %s AND e.actor = %s AND a.status = %s"
            " ORDER BY e.id DESC LIMIT 1",
            (account_id, agent_id, after, actor, "paused" if paused else "active"))).fetchone()
    return row is not None and row["action"] == ("paused" if paused else "resumed")


async def agent_events(pool: AsyncConnectionPool, account_id: str, agent_id: str, limit: int = 100,
                       starting_after: int | None = None, ending_before: int | None = None) -> list[AgentEvent]:
    """The agent's audit trail, oldest first: ``limit`` events after ``starting_after`` (an event id), or the last
    ``limit`` before ``ending_before``."""
    before = ending_before is not None
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT id, agent_id, action, actor, reason, created_at FROM agent_events"
            " WHERE account_id = %s AND agent_id = %s AND id > %s AND id < %s"
            f" ORDER BY id {'DESC' if before else 'ASC'} LIMIT %s",
            (account_id, agent_id, starting_after or 0, ending_before if before else 2**63 - 1, limit))).fetchall()
    if before:
        rows.reverse()
    return [AgentEvent(**row) for row in rows]


async def system_paused(pool: AsyncConnectionPool, account_id: str) -> list[Agent]:
    """Agents the system paused (for a limit): the ones a new period or a raised limit may resume."""
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            f"SELECT {_COLUMNS} FROM agents WHERE account_id = %s AND status = 'paused' AND paused_by = %s"
            " ORDER BY id", (account_id, PAUSED_BY_SYSTEM))).fetchall()
    return [Agent(**row) for row in rows]


async def plan_period_end(pool: AsyncConnectionPool, account_id: str) -> datetime | None:
    """When the account's active billing period ends (its plan credits renew); None without a subscription."""
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT period_end FROM subscriptions WHERE account_id = %s"
                                        " AND status = 'active'", (account_id,))).fetchone()
    return None if row is None else row["period_end"]


async def purchased_since(pool: AsyncConnectionPool, account_id: str, since: datetime | None) -> bool:
    """Did the customer buy credits (a top-up or an auto-recharge) after ``since``?"""
    if since is None:
        return False
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT 1 FROM journal WHERE account_id = %s AND type IN ('purchase', 'auto_recharge')"
            " AND amount_micros > 0 AND created_at > %s LIMIT 1", (account_id, since))).fetchone()
    return row is not None


async def stopped_for_plan_credits(pool: AsyncConnectionPool, account_id: str, agent_id: str) -> bool:
    """Does the stop rule still stop this agent: ``stop``, on an active plan, with no plan credits available to it
    (left minus held, within its plan_credit_limit)? False once it is use_balance, the limit is raised, or no plan."""
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT b.plan_id, b.plan_left_micros, b.held_micros, (s).stop, (s).room"
            " FROM balances b, LATERAL (SELECT cf_agent_plan(b.account_id, %s) AS s) x WHERE b.account_id = %s",
            (agent_id, account_id))).fetchone()
    if row is None or row["plan_id"] is None or not row["stop"]:
        return False
    available = max(0, row["plan_left_micros"] - row["held_micros"])
    if row["room"] is not None:
        available = min(available, row["room"])
    return available == 0
