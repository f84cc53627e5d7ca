"""``send_notification``: the one activity every workflow uses to tell an account something.

It records the notification (once per dedup key) and delivers it on its channels through
``creditflow.notify.service``: each channel at most once when it succeeds, only unsent channels on a retry.
While a channel may still go (transient failure), the activity fails with a *retryable*
``notification_pending`` error so Temporal retries it; a channel failing ``notify_max_attempts`` times, or still
pending on the activity's last attempt, is reported ``failed`` in the result and the activity completes.

Workflows call it with ``notify`` (workflows/notify.py: bounded retries, never raises), or with
``NOTIFY_RETRY_POLICY`` and their own ``except ActivityError`` as ``TopUpWorkflow`` does.
"""

from __future__ import annotations

from datetime import timedelta

from psycopg_pool import AsyncConnectionPool
from temporalio import activity
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

from activities.errors import translating_errors
from creditflow.config import Settings, get_settings
from creditflow.ledger import outbox
from creditflow.notify.log import Notification, NotificationRecord
from creditflow.notify.service import NotificationPending, NotificationService

# About 4 minutes of attempts in all; together with ``notify_max_attempts`` (5 per channel) a failing channel
# is reported ``failed`` well before the last attempt. Refusals (unknown account...) are not retried.
NOTIFY_RETRY_POLICY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                                  maximum_interval=timedelta(minutes=1), maximum_attempts=10)
# Channels are sent concurrently, each within its own timeout (at most 25 s in the settings).
NOTIFY_TIMEOUT = timedelta(seconds=30)
PENDING = "notification_pending"


class NotificationActivities:
    def __init__(self, pool: AsyncConnectionPool, settings: Settings | None = None) -> None:
        self._pool = pool
        self._service = NotificationService(pool, settings or get_settings())

    @activity.defn(name="send_notification")
    @translating_errors
    async def send_notification(self, input: Notification) -> NotificationRecord:
        """Record and deliver a notification; a repeated dedup key re-sends nothing that was sent."""
        info = activity.info()
        limit = info.retry_policy.maximum_attempts if info.retry_policy else 0
        final = limit > 0 and info.attempt >= limit
        try:
            record = await self._service.send(input, final_attempt=final)
        except NotificationPending as pending:
            raise ApplicationError(f"channels pending: {pending}", pending.record.model_dump(mode="json"),
                                   type=PENDING, non_retryable=False) from pending
        await outbox.mark_applied(self._pool, input.account_id, input.outbox_key)
        return record
