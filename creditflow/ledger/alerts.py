"""Low-balance alerts and the daily-usage notification threshold, in the ledger database.

The API replaces an account's alert list as a whole (``put_alerts``): one transaction under the balances row
lock (the order every money writer follows), then ``cf_refresh_watch`` so the hot path watches exactly the
saved thresholds from the commit on. The balance watch (migration 0007) writes ``balance.below_threshold``
once per threshold and downward crossing, and re-arms by itself when the balance goes back above; the account
workflow then asks ``alerts_crossed`` which alerts that threshold belongs to (the settings may have changed
since the event was written: an alert removed meanwhile does not fire). The daily-usage threshold is a column
of the balances row, compared on the hot path with the day's counter (migration 0009): saving it calls
``cf_refresh_spend`` so the counter is right before the next event.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.domain.money import AmountError, credits_to_micros, to_decimal
from creditflow.domain.recharge import MAX_THRESHOLD_CREDITS
from creditflow.errors import CreditflowError

AlertChannel = Literal["email", "slack", "sms", "webhook"]
CHANNELS: tuple[str, ...] = ("email", "slack", "sms", "webhook")  # the order channels are stored and shown in
MAX_ALERTS = 10  # more thresholds than this is a misuse (every crossing is a notification on every channel)


class AlertSpec(BaseModel):
    """One alert as asked for: ``threshold`` in credits (validated by ``validate_alerts``)."""

    threshold: Any  # credits: int, Decimal or decimal string; floats are refused by ``threshold_micros``
    channels: list[str]
    enabled: bool = True


class AlertConfig(BaseModel):
    """A validated alert: whole-credit threshold in micro-credits, known channels in canonical order."""

    threshold_micros: int
    channels: list[AlertChannel]
    enabled: bool = True


class BalanceAlert(AlertConfig):
    """A row of ``balance_alerts``."""

    created_at: datetime
    updated_at: datetime


class AlertSettings(BaseModel):
    """Everything ``GET /billing/alerts`` shows: the alerts (highest threshold first), the daily-usage
    threshold (None: off) and the available balance, which says which alerts are armed."""

    account_id: str
    alerts: list[BalanceAlert]
    daily_usage_alert_micros: int | None
    available_micros: int


def threshold_micros(value: object, field: str) -> int:
    """A threshold in whole credits, 1 .. MAX_THRESHOLD_CREDITS, as micro-credits (``AmountError`` otherwise)."""
    credits = to_decimal(value)
    if credits != credits.to_integral_value():
        raise AmountError("invalid_amount", f"{field} must be a whole number of credits")
    if not 0 < credits <= MAX_THRESHOLD_CREDITS:
        raise AmountError("amount_out_of_range", f"{field} must be between 1 and {MAX_THRESHOLD_CREDITS:,} credits")
    return credits_to_micros(int(credits))


def _refuse(code: str, field: str, message: str) -> CreditflowError:
    return CreditflowError(code, message, details={"problems": [{"field": field, "message": message}]})


def validate_alerts(specs: Sequence[AlertSpec]) -> list[AlertConfig]:
    """Check a whole list before anything is written; the first problem is raised as a ``CreditflowError``
    (``invalid_amount`` / ``amount_out_of_range`` for thresholds, ``validation_error`` for the rest)."""
    if len(specs) > MAX_ALERTS:
        raise _refuse("validation_error", "alerts", f"at most {MAX_ALERTS} alerts")
    configs: list[AlertConfig] = []
    seen: set[int] = set()
    for n, spec in enumerate(specs):
        try:
            micros = threshold_micros(spec.threshold, "threshold")
        except AmountError as exc:
            raise _refuse(exc.code, f"alerts.{n}.threshold", str(exc)) from exc
        if micros in seen:
            raise _refuse("validation_error", f"alerts.{n}.threshold", "two alerts have the same threshold")
        seen.add(micros)
        if not spec.channels:
            raise _refuse("validation_error", f"alerts.{n}.channels", "name at least one channel")
        unknown = [c for c in spec.channels if c not in CHANNELS]
        if unknown:
            raise _refuse("validation_error", f"alerts.{n}.channels",
                          f"unknown channel {unknown[0]!r} (email, slack, sms, webhook)")
        if len(set(spec.channels)) != len(spec.channels):
            raise _refuse("validation_error", f"alerts.{n}.channels", "a channel is named twice")
        channels: list[Any] = [c for c in CHANNELS if c in spec.channels]
        configs.append(AlertConfig(threshold_micros=micros, channels=channels, enabled=spec.enabled))
    return configs


async def _lock_balance(conn: AsyncConnection[Any], account_id: str) -> None:
    row = await (await conn.execute("SELECT 1 FROM balances WHERE account_id = %s FOR UPDATE",
                                    (account_id,))).fetchone()
    if row is None:
        raise CreditflowError("unknown_account", f"no account {account_id}")


async def _read(conn: AsyncConnection[Any], account_id: str) -> AlertSettings:
    row = await (await conn.execute(
        "SELECT balance_micros - held_micros AS available, daily_usage_alert_micros FROM balances"
        " WHERE account_id = %s", (account_id,))).fetchone()
    if row is None:
        raise CreditflowError("unknown_account", f"no account {account_id}")
    alerts = await (await conn.execute(
        "SELECT threshold_micros, channels, enabled, created_at, updated_at FROM balance_alerts"
        " WHERE account_id = %s ORDER BY threshold_micros DESC", (account_id,))).fetchall()
    return AlertSettings(account_id=account_id, alerts=[BalanceAlert(**a) for a in alerts],
                         daily_usage_alert_micros=row["daily_usage_alert_micros"],
                         available_micros=int(row["available"]))


async def get_alerts(pool: AsyncConnectionPool, account_id: str) -> AlertSettings:
    """The account's alert settings (``unknown_account`` if there is no such account)."""
    async with pool.connection() as conn:
        return await _read(conn, account_id)


