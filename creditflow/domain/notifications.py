"""What a notification is, as workflows, activities and the notification service pass it around.

Pure models (no I/O), so workflows can build notifications without importing the service or the log
(``creditflow.notify``). The models only ever gain fields with defaults, so recorded histories keep working.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

Channel = Literal["log", "email", "slack", "sms", "webhook"]
DeliveryStatus = Literal["pending", "sending", "sent", "failed", "skipped"]


class Attachment(BaseModel):
    """A file to attach to the email, named by reference so workflow payloads stay small: the notification
    service reads the bytes when it sends (today: an invoice's PDF, ``invoices.pdf`` of this account)."""

    filename: str
    content_type: str = "application/pdf"
    invoice_id: str


class Notification(BaseModel):
    """One notification to send. ``dedup_key`` makes a retried send a no-op (e.g. ``receipt:{charge_id}``).

    ``channels``: where to send it; ``None`` means the kind's defaults (see ``creditflow.notify.templates``)
    among the channels the account has a destination for. The log always gets it."""

    account_id: str
    kind: str
    dedup_key: str
    payload: dict[str, Any] = Field(default_factory=dict)
    channel: str = "log"
    channels: list[Channel] | None = None
    # Email only (other channels ignore them); resolved by the service at send time. An attachment that cannot
    # be found fails the email channel (``attachment_missing``) rather than sending a message without it.
    attachments: list[Attachment] = Field(default_factory=list)
    # The outbox row this notification is the whole effect of (an ``alert_only`` limit): marked applied once sent.
    outbox_key: str | None = None
    # A redelivery (POST /api/v1/webhooks/deliveries/{id}/redeliver): the id of the event's first webhook delivery.
    # The same event goes again (its id, type, created time and data), on the webhook channel, under its own key.
    redelivery_of: int | None = None


class ChannelDelivery(BaseModel):
    """What happened on one channel: ``error`` is the last failure (or why it was skipped)."""

    channel: Channel
    status: DeliveryStatus
    attempts: int = 0
    destination: str | None = None
    error: str | None = None
    sent_at: datetime | None = None


class NotificationRecord(BaseModel):
    id: int
    created: bool
    deliveries: list[ChannelDelivery] = Field(default_factory=list)

    def delivery(self, channel: str) -> ChannelDelivery | None:
        return next((d for d in self.deliveries if d.channel == channel), None)
