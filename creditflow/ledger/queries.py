"""Read side of the ledger: balance, transaction history, usage items and daily rollups."""

from __future__ import annotations

import base64
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from uuid import UUID

from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from creditflow.domain.money import micros_to_credits
from creditflow.errors import CreditflowError
from creditflow.ledger.models import (
    AgentUsage,
    Balance,
    Balances,
    Transaction,
    TransactionPage,
    UsageItem,
    UsageRollup,
    exact,
    txn_id,
)
from creditflow.ledger.pagination import Cursor, keyset

# Journal types that add credits someone bought or was granted ("Total Credits" of seed 002's console): not the
# returns of credits (refund or dispute reversals) nor the restoration of overage an invoice payment makes.
GRANTED_TYPES = ("purchase", "auto_recharge", "welcome_bonus", "plan_grant", "grant", "adjustment", "transfer_in")


async def balance(pool: AsyncConnectionPool, account_id: str) -> Balance:
    """The wallet, the plan's credits and the console's figures for the account's period: its billing period with a
    plan, else the UTC calendar month (``total_credits`` bought or granted in it, gross; ``usage_this_period``;
    ``remaining_credits`` = the balance after that usage)."""
    async with pool.connection() as conn:
        # Plan credits left, read only: usage not yet burned from the lots is owed to the plan lots first (they
        # come first in the burn order), so it is subtracted from them.
        row = await (await conn.execute(
            "SELECT b.balance_micros, cf_live_held(b.account_id, b.held_micros) AS held_micros, b.floor_micros,"
            " b.updated_at, s.plan_id, s.period_end, s.status,"
            " greatest(0, (SELECT coalesce(sum(l.remaining_micros), 0) FROM credit_lots l WHERE l.account_id ="
            "  b.account_id AND l.source = 'plan' AND NOT l.depleted) - b.unburned_micros) AS plan_left,"
            " CASE WHEN s.status = 'active' THEN s.period_start"
            "  ELSE date_trunc('month', cf_now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' END AS figures_start,"
            " CASE WHEN s.status = 'active' THEN s.period_end"
            "  ELSE (date_trunc('month', cf_now() AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC' END"
            "  AS figures_end"
            " FROM balances b LEFT JOIN subscriptions s ON s.account_id = b.account_id WHERE b.account_id = %s",
            (account_id,))).fetchone()
        if row is None:
            raise CreditflowError("unknown_account", f"no account {account_id}")
        figures = await (await conn.execute(
            "SELECT coalesce(sum(amount_micros) FILTER (WHERE amount_micros > 0 AND type = ANY(%s)), 0) AS granted,"
            " coalesce(-sum(amount_micros) FILTER (WHERE type = 'usage'), 0) AS used"
            " FROM journal WHERE account_id = %s AND created_at >= %s AND created_at < %s",
            (list(GRANTED_TYPES), account_id, row["figures_start"], row["figures_end"]))).fetchone()
    assert figures is not None
    subscribed = row["plan_id"] is not None and row["status"] == "active"
    return Balance(account_id=account_id, last_updated=row["updated_at"],
                   plan_id=row["plan_id"] if subscribed else None,
                   plan_credits_remaining=micros_to_credits(int(row["plan_left"])) if subscribed else None,
                   wallet_balance=micros_to_credits(row["balance_micros"] - int(row["plan_left"]))
                   if subscribed else None,
                   next_renewal_at=row["period_end"] if subscribed else None,
                   period_start=row["figures_start"], period_end=row["figures_end"],
                   total_credits=micros_to_credits(int(figures["granted"])),
                   usage_this_period=micros_to_credits(int(figures["used"])),
                   remaining_credits=micros_to_credits(row["balance_micros"]),
                   **Balances.from_micros(row["balance_micros"], row["held_micros"],
                                          row["floor_micros"]).model_dump())


def _encode_cursor(created_at: datetime, seq: int) -> str:
    raw = f"{created_at.isoformat()}|{seq}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        created, seq = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split("|")
        return datetime.fromisoformat(created), int(seq)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CreditflowError("validation_error", "malformed cursor") from exc


def _usage_metadata(row: dict[str, Any]) -> dict[str, Any]:
    """A transaction's metadata: the caller's, plus the usage item for usage rows."""
    metadata = dict(row["metadata"] or {})
    if row["feature_id"] is not None:
        metadata.update(feature_id=row["feature_id"], channel=row["channel"], quantity=exact(row["quantity"]),
                        credits_per_unit=exact(row["credits_per_unit"]))
        if row["agent_id"] is not None:
            metadata["agent_id"] = row["agent_id"]
    return metadata


