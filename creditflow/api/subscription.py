"""/api/v1/billing/subscription and /api/v1/billing/recurring-charges: the account's plan and billing cycle.

The account workflow is the only writer of cycle state: subscribing, changing plan (at the next renewal) and
cancelling go to it as the update ``change_plan``; this module validates, asks, and shows the result.
Recurring charges (e.g. a monthly phone-number rental) are operator settings billed on every invoice.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from creditflow.api.deps import get_pool, require, target_account
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import Principal, Scope
from creditflow.api.plans import get_plan_catalog
from creditflow.api.schemas import Amount, Strict, Text, Token
from creditflow.api.topups import get_temporal
from creditflow.domain.money import MICROS_PER_CREDIT, AmountError, micros_to_credits
from creditflow.domain.periods import period_at
from creditflow.domain.plans import PlanCatalog, UnknownPlanError
from creditflow.domain.proration import prorate_plan_change
from creditflow.errors import CreditflowError
from creditflow.ledger import queries, subscriptions
from workflows.contract import PlanChange, PlanProration

router = APIRouter(prefix="/api/v1/billing", tags=["subscription"], route_class=ExactRoute)

Reader = Annotated[Principal, Depends(require(Scope.BILLING_READ))]
Writer = Annotated[Principal, Depends(require(Scope.PAYMENTS_WRITE))]
Admin = Annotated[Principal, Depends(require(Scope.ADMIN))]
Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]
Catalog = Annotated[PlanCatalog, Depends(get_plan_catalog)]
AccountQuery = Annotated[str | None, Query(description="Admin keys only.")]


class SubscriptionView(BaseModel):
    account_id: str
    plan_id: str | None = Field(description="null: no plan (wallet only)")
    plan_name: str | None = None
    status: str = Field(description="active, canceled or none")
    monthly_fee_usd: Decimal | None = None
    plan_credits_included: int | None = None
    plan_credits_remaining: Decimal | None = None
    cycle_start: datetime | None = None
    cycle_end: datetime | None = None
    next_renewal_at: datetime | None = None
    pending_plan_id: str | None = Field(default=None, description="the plan from the next renewal on; \"\" ends it")
    proration: PlanProration | None = Field(default=None, description="an immediate change: the unused part of the "
                                            "old plan credited, the new plan charged for the rest of the cycle "
                                            "(both on this cycle's invoice), plan credits granted or given back")


class SubscriptionRequest(Strict):
    account_id: str | None = None
    plan_id: Token | None = Field(description="A plan of GET /billing/plans; null cancels at the next renewal.")
    effective: Literal["next_renewal", "immediately"] = "next_renewal"
    anchor: datetime | None = Field(default=None, description="Admin only: backdate the cycle anchor (imports).")


class RecurringChargeView(BaseModel):
    id: str
    description: str
    quantity: int
    unit: str
    unit_price: Decimal = Field(description="credits per unit per cycle")
    created_at: datetime


class RecurringChargeCreate(Strict):
    account_id: str | None = None
    description: Text = Field(min_length=1, max_length=200)
    quantity: int = Field(ge=1, le=100_000)
    unit: Text = Field(default="", max_length=50)
    unit_price: Amount = Field(description="Credits per unit per cycle (e.g. 150 for a phone number).")


async def _view(pool: AsyncConnectionPool, catalog: PlanCatalog, account_id: str) -> SubscriptionView:
    row = await subscriptions.get_subscription(pool, account_id)
    if row is None or row.status != "active":
        return SubscriptionView(account_id=account_id, plan_id=None, status=row.status if row else "none")
    plan = catalog.get(row.plan_id)
    balance = await queries.balance(pool, account_id)
    return SubscriptionView(
        account_id=account_id, plan_id=plan.id, plan_name=plan.name, status=row.status,
        monthly_fee_usd=plan.monthly_fee_usd, plan_credits_included=plan.included_credits,
        plan_credits_remaining=balance.plan_credits_remaining, cycle_start=row.period_start, cycle_end=row.period_end,
        next_renewal_at=row.period_end, pending_plan_id=row.pending_plan_id)


@router.get("/subscription", response_model=SubscriptionView, response_class=ExactJSONResponse)
async def get_subscription(principal: Reader, pool: Pool, catalog: Catalog,
                           account_id: AccountQuery = None) -> ExactJSONResponse:
    """The account's plan, the current cycle and the next renewal."""
    return respond(await _view(pool, catalog, target_account(principal, account_id)))


