"""Billing-cycle activities of the account workflow: start a subscription, renew it at a period boundary, record
a plan change for the next renewal. Each is idempotent (keys and once-written records in
``creditflow.ledger.subscriptions``), so a retried or re-run step has one effect.
"""

from __future__ import annotations

from datetime import datetime

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel
from temporalio import activity

from activities.errors import translating_errors
from activities.faults import fault_point
from creditflow.domain.money import MICROS_PER_CREDIT, micros_to_credits
from creditflow.domain.periods import period_at, period_containing
from creditflow.domain.plans import Plan, PlanCatalog, UnknownPlanError
from creditflow.domain.proration import prorate_plan_change
from creditflow.errors import CreditflowError
from creditflow.ledger import subscriptions
from workflows.contract import (
    InvoiceAdjustmentLine,
    InvoiceChargeLine,
    InvoiceWorkflowInput,
    PlanProration,
    SubscriptionState,
)


class StartSubscriptionInput(BaseModel):
    account_id: str
    plan_id: str
    anchor: datetime
    now: datetime


class RenewInput(BaseModel):
    account_id: str
    subscription: SubscriptionState


class RenewResult(BaseModel):
    """The invoice of the closed period, and the subscription from now on (None: it ended)."""

    invoice: InvoiceWorkflowInput
    subscription: SubscriptionState | None
    expired_micros: int
    granted_credits: int


class ChangeNowInput(BaseModel):
    account_id: str
    subscription: SubscriptionState
    new_plan_id: str
    at: datetime


class PendingPlanInput(BaseModel):
    account_id: str
    subscription: SubscriptionState


def state_of(row: subscriptions.Subscription, previous: SubscriptionState | None = None) -> SubscriptionState:
    """The workflow's view of the row; within a period the fee plan and change count carry over."""
    same_period = previous is not None and previous.period_index == row.period_index
    return SubscriptionState(plan_id=row.plan_id, anchor=row.anchor_at, period_index=row.period_index,
                             period_start=row.period_start, period_end=row.period_end,
                             pending_plan_id=row.pending_plan_id, status=row.status,
                             fee_plan_id=previous.fee_plan_id if same_period and previous else None,
                             changes=previous.changes if same_period and previous else 0,
                             proration=previous.proration if same_period and previous else None)


