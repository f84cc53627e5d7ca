"""/api/v1/entitled and /api/v1/event: the credit-system shape of check and track (the "credit systems"
document): ``customer_id`` names the account (its id, or the ``external_id`` it was created with).

Same rules as ``/billing/check`` and ``/billing/track``: the check writes nothing and a feature with no rate
is ``allowed: false``; an event is recorded once per ``idempotency_key`` (an event sent without one cannot be
told apart from a retry: each call is recorded).
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, Depends
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from creditflow.api.conventions import IdempotencyKey, idempotency_key
from creditflow.api.deps import get_pool, require, target_account
from creditflow.api.error_handling import error_object
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import Principal, Scope
from creditflow.api.schemas import Amount, Metadata, Strict, Token
from creditflow.errors import STATUS_BY_CODE, CreditflowError
from creditflow.ledger import metering

router = APIRouter(prefix="/api/v1", tags=["entitlements"], route_class=ExactRoute)

Reader = Annotated[Principal, Depends(require(Scope.BILLING_READ))]
Writer = Annotated[Principal, Depends(require(Scope.USAGE_WRITE))]
Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]

CREDITS_FEATURE = "credits"  # the shared balance every feature draws on


class EntitledRequest(Strict):
    customer_id: Token | None = Field(default=None,
                                      description="Account id or external id; implied by an account key.")
    feature_id: Token
    value: Amount | None = None
    agent_id: Token | None = None


class EventRequest(Strict):
    customer_id: Token | None = None
    feature_id: Token
    value: Amount = Field(default=Decimal(1))
    agent_id: Token | None = None
    idempotency_key: Token | None = None
    metadata: Metadata


class CreditBalance(BaseModel):
    feature_id: str = CREDITS_FEATURE
    unlimited: bool = False
    balance: Decimal


class EntitledResponse(BaseModel):
    customer_id: str
    feature_id: str
    code: str = Field(description="feature_found, or why not: unknown_feature, feature_not_priced, "
                                  "insufficient_credits, agent_paused, daily_limit_reached, ...")
    allowed: bool
    balances: list[CreditBalance]
    credits_required: Decimal | None = None


async def _account(pool: AsyncConnectionPool, principal: Principal, customer_id: str | None) -> str:
    """The account a customer id names: an account id as is, otherwise the account with that external id."""
    if customer_id is not None and not customer_id.startswith("acc_"):
        async with pool.connection() as conn:
            row = await (await conn.execute("SELECT id FROM accounts WHERE external_id = %s",
                                            (customer_id,))).fetchone()
        if row is None:
            if principal.is_admin:
                raise CreditflowError("unknown_account", f"no customer {customer_id}")
            raise CreditflowError("forbidden", "this API key belongs to another account")
        customer_id = row["id"]
    return target_account(principal, customer_id)


@router.post("/entitled", response_model=EntitledResponse, response_class=ExactJSONResponse)
async def entitled(req: EntitledRequest, principal: Reader, pool: Pool) -> ExactJSONResponse:
    """May this customer use the feature (for ``value`` units)? Writes nothing."""
    account_id = await _account(pool, principal, req.customer_id)
    result = await metering.check(pool, account_id, req.feature_id, req.value, req.agent_id)
    code = "feature_found" if result.allowed else result.code
    return respond(EntitledResponse(
        customer_id=req.customer_id or account_id, feature_id=req.feature_id, code=code, allowed=result.allowed,
        balances=[CreditBalance(feature_id=result.credit_system or CREDITS_FEATURE, balance=result.balances.available)]
        if result.balances else [],
        credits_required=result.credits_required,
    ).model_dump(exclude_none=True))


class EventResponse(BaseModel):
    customer_id: str
    feature_id: str
    allowed: bool
    code: str
    credits_charged: Decimal
    idempotency_key: str
    replayed: bool
    balance: Decimal | None = None
    message: str | None = Field(default=None, description="Set when recorded.")
    event_id: str | None = Field(default=None, description="The ledger transaction, when recorded.")


@router.post("/event", response_model=EventResponse, response_class=ExactJSONResponse,
             responses={402: {"description": "insufficient_credits (nothing recorded)"},
                        404: {"description": "unknown_feature / unknown_account"}})
async def event(req: EventRequest, principal: Writer, pool: Pool,
                header_key: IdempotencyKey = None) -> ExactJSONResponse:
    """Record a usage event against the shared credit balance."""
    account_id = await _account(pool, principal, req.customer_id)
    given = header_key is not None or req.idempotency_key is not None
    key = idempotency_key(header_key, req.idempotency_key) if given else f"event:{uuid.uuid4().hex}"
    result = await metering.track(pool, metering.UsageEvent.build(account_id, req.feature_id, req.value, key,
                                                                  req.agent_id, req.metadata))
    body: dict[str, object] = {
        "customer_id": req.customer_id or account_id, "feature_id": req.feature_id, "allowed": result.allowed,
        "code": result.code, "credits_charged": result.credits_charged, "idempotency_key": key,
        "replayed": result.replayed,
    }
    if result.balances is not None:
        body["balance"] = result.balances.balance
    if result.allowed:
        body.update(message="Event recorded successfully", event_id=result.transaction_id)
        return respond(body)
    body["error"] = error_object(result.code, result.code.replace("_", " "))
    return respond(body, STATUS_BY_CODE.get(result.code, 400))
