"""Auto-recharge rules (``creditflow.domain.recharge``): pure functions, exact figures."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from creditflow.domain.money import AmountError
from creditflow.domain.recharge import (
    Action,
    Reason,
    RechargeConfig,
    RechargePolicy,
    RechargeState,
    after_attempt,
    decide,
    next_utc_midnight,
    rebase,
    recharge_terms,
)
from creditflow.domain.topups import TopUpPolicy

NOW = datetime(2026, 3, 14, 15, 9, 26, tzinfo=UTC)
POLICY = RechargePolicy(max_per_day=3, max_consecutive_failures=3, retry_base_seconds=60, retry_max_seconds=600)
CONFIG = RechargeConfig(enabled=True, threshold_micros=1_000_000_000, amount_credits=5_000, generation=2)


def test_charges_only_when_enabled_and_below_the_threshold() -> None:
    state = RechargeState(generation=2)
    assert decide(None, state, 0, POLICY, NOW).reason == Reason.NOT_CONFIGURED
    off = CONFIG.model_copy(update={"enabled": False})
    assert decide(off, state, 0, POLICY, NOW).action == Action.IDLE
    assert decide(CONFIG, state, 1_000_000_000, POLICY, NOW).reason == Reason.ABOVE_THRESHOLD
    due = decide(CONFIG, state, 999_999_999, POLICY, NOW)
    assert (due.action, due.reason, due.wake_at) == (Action.CHARGE, Reason.DUE, None)


def test_failures_back_off_doubling_then_disable() -> None:
    state = RechargeState(generation=2)
    state, disable = after_attempt(state, succeeded=False, error="card_declined", policy=POLICY, now=NOW)
    assert (state.consecutive_failures, state.next_attempt_at, disable) == (1, NOW + timedelta(seconds=60), False)
    waiting = decide(CONFIG, state, 0, POLICY, NOW + timedelta(seconds=59))
    assert (waiting.action, waiting.reason, waiting.wake_at) == (Action.WAIT, Reason.BACKING_OFF,
                                                                 NOW + timedelta(seconds=60))
    assert decide(CONFIG, state, 0, POLICY, NOW + timedelta(seconds=60)).action == Action.CHARGE
    later = NOW + timedelta(seconds=60)
    state, disable = after_attempt(state, succeeded=False, error="card_declined", policy=POLICY, now=later)
    assert (state.consecutive_failures, state.next_attempt_at, disable) == (2, later + timedelta(seconds=120), False)
    state, disable = after_attempt(state, succeeded=False, error="no_payment_method", policy=POLICY, now=later)
    assert (state.consecutive_failures, state.last_error, disable) == (3, "no_payment_method", True)
    assert POLICY.backoff(5) == timedelta(seconds=600)  # capped


def test_success_clears_failures() -> None:
    state = RechargeState(generation=2, consecutive_failures=2, next_attempt_at=NOW)
    state, disable = after_attempt(state, succeeded=True, error=None, policy=POLICY, now=NOW)
    assert (state.consecutive_failures, state.next_attempt_at, state.last_status, disable) == (0, None, "succeeded",
                                                                                              False)
    assert (state.day, state.attempts_today) == (date(2026, 3, 14), 1)


def test_daily_cap_counts_attempts_per_utc_day() -> None:
    state = RechargeState(generation=2)
    for _ in range(3):
        state, _disable = after_attempt(state, succeeded=True, error=None, policy=POLICY, now=NOW)
    capped = decide(CONFIG, state, 0, POLICY, NOW)
    assert (capped.action, capped.reason, capped.wake_at) == (Action.WAIT, Reason.DAILY_CAP_REACHED,
                                                              datetime(2026, 3, 15, tzinfo=UTC))
    assert decide(CONFIG, state, 0, POLICY, datetime(2026, 3, 15, tzinfo=UTC)).action == Action.CHARGE
    assert next_utc_midnight(datetime(2026, 12, 31, 23, 59, tzinfo=UTC)) == datetime(2027, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError):
        next_utc_midnight(datetime(2026, 1, 1))


def test_new_settings_start_afresh_but_keep_the_daily_count() -> None:
    state = RechargeState(generation=1, consecutive_failures=3, next_attempt_at=NOW, day=NOW.date(),
                          attempts_today=3, last_error="card_declined", seq=7)
    fresh = rebase(state, 2)
    assert (fresh.generation, fresh.consecutive_failures, fresh.next_attempt_at, fresh.last_error) == (2, 0, None, None)
    assert (fresh.attempts_today, fresh.seq) == (3, 7)
    assert rebase(fresh, 2) is fresh


def test_terms_in_credits_or_usd() -> None:
    policy = TopUpPolicy()
    assert recharge_terms(policy, threshold=1000, recharge_amount=10000).model_dump() == {
        "threshold_micros": 1_000_000_000, "amount_credits": 10_000}
    assert recharge_terms(policy, threshold_usd=20, amount_usd="50.25").model_dump() == {
        "threshold_micros": 2_000_000_000, "amount_credits": 5_025}


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"threshold": 1000}, "validation_error"),
    ({"recharge_amount": 1000}, "validation_error"),
    ({"threshold": 1000, "threshold_usd": 10, "recharge_amount": 1000}, "validation_error"),
    ({"threshold": "10.5", "recharge_amount": 1000}, "invalid_amount"),
    ({"threshold_usd": "0.001", "recharge_amount": 1000}, "invalid_amount"),
    ({"threshold": 0, "recharge_amount": 1000}, "amount_out_of_range"),
    ({"threshold": -5, "recharge_amount": 1000}, "amount_out_of_range"),
    ({"threshold": 10_000_001, "recharge_amount": 1000}, "amount_out_of_range"),
    ({"threshold": 1000, "recharge_amount": 499}, "amount_out_of_range"),
    ({"threshold": 1000, "recharge_amount": 500_001}, "amount_out_of_range"),
    ({"threshold": 1000, "recharge_amount": "1000.5"}, "invalid_amount"),
    ({"threshold": 1000, "amount_usd": "5.001"}, "invalid_amount"),
    ({"threshold": 1000, "amount_usd": True}, "invalid_amount"),
])
def test_terms_refused(kwargs: dict[str, object], code: str) -> None:
    with pytest.raises(AmountError) as err:
        recharge_terms(TopUpPolicy(), **kwargs)  # type: ignore[arg-type]
    assert err.value.code == code
