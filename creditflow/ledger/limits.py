"""Spend limits and spend figures of an account.

Limits live on the balances row so the metering transaction enforces them under the lock it already
takes (migration 0009: cf_spend_gate / cf_spend_record). Saving limits recomputes the day's and month's
counters from the journal (cf_refresh_spend) and tells the account workflow (outbox ``limits.changed``),
which resumes agents the system paused for a limit that no longer holds.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.domain.money import micros_to_credits
from creditflow.errors import CreditflowError

LIMIT_ACTIONS = ("pause", "alert_only")
LIMITS_CHANGED = "limits.changed"  # outbox kind


class Limits(BaseModel):
    """An account's limits in micro-credits (None: no limit)."""

    daily_limit_micros: int | None = None
    monthly_limit_micros: int | None = None
    per_agent_limit_micros: int | None = None
    action_on_limit: str = "pause"
    daily_usage_alert_micros: int | None = None
    enabled: bool = True  # off: the three limits are kept but not enforced (seed 002's toggle)


# The limits that spend management's off switch suspends (kept in balances.spend_limits_off, migration 0046).
SUSPENDED = ("daily_limit_micros", "monthly_limit_micros", "per_agent_limit_micros")
_LIMITS_SQL = ("SELECT daily_limit_micros, monthly_limit_micros, per_agent_limit_micros, limit_action,"
               " daily_usage_alert_micros, spend_limits_off FROM balances WHERE account_id = %s")


def _limits_of(row: dict[str, Any]) -> Limits:
    """The saved limits, from the live columns, or from where they are kept while spend management is off."""
    off = row["spend_limits_off"]
    kept = {k: (off.get(k) if off is not None else row[k]) for k in SUSPENDED}
    return Limits(**kept, action_on_limit=row["limit_action"], daily_usage_alert_micros=row["daily_usage_alert_micros"],
                  enabled=off is None)


class AgentSpend(BaseModel):
    agent_id: str
    spent_micros: int
    monthly_limit_micros: int | None = None


class Spend(BaseModel):
    """Usage (credits consumed) by UTC day and month, from the journal."""

    today: date
    today_micros: int
    yesterday_micros: int
    month_micros: int
    agents: list[AgentSpend]


async def get_limits(pool: AsyncConnectionPool, account_id: str) -> Limits:
    async with pool.connection() as conn:
        row = await (await conn.execute(_LIMITS_SQL, (account_id,))).fetchone()
    if row is None:
        raise CreditflowError("unknown_account", f"no account {account_id}")
    return _limits_of(row)


async def put_limits(pool: AsyncConnectionPool, account_id: str, limits: Limits) -> Limits:
    """Save all limits at once (see ``update_limits``)."""
    return await update_limits(pool, account_id, limits.model_dump())


async def update_limits(pool: AsyncConnectionPool, account_id: str, changes: dict[str, Any]) -> Limits:
    """Change some limits (the fields of ``Limits`` named in ``changes``), merged under the balances row lock so
    concurrent partial updates never undo each other; counters are recomputed and the account workflow told, in
    the same transaction."""
    unknown = set(changes) - set(Limits.model_fields)
    if unknown:
        raise CreditflowError("validation_error", f"unknown limit field(s): {', '.join(sorted(unknown))}")
    async with pool.connection() as conn, conn.transaction():
        row = await (await conn.execute(_LIMITS_SQL + " FOR UPDATE", (account_id,))).fetchone()
        if row is None:
            raise CreditflowError("unknown_account", f"no account {account_id}")
        limits = _limits_of(row).model_copy(update=changes)
        if limits.action_on_limit not in LIMIT_ACTIONS:
            raise CreditflowError("validation_error", f"action_on_limit must be one of {', '.join(LIMIT_ACTIONS)}")
        kept = {k: getattr(limits, k) for k in SUSPENDED}
        live = kept if limits.enabled else dict.fromkeys(SUSPENDED)
        await conn.execute(
            "UPDATE balances SET daily_limit_micros = %s, monthly_limit_micros = %s, per_agent_limit_micros = %s,"
            " limit_action = %s, daily_usage_alert_micros = %s, spend_limits_off = %s WHERE account_id = %s",
            (live["daily_limit_micros"], live["monthly_limit_micros"], live["per_agent_limit_micros"],
             limits.action_on_limit, limits.daily_usage_alert_micros, None if limits.enabled else Jsonb(kept),
             account_id))
        await conn.execute("SELECT cf_refresh_spend(%s)", (account_id,))
        await emit_limits_changed(conn, account_id)
    return limits


async def emit_limits_changed(conn: Any, account_id: str) -> None:
    """Tell the account workflow (in the caller's transaction) that limits changed."""
    await conn.execute(
        "INSERT INTO outbox (account_id, kind, dedup_key) VALUES (%s, %s, %s || ':' || %s || ':' || txid_current())"
        " ON CONFLICT (dedup_key) DO NOTHING", (account_id, LIMITS_CHANGED, LIMITS_CHANGED, account_id))


def _utc_midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


async def spend(pool: AsyncConnectionPool, account_id: str, today: date) -> Spend:
    """Credits consumed today and yesterday (UTC days), this UTC month, and per agent this month."""
    start_today = _utc_midnight(today)
    start_yesterday = start_today - timedelta(days=1)
    start_month = _utc_midnight(today.replace(day=1))
    since = min(start_yesterday, start_month)
    async with pool.connection() as conn:
        exists = await (await conn.execute("SELECT 1 FROM accounts WHERE id = %s", (account_id,))).fetchone()
        if exists is None:
            raise CreditflowError("unknown_account", f"no account {account_id}")
        totals = await (await conn.execute(
            "SELECT coalesce(-sum(amount_micros) FILTER (WHERE created_at >= %(t)s), 0) AS today,"
            " coalesce(-sum(amount_micros) FILTER (WHERE created_at >= %(y)s AND created_at < %(t)s), 0) AS yesterday,"
            " coalesce(-sum(amount_micros) FILTER (WHERE created_at >= %(m)s), 0) AS month"
            " FROM journal WHERE account_id = %(a)s AND type = 'usage' AND created_at >= %(s)s",
            {"a": account_id, "t": start_today, "y": start_yesterday, "m": start_month, "s": since})).fetchone()
        agents = await (await conn.execute(
            "SELECT u.agent_id, u.spent, coalesce(g.monthly_limit_micros, b.per_agent_limit_micros) AS limit_micros"
            " FROM (SELECT agent_id, -sum(amount_micros) AS spent FROM journal WHERE account_id = %(a)s"
            "       AND type = 'usage' AND agent_id IS NOT NULL AND created_at >= %(m)s GROUP BY agent_id) u"
            " JOIN balances b ON b.account_id = %(a)s"
            " LEFT JOIN agents g ON g.account_id = %(a)s AND g.id = u.agent_id ORDER BY u.agent_id",
            {"a": account_id, "m": start_month})).fetchall()
    assert totals is not None
    return Spend(today=today, today_micros=int(totals["today"]), yesterday_micros=int(totals["yesterday"]),
                 month_micros=int(totals["month"]),
                 agents=[AgentSpend(agent_id=r["agent_id"], spent_micros=int(r["spent"]),
                                    monthly_limit_micros=r["limit_micros"]) for r in agents])


def credits_or_none(micros: int | None) -> Decimal | None:
    return None if micros is None else micros_to_credits(micros)