@router.post("/subscription", response_model=SubscriptionView, response_class=ExactJSONResponse,
             responses={404: {"description": "unknown_account"},
                        409: {"description": "no_subscription (cancelling without a plan)"},
                        422: {"description": "unknown_plan / validation_error"},
                        503: {"description": "workflow_unavailable"}})
async def change_subscription(req: SubscriptionRequest, principal: Writer, pool: Pool, catalog: Catalog,
                              request: Request) -> ExactJSONResponse:
    """Subscribe to a plan (the cycle starts now, with the plan's credits), change plan at the next renewal, or
    cancel at the next renewal (``plan_id: null``)."""
    account_id = target_account(principal, req.account_id)
    if req.anchor is not None and not principal.is_admin:
        raise CreditflowError("forbidden", "only an admin key may set the cycle anchor")
    if req.plan_id is not None:
        try:
            catalog.get(req.plan_id)
        except UnknownPlanError as exc:
            raise CreditflowError("unknown_plan", f"no plan {req.plan_id}; see GET /api/v1/billing/plans") from exc
    await subscriptions.get_subscription(pool, account_id)  # unknown_account before Temporal
    client = await get_temporal(request)
    state = await client.change_plan(account_id, PlanChange(plan_id=req.plan_id, effective=req.effective,
                                                             anchor=req.anchor),
                                     wait=timedelta(seconds=request.app.state.settings.topup_answer_timeout_seconds))
    view = await _view(pool, catalog, account_id)
    if req.effective == "immediately":
        view.proration = state.proration
    return respond(view)


class SubscriptionPreview(BaseModel):
    account_id: str
    current_plan_id: str | None = Field(description="null: no active plan (the new plan would start a cycle now)")
    plan_id: str | None = Field(description="the plan asked about; null: cancel at the next renewal")
    effective: Literal["next_renewal", "immediately"]
    effective_at: datetime = Field(description="when the change would take effect")
    at: datetime = Field(description="the instant the proration is computed for (now)")
    proration: PlanProration | None = Field(default=None, description="an immediate change of plan: what it would "
                                            "credit and charge on this cycle's invoice and do to plan credits, "
                                            "computed now by the same function the change uses; null otherwise "
                                            "(nothing is prorated)")


@router.get("/subscription/preview", response_model=SubscriptionPreview, response_class=ExactJSONResponse,
            responses={404: {"description": "unknown_account"},
                       409: {"description": "no_subscription (cancelling without a plan)"},
                       422: {"description": "unknown_plan / validation_error (an immediate change to the same plan, "
                                            "or an immediate cancel)"}})