def txn_uuid(public_id: str) -> UUID:
    """``txn_<hex>`` back to the journal row's uuid (ValueError when it is not one)."""
    if not public_id.startswith("txn_"):
        raise ValueError(public_id)
    return UUID(hex=public_id[4:])


async def transactions(pool: AsyncConnectionPool, account_id: str, *, limit: int = 50,
                       cursor: str | None = None, type: str | None = None,
                       page: Cursor | None = None) -> TransactionPage:
    """Newest first; ``cursor`` continues after the last item of the previous page (``next_cursor``), ``page``
    pages by item id as the other lists do (``starting_after`` / ``ending_before``)."""
    after = _decode_cursor(cursor) if cursor else None
    params = {"a": account_id, "t": type, "c": after[0] if after else None, "s": after[1] if after else None,
              "l": limit + 1}
    async with pool.connection() as conn:
        where, keys, order, reverse = await keyset(conn, "journal", account_id, page, tiebreak="seq", key=txn_uuid)
        rows = await (await conn.execute(sql.SQL(
            "SELECT * FROM journal WHERE account_id = %s AND (%s::text IS NULL OR type = %s)"
            " AND (%s::timestamptz IS NULL OR (created_at, seq) < (%s, %s)) AND {}"
            " ORDER BY {} LIMIT %s").format(where, order),
            (account_id, type, type, params["c"], params["c"], params["s"], *keys, limit + 1))).fetchall()
        total = await (await conn.execute(
            "SELECT count(*) AS n FROM journal WHERE account_id = %(a)s AND (%(t)s::text IS NULL OR type = %(t)s)",
            params)).fetchone()
    has_more = len(rows) > limit
    rows = rows[:limit]
    if reverse:
        rows.reverse()
    items = [
        Transaction(id=txn_id(r["id"]) or "", type=r["type"], amount=micros_to_credits(r["amount_micros"]),
                    description=r["description"], balance_after=micros_to_credits(r["balance_after_micros"]),
                    created_at=r["created_at"], metadata=_usage_metadata(r))
        for r in rows
    ]
    last = rows[-1] if has_more and not reverse else None
    return TransactionPage(items=items, total=total["n"] if total else 0, has_more=has_more,
                           next_cursor=_encode_cursor(last["created_at"], last["seq"]) if last else None)


async def usage_items(pool: AsyncConnectionPool, account_id: str, *, start: datetime | None = None,
                      end: datetime | None = None, agent_id: str | None = None,
                      limit: int = 100, page: Cursor | None = None) -> list[UsageItem]:
    """Usage rows newest first, ``limit`` of them after or before the ``page`` cursor (a usage item id)."""
    async with pool.connection() as conn:
        where, keys, order, reverse = await keyset(conn, "journal", account_id, page, tiebreak="seq", key=txn_uuid)
        rows = await (await conn.execute(sql.SQL(
            "SELECT * FROM journal WHERE account_id = %s AND type = 'usage'"
            " AND (%s::timestamptz IS NULL OR created_at >= %s)"
            " AND (%s::timestamptz IS NULL OR created_at < %s)"
            " AND (%s::text IS NULL OR agent_id = %s) AND {}"
            " ORDER BY {} LIMIT %s").format(where, order),
            (account_id, start, start, end, end, agent_id, agent_id, *keys, limit))).fetchall()
    if reverse:
        rows.reverse()
    return [
        UsageItem(id=txn_id(r["id"]) or "", channel=r["channel"], feature=r["feature_id"],
                  quantity=exact(r["quantity"]), credits_per_unit=exact(r["credits_per_unit"]),
                  credits=micros_to_credits(-r["amount_micros"]), agent_id=r["agent_id"],
                  created_at=r["created_at"], metadata=dict(r["metadata"] or {}))
        for r in rows
    ]


async def usage_rollups(pool: AsyncConnectionPool, account_id: str, *, start: datetime | None = None,
                        end: datetime | None = None) -> list[UsageRollup]:
    """Daily (UTC) totals per channel. Whole days the partition maintenance has rolled up (usage_daily, migration
    0041) are read from there, the rest from the journal, so a long range does not read old journal partitions."""
    async with pool.connection() as conn:
        rows = await (await conn.execute(_USAGE_ROLLUPS_SQL, await _rollup_window(conn, account_id, start, end))
                      ).fetchall()
    return [UsageRollup(date=r["day"], channel=r["channel"], quantity=exact(r["quantity"]) or 0,
                        credits=micros_to_credits(int(r["micros"])), events=r["events"]) for r in rows]


