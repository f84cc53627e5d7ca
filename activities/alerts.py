"""Alert activities of the account workflow: low-balance alerts and the daily-usage notification.

``fire_balance_alerts`` runs for a ``balance.below_threshold`` outbox event: it looks up the enabled alerts of
the crossed threshold *now* (an alert removed since the crossing does not fire; a threshold that belongs only
to auto-recharge fires nothing) and sends ``balance.low`` on the alert's channels. ``send_daily_usage_alert``
runs for a ``usage.daily_threshold`` event and sends that kind on every channel the account has a destination
for (unless the threshold was turned off since).

Both send through ``NotificationService`` with a dedup key derived from the outbox event's (``alert:{key}``), so
a redelivered event, a second workflow run or a retried activity sends each channel once. Like
``send_notification`` they fail with the *retryable* ``notification_pending`` error while a channel may still go,
and report ``failed`` channels on their last attempt instead of failing. Workflows call them with ``ALERT_RETRY``
and ``ALERT_TIMEOUT`` and catch ``ActivityError``, or through ``fire_balance_alerts_from_workflow`` /
``send_daily_usage_alert_from_workflow`` (workflows/notify.py), which do both: an alert must never fail the account
workflow.
"""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.errors import translating_errors
from activities.notifications import NOTIFY_RETRY_POLICY, NOTIFY_TIMEOUT, PENDING
from creditflow.config import Settings, get_settings
from creditflow.ledger import alerts, outbox
from creditflow.notify.log import ChannelDelivery, Notification, NotificationRecord
from creditflow.notify.service import NotificationPending, NotificationService

BALANCE_LOW = "balance.low"  # the notification kind (template creditflow/notify/templates/balance.low.j2)
DAILY_USAGE = "usage.daily_threshold"  # the outbox kind and the notification kind
ALERT_RETRY = NOTIFY_RETRY_POLICY  # 10 attempts over about 4 minutes; refusals (unknown account) are final
ALERT_TIMEOUT = NOTIFY_TIMEOUT  # channels are sent concurrently, each within its own (shorter) timeout


def alert_dedup_key(event_dedup_key: str) -> str:
    """The notification's dedup key: one per outbox event (the event key is unique per crossing)."""
    return f"alert:{event_dedup_key}"


class BalanceAlertInput(BaseModel):
    """A ``balance.below_threshold`` outbox event: its dedup key and the payload's amounts (micro-credits)."""

    account_id: str
    dedup_key: str
    threshold_micros: int
    available_micros: int
    balance_micros: int | None = None
    source: str | None = Field(default=None, description="The payload's `source`: `settings` when auto-recharge "
                                                         "was enabled below its threshold (not a crossing).")


class FiredAlert(BaseModel):
    threshold_micros: int
    channels: list[str]
    dedup_key: str
    deliveries: list[ChannelDelivery] = Field(default_factory=list)


class BalanceAlertsResult(BaseModel):
    """What fired (empty: the threshold has no enabled alert, or the event was not a crossing)."""

    fired: list[FiredAlert] = Field(default_factory=list)


class DailyUsageAlertInput(BaseModel):
    """A ``usage.daily_threshold`` outbox event: the threshold (``limit_micros``), the day's usage when it was
    reached (``spent_micros``) and the UTC date (``period``)."""

    account_id: str
    dedup_key: str
    limit_micros: int
    spent_micros: int
    period: str


class DailyUsageAlertResult(BaseModel):
    fired: bool
    dedup_key: str | None = None
    deliveries: list[ChannelDelivery] = Field(default_factory=list)


def _final_attempt() -> bool:
    info = activity.info()
    limit = info.retry_policy.maximum_attempts if info.retry_policy else 0
    return limit > 0 and info.attempt >= limit


class AlertActivities:
    def __init__(self, pool: AsyncConnectionPool, settings: Settings | None = None) -> None:
        self._pool = pool
        self._service = NotificationService(pool, settings or get_settings())

    async def _send(self, notification: Notification) -> NotificationRecord:
        try:
            return await self._service.send(notification, final_attempt=_final_attempt())
        except NotificationPending as pending:
            raise ApplicationError(f"channels pending: {pending}", pending.record.model_dump(mode="json"),
                                   type=PENDING, non_retryable=False) from pending

    @activity.defn(name="fire_balance_alerts")
    @translating_errors
    async def fire_balance_alerts(self, input: BalanceAlertInput) -> BalanceAlertsResult:
        """Send ``balance.low`` for the alerts of the crossed threshold, once per event and channel."""
        if input.source == "settings":  # auto-recharge enabled below its threshold: nothing was crossed
            await outbox.mark_applied(self._pool, input.account_id, input.dedup_key)
            return BalanceAlertsResult()
        fired = []
        for alert in await alerts.alerts_crossed(self._pool, input.account_id, input.threshold_micros):
            payload = {"threshold_micros": input.threshold_micros, "available_micros": input.available_micros}
            if input.balance_micros is not None:
                payload["balance_micros"] = input.balance_micros
            key = alert_dedup_key(input.dedup_key)
            record = await self._send(Notification(account_id=input.account_id, kind=BALANCE_LOW, dedup_key=key,
                                                   payload=payload, channels=list(alert.channels)))
            fired.append(FiredAlert(threshold_micros=alert.threshold_micros, channels=list(alert.channels),
                                    dedup_key=key, deliveries=record.deliveries))
        await outbox.mark_applied(self._pool, input.account_id, input.dedup_key)
        return BalanceAlertsResult(fired=fired)

    @activity.defn(name="send_daily_usage_alert")
    @translating_errors
    async def send_daily_usage_alert(self, input: DailyUsageAlertInput) -> DailyUsageAlertResult:
        """Send ``usage.daily_threshold`` once per event and channel, unless the threshold was turned off."""
        if await alerts.daily_usage_alert(self._pool, input.account_id) is None:
            await outbox.mark_applied(self._pool, input.account_id, input.dedup_key)
            return DailyUsageAlertResult(fired=False)
        key = alert_dedup_key(input.dedup_key)
        record = await self._send(Notification(
            account_id=input.account_id, kind=DAILY_USAGE, dedup_key=key,
            payload={"limit_micros": input.limit_micros, "spent_micros": input.spent_micros, "period": input.period}))
        await outbox.mark_applied(self._pool, input.account_id, input.dedup_key)
        return DailyUsageAlertResult(fired=True, dedup_key=key, deliveries=record.deliveries)
