"""/api/v1/billing/limits and /api/v1/billing/spend: spend management.

Limits are enforced inside the metering transaction (``daily_limit_reached``, ``monthly_limit_reached``,
``agent_limit_reached``, with action ``pause``; ``alert_only`` lets usage continue and only notifies), and
reaching one is sent to the account workflow through the outbox (it notifies, and pauses agents).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from creditflow.api.agents import limit_micros
from creditflow.api.deps import get_pool, require, target_account
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import Principal, Scope
from creditflow.api.schemas import Amount, Strict
from creditflow.domain.money import micros_to_credits
from creditflow.ledger import limits as ledger_limits
from creditflow.ledger.limits import Limits, credits_or_none

router = APIRouter(prefix="/api/v1/billing", tags=["spend management"], route_class=ExactRoute)

Reader = Annotated[Principal, Depends(require(Scope.BILLING_READ))]
Writer = Annotated[Principal, Depends(require(Scope.BILLING_WRITE))]
Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]
AccountQuery = Annotated[str | None, Query(description="Admin keys only.")]


class LimitsRequest(Strict):
    """Fields left out keep their value; ``null`` removes a limit."""

    account_id: str | None = None
    daily_limit: Amount | None = Field(default=None, description="Credits per UTC day (a hard limit).")
    monthly_limit: Amount | None = Field(default=None, description="Credits per UTC month.")
    per_agent_limit: Amount | None = Field(default=None, description="Credits per agent per UTC month, for agents "
                                                                     "without a limit of their own.")
    action_on_limit: Literal["pause", "alert_only"] | None = None
    enabled: bool | None = Field(default=None, description="Spend management on/off: false keeps the three limits "
                                                            "but enforces none of them; true enforces them again.")


class LimitsView(BaseModel):
    daily_limit: Decimal | None
    monthly_limit: Decimal | None
    per_agent_limit: Decimal | None
    action_on_limit: str
    enabled: bool = Field(description="false: spend management is off; the limits above are kept, not enforced")
    currency: str = "credits"


class AgentSpendView(BaseModel):
    agent_id: str
    spent_this_month: Decimal
    monthly_limit: Decimal | None


class SpendView(BaseModel):
    date: date
    today: Decimal = Field(description="credits consumed today (UTC)")
    yesterday: Decimal
    this_month: Decimal
    daily_limit: Decimal | None
    monthly_limit: Decimal | None
    agents: list[AgentSpendView] = Field(description="per agent, this UTC month")
    currency: str = "credits"


def _view(limits: Limits) -> LimitsView:
    return LimitsView(daily_limit=credits_or_none(limits.daily_limit_micros),
                      monthly_limit=credits_or_none(limits.monthly_limit_micros),
                      per_agent_limit=credits_or_none(limits.per_agent_limit_micros),
                      action_on_limit=limits.action_on_limit, enabled=limits.enabled)


@router.get("/limits", response_model=LimitsView, response_class=ExactJSONResponse)
async def get_limits(principal: Reader, pool: Pool, account_id: AccountQuery = None) -> ExactJSONResponse:
    return respond(_view(await ledger_limits.get_limits(pool, target_account(principal, account_id))))


async def _save(req: LimitsRequest, principal: Principal, pool: AsyncConnectionPool) -> ExactJSONResponse:
    account_id = target_account(principal, req.account_id)
    fields = req.model_fields_set
    changes: dict[str, object] = {}
    for name in ("daily_limit", "monthly_limit", "per_agent_limit"):
        if name in fields:
            changes[f"{name}_micros"] = limit_micros(getattr(req, name), name)
    if req.action_on_limit is not None:
        changes["action_on_limit"] = req.action_on_limit
    if req.enabled is not None:
        changes["enabled"] = req.enabled
    return respond(_view(await ledger_limits.update_limits(pool, account_id, changes)))


@router.put("/limits", response_model=LimitsView, response_class=ExactJSONResponse,
            responses={422: {"description": "invalid_amount / validation_error; nothing changed"}})
async def put_limits(req: LimitsRequest, principal: Writer, pool: Pool) -> ExactJSONResponse:
    """Set spend limits. The day's and month's usage so far counts at once; raising or removing a limit resumes
    the agents the system paused for it. ``enabled: false`` (spend management off) keeps the limits and enforces
    none (limits saved while off are kept for when it is on again)."""
    return await _save(req, principal, pool)


@router.post("/limits", response_model=LimitsView, response_class=ExactJSONResponse, deprecated=True,
             responses={422: {"description": "invalid_amount / validation_error; nothing changed"}})
async def post_limits(req: LimitsRequest, principal: Writer, pool: Pool) -> ExactJSONResponse:
    """Same as PUT (the documented ``POST /billing/limits``)."""
    return await _save(req, principal, pool)


@router.get("/spend", response_model=SpendView, response_class=ExactJSONResponse)
async def get_spend(principal: Reader, pool: Pool, account_id: AccountQuery = None) -> ExactJSONResponse:
    """Credits consumed today and yesterday (UTC days), this month, and per agent this month."""
    account = target_account(principal, account_id)
    today = datetime.now(UTC).date()
    spent = await ledger_limits.spend(pool, account, today)
    limits = await ledger_limits.get_limits(pool, account)
    applied = limits if limits.enabled else Limits(action_on_limit=limits.action_on_limit)  # off: none applies
    return respond(SpendView(
        date=today, today=micros_to_credits(spent.today_micros), yesterday=micros_to_credits(spent.yesterday_micros),
        this_month=micros_to_credits(spent.month_micros), daily_limit=credits_or_none(applied.daily_limit_micros),
        monthly_limit=credits_or_none(applied.monthly_limit_micros),
        agents=[AgentSpendView(agent_id=a.agent_id, spent_this_month=micros_to_credits(a.spent_micros),
                               monthly_limit=credits_or_none(a.monthly_limit_micros)) for a in spent.agents]))