async def put_alerts(pool: AsyncConnectionPool, account_id: str, alerts: Sequence[AlertSpec] | None, *,
                     set_daily: bool = False, daily_usage_threshold: object = None) -> AlertSettings:
    """Replace the alert list (``None``: keep it) and, with ``set_daily``, the daily-usage threshold in credits
    (``None`` turns it off), atomically; everything is validated before anything is written. Alerts kept with
    the same threshold keep their ``created_at``. An alert saved while the balance is already below it fires
    at the next crossing, not now: alerts announce crossings (and a re-save must not send them again)."""
    configs = validate_alerts(alerts) if alerts is not None else None
    daily: int | None = None
    if set_daily and daily_usage_threshold is not None:
        try:
            daily = threshold_micros(daily_usage_threshold, "daily_usage_threshold")
        except AmountError as exc:
            raise _refuse(exc.code, "daily_usage_threshold", str(exc)) from exc
    async with pool.connection() as conn, conn.transaction():
        await _lock_balance(conn, account_id)
        if configs is not None:
            await conn.execute(
                "DELETE FROM balance_alerts WHERE account_id = %s AND NOT (threshold_micros = ANY(%s::bigint[]))",
                (account_id, [c.threshold_micros for c in configs]))
            for config in configs:
                await conn.execute(
                    "INSERT INTO balance_alerts AS a (account_id, threshold_micros, channels, enabled)"
                    " VALUES (%s, %s, %s, %s) ON CONFLICT (account_id, threshold_micros) DO UPDATE"
                    " SET channels = excluded.channels, enabled = excluded.enabled, updated_at = now()"
                    " WHERE (a.channels, a.enabled) IS DISTINCT FROM (excluded.channels, excluded.enabled)",
                    (account_id, config.threshold_micros, list(config.channels), config.enabled))
            await conn.execute("SELECT cf_refresh_watch(%s)", (account_id,))
        if set_daily:
            await conn.execute("UPDATE balances SET daily_usage_alert_micros = %s WHERE account_id = %s",
                               (daily, account_id))
            await conn.execute("SELECT cf_refresh_spend(%s)", (account_id,))
        return await _read(conn, account_id)


async def alerts_crossed(pool: AsyncConnectionPool, account_id: str, threshold: int) -> list[BalanceAlert]:
    """The enabled alerts whose threshold (micro-credits) is ``threshold``: what a crossing of it must fire.
    Empty when the threshold belongs only to auto-recharge, or the alert was removed or disabled since."""
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT threshold_micros, channels, enabled, created_at, updated_at FROM balance_alerts"
            " WHERE account_id = %s AND threshold_micros = %s AND enabled", (account_id, threshold))).fetchall()
    return [BalanceAlert(**row) for row in rows]


async def daily_usage_alert(pool: AsyncConnectionPool, account_id: str) -> int | None:
    """The daily-usage threshold now (micro-credits), None when off (``unknown_account`` if no account)."""
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT daily_usage_alert_micros FROM balances WHERE account_id = %s",
                                        (account_id,))).fetchone()
    if row is None:
        raise CreditflowError("unknown_account", f"no account {account_id}")
    return row["daily_usage_alert_micros"]
