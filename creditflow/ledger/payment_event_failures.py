"""Payment events the account workflow could not apply (migration 0025_2): kept, visible, re-drivable.

A refund or dispute made on Stripe, or a payment that succeeded late, reaches the account workflow as an outbox
event. If applying it fails for a reason a retry cannot fix (a refusal: the PaymentIntent is not the charge's,
Stripe does not know it, the clawback was refused...), the activity records it here before failing, with the
error; a success of the same event (or of a re-drive of it) marks it resolved. ``redrive`` puts it back in the
outbox under a new dedup key (the workflow deduplicates by key), once its cause is fixed; every effect of a payment
event is keyed by its Stripe object, so a re-drive never applies anything twice.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.errors import CreditflowError

REDRIVE_SEPARATOR = "#redrive-"
MAX_ERROR_LENGTH = 2000


class PaymentEventFailure(BaseModel):
    id: int
    account_id: str
    dedup_key: str
    kind: str
    payload: dict[str, Any]
    error_code: str
    error_message: str
    failures: int
    redrives: int
    first_failed_at: datetime
    last_failed_at: datetime
    resolved_at: datetime | None


def origin_key(dedup_key: str) -> str:
    """The key of the event a re-drive was made from (a first delivery's key is its own origin)."""
    return dedup_key.split(REDRIVE_SEPARATOR, 1)[0]


async def record(pool: AsyncConnectionPool, account_id: str, dedup_key: str, kind: str, payload: dict[str, Any],
                 error_code: str, error_message: str) -> None:
    """Keep a failed event (or count one more failure of it, re-opening it if it was resolved)."""
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO payment_event_failures AS f (account_id, dedup_key, kind, payload, error_code, error_message)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (account_id, dedup_key) DO UPDATE SET"
            " failures = f.failures + 1, error_code = EXCLUDED.error_code, error_message = EXCLUDED.error_message,"
            " last_failed_at = now(), resolved_at = NULL",
            (account_id, origin_key(dedup_key), kind, Jsonb(payload), error_code,
             error_message[:MAX_ERROR_LENGTH]))


async def resolve(pool: AsyncConnectionPool, account_id: str, dedup_key: str) -> None:
    """The event (or a re-drive of it) was applied: its failure, if any, is resolved."""
    async with pool.connection() as conn:
        await conn.execute("UPDATE payment_event_failures SET resolved_at = now() WHERE account_id = %s"
                           " AND dedup_key = %s AND resolved_at IS NULL", (account_id, origin_key(dedup_key)))


async def list_failures(pool: AsyncConnectionPool, *, account_id: str | None = None,
                        include_resolved: bool = False, limit: int = 100) -> list[PaymentEventFailure]:
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT * FROM payment_event_failures WHERE (%s::text IS NULL OR account_id = %s)"
            " AND (%s OR resolved_at IS NULL) ORDER BY id LIMIT %s",
            (account_id, account_id, include_resolved, limit))).fetchall()
    return [PaymentEventFailure(**r) for r in rows]


async def redrive(pool: AsyncConnectionPool, failure_id: int) -> str:
    """Put the event back in the outbox (new dedup key, same kind and payload); returns the outbox row's key."""
    async with pool.connection() as conn, conn.transaction():
        row = await (await conn.execute(
            "UPDATE payment_event_failures SET redrives = redrives + 1 WHERE id = %s AND resolved_at IS NULL"
            " RETURNING account_id, dedup_key, kind, payload, redrives", (failure_id,))).fetchone()
        if row is None:
            raise CreditflowError("not_found", f"no open payment event failure {failure_id}")
        key = f"{row['dedup_key']}{REDRIVE_SEPARATOR}{row['redrives']}"
        await conn.execute("INSERT INTO outbox (account_id, kind, dedup_key, payload) VALUES (%s, %s, %s, %s)",
                           (row["account_id"], row["kind"], key, Jsonb(row["payload"])))
    return key
