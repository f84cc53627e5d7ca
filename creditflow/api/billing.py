"""/api/v1/billing: metering (track, check, holds), balance, history, usage, manual credits."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from creditflow.api.conventions import EndingBefore, IdempotencyKey, StartingAfter, idempotency_key, page_of
from creditflow.api.deps import get_app_settings, get_pool, require, target_account
from creditflow.api.error_handling import error_object
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.fast_path import attach, body_route
from creditflow.api.keys import Principal, Scope
from creditflow.api.schemas import (
    CheckRequest,
    HoldCreate,
    HoldRelease,
    HoldSettle,
    TrackBatchRequest,
    TrackRequest,
    WalletCredit,
)
from creditflow.config import Settings
from creditflow.domain.money import AmountError, micros_to_credits, validate_whole_credits
from creditflow.errors import STATUS_BY_CODE, CreditflowError
from creditflow.ids import check_id
from creditflow.ledger import credit_systems, metering, postings, queries
from creditflow.ledger.models import (
    AgentUsage,
    Balance,
    CheckResult,
    HoldResult,
    PostingResult,
    TrackResult,
    TransactionPage,
    UsageItem,
    UsageRollup,
)
from creditflow.ledger.pagination import Cursor

router = APIRouter(prefix="/api/v1/billing", tags=["billing"], route_class=ExactRoute)

Reader = Annotated[Principal, Depends(require(Scope.BILLING_READ))]
Writer = Annotated[Principal, Depends(require(Scope.USAGE_WRITE))]
Crediter = Annotated[Principal, Depends(require(Scope.WALLET_CREDIT))]
Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]
SystemQuery = Annotated[str | None, Query(pattern=r"^[A-Za-z0-9._:\-/]{1,200}$",
                                         description="A named credit system (default: the wallet, `credits`).")]


class TrackResponse(BaseModel):
    allowed: bool
    code: str
    credits_charged: Decimal
    credits_per_unit: Decimal | None = None
    credits_required: Decimal | None = None
    balance: Decimal | None = None
    pending_charges: Decimal | None = None
    available: Decimal | None = None
    transaction_id: str | None = None
    hold_id: str | None = None
    released: Decimal | None = None
    replayed: bool = False


class TrackBatchResponse(BaseModel):
    results: list[TrackResponse] = Field(description="One per event, in the order sent.")
    allowed: int = Field(description="How many events were recorded (or replayed).")
    denied: int = Field(description="How many were refused (each result says why).")


def _track_body(result: TrackResult) -> dict[str, Any]:
    """``TrackResponse(...).model_dump(exclude_none=True)``, built directly: it runs once per event of a batch, where
    a model per event and three ``Balances`` per event (one per figure read) were 40 % of the endpoint's CPU.
    tests/test_api_track_body.py holds it equal to the model's dump."""
    body: dict[str, Any] = {"allowed": result.allowed, "code": result.code,
                            "credits_charged": result.credits_charged}
    if result.credits_per_unit is not None:
        body["credits_per_unit"] = result.credits_per_unit
    if result.required_micros is not None:
        body["credits_required"] = micros_to_credits(result.required_micros)
    balance, held = result.balance_micros, result.held_micros
    if balance is not None and held is not None and result.floor_micros is not None:
        body["balance"] = micros_to_credits(balance)
        body["pending_charges"] = micros_to_credits(held)
        body["available"] = micros_to_credits(balance - held)
    if result.transaction_id is not None:
        body["transaction_id"] = result.transaction_id
    if result.hold_id is not None:
        body["hold_id"] = result.hold_id
    if result.released_micros is not None:
        body["released"] = micros_to_credits(result.released_micros)
    body["replayed"] = result.replayed
    if result.credit_system is not None:  # a named credit system's event: its balance, not the wallet's
        body["credit_system"] = result.credit_system
    if not result.allowed:
        body["error"] = error_object(result.code, result.code.replace("_", " "))
    return body


