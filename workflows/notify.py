"""Telling the customer from a workflow: ``notify`` (any notification) and the account workflow's alert helpers.

Code that runs inside workflows lives in ``workflows/``: these run the ``send_notification``,
``fire_balance_alerts`` and ``send_daily_usage_alert`` activities (defined in ``activities/notifications.py`` and
``activities/alerts.py``, by name) with bounded retries, and never raise: a notification or an alert that cannot
be sent must not fail a billing flow.
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.alerts import (
        ALERT_RETRY,
        ALERT_TIMEOUT,
        BalanceAlertInput,
        BalanceAlertsResult,
        DailyUsageAlertInput,
        DailyUsageAlertResult,
    )
    from activities.notifications import NOTIFY_RETRY_POLICY, NOTIFY_TIMEOUT
    from creditflow.domain.notifications import Notification, NotificationRecord


async def notify(notification: Notification, *, summary: str | None = None) -> NotificationRecord | None:
    """From a workflow: send ``notification`` with bounded retries; never raises (a notification must not
    fail a billing flow). Returns the record with each channel's outcome, or ``None`` if the activity failed."""
    try:
        return await workflow.execute_activity(
            "send_notification", notification, result_type=NotificationRecord,
            start_to_close_timeout=NOTIFY_TIMEOUT, retry_policy=NOTIFY_RETRY_POLICY,
            summary=summary or f"Notify {notification.kind}")
    except ActivityError as err:
        workflow.logger.error("notification %s (%s) not delivered: %s", notification.dedup_key,
                              notification.kind, err.cause or err)
        return None


async def fire_balance_alerts_from_workflow(input: BalanceAlertInput) -> BalanceAlertsResult | None:
    """From a workflow: run ``fire_balance_alerts`` with bounded retries; never raises (None if it failed)."""
    try:
        return await workflow.execute_activity(
            "fire_balance_alerts", input, result_type=BalanceAlertsResult, start_to_close_timeout=ALERT_TIMEOUT,
            retry_policy=ALERT_RETRY, summary=f"Low-balance alerts at {input.threshold_micros} micro-credits")
    except ActivityError as err:
        workflow.logger.error("balance alerts of %s not delivered: %s", input.dedup_key, err.cause or err)
        return None


async def send_daily_usage_alert_from_workflow(input: DailyUsageAlertInput) -> DailyUsageAlertResult | None:
    """From a workflow: run ``send_daily_usage_alert`` with bounded retries; never raises (None if it failed)."""
    try:
        return await workflow.execute_activity(
            "send_daily_usage_alert", input, result_type=DailyUsageAlertResult, start_to_close_timeout=ALERT_TIMEOUT,
            retry_policy=ALERT_RETRY, summary=f"Daily usage alert {input.period}")
    except ActivityError as err:
        workflow.logger.error("daily usage alert %s not delivered: %s", input.dedup_key, err.cause or err)
        return None
