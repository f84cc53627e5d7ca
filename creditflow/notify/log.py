"""The notifications log: every notification creditflow decided to send, written once per dedup key.

Until channels (email, Slack, SMS, webhooks) exist, writing here is the whole delivery; afterwards the
channels read the same request, so callers (the ``send_notification`` activity) do not change.
"""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from creditflow.ledger.db import to_jsonb


class Notification(BaseModel):
    """One notification to send. ``dedup_key`` makes a retried send a no-op (e.g. ``receipt:{charge_id}``)."""

    account_id: str
    kind: str
    dedup_key: str
    payload: dict[str, Any] = Field(default_factory=dict)
    channel: str = "log"


class NotificationRecord(BaseModel):
    id: int
    created: bool


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
