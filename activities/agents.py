"""Agent activities of the account workflow: pause and resume (the workflow is their only caller, so it
is the single writer of agent status), and what a limit reached or a new period means for agents.

Each is safe to repeat: pausing an agent that is already paused is ``invalid_transition`` for an operator's
request (the update reports it) and skipped for the system's own pauses.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field
from temporalio import activity

from activities.errors import translating_errors
from creditflow.errors import CreditflowError
from creditflow.ledger import agents, outbox
from creditflow.ledger.agents import PAUSED_BY_SYSTEM, Agent
from workflows.contract import AgentStatus

# Why the system paused an agent (``agents.pause_reason``), by the scope of the limit reached.
REASON_BY_SCOPE = {"agent_monthly": "agent_monthly_limit", "daily": "daily_limit", "monthly": "monthly_limit",
                   "plan_credits": agents.PLAN_CREDITS_EXHAUSTED}


class SetAgentStatusInput(BaseModel):
    account_id: str
    agent_id: str
    paused: bool
    actor: str
    reason: str | None = None


class LimitReachedInput(BaseModel):
    account_id: str
    scope: str  # agent_monthly, daily, monthly
    agent_id: str | None = None
    now: datetime
    # The UTC day ("2026-12-01") or month ("2026-12-01", its first day) the limit was reached in; None: ``now``'s.
    period: str | None = None
    dedup_key: str | None = None  # the outbox row: marked applied once its agents are paused


class ResumeInput(BaseModel):
    account_id: str
    now: datetime
    # ``due``: system pauses whose resume time has come; ``limits``: those whose limit no longer holds.
    why: str = "due"


class AgentChanges(BaseModel):
    changes: list[AgentStatus] = Field(default_factory=list)
    # The earliest time a system pause ends by itself (the workflow sets its timer to it).
    next_resume_at: datetime | None = None


def resume_time(scope: str, now: datetime, period: str | None = None) -> datetime:
    """A daily limit pauses until the end of its UTC day; monthly ones until the first of the next month. The
    period is the one the limit was reached in (an event handled after midnight does not pause a new day)."""
    try:
        today = date.fromisoformat(period) if period else now.astimezone(UTC).date()
    except ValueError:
        today = now.astimezone(UTC).date()
    if scope == "daily":
        return datetime.combine(today + timedelta(days=1), time(0), tzinfo=UTC)
    first = today.replace(day=1)
    following = (first + timedelta(days=32)).replace(day=1)
    return datetime.combine(following, time(0), tzinfo=UTC)


def _change(agent: Agent, event_id: int | None = None) -> AgentStatus:
    return AgentStatus(agent_id=agent.id, name=agent.name, status=agent.status, paused_by=agent.paused_by,
                       reason=agent.pause_reason, resume_at=agent.resume_at, event_id=event_id)


class AgentActivities:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def _next_resume(self, account_id: str) -> datetime | None:
        times = [a.resume_at for a in await agents.system_paused(self._pool, account_id) if a.resume_at]
        return min(times) if times else None

    @activity.defn(name="set_agent_status")
    @translating_errors
    async def set_agent_status(self, input: SetAgentStatusInput) -> AgentStatus:
        """An operator's (or service's, or customer's) pause or resume; ``invalid_transition`` if it is one."""
        agent, event_id = await agents.set_status(self._pool, input.account_id, input.agent_id, paused=input.paused,
                                                  actor=input.actor, reason=input.reason)
        return _change(agent, event_id)

    @activity.defn(name="pause_for_limit")
    @translating_errors
    async def pause_for_limit(self, input: LimitReachedInput) -> AgentChanges:
        """A limit with action ``pause`` was reached: pause its agent (agent limit) or every active agent of the
        account (account limit) until the next period. Agents already paused are left as they are."""
        changes = await self._pause_for_limit(input)
        await outbox.mark_applied(self._pool, input.account_id, input.dedup_key)
        return changes

    async def _pause_for_limit(self, input: LimitReachedInput) -> AgentChanges:
        reason = REASON_BY_SCOPE.get(input.scope, input.scope)
        if input.scope == "plan_credits":  # a stop agent out of plan credits: until the cycle renews (or a top-up)
            renewal = await agents.plan_period_end(self._pool, input.account_id)
            until = renewal if renewal is not None else input.now
        else:
            until = resume_time("daily" if input.scope == "daily" else "monthly", input.now, input.period)
        if until <= input.now:  # the period of that limit is already over: nothing to stop now
            return AgentChanges(changes=[], next_resume_at=await self._next_resume(input.account_id))
        if input.agent_id is not None:
            targets = [input.agent_id]
        else:
            targets = [a.id for a in await agents.list_agents(self._pool, input.account_id) if a.status == "active"]
        changes = []
        for agent_id in targets:
            try:
                agent, event_id = await agents.set_status(self._pool, input.account_id, agent_id, paused=True,
                                                          actor=PAUSED_BY_SYSTEM, reason=reason, resume_at=until)
            except CreditflowError as exc:
                if exc.code in ("invalid_transition", "unknown_agent"):
                    continue
                raise
            changes.append(_change(agent, event_id))
        return AgentChanges(changes=changes, next_resume_at=await self._next_resume(input.account_id))

    @activity.defn(name="resume_system_paused")
    @translating_errors
    async def resume_system_paused(self, input: ResumeInput) -> AgentChanges:
        """Resume agents the system paused whose period is over (``due``) or whose limit no longer holds
        (``limits``: raised, removed or turned into alert-only). Operator pauses are never touched."""
        limits_state = await _limit_state(self._pool, input.account_id)
        changes = []
        for agent in await agents.system_paused(self._pool, input.account_id):
            due = agent.resume_at is not None and agent.resume_at <= input.now
            plan_pause = agent.pause_reason == agents.PLAN_CREDITS_EXHAUSTED and not due
            topped_up = plan_pause and await agents.purchased_since(self._pool, input.account_id, agent.paused_at)
            if plan_pause and not topped_up:  # its settings changed (limit raised, use_balance): plan credits again?
                lifted = input.why == "limits" and not await agents.stopped_for_plan_credits(
                    self._pool, input.account_id, agent.id)
            else:
                lifted = input.why == "limits" and not _still_limited(agent, limits_state)
            if not (due or topped_up or lifted):
                continue
            try:
                why = "new period" if due else "top-up" if topped_up else "limit raised"
                resumed, event_id = await agents.set_status(self._pool, input.account_id, agent.id, paused=False,
                                                            actor=PAUSED_BY_SYSTEM, reason=why,
                                                            wallet_until_renewal=topped_up)
            except CreditflowError as exc:
                if exc.code == "invalid_transition":
                    continue
                raise
            changes.append(_change(resumed, event_id))
        return AgentChanges(changes=changes, next_resume_at=await self._next_resume(input.account_id))


