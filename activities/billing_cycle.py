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
from creditflow.domain.money import micros_to_credits
from creditflow.domain.periods import period_at, period_containing
from creditflow.domain.plans import Plan, PlanCatalog, UnknownPlanError
from creditflow.errors import CreditflowError
from creditflow.ledger import subscriptions
from workflows.contract import InvoiceChargeLine, InvoiceWorkflowInput, SubscriptionState


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


class PendingPlanInput(BaseModel):
    account_id: str
    subscription: SubscriptionState


def state_of(row: subscriptions.Subscription) -> SubscriptionState:
    return SubscriptionState(plan_id=row.plan_id, anchor=row.anchor_at, period_index=row.period_index,
                             period_start=row.period_start, period_end=row.period_end,
                             pending_plan_id=row.pending_plan_id, status=row.status)


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
        return state_of(row)

    @activity.defn(name="renew_subscription")
    @translating_errors
    async def renew_subscription(self, input: RenewInput) -> RenewResult:
        """Close the period (facts recorded once), expire its unused plan credits, open the next period with the
        (possibly new) plan's credits, and hand back the closed period's invoice."""
        s = input.subscription
        plan = self._plan(s.plan_id)
        closed = period_at(s.anchor, s.period_index)
        facts = await subscriptions.close_period(self._pool, input.account_id, closed, plan)
        expired = await subscriptions.expire_plan_credits(self._pool, input.account_id, closed, plan.name)
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
            plan_id=plan.id, subscription_fee_cents=facts.fee_cents, overage_micros=facts.overage_micros,
            recurring_charges=[InvoiceChargeLine(description=r["description"], quantity=r["quantity"],
                                                 unit=r["unit"],
                                                 unit_price_credits=micros_to_credits(r["unit_price_micros"]))
                               for r in facts.recurring])
        return RenewResult(invoice=invoice, subscription=state, expired_micros=expired, granted_credits=granted)