def _status(allowed: bool, code: str) -> int:
    return 200 if allowed else STATUS_BY_CODE.get(code, 400)


def _event(principal: Principal, req: TrackRequest, header_key: str | None = None) -> metering.UsageEvent:
    account_id = target_account(principal, req.account_id)
    return metering.UsageEvent.build(account_id, req.feature_id, req.value,
                                     idempotency_key(header_key, req.idempotency_key), req.agent_id, req.metadata)


@router.post("/track", response_model=TrackResponse, response_class=ExactJSONResponse,
             responses={402: {"description": "insufficient_credits / plan_credits_exhausted (nothing written)"},
                        403: {"description": "agent_paused (a denial), insufficient_scope / forbidden (the key)"},
                        404: {"description": "unknown_feature / unknown_account"},
                        409: {"description": "idempotency_conflict"},
                        429: {"description": "daily_limit_reached / monthly_limit_reached / agent_limit_reached"}})
async def track(req: TrackRequest, principal: Writer, pool: Pool,
                key: IdempotencyKey = None) -> ExactJSONResponse:
    """Record a usage event exactly once (per ``Idempotency-Key`` / ``idempotency_key``). Replays return the original
    result with ``replayed: true``; a denial writes nothing and carries a ``code``."""
    result = await metering.track(pool, _event(principal, req, key))
    return respond(_track_body(result), _status(result.allowed, result.code))


attach(track, body_route(TrackRequest, lambda req, principal, pool, request: track(
    req, principal, pool, request.headers.get("idempotency-key"))))


@router.post("/track/batch", response_model=TrackBatchResponse, response_class=ExactJSONResponse)
async def track_batch(req: TrackBatchRequest, principal: Writer, pool: Pool) -> ExactJSONResponse:
    """Up to 1,000 events in one transaction; each is decided on its own (see ``results``)."""
    events = [_event(principal, e) for e in req.events]
    results = await metering.track_batch(pool, events)
    return respond({"results": [_track_body(r) for r in results],
                    "allowed": sum(r.allowed for r in results), "denied": sum(not r.allowed for r in results)})


attach(track_batch, body_route(TrackBatchRequest, lambda req, principal, pool, _: track_batch(req, principal, pool)))


@router.post("/check", response_model=CheckResult, response_class=ExactJSONResponse)
async def check(req: CheckRequest, principal: Reader, pool: Pool) -> ExactJSONResponse:
    """May the account use this feature (for ``value`` units), and what is left? Writes nothing.
    A feature that is unknown or has no rate is ``allowed: false``."""
    account_id = target_account(principal, req.account_id)
    result = await metering.check(pool, account_id, req.feature_id, req.value, req.agent_id)
    body = result.model_dump()
    if result.credit_system is not None:  # a named credit system's feature: ``balances`` are that system's
        body["credit_system"] = result.credit_system
    return respond(body)


attach(check, body_route(CheckRequest, lambda req, principal, pool, _: check(req, principal, pool)))


@router.post("/holds", response_model=HoldResult, response_class=ExactJSONResponse, status_code=201)
async def create_hold(req: HoldCreate, principal: Writer, pool: Pool,
                      settings: Annotated[Settings, Depends(get_app_settings)],
                      key: IdempotencyKey = None) -> ExactJSONResponse:
    """Reserve credits for long-running usage (a call). Held credits are ``pending_charges``."""
    account_id = target_account(principal, req.account_id)
    event = metering.UsageEvent.build(account_id, req.feature_id, req.value, idempotency_key(key, req.idempotency_key),
                                      req.agent_id, req.metadata)
    result = await metering.create_hold(pool, event, req.ttl_seconds or settings.hold_ttl_seconds)
    body = result.model_dump(exclude_none=True)
    if not result.allowed:
        body["error"] = error_object(result.code, result.code.replace("_", " "))
    return respond(body, 201 if result.allowed and not result.replayed else _status(result.allowed, result.code))