class BillingCycleActivities:
    def __init__(self, pool: AsyncConnectionPool, catalog: PlanCatalog) -> None:
        self._pool = pool
        self._catalog = catalog

    def _plan(self, plan_id: str) -> Plan:
        try:
            return self._catalog.get(plan_id)
        except UnknownPlanError as exc:
            raise CreditflowError("unknown_plan", f"no plan {plan_id}") from exc

    @activity.defn(name="start_subscription")
    @translating_errors
    async def start_subscription(self, input: StartSubscriptionInput) -> SubscriptionState:
        """Subscribe to a plan: the period containing ``now`` (from ``anchor``) starts with the plan's credits."""
        plan = self._plan(input.plan_id)
        period = period_containing(input.anchor, input.now)
        await subscriptions.grant_plan_credits(self._pool, input.account_id, plan, period)
        row = await subscriptions.save_subscription(self._pool, input.account_id, plan_id=plan.id, period=period,
                                                    pending_plan_id=None)
        return state_of(row)

    @activity.defn(name="set_pending_plan")
    @translating_errors
    async def set_pending_plan(self, input: PendingPlanInput) -> SubscriptionState:
        """Record the plan the next renewal switches to ("" ends the subscription then)."""
        s = input.subscription
        if s.pending_plan_id:
            self._plan(s.pending_plan_id)
        row = await subscriptions.save_subscription(
            self._pool, input.account_id, plan_id=s.plan_id, period=period_at(s.anchor, s.period_index),
            pending_plan_id=s.pending_plan_id)
        return state_of(row, s)

    @activity.defn(name="change_plan_now")
    @translating_errors
    async def change_plan_now(self, input: ChangeNowInput) -> SubscriptionState:
        """An immediate plan change: prorate (domain/proration.py), put the two money lines on this period's
        invoice, grant or give back plan credits for the rest of the period, switch the plan. Keys carry the
        change's number, so a retry has one effect."""
        s = input.subscription
        old, new = self._plan(s.plan_id), self._plan(input.new_plan_id)
        period = period_at(s.anchor, s.period_index)
        seq = s.changes + 1
        left = await subscriptions.plan_credits_left(self._pool, input.account_id)
        p = prorate_plan_change(period, input.at, old, new, left // MICROS_PER_CREDIT)
        span = f"{input.at.date().isoformat()} to {period.end.date().isoformat()}"
        await subscriptions.add_adjustments(self._pool, input.account_id, period, seq, [
            (f"Unused {old.name} plan, {span}", -p.old_plan_credit_cents),
            (f"{new.name} plan, {span}", p.new_plan_charge_cents)])
        suffix = f":change{seq}"
        if p.plan_credits_granted:
            await subscriptions.grant_plan_credits(self._pool, input.account_id, new, period,
                                                   credits=p.plan_credits_granted, key_suffix=suffix)
        expired = 0
        if p.plan_credits_expired:
            expired = await subscriptions.expire_some_plan_credits(
                self._pool, input.account_id, period, old.name, p.plan_credits_expired, suffix)
        row = await subscriptions.save_subscription(self._pool, input.account_id, plan_id=new.id, period=period,
                                                    pending_plan_id=None)
        proration = PlanProration(
            at=input.at, old_plan_id=old.id, new_plan_id=new.id, old_plan_credit_cents=p.old_plan_credit_cents,
            new_plan_charge_cents=p.new_plan_charge_cents, net_cents=p.net_cents,
            plan_credits_granted=p.plan_credits_granted, plan_credits_expired=expired // MICROS_PER_CREDIT)
        return state_of(row, s).model_copy(update={"fee_plan_id": s.fee_plan_id or s.plan_id, "changes": seq,
                                                    "proration": proration})

    @activity.defn(name="renew_subscription")
    @translating_errors
    async def renew_subscription(self, input: RenewInput) -> RenewResult:
        """Close the period (facts recorded once), expire its unused plan credits, open the next period with the
        (possibly new) plan's credits, and hand back the closed period's invoice."""
        s = input.subscription
        plan = self._plan(s.plan_id)
        fee_plan = self._plan(s.fee_plan_id or s.plan_id)  # proration lines cover any change within the period
        closed = period_at(s.anchor, s.period_index)
        facts = await subscriptions.close_period(self._pool, input.account_id, closed, fee_plan)
        expired = await subscriptions.expire_plan_credits(self._pool, input.account_id, closed, plan.name)
        fault_point("renewal_after_expiry")  # test-only: the period is closed and its credits expired
        next_plan_id = s.plan_id if s.pending_plan_id is None else s.pending_plan_id
        state: SubscriptionState | None = None
        granted = 0
        if next_plan_id:
            next_plan = self._plan(next_plan_id)
            opened = period_at(s.anchor, s.period_index + 1)
            await subscriptions.grant_plan_credits(self._pool, input.account_id, next_plan, opened)
            granted = next_plan.included_credits
            state = state_of(await subscriptions.save_subscription(
                self._pool, input.account_id, plan_id=next_plan.id, period=opened, pending_plan_id=None))
        else:
            await subscriptions.save_subscription(self._pool, input.account_id, plan_id=s.plan_id, period=closed,
                                                  pending_plan_id=None, status="canceled")
        invoice = InvoiceWorkflowInput(
            account_id=input.account_id, period_start=closed.start, period_end=closed.end, period_key=closed.key,
            plan_id=fee_plan.id, subscription_fee_cents=facts.fee_cents, overage_micros=facts.overage_micros,
            adjustments=[InvoiceAdjustmentLine(description=a["description"], amount_cents=a["amount_cents"])
                         for a in facts.adjustments],
            recurring_charges=[InvoiceChargeLine(description=r["description"], quantity=r["quantity"],
                                                 unit=r["unit"],
                                                 unit_price_credits=micros_to_credits(r["unit_price_micros"]))
                               for r in facts.recurring])
        return RenewResult(invoice=invoice, subscription=state, expired_micros=expired, granted_credits=granted)
