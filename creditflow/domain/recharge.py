"""Auto-recharge rules, pure: when to charge, when to wait, when to give up.

The account workflow asks ``decide`` whenever the balance crossed the threshold (an outbox event), a
back-off timer fired, or a recharge finished; it records each attempt with ``after_attempt``. No clock:
``now`` is passed in (the workflow's deterministic time), UTC throughout.

- At most ``max_per_day`` attempts (charges tried, declined or not) per UTC day: a recharge that succeeds
  and is drained again at once cannot loop the card all day.
- After a failure (declined card, no saved card) the next attempt waits ``retry_base_seconds`` doubled per
  consecutive failure (capped); after ``max_consecutive_failures`` failures in a row auto-recharge is
  disabled (and the customer told) until they save new settings.
- New settings (a higher ``generation``) start afresh: failures and back-off are forgotten.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum

from pydantic import BaseModel, Field

from creditflow.domain.money import CREDITS_PER_USD, AmountError, credits_to_micros, to_decimal
from creditflow.domain.topups import TopUpPolicy, quote

DEFAULT_MAX_PER_DAY = 5
DEFAULT_MAX_CONSECUTIVE_FAILURES = 3
DEFAULT_RETRY_BASE_SECONDS = 900  # 15 minutes, then 30, 60, ...
DEFAULT_RETRY_MAX_SECONDS = 6 * 3600


class RechargePolicy(BaseModel):
    """Operator knobs (settings), the same for every account."""

    max_per_day: int = Field(default=DEFAULT_MAX_PER_DAY, ge=1)
    max_consecutive_failures: int = Field(default=DEFAULT_MAX_CONSECUTIVE_FAILURES, ge=1)
    retry_base_seconds: int = Field(default=DEFAULT_RETRY_BASE_SECONDS, ge=1)
    retry_max_seconds: int = Field(default=DEFAULT_RETRY_MAX_SECONDS, ge=1)

    def backoff(self, consecutive_failures: int) -> timedelta:
        """The wait after the n-th failure in a row: base, 2x base, 4x base, ... capped."""
        n = max(consecutive_failures, 1)
        return timedelta(seconds=min(self.retry_max_seconds, self.retry_base_seconds * 2 ** min(n - 1, 30)))


class RechargeConfig(BaseModel):
    """An account's settings (``auto_recharge_settings``)."""

    enabled: bool
    threshold_micros: int = Field(gt=0)
    amount_credits: int = Field(gt=0)
    payment_method_id: str | None = None
    generation: int = 1

    @property
    def amount_cents(self) -> int:
        return self.amount_credits  # 1 credit = 1 cent


class RechargeState(BaseModel):
    """What the account workflow remembers between attempts (carried across continue-as-new)."""

    generation: int = 0
    seq: int = 0  # the last ``recharge:{account_id}:{seq}`` started
    consecutive_failures: int = 0
    next_attempt_at: datetime | None = None
    day: date | None = None  # the UTC day ``attempts_today`` counts
    attempts_today: int = 0
    cap_notified_day: date | None = None
    last_status: str | None = None
    last_error: str | None = None


class Action(StrEnum):
    CHARGE = "charge"  # start a recharge now
    WAIT = "wait"  # ask again at ``wake_at`` (back-off, daily cap)
    IDLE = "idle"  # nothing to do until the next crossing


class Reason(StrEnum):
    DUE = "due"
    DISABLED = "disabled"
    NOT_CONFIGURED = "not_configured"
    ABOVE_THRESHOLD = "above_threshold"
    DAILY_CAP_REACHED = "daily_cap_reached"
    BACKING_OFF = "backing_off"


class Decision(BaseModel):
    action: Action
    reason: Reason
    wake_at: datetime | None = None


def _utc_day(now: datetime) -> date:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC).date()


def next_utc_midnight(now: datetime) -> datetime:
    return datetime.combine(_utc_day(now) + timedelta(days=1), time(0), tzinfo=UTC)


def rebase(state: RechargeState, generation: int) -> RechargeState:
    """The state for settings of ``generation``: new settings forget failures and back-off (not the
    daily count, which protects the card whatever the settings)."""
    if state.generation == generation:
        return state
    return state.model_copy(update={"generation": generation, "consecutive_failures": 0, "next_attempt_at": None,
                                    "last_error": None})