@router.post("/holds/{hold_id}/settle", response_model=TrackResponse, response_class=ExactJSONResponse)
async def settle_hold(hold_id: str, req: HoldSettle, principal: Writer, pool: Pool) -> ExactJSONResponse:
    """Charge the actual usage and release the rest of the hold. Settling twice is a no-op."""
    account_id = target_account(principal, req.account_id)
    check_id(hold_id, "hold", "hold_id")
    result = await metering.settle_hold(pool, account_id, hold_id, req.value, req.metadata)
    return respond(_track_body(result), _status(result.allowed, result.code))


@router.post("/holds/{hold_id}/release", response_model=HoldResult, response_class=ExactJSONResponse)
async def release_hold(hold_id: str, req: HoldRelease, principal: Writer, pool: Pool) -> ExactJSONResponse:
    account_id = target_account(principal, req.account_id)
    check_id(hold_id, "hold", "hold_id")
    result = await metering.release_hold(pool, account_id, hold_id)
    if not result.allowed:
        raise CreditflowError(result.code)
    return respond(result.model_dump(exclude_none=True))


@router.get("/balance", response_model=Balance, response_class=ExactJSONResponse)
async def balance(principal: Reader, pool: Pool,
                  account_id: Annotated[str | None, Query(description="Admin keys only.")] = None
                  ) -> ExactJSONResponse:
    """Wallet balance: ``balance``, ``pending_charges`` (holds), ``available`` = balance - pending. An account with
    credits in named credit systems also gets ``credit_systems``: each one's balance (docs/credit-systems.md)."""
    return respond(await _balance_body(pool, target_account(principal, account_id)))


async def _balance_body(pool: AsyncConnectionPool, account_id: str) -> dict[str, Any]:
    """The default wallet in today's fields; ``credit_systems`` only when the account has balances in others."""
    body = (await queries.balance(pool, account_id)).model_dump()
    systems = await credit_systems.balances(pool, account_id)
    if systems:
        body["credit_systems"] = systems
    return body


@router.get("/wallet", response_model=Balance, response_class=ExactJSONResponse, deprecated=True)
async def wallet(principal: Reader, pool: Pool, account_id: str | None = None) -> ExactJSONResponse:
    """Alias of ``/balance``."""
    return respond(await _balance_body(pool, target_account(principal, account_id)))


@router.get("/transactions", response_model=TransactionPage, response_class=ExactJSONResponse)
async def transactions(
    principal: Reader, pool: Pool,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_\-]{1,200}$")] = None,
    type: Annotated[str | None, Query(pattern=r"^[a-z_]{1,40}$",
                                      description="purchase, usage, welcome_bonus, adjustment, ...")] = None,
    account_id: str | None = None, starting_after: StartingAfter = None, ending_before: EndingBefore = None,
    credit_system: SystemQuery = None,
) -> ExactJSONResponse:
    """Balance history, newest first. Pages with ``starting_after`` / ``ending_before`` (a transaction id) and
    ``has_more`` as the other lists do; ``cursor`` (the answer's ``next_cursor``) keeps working. ``credit_system``:
    the history of that credit system's balance (default: the wallet)."""
    account = await _system_account(pool, target_account(principal, account_id), credit_system)
    page = await queries.transactions(pool, account, limit=limit, cursor=cursor,
                                      type=type, page=Cursor(starting_after, ending_before))
    return respond(page)


AgentQuery = Annotated[str | None, Query(pattern=r"^[A-Za-z0-9._:\-/]{1,200}$")]


async def _system_account(pool: AsyncConnectionPool, account_id: str, credit_system: str | None) -> str:
    """The ledger account whose history a list shows: the account's, or its balance in a named credit system."""
    if credit_system is None or credit_system == credit_systems.DEFAULT_SYSTEM:
        return account_id
    await credit_systems.require_system(pool, credit_system)
    return credit_systems.sub_account_id(account_id, credit_system)