async def usage_by_agent(pool: AsyncConnectionPool, account_id: str, *, start: datetime | None = None,
                         end: datetime | None = None) -> list[AgentUsage]:
    """Credits used per agent in [start, end), read like ``usage_rollups`` (rolled-up whole days, the journal for
    the rest), so a per-agent chart and the per-day chart of the same window add up to the same total."""
    async with pool.connection() as conn:
        rows = await (await conn.execute(_USAGE_BY_AGENT_SQL, await _rollup_window(conn, account_id, start, end))
                      ).fetchall()
    return [AgentUsage(agent_id=r["agent_id"], credits=micros_to_credits(int(r["micros"])), events=r["events"])
            for r in rows]


async def _rollup_window(conn: Any, account_id: str, start: datetime | None, end: datetime | None
                         ) -> dict[str, Any]:
    """The query parameters that split [start, end) between the rollups (whole rolled-up days) and the journal."""
    rolled = await (await conn.execute(_ROLLED_DAYS_SQL)).fetchone()
    lo, hi = _whole_days(rolled["lo"] if rolled else None, rolled["hi"] if rolled else None, start, end)
    return {"a": account_id, "s": start, "e": end, "lo": lo, "hi": hi,
            "lo_ts": datetime.combine(lo, time(), UTC), "hi_ts": datetime.combine(hi, time(), UTC)}


# The contiguous run of rolled-up days that ends at the latest one: [lo, hi).
_ROLLED_DAYS_SQL = (
    "WITH d AS (SELECT day, day - (row_number() OVER (ORDER BY day))::integer AS grp FROM usage_rollup_days)"
    " SELECT min(day) AS lo, max(day) + 1 AS hi FROM d WHERE grp = (SELECT grp FROM d ORDER BY day DESC LIMIT 1)")
# Days [lo, hi) from the rollups, everything else in [s, e) from the journal (its partitions outside [lo, hi)).
_USAGE_ROLLUPS_SQL = (
    "SELECT day, channel, sum(quantity) AS quantity, sum(micros) AS micros, sum(events)::bigint AS events FROM ("
    " SELECT to_char(day, 'YYYY-MM-DD') AS day, nullif(channel, '') AS channel, quantity,"
    "  charged_micros AS micros, events FROM usage_daily"
    "  WHERE account_id = %(a)s AND day >= %(lo)s AND day < %(hi)s"
    " UNION ALL"
    " SELECT to_char(date_trunc('day', created_at AT TIME ZONE 'UTC'), 'YYYY-MM-DD'), channel, quantity,"
    "  -amount_micros, 1 FROM journal WHERE account_id = %(a)s AND type = 'usage'"
    "  AND (%(s)s::timestamptz IS NULL OR created_at >= %(s)s)"
    "  AND (%(e)s::timestamptz IS NULL OR created_at < %(e)s)"
    "  AND (created_at < %(lo_ts)s OR created_at >= %(hi_ts)s)"
    ") x GROUP BY 1, 2 ORDER BY 1 DESC, 2")
# The same split, totalled per agent ('' in the rollups is no agent, NULL in the journal); most credits first.
_USAGE_BY_AGENT_SQL = (
    "SELECT agent_id, sum(micros) AS micros, sum(events)::bigint AS events FROM ("
    " SELECT nullif(agent_id, '') AS agent_id, charged_micros AS micros, events FROM usage_daily"
    "  WHERE account_id = %(a)s AND day >= %(lo)s AND day < %(hi)s"
    " UNION ALL"
    " SELECT agent_id, -amount_micros, 1 FROM journal WHERE account_id = %(a)s AND type = 'usage'"
    "  AND (%(s)s::timestamptz IS NULL OR created_at >= %(s)s)"
    "  AND (%(e)s::timestamptz IS NULL OR created_at < %(e)s)"
    "  AND (created_at < %(lo_ts)s OR created_at >= %(hi_ts)s)"
    ") x GROUP BY 1 ORDER BY 2 DESC, 1 NULLS LAST")


def _whole_days(lo: date | None, hi: date | None, start: datetime | None,
                end: datetime | None) -> tuple[date, date]:
    """The rolled-up days [lo, hi) that lie wholly inside [start, end) (an empty range when none do)."""
    if lo is None or hi is None:
        return date(1970, 1, 1), date(1970, 1, 1)
    if start is not None:
        s = start.astimezone(UTC)
        first = s.date() if s.time() == time() else s.date() + timedelta(days=1)
        lo = max(lo, first)
    if end is not None:
        hi = min(hi, end.astimezone(UTC).date())
    return (lo, hi) if lo < hi else (date(1970, 1, 1), date(1970, 1, 1))