async def _limit_state(pool: AsyncConnectionPool, account_id: str) -> dict[str, object]:
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT daily_limit_micros, monthly_limit_micros, per_agent_limit_micros, limit_action,"
            " CASE WHEN day_start = cf_utc_today() THEN day_spent_micros ELSE 0 END AS day_spent,"
            " CASE WHEN month_start = date_trunc('month', cf_utc_today())::date THEN month_spent_micros ELSE 0 END"
            " AS month_spent FROM balances WHERE account_id = %s", (account_id,))).fetchone()
    if row is None:
        raise CreditflowError("unknown_account", f"no account {account_id}")
    return dict(row)


def _still_limited(agent: Agent, state: dict[str, object]) -> bool:
    """Does the limit this agent was paused for still stop it (same period, limit still reached, action pause)?"""
    def reached(limit: object, spent: object, action: object) -> bool:
        return isinstance(limit, int) and isinstance(spent, int) and action == "pause" and spent >= limit

    if agent.pause_reason == "agent_monthly_limit":
        limit = agent.monthly_limit_micros or state["per_agent_limit_micros"]
        return reached(limit, agent.month_spent_micros, agent.limit_action or state["limit_action"])
    if agent.pause_reason == "daily_limit":
        return reached(state["daily_limit_micros"], state["day_spent"], state["limit_action"])
    if agent.pause_reason == "monthly_limit":
        return reached(state["monthly_limit_micros"], state["month_spent"], state["limit_action"])
    return True  # a system pause for another reason: only its resume time ends it