def attempts_on(state: RechargeState, now: datetime) -> int:
    return state.attempts_today if state.day == _utc_day(now) else 0


def decide(config: RechargeConfig | None, state: RechargeState, available_micros: int, policy: RechargePolicy,
           now: datetime) -> Decision:
    """Whether to charge now, wait, or do nothing (``state`` already rebased on ``config.generation``)."""
    if config is None:
        return Decision(action=Action.IDLE, reason=Reason.NOT_CONFIGURED)
    if not config.enabled:
        return Decision(action=Action.IDLE, reason=Reason.DISABLED)
    if available_micros >= config.threshold_micros:
        return Decision(action=Action.IDLE, reason=Reason.ABOVE_THRESHOLD)
    if attempts_on(state, now) >= policy.max_per_day:
        return Decision(action=Action.WAIT, reason=Reason.DAILY_CAP_REACHED, wake_at=next_utc_midnight(now))
    if state.next_attempt_at is not None and now < state.next_attempt_at:
        return Decision(action=Action.WAIT, reason=Reason.BACKING_OFF, wake_at=state.next_attempt_at)
    return Decision(action=Action.CHARGE, reason=Reason.DUE)


def after_attempt(state: RechargeState, *, succeeded: bool, error: str | None, policy: RechargePolicy,
                  now: datetime) -> tuple[RechargeState, bool]:
    """Record one finished attempt; returns the new state and whether auto-recharge must now be disabled."""
    today = _utc_day(now)
    attempts = attempts_on(state, now) + 1
    if succeeded:
        new = state.model_copy(update={"day": today, "attempts_today": attempts, "consecutive_failures": 0,
                                       "next_attempt_at": None, "last_status": "succeeded", "last_error": None})
        return new, False
    failures = state.consecutive_failures + 1
    new = state.model_copy(update={"day": today, "attempts_today": attempts, "consecutive_failures": failures,
                                   "next_attempt_at": now + policy.backoff(failures), "last_status": "failed",
                                   "last_error": error})
    return new, failures >= policy.max_consecutive_failures


def threshold_micros(credits: int) -> int:
    """A threshold in whole credits as the micro-credits the balance watch compares."""
    return credits_to_micros(credits)


MAX_THRESHOLD_CREDITS = 10_000_000  # $100,000: anything above is a typo, not a threshold


class RechargeTerms(BaseModel):
    threshold_micros: int
    amount_credits: int


def recharge_terms(topups: TopUpPolicy, *, threshold: object = None, recharge_amount: object = None,
                   threshold_usd: object = None, amount_usd: object = None) -> RechargeTerms:
    """Validate the settings as given in credits (``threshold``, ``recharge_amount``) or in USD
    (``threshold_usd``, ``amount_usd``): whole credits / whole cents, threshold above zero, the recharge
    within the top-up bounds (it is a top-up). Raises ``AmountError`` with the code."""
    if (threshold is None) == (threshold_usd is None):
        raise AmountError("validation_error", "give exactly one of threshold (credits) and threshold_usd")
    if (recharge_amount is None) == (amount_usd is None):
        raise AmountError("validation_error", "give exactly one of recharge_amount (credits) and amount_usd")
    limit = to_decimal(threshold) if threshold is not None else to_decimal(threshold_usd) * CREDITS_PER_USD
    if limit != limit.to_integral_value():
        raise AmountError("invalid_amount", "the threshold must be whole credits (whole cents in USD)")
    if not 0 < limit <= MAX_THRESHOLD_CREDITS:
        raise AmountError("amount_out_of_range", f"the threshold must be between 1 and {MAX_THRESHOLD_CREDITS:,} "
                                                 "credits")
    amount = to_decimal(recharge_amount) if recharge_amount is not None else to_decimal(amount_usd) * CREDITS_PER_USD
    if amount != amount.to_integral_value():
        raise AmountError("invalid_amount", "the recharge amount must be whole credits (whole cents in USD)")
    priced = quote(topups, amount_usd=amount / CREDITS_PER_USD)  # bounds of a top-up
    return RechargeTerms(threshold_micros=credits_to_micros(int(limit)), amount_credits=priced.credits)
