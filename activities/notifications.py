"""``send_notification``: the one activity every workflow uses to tell an account something.

Today it writes the notifications log (kind, account, payload; once per dedup key). The notifications
issue adds channels behind the same input model, so workflows do not change.
"""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool
from temporalio import activity

from creditflow.notify.log import Notification, NotificationRecord, record_notification


class NotificationActivities:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    @activity.defn(name="send_notification")
    async def send_notification(self, input: Notification) -> NotificationRecord:
        """Record (and later deliver) a notification; a repeated dedup key is a no-op."""
        return await record_notification(self._pool, input)
