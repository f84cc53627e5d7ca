"""/api/v1/agents: the agents that spend an account's credits, their settings, and pause/resume.

Settings are saved here. Pause and resume go through the account workflow (update ``pause_agent`` /
``resume_agent`` on ``account:{account_id}``), the single writer of agent status: it records the change with
its audit trail, tells the customer's service (``agent.paused`` / ``agent.resumed``) and answers the new status.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from creditflow.api.conventions import page_of
from creditflow.api.deps import get_pool, require, target_account
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import Principal, Scope
from creditflow.api.schemas import Amount, Metadata, Strict, Text, Token
from creditflow.api.topups import get_temporal
from creditflow.domain.money import AmountError, credits_to_micros, micros_to_credits
from creditflow.errors import CreditflowError
from creditflow.ledger import agents
from creditflow.ledger.agents import Agent
from creditflow.ledger.pagination import Cursor
from workflows.contract import AgentCommand

router = APIRouter(prefix="/api/v1/agents", tags=["agents"], route_class=ExactRoute)

Reader = Annotated[Principal, Depends(require(Scope.BILLING_READ))]
Writer = Annotated[Principal, Depends(require(Scope.BILLING_WRITE))]
Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]
AccountQuery = Annotated[str | None, Query(description="Admin keys only.")]
LimitAction = Literal["pause", "alert_only"]
PlanExhausted = Literal["stop", "use_balance"]


class AgentView(BaseModel):
    id: str
    name: str
    status: str = Field(description="active or paused")
    paused_by: str | None = Field(default=None, description="system (a limit) or who paused it")
    pause_reason: str | None = None
    paused_at: datetime | None = None
    resume_at: datetime | None = Field(default=None, description="when a system pause ends by itself")
    monthly_limit: Decimal | None = None
    limit_action: str | None = Field(default=None, description="pause / alert_only; null: the account's")
    on_plan_exhausted: str
    spent_this_month: Decimal
    plan_credit_limit: Decimal | None = Field(default=None, description=(
        "plan credits it may take per billing period (seed 001's monthly limit); at it a stop agent stops, a "
        "use_balance agent goes on from the wallet only. Not monthly_limit (a cap on all its spending)"))
    plan_credits_used: Decimal = Field(default=Decimal(0), description="plan credits it took this billing period")
    wallet_until: datetime | None = Field(default=None, description=(
        "a stop agent resumed by a top-up uses the wallet until then (the cycle's renewal)"))
    metadata: dict[str, Any] | None = None
    created_at: datetime
    updated_at: datetime


class AgentList(BaseModel):
    items: list[AgentView]
    has_more: bool = False


AgentCursor = Annotated[str | None, Query(pattern=r"^[A-Za-z0-9._:\-/]{1,200}$", description="An agent id.")]


class AgentCreate(Strict):
    account_id: str | None = Field(default=None, description="Required with an admin key.")
    id: Token = Field(description="The agent id used as agent_id in usage events.")
    name: Text = Field(default="", max_length=200)
    monthly_limit: Amount | None = Field(default=None, description="Credits per UTC month; null: none.")
    limit_action: LimitAction | None = None
    on_plan_exhausted: PlanExhausted = "use_balance"
    plan_credit_limit: Amount | None = Field(default=None, description="Plan credits per billing period; null: none.")
    metadata: Metadata


class AgentPatch(Strict):
    account_id: str | None = None
    name: Text | None = Field(default=None, max_length=200)
    monthly_limit: Amount | None = None
    limit_action: LimitAction | None = None
    on_plan_exhausted: PlanExhausted | None = None
    plan_credit_limit: Amount | None = None
    metadata: dict[str, Any] | None = None
    status: Literal["active", "paused"] | None = Field(default=None, description="pause or resume (the workflow)")
    reason: Text | None = Field(default=None, max_length=500)


class AgentAction(Strict):
    account_id: str | None = None
    reason: Text | None = Field(default=None, max_length=500)


def view(agent: Agent) -> AgentView:
    return AgentView(
        id=agent.id, name=agent.name, status=agent.status, paused_by=agent.paused_by,
        pause_reason=agent.pause_reason, paused_at=agent.paused_at, resume_at=agent.resume_at,
        monthly_limit=None if agent.monthly_limit_micros is None else micros_to_credits(agent.monthly_limit_micros),
        limit_action=agent.limit_action, on_plan_exhausted=agent.on_plan_exhausted,
        spent_this_month=micros_to_credits(agent.month_spent_micros),
        plan_credit_limit=None if agent.plan_limit_micros is None else micros_to_credits(agent.plan_limit_micros),
        plan_credits_used=micros_to_credits(agent.plan_spent_micros), wallet_until=agent.wallet_until,
        metadata=agent.metadata,
        created_at=agent.created_at, updated_at=agent.updated_at)


def limit_micros(credits: Decimal | None, what: str) -> int | None:
    """A limit in credits (exact, above zero) as micro-credits; None stays None."""
    if credits is None:
        return None
    try:
        micros = credits_to_micros(credits)
    except AmountError as exc:
        raise CreditflowError(exc.code, f"{what}: {exc}") from exc
    if micros <= 0 or credits > Decimal(1_000_000_000):
        raise CreditflowError("invalid_amount", f"{what} must be above zero and at most 1,000,000,000 credits")
    return micros


def actor_of(principal: Principal) -> str:
    """Who asked, for the audit trail."""
    return "admin" if principal.is_admin else f"customer (key {principal.key_id})"


async def _status_change(request: Request, principal: Principal, account_id: str, agent_id: str, *, paused: bool,
                         reason: str | None) -> ExactJSONResponse:
    pool: AsyncConnectionPool = request.app.state.pool
    await agents.get_agent(pool, account_id, agent_id)  # unknown_agent / unknown_account before Temporal
    before = await agents.last_event_id(pool, account_id, agent_id)
    client = await get_temporal(request)
    actor = actor_of(principal)
    try:
        await client.set_agent_status(account_id, AgentCommand(agent_id=agent_id, actor=actor, reason=reason),
                                      paused=paused,
                                      wait=timedelta(seconds=request.app.state.settings.topup_answer_timeout_seconds))
    except CreditflowError as exc:
        # The workflow answers after telling the customer (agent.paused / agent.resumed), which a slow or failing
        # channel can hold up for seconds: if this change is already recorded, say so rather than 503.
        if exc.code != "workflow_unavailable" or not await agents.changed_since(
                pool, account_id, agent_id, before, paused=paused, actor=actor):
            raise
    return respond(view(await agents.get_agent(pool, account_id, agent_id)))


_STATUS_ERRORS: dict[int | str, dict[str, str]] = {
    404: {"description": "unknown_agent / unknown_account"},
    409: {"description": "invalid_transition (already paused / not paused)"},
    503: {"description": "workflow_unavailable"},
}


@router.get("", response_model=AgentList, response_class=ExactJSONResponse)
async def list_agents(principal: Reader, pool: Pool, account_id: AccountQuery = None,
                      limit: Annotated[int | None, Query(ge=1, le=1000, description="Default: all.")] = None,
                      starting_after: AgentCursor = None, ending_before: AgentCursor = None) -> ExactJSONResponse:
    """The account's agents (registered, or seen in usage while the account has spend controls), by id. Pages with
    ``limit`` and ``starting_after`` / ``ending_before`` (an agent id); ``has_more``."""
    cursor = Cursor(starting_after, ending_before)
    rows = await agents.list_agents(pool, target_account(principal, account_id),
                                    None if limit is None else limit + 1, starting_after, ending_before)
    items, has_more = page_of(rows, limit, cursor) if limit is not None else (rows, False)
    return respond(AgentList(items=[view(a) for a in items], has_more=has_more))


@router.post("", response_model=AgentView, response_class=ExactJSONResponse, status_code=201,
             responses={409: {"description": "agent_exists"}})
async def create_agent(req: AgentCreate, principal: Writer, pool: Pool) -> ExactJSONResponse:
    """Register an agent with its settings (its usage this month so far counts towards its limit)."""
    account_id = target_account(principal, req.account_id)
    agent = await agents.create_agent(
        pool, account_id, req.id, name=req.name, monthly_limit_micros=limit_micros(req.monthly_limit, "monthly_limit"),
        limit_action=req.limit_action, on_plan_exhausted=req.on_plan_exhausted, metadata=req.metadata or None,
        plan_limit_micros=limit_micros(req.plan_credit_limit, "plan_credit_limit"))
    return respond(view(agent), 201)


@router.get("/{agent_id}", response_model=AgentView, response_class=ExactJSONResponse,
            responses={404: {"description": "unknown_agent"}})
async def get_agent(agent_id: str, principal: Reader, pool: Pool, account_id: AccountQuery = None
                    ) -> ExactJSONResponse:
    return respond(view(await agents.get_agent(pool, target_account(principal, account_id), agent_id)))


class AgentEventList(BaseModel):
    items: list[agents.AgentEvent]
    has_more: bool = Field(description="More events beyond this page in the paging direction.")


EventCursor = Annotated[int | None, Query(ge=0, le=2**63 - 1, description="An event id of this trail.")]


@router.get("/{agent_id}/events", response_model=AgentEventList, response_class=ExactJSONResponse)
async def agent_events(agent_id: str, principal: Reader, pool: Pool, account_id: AccountQuery = None,
                       limit: Annotated[int, Query(ge=1, le=1000)] = 100, starting_after: EventCursor = None,
                       ending_before: EventCursor = None) -> ExactJSONResponse:
    """The agent's audit trail: every pause and resume, who asked and why, oldest first. Pages with ``limit``,
    ``starting_after`` (the next, newer events) / ``ending_before`` (the previous ones) and ``has_more``."""
    if starting_after is not None and ending_before is not None:
        raise CreditflowError("validation_error", "starting_after and ending_before exclude each other",
                              param="ending_before")
    account = target_account(principal, account_id)
    await agents.get_agent(pool, account, agent_id)
    events = await agents.agent_events(pool, account, agent_id, limit + 1, starting_after, ending_before)
    has_more = len(events) > limit
    page = (events[1:] if ending_before is not None else events[:limit]) if has_more else events
    return respond({"items": [e.model_dump(mode="json") for e in page], "has_more": has_more})


@router.patch("/{agent_id}", response_model=AgentView, response_class=ExactJSONResponse, responses=_STATUS_ERRORS)
async def patch_agent(agent_id: str, req: AgentPatch, principal: Writer, request: Request, pool: Pool
                      ) -> ExactJSONResponse:
    """Change settings (a field sent as null is cleared: ``monthly_limit: null`` removes the limit); ``status``
    pauses or resumes through the account workflow."""
    account_id = target_account(principal, req.account_id)
    changes: dict[str, Any] = {}
    fields = req.model_fields_set
    if "name" in fields:
        changes["name"] = req.name or ""
    if "monthly_limit" in fields:
        changes["monthly_limit_micros"] = limit_micros(req.monthly_limit, "monthly_limit")
    if "limit_action" in fields:
        changes["limit_action"] = req.limit_action
    if "on_plan_exhausted" in fields:
        if req.on_plan_exhausted is None:
            raise CreditflowError("validation_error", "on_plan_exhausted is stop or use_balance")
        changes["on_plan_exhausted"] = req.on_plan_exhausted
    if "plan_credit_limit" in fields:
        changes["plan_limit_micros"] = limit_micros(req.plan_credit_limit, "plan_credit_limit")
    if "metadata" in fields:
        changes["metadata"] = req.metadata
    agent = await agents.update_agent(pool, account_id, agent_id, changes)
    if req.status is not None and req.status != agent.status:
        return await _status_change(request, principal, account_id, agent_id, paused=req.status == "paused",
                                    reason=req.reason)
    return respond(view(agent))


@router.post("/{agent_id}/pause", response_model=AgentView, response_class=ExactJSONResponse,
             responses=_STATUS_ERRORS)
async def pause_agent(agent_id: str, req: AgentAction, principal: Writer, request: Request) -> ExactJSONResponse:
    """Pause the agent: its usage is refused (``agent_paused``) from the next event until it is resumed."""
    account_id = target_account(principal, req.account_id)
    return await _status_change(request, principal, account_id, agent_id, paused=True, reason=req.reason)


@router.post("/{agent_id}/resume", response_model=AgentView, response_class=ExactJSONResponse,
             responses=_STATUS_ERRORS)
async def resume_agent(agent_id: str, req: AgentAction, principal: Writer, request: Request) -> ExactJSONResponse:
    """Resume a paused agent (whoever paused it)."""
    account_id = target_account(principal, req.account_id)
    return await _status_change(request, principal, account_id, agent_id, paused=False, reason=req.reason)