async def preview_subscription(principal: Reader, pool: Pool, catalog: Catalog,
                               plan_id: Annotated[str | None, Query(max_length=100, description=(
                                   "The plan to change to; empty or absent: cancel."))] = None,
                               effective: Annotated[Literal["next_renewal", "immediately", "now"], Query(
                                   description="now is the same as immediately")] = "next_renewal",
                               account_id: AccountQuery = None) -> ExactJSONResponse:
    """What ``POST /billing/subscription`` with this plan and timing would do, without doing it: an immediate change
    prorated as of now (``domain/proration.prorate_plan_change``, the function the change itself runs: the unused
    part of the old plan credited, the new plan charged for the rest of the cycle, plan credits granted or given
    back). Changes nothing; the change, made later, is prorated as of its own instant."""
    account = target_account(principal, account_id)
    when: Literal["next_renewal", "immediately"] = "immediately" if effective in ("now", "immediately") \
        else "next_renewal"
    new = None
    if plan_id:
        try:
            new = catalog.get(plan_id)
        except UnknownPlanError as exc:
            raise CreditflowError("unknown_plan", f"no plan {plan_id}; see GET /api/v1/billing/plans",
                                  param="plan_id") from exc
    row = await subscriptions.get_subscription(pool, account)  # unknown_account
    now = datetime.now(UTC)
    if row is None or row.status != "active":
        if new is None:
            raise CreditflowError("no_subscription", "the account has no subscription to cancel")
        return respond(SubscriptionPreview(account_id=account, current_plan_id=None, plan_id=new.id,
                                           effective=when, effective_at=now, at=now))
    if when == "next_renewal":
        return respond(SubscriptionPreview(account_id=account, current_plan_id=row.plan_id, plan_id=plan_id or None,
                                           effective=when, effective_at=row.period_end, at=now))
    if new is None or new.id == row.plan_id:
        raise CreditflowError("validation_error", "an immediate change needs another plan (cancelling takes effect "
                              "at the next renewal)", param="plan_id")
    period = period_at(row.anchor_at, row.period_index)
    left = await subscriptions.plan_credits_left(pool, account)
    p = prorate_plan_change(period, now, catalog.get(row.plan_id), new, left // MICROS_PER_CREDIT)
    proration = PlanProration(at=now, old_plan_id=p.old_plan_id, new_plan_id=p.new_plan_id,
                              old_plan_credit_cents=p.old_plan_credit_cents,
                              new_plan_charge_cents=p.new_plan_charge_cents, net_cents=p.net_cents,
                              plan_credits_granted=p.plan_credits_granted, plan_credits_expired=p.plan_credits_expired)
    return respond(SubscriptionPreview(account_id=account, current_plan_id=row.plan_id, plan_id=new.id,
                                       effective=when, effective_at=now, at=now, proration=proration))


def _charge_view(charge: subscriptions.RecurringCharge) -> RecurringChargeView:
    return RecurringChargeView(id=charge.id, description=charge.description, quantity=charge.quantity,
                               unit=charge.unit, unit_price=micros_to_credits(charge.unit_price_micros),
                               created_at=charge.created_at)


class RecurringChargeList(BaseModel):
    items: list[RecurringChargeView]
    has_more: bool = Field(default=False, description="Always false: an account's recurring charges are one page.")


@router.get("/recurring-charges", response_model=RecurringChargeList, response_class=ExactJSONResponse)
async def list_recurring_charges(principal: Reader, pool: Pool, account_id: AccountQuery = None
                                 ) -> ExactJSONResponse:
    """Charges billed on every invoice (e.g. phone-number rental)."""
    items = await subscriptions.list_recurring(pool, target_account(principal, account_id))
    return respond({"items": [_charge_view(c) for c in items], "has_more": False})


@router.post("/recurring-charges", response_model=RecurringChargeView, response_class=ExactJSONResponse,
             status_code=201)
async def add_recurring_charge(req: RecurringChargeCreate, principal: Admin, pool: Pool,
                               request: Request) -> ExactJSONResponse:
    """Admin: bill this on every invoice from the next renewal on (plan accounts); a wallet-only account pays it from
    the wallet now and every month (``RentalWorkflow``, seed 004's number rental; docs/seed-promises.md)."""
    account_id = target_account(principal, req.account_id)
    try:
        charge = await subscriptions.add_recurring(pool, account_id, description=req.description,
                                                   quantity=req.quantity, unit=req.unit,
                                                   unit_price_credits=req.unit_price)
    except AmountError as exc:
        raise CreditflowError(exc.code, str(exc)) from exc
    try:
        await (await get_temporal(request)).start_rental(account_id, charge.id, charge.created_at)
    except CreditflowError:  # no schedule, no charge: nothing changed (503, try again)
        await subscriptions.remove_recurring(pool, account_id, charge.id)
        raise
    return respond(_charge_view(charge), 201)


@router.delete("/recurring-charges/{charge_id}", response_model=RecurringChargeView, response_class=ExactJSONResponse)
async def remove_recurring_charge(charge_id: str, principal: Admin, pool: Pool,
                                  account_id: AccountQuery = None) -> ExactJSONResponse:
    """Admin: stop billing it (from the next invoice on)."""
    return respond(_charge_view(await subscriptions.remove_recurring(pool, target_account(principal, account_id),
                                                                     charge_id)))