def utc(moment: datetime | None) -> datetime | None:
    """Windows are UTC: a time without an offset is read as UTC, not as the server's zone."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


class UsageItemList(BaseModel):
    items: list[UsageItem]
    has_more: bool = Field(default=False, description="More items beyond this page in the paging direction.")


class UsageRollupList(BaseModel):
    items: list[UsageRollup]


class AgentUsageList(BaseModel):
    """``group_by=agent``: credits per agent in the window, most first."""

    items: list[AgentUsage]


@router.get("/usage/items", response_model=UsageItemList, response_class=ExactJSONResponse)
async def usage_items(
    principal: Reader, pool: Pool,
    start: datetime | None = None, end: datetime | None = None, agent_id: AgentQuery = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100, account_id: str | None = None,
    starting_after: StartingAfter = None, ending_before: EndingBefore = None, credit_system: SystemQuery = None,
) -> ExactJSONResponse:
    """Itemized charges in a window (``start`` inclusive, ``end`` exclusive, UTC): channel,
    feature, quantity, credits, agent. Newest first; pages with ``starting_after`` / ``ending_before`` (an item
    id) and ``has_more``."""
    cursor = Cursor(starting_after, ending_before)
    account = await _system_account(pool, target_account(principal, account_id), credit_system)
    items, has_more = page_of(await queries.usage_items(pool, account, start=utc(start),
                                                        end=utc(end), agent_id=agent_id, limit=limit + 1, page=cursor),
                              limit, cursor)
    return respond({"items": items, "has_more": has_more})


@router.get("/usage", response_model=UsageRollupList | AgentUsageList, response_class=ExactJSONResponse)
async def usage(principal: Reader, pool: Pool, start: datetime | None = None, end: datetime | None = None,
                account_id: str | None = None, credit_system: SystemQuery = None,
                group_by: Annotated[Literal["day", "agent"], Query(
                    description="day (default): per UTC day and channel; agent: one total per agent for "
                                "[start, end)")] = "day") -> ExactJSONResponse:
    """Daily (UTC) usage per channel, or per agent over the window (``credit_system``: of that system's balance;
    default: the wallet)."""
    account = await _system_account(pool, target_account(principal, account_id), credit_system)
    if group_by == "agent":
        return respond({"items": await queries.usage_by_agent(pool, account, start=utc(start), end=utc(end))})
    rollups = await queries.usage_rollups(pool, account, start=utc(start),
                                          end=utc(end))
    return respond({"items": rollups})


@router.post("/wallet/credit", response_model=PostingResult, response_class=ExactJSONResponse)
async def wallet_credit(req: WalletCredit, principal: Crediter, pool: Pool,
                        key: IdempotencyKey = None) -> ExactJSONResponse:
    """Manual credit (positive ``amount``) or debit (negative) with a reason (admin, or a key the platform gave
    ``wallet:credit``)."""
    account_id = target_account(principal, req.account_id)
    try:
        amount = validate_whole_credits(req.amount, allow_negative=True)
    except AmountError as exc:
        raise CreditflowError(exc.code, str(exc)) from exc
    the_key = idempotency_key(key, req.idempotency_key)
    system = req.credit_system
    if system is not None and system != credit_systems.DEFAULT_SYSTEM:
        # A named credit system's balance: its sub-account, created by its first grant (never by a refused request).
        await credit_systems.require_system(pool, system)
        account_id = await credit_systems.system_account_for_posting(pool, account_id, system, grant=amount > 0)
    result = await postings.adjust(pool, account_id=account_id, amount_credits=amount, reason=req.reason,
                                   idempotency_key=the_key, actor=principal.key_id)
    body = result.model_dump()
    if system is not None and system != credit_systems.DEFAULT_SYSTEM:
        body["credit_system"] = system
    return respond(body)
