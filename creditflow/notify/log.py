"""The notifications log: every notification creditflow decided to send, written once per dedup key.

The ``send_notification`` activity writes here first, then delivers the notification on its channels
(``creditflow.notify.service``); each channel's outcome is kept per (dedup key, channel) in
``notification_deliveries``. The input model only ever gains fields with defaults, so workflows and their
recorded histories keep working.
"""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool

from creditflow.domain.notifications import (  # noqa: F401 - the models live in the domain; re-exported here
    Attachment,
    Channel,
    ChannelDelivery,
    DeliveryStatus,
    Notification,
    NotificationRecord,
)
from creditflow.ledger.db import to_jsonb


async def record_notification(pool: AsyncConnectionPool, notification: Notification) -> NotificationRecord:
    """Write the notification unless its dedup key was written before; returns the row either way."""
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "INSERT INTO notifications_log (account_id, kind, channel, dedup_key, payload)"
            " VALUES (%s, %s, %s, %s, coalesce(%s, '{}'::jsonb)) ON CONFLICT (dedup_key) DO NOTHING RETURNING id",
            (notification.account_id, notification.kind, notification.channel, notification.dedup_key,
             to_jsonb(notification.payload)))).fetchone()
        if row is not None:
            return NotificationRecord(id=row["id"], created=True)
        row = await (await conn.execute("SELECT id FROM notifications_log WHERE dedup_key = %s",
                                        (notification.dedup_key,))).fetchone()
    assert row is not None
    return NotificationRecord(id=row["id"], created=False)
