"""Plan changes: when they take effect, and what an immediate change costs (pure, no clock).

By default a plan change takes effect at the **next renewal** (the end of the current period):
nothing is prorated, the new plan's fee and credits come with the next cycle.

An **immediate** change at instant ``at`` inside period ``P`` prorates by the exact share of the
period left, ``(P.end - at) / (P.end - P.start)``, measured in microseconds (periods are 28 to 31
days long, so a day of February is worth more than a day of March: each month costs the same fee).

* Money: a credit for the unused part of the old plan's fee, ``old_fee x share``, and a charge for
  the new plan over the rest of the period, ``new_fee x share``, each rounded **half-up to the
  whole cent** on its own by :func:`creditflow.domain.money.prorate` (the project's one rounding
  rule), so the two invoice lines add up to ``net_cents`` exactly. A positive net is due now; a
  negative net is a credit for the customer (to be applied to the next invoice, never paid out).
* Plan credits: the plan credits "belonging" to the rest of the period are swapped, with the same
  share and rounding: ``delta = new_included x share - old_included x share``. An upgrade
  (``delta > 0``) grants ``delta`` plan credits now (expiring with the period's other plan credits);
  a downgrade (``delta < 0``) expires ``|delta|`` plan credits, but never more than remain (credits
  already spent are not clawed back). The customer is refunded the unused fee and loses the unused
  credits that came with it, so neither side gains from changing plans back and forth.
* To or from "no plan" (wallet only) is the same rule with a zero fee and zero included credits.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from creditflow.domain.money import prorate
from creditflow.domain.periods import Period, as_utc, period_key
from creditflow.domain.plans import Plan


class PlanChangeTiming(StrEnum):
    NEXT_RENEWAL = "next_renewal"
    IMMEDIATE = "immediate"


def change_effective_at(period: Period, at: datetime, timing: PlanChangeTiming) -> datetime:
    """When a change requested at ``at`` takes effect: the period's end, or ``at`` itself."""
    at = as_utc(at, "at")
    if not period.contains(at):
        raise ValueError(f"{at.isoformat()} is not in the period starting {period_key(period)}")
    return period.end if timing is PlanChangeTiming.NEXT_RENEWAL else at


class Proration(BaseModel):
    """What an immediate plan change charges, credits and does to plan credits. Cents and credits are integers."""

    model_config = ConfigDict(frozen=True)

    period_key: str
    at: datetime
    old_plan_id: str | None
    new_plan_id: str | None
    remaining_micros: int  # microseconds left in the period at ``at``
    period_micros: int  # microseconds in the whole period
    old_plan_credit_cents: int  # credited: unused part of the old plan's fee
    new_plan_charge_cents: int  # charged: the new plan for the rest of the period
    net_cents: int  # charge - credit: > 0 due now, < 0 owed to the customer
    plan_credits_granted: int
    plan_credits_expired: int
    plan_credits_after: int


def _micros(delta_seconds: int, delta_days: int, delta_micros: int) -> int:
    return (delta_days * 86_400 + delta_seconds) * 1_000_000 + delta_micros


def prorate_plan_change(period: Period, at: datetime, old: Plan | None, new: Plan | None,
                        plan_credits_remaining: int) -> Proration:
    """Prorate an immediate change from ``old`` to ``new`` (either may be None: no plan)."""
    at = as_utc(at, "at")
    if not period.contains(at):
        raise ValueError(f"{at.isoformat()} is not in the period starting {period_key(period)}")
    if (old.id if old else None) == (new.id if new else None):
        raise ValueError("the old and new plan are the same: nothing to prorate")
    if plan_credits_remaining < 0:
        raise ValueError("plan credits remaining cannot be negative")
    left, whole = period.end - at, period.end - period.start
    remaining = _micros(left.seconds, left.days, left.microseconds)
    total = _micros(whole.seconds, whole.days, whole.microseconds)
    credit = prorate(old.monthly_fee_cents, remaining, total) if old else 0
    charge = prorate(new.monthly_fee_cents, remaining, total) if new else 0
    old_share = prorate(old.included_credits, remaining, total) if old else 0
    new_share = prorate(new.included_credits, remaining, total) if new else 0
    granted = max(0, new_share - old_share)
    expired = min(plan_credits_remaining, max(0, old_share - new_share))
    return Proration(
        period_key=period_key(period), at=at, old_plan_id=old.id if old else None,
        new_plan_id=new.id if new else None, remaining_micros=remaining, period_micros=total,
        old_plan_credit_cents=credit, new_plan_charge_cents=charge, net_cents=charge - credit,
        plan_credits_granted=granted, plan_credits_expired=expired,
        plan_credits_after=plan_credits_remaining + granted - expired)
