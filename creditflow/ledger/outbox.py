"""The outbox's database side: claim pending rows, mark them dispatched, record failed attempts.

Rows are written by hot-path transactions (e.g. ``create_account``) and drained by the relay in the
worker. Functions take a connection from the ledger pool (dict rows) so the caller owns the
transaction. Claims use ``FOR UPDATE SKIP LOCKED`` inside the caller's transaction, so several relays can run
at once and each row is delivered by one of them at a time; delivery is at least once and the account
workflow deduplicates by ``dedup_key``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

CHANNEL = "creditflow_outbox"  # NOTIFYed by the insert trigger with the account id as payload

# Retry delays after failed attempts: 1 s, 2 s, 4 s, ... capped at 5 minutes.
RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 300.0
MAX_ERROR_LENGTH = 2000


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    account_id: str
    kind: str
    dedup_key: str
    payload: dict[str, Any]
    created_at: datetime
    attempts: int


def retry_delay(attempts: int) -> float:
    """Seconds to wait before retrying a row that has failed ``attempts`` times."""
    if attempts <= 0:
        return 0.0
    return min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2.0 ** min(attempts - 1, 20))


async def claim_batch(conn: AsyncConnection[dict[str, Any]], limit: int,
                      exclude_ids: Collection[int] = ()) -> list[OutboxRow]:
    """Lock up to ``limit`` pending rows, oldest first, skipping rows locked by another relay and
    ``exclude_ids`` (rows backing off). Call inside a transaction; the locks last until it ends.

    Each account's rows are delivered in order: a row is returned only if every earlier pending row of its
    account is returned too. An earlier row that is backing off (it failed) or locked by another relay holds back
    the account's later rows (e.g. a ``dispute.closed`` never overtakes its ``dispute.created``); other accounts
    are not held back."""
    excluded = list(exclude_ids)
    cur = await conn.execute(
        "SELECT id, account_id, kind, dedup_key, payload, created_at, attempts FROM outbox o"
        " WHERE dispatched_at IS NULL AND NOT (id = ANY(%(ex)s))"
        " AND NOT EXISTS (SELECT 1 FROM outbox e WHERE e.account_id = o.account_id AND e.dispatched_at IS NULL"
        "   AND e.id < o.id AND e.id = ANY(%(ex)s))"
        " ORDER BY id LIMIT %(n)s FOR UPDATE SKIP LOCKED",
        {"ex": excluded, "n": limit},
    )
    rows = [_row(r) for r in await cur.fetchall()]
    if not rows:
        return rows
    # Rows of these accounts still pending up to the last one claimed: an account's claimed rows count only up to
    # its first pending row that is not among them (locked by another relay, or backing off).
    pending = await (await conn.execute(
        "SELECT account_id, id FROM outbox WHERE dispatched_at IS NULL AND account_id = ANY(%s) AND id <= %s"
        " ORDER BY account_id, id", (list({r.account_id for r in rows}), max(r.id for r in rows)))).fetchall()
    claimed = {r.id for r in rows}
    blocked: set[str] = set()
    held_back: set[int] = set()
    for p in pending:
        if p["account_id"] in blocked:
            held_back.add(p["id"])
        elif p["id"] not in claimed:
            blocked.add(p["account_id"])
    return [r for r in rows if r.id not in held_back]


async def mark_dispatched(conn: AsyncConnection[dict[str, Any]], ids: Collection[int] | Mapping[int, str | None]
                          ) -> None:
    """Delivered: counted as an attempt and never claimed again. A mapping gives each row the workflow run that
    accepted its signal (``dispatched_run_id``: a new run rebuilds its dedup window from rows delivered to others)."""
    if not ids:
        return
    runs = ids if isinstance(ids, Mapping) else dict.fromkeys(ids)
    await conn.execute(
        "UPDATE outbox o SET dispatched_at = now(), attempts = attempts + 1, dispatched_run_id = d.run_id"
        " FROM unnest(%s::bigint[], %s::text[]) AS d(id, run_id) WHERE o.id = d.id",
        (list(runs.keys()), list(runs.values())))


async def record_failure(conn: AsyncConnection[dict[str, Any]], row_id: int, error: str) -> int:
    """A failed delivery: the row stays pending; returns its attempt count for the backoff."""
    cur = await conn.execute(
        "UPDATE outbox SET attempts = attempts + 1, last_error = %s WHERE id = %s RETURNING attempts",
        (error[:MAX_ERROR_LENGTH], row_id),
    )
    row = await cur.fetchone()
    return int(row["attempts"]) if row is not None else 0


@dataclass(frozen=True, slots=True)
class DedupWindow:
    """What a new run of the account workflow starts from: the keys it has seen, and the rows an earlier run accepted
    but never applied (of the kinds applied after their signal), oldest first."""

    seen_keys: list[str]
    unapplied: list[OutboxRow]


async def recent_dispatched(conn: AsyncConnection[dict[str, Any]], account_id: str, limit: int,
                            except_run_id: str | None, applied_later: Collection[str]) -> DedupWindow:
    """The account's last ``limit`` rows delivered to runs other than ``except_run_id``, oldest first: the dedup
    window a new run of the account workflow starts from (the database, not the previous run, is the source of
    truth). Rows delivered to that run itself are not "seen" yet: it has still to apply them. Rows of the
    ``applied_later`` kinds that no activity marked applied were accepted by a run that ended first: not seen."""
    cur = await conn.execute(
        "SELECT * FROM (SELECT id, account_id, kind, dedup_key, payload, created_at, attempts, applied_at FROM outbox"
        " WHERE account_id = %s AND dispatched_at IS NOT NULL AND dispatched_run_id IS DISTINCT FROM %s"
        " ORDER BY id DESC LIMIT %s) recent ORDER BY id",
        (account_id, except_run_id, limit))
    seen: list[str] = []
    unapplied: list[OutboxRow] = []
    for r in await cur.fetchall():
        if r["applied_at"] is None and r["kind"] in applied_later:
            unapplied.append(_row(r))
        else:
            seen.append(r["dedup_key"])
    return DedupWindow(seen_keys=seen, unapplied=unapplied)


async def mark_applied(pool: AsyncConnectionPool[Any], account_id: str, dedup_key: str | None) -> None:
    """The row's effect is done (or kept for an operator, e.g. a refused payment event): a new run of the account
    workflow does not apply it again. Called by the activity that applied it, after its effect committed."""
    if not dedup_key:
        return
    async with pool.connection() as conn:
        await conn.execute("UPDATE outbox SET applied_at = now() WHERE dedup_key = %s AND account_id = %s"
                           " AND applied_at IS NULL", (dedup_key, account_id))


def _row(r: dict[str, Any]) -> OutboxRow:
    return OutboxRow(id=r["id"], account_id=r["account_id"], kind=r["kind"], dedup_key=r["dedup_key"],
                     payload=r["payload"], created_at=r["created_at"], attempts=r["attempts"])
