"""Customer-webhook deliveries as the API shows them, and redeliveries (``/api/v1/webhooks/deliveries``).

A delivery is the webhook channel's row of one notification (``notification_deliveries``, read through the
``webhook_deliveries`` view). A redelivery sends the same event again: it is recorded here as a notification of its
own (key ``webhook.redeliver:{account_id}:{idempotency key}``, webhook channel only, ``redelivery_of`` the event's
first delivery; its log payload names the delivery asked for), then sent by ``WebhookRedeliveryWorkflow`` through the
``send_notification`` activity like any other. Recording it first, in one transaction keyed by the idempotency key,
is what makes the request idempotent: the same key and delivery get the same redelivery, the same key and another
delivery ``idempotency_conflict``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from creditflow.domain.notifications import Notification
from creditflow.errors import CreditflowError
from creditflow.ledger.db import to_jsonb
from creditflow.ledger.pagination import Cursor, keyset
from creditflow.notify.service import event_id
from creditflow.notify.templates import canonical_kind

PREFIX = "whd"
# The row's status as the list shows it: in flight, delivered, or given up (refused, attempts used, no destination).
PUBLIC_STATUS = {"pending": "pending", "sending": "pending", "sent": "succeeded", "failed": "failed",
                 "skipped": "failed"}


def public_id(value: UUID) -> str:
    """``whd_`` and 32 hex digits (a random uuid): an id of the usual shape, usable as a list cursor."""
    return f"{PREFIX}_{value.hex}"


def stored_id(value: str) -> UUID:
    """The stored uuid of a ``whd_`` id (``ValueError`` for anything else)."""
    prefix, _, digits = value.partition("_")
    if prefix != PREFIX or len(digits) != 32 or digits != digits.lower():
        raise ValueError(value)
    return UUID(hex=digits)


@dataclass(frozen=True)
class Delivery:
    id: str
    event_id: str
    type: str
    url: str | None
    status: str
    attempts: int
    response_code: int | None
    error: str | None
    redelivery_of: str | None
    event_created_at: datetime
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None


def _delivery(row: dict[str, Any]) -> Delivery:
    return Delivery(id=public_id(row["id"]), event_id=event_id(row["event_key"]), type=canonical_kind(row["kind"]),
                    url=row["destination"], status=PUBLIC_STATUS[row["status"]], attempts=row["attempts"],
                    response_code=row["response_code"], error=row["last_error"],
                    redelivery_of=public_id(row["first_public_id"]) if row["first_public_id"] is not None else None,
                    event_created_at=row["event_created_at"], created_at=row["created_at"],
                    updated_at=row["updated_at"], delivered_at=row["sent_at"])


async def _existing_account(conn: Any, account_id: str) -> None:
    if await (await conn.execute("SELECT 1 FROM accounts WHERE id = %s", (account_id,))).fetchone() is None:
        raise CreditflowError("unknown_account", f"no account {account_id}")


async def list_deliveries(pool: AsyncConnectionPool, account_id: str, limit: int,
                          cursor: Cursor | None = None) -> tuple[list[Delivery], int]:
    """The account's webhook deliveries, newest first (``limit`` rows from the cursor), and how many it has."""
    async with pool.connection() as conn:
        await _existing_account(conn, account_id)
        where, params, order, reverse = await keyset(conn, "webhook_deliveries", account_id, cursor, key=stored_id)
        rows = await (await conn.execute(sql.SQL(
            "SELECT * FROM webhook_deliveries WHERE account_id = %s AND {} ORDER BY {} LIMIT %s").format(where, order),
            (account_id, *params, limit))).fetchall()
        total = await (await conn.execute("SELECT count(*) AS n FROM webhook_deliveries WHERE account_id = %s",
                                          (account_id,))).fetchone()
    if reverse:
        rows.reverse()
    return [_delivery(row) for row in rows], int(total["n"] if total else 0)


async def get_delivery(pool: AsyncConnectionPool, account_id: str, delivery_id: str) -> Delivery:
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT * FROM webhook_deliveries WHERE id = %s AND account_id = %s",
                                        (stored_id(delivery_id), account_id))).fetchone()
    if row is None:
        raise CreditflowError("not_found", f"no webhook delivery {delivery_id}")
    return _delivery(row)


async def record_redelivery(pool: AsyncConnectionPool, account_id: str, delivery_id: str,
                            key: str) -> tuple[Delivery, Notification]:
    """Record (once per key) a redelivery of the event of ``delivery_id``; returns it (``pending`` when new) and the
    notification that sends it. Another account's delivery is ``not_found``; a key used for another delivery is
    ``idempotency_conflict``; an account without a webhook URL now is ``no_webhook_url``."""
    try:
        wanted = stored_id(delivery_id)
    except ValueError as exc:
        raise CreditflowError("invalid_id", f"malformed delivery id: expected {PREFIX}_<32 hex digits>",
                              param="delivery_id") from exc
    dedup_key = f"webhook.redeliver:{account_id}:{key}"
    async with pool.connection() as conn, conn.transaction():
        await _existing_account(conn, account_id)
        original = await (await conn.execute(
            "SELECT row_id, redelivery_of, kind FROM webhook_deliveries WHERE id = %s AND account_id = %s",
            (wanted, account_id))).fetchone()
        if original is None:
            raise CreditflowError("not_found", f"no webhook delivery {delivery_id}", param="delivery_id")
        first = original["redelivery_of"] or original["row_id"]  # a redelivery of a redelivery: the same event
        done = await _redelivery_row(conn, dedup_key)
        if done is None:
            url = await (await conn.execute("SELECT webhook_url FROM notification_channels WHERE account_id = %s",
                                            (account_id,))).fetchone()
            if url is None or url["webhook_url"] is None:
                raise CreditflowError("no_webhook_url", "the account has no webhook_url to send to",
                                      status=409)
            await conn.execute(
                "INSERT INTO notifications_log (account_id, kind, channel, dedup_key, payload)"
                " VALUES (%s, %s, 'webhook', %s, coalesce(%s, '{}'::jsonb)) ON CONFLICT (dedup_key) DO NOTHING",
                (account_id, original["kind"], dedup_key, to_jsonb({"redelivery_requested": delivery_id})))
            await conn.execute(
                "INSERT INTO notification_deliveries (notification_id, account_id, dedup_key, channel, status,"
                " destination, redelivery_of)"
                " SELECT id, %s, %s, 'webhook', 'pending', %s, %s FROM notifications_log WHERE dedup_key = %s"
                " ON CONFLICT (dedup_key, channel) DO NOTHING",
                (account_id, dedup_key, url["webhook_url"], first, dedup_key))
            done = await _redelivery_row(conn, dedup_key)
            assert done is not None
        if done["requested"] != delivery_id:
            raise CreditflowError("idempotency_conflict", "this Idempotency-Key was used to redeliver another "
                                  "delivery", param="Idempotency-Key")
    notification = Notification(account_id=account_id, kind=done["kind"], dedup_key=dedup_key,
                                channels=["webhook"], redelivery_of=first)
    return _delivery(done), notification


async def _redelivery_row(conn: Any, dedup_key: str) -> dict[str, Any] | None:
    row: dict[str, Any] | None = await (await conn.execute(
        "SELECT w.*, l.payload ->> 'redelivery_requested' AS requested FROM webhook_deliveries w"
        " JOIN notification_deliveries d ON d.id = w.row_id JOIN notifications_log l ON l.id = d.notification_id"
        " WHERE d.dedup_key = %s", (dedup_key,))).fetchone()
    return row

