"""The journal's monthly partitions and the daily usage rollups (docs/partitioning.md).

The journal is partitioned by month of ``created_at`` (UTC, migration 0041) with a DEFAULT partition, so an insert
never fails; but rows in the default partition are what a missing month costs (every read scans it, and creating
the month later has to move them). So months are created ahead of time: the Temporal Schedule
``creditflow-partitions`` runs :func:`maintain` daily (``PartitionMaintenanceWorkflow``), and operators run
``creditflow partitions ensure``. Both call ``cf_ensure_journal_partitions``, which is idempotent and serialized.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from psycopg_pool import AsyncConnectionPool

from creditflow.observability.metrics import JOURNAL_DEFAULT_ROWS, JOURNAL_MONTHS_AHEAD, JOURNAL_PARTITIONS_CREATED

log = logging.getLogger(__name__)

DEFAULT_MONTHS_AHEAD = 3
# A day is rolled up once it has been over for ROLLUP_SETTLE (a transaction that began before midnight dates its
# rows the day before and may commit after it), and the latest rolled-up day is redone on the next run.
ROLLUP_SETTLE = timedelta(hours=1)
ROLLUP_FIRST_RUN_DAYS = 35  # how far back the first rollup goes when none was made yet


@dataclass(frozen=True)
class Partition:
    """One partition of the journal: its month (None for the DEFAULT partition) and its rows (an estimate from the
    statistics, exact for the default partition)."""

    name: str
    range_from: datetime | None
    range_to: datetime | None
    rows: int
    created: bool = False  # made by this call (ensure only)
    moved_rows: int = 0  # rows moved out of the DEFAULT partition into it (ensure only)


@dataclass(frozen=True)
class Maintenance:
    """What one maintenance run did."""

    partitions: list[Partition]
    created: list[str]
    months_ahead: int  # whole months after the current one that have their partition
    default_rows: int
    rolled_up_from: date | None
    rolled_up_to: date | None  # exclusive
    rollup_rows: int


async def ensure_partitions(pool: AsyncConnectionPool, months_ahead: int = DEFAULT_MONTHS_AHEAD,
                            at: datetime | None = None) -> list[Partition]:
    """Create the partitions of the month of ``at`` (default: the ledger clock) and the ``months_ahead`` after it;
    idempotent. The database refuses ``months_ahead`` outside 0..120 (SQLSTATE CF400)."""
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT * FROM cf_ensure_journal_partitions(%s, coalesce(%s, cf_now()))", (months_ahead, at))).fetchall()
    made = [Partition(r["partition_name"], r["range_from"], r["range_to"], 0, r["created"], int(r["moved_rows"]))
            for r in rows]
    created = sum(p.created for p in made)
    if created:
        JOURNAL_PARTITIONS_CREATED.inc(created)
    return made


async def list_partitions(pool: AsyncConnectionPool) -> list[Partition]:
    """Every partition of the journal in range order, the DEFAULT partition last."""
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bound,"
            " greatest(c.reltuples, 0)::bigint AS estimate"
            " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'journal'::regclass")).fetchall()
        default_rows = (await (await conn.execute("SELECT count(*) AS n FROM journal_default")).fetchone() or {"n": 0})
    out: list[Partition] = []
    for r in rows:
        if r["bound"] == "DEFAULT":
            continue
        lo, hi = _bounds(r["bound"])
        out.append(Partition(r["name"], lo, hi, int(r["estimate"])))
    out.sort(key=lambda p: p.range_from or datetime.min.replace(tzinfo=UTC))
    out.append(Partition("journal_default", None, None, int(default_rows["n"])))
    return out


def _bounds(expr: str) -> tuple[datetime, datetime]:
    """``FOR VALUES FROM ('2027-01-01 00:00:00+00') TO ('2027-02-01 00:00:00+00')`` -> the two instants."""
    parts = expr.split("'")
    return datetime.fromisoformat(parts[1]), datetime.fromisoformat(parts[3])


async def rollup_usage(pool: AsyncConnectionPool, day_from: date, day_to: date) -> int:
    """Materialize the daily usage rollups of [day_from, day_to) (idempotent); returns the rows written."""
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT cf_rollup_usage(%s, %s) AS n", (day_from, day_to))).fetchone()
    return int(row["n"]) if row else 0


async def maintain(pool: AsyncConnectionPool, months_ahead: int = DEFAULT_MONTHS_AHEAD,
                   now: datetime | None = None) -> Maintenance:
    """The scheduled run: create the coming months' partitions, roll up the days that are over (from the last
    rolled-up day, which is redone, through yesterday), set the gauges and log one structured line."""
    now = now or datetime.now(UTC)
    made = await ensure_partitions(pool, months_ahead, now)
    today = (now - ROLLUP_SETTLE).astimezone(UTC).date()  # the first day not rolled up
    async with pool.connection() as conn:
        last = await (await conn.execute("SELECT max(day) AS d FROM usage_rollup_days")).fetchone()
    start = last["d"] if last and last["d"] else today - timedelta(days=ROLLUP_FIRST_RUN_DAYS)
    rolled = await rollup_usage(pool, start, today) if start < today else 0
    partitions = await list_partitions(pool)
    ahead = _months_ahead(partitions, now)
    default_rows = partitions[-1].rows
    JOURNAL_MONTHS_AHEAD.set(ahead)
    JOURNAL_DEFAULT_ROWS.set(default_rows)
    result = Maintenance(partitions, [p.name for p in made if p.created], ahead, default_rows,
                         start if start < today else None, today if start < today else None, rolled)
    log.info("journal partitions maintained", extra=_log_fields(result))
    return result


def _months_ahead(partitions: list[Partition], now: datetime) -> int:
    """Whole months after the current one covered by consecutive partitions (-1: not even the current month)."""
    starts = {p.range_from for p in partitions if p.range_from is not None}
    month = datetime(now.year, now.month, 1, tzinfo=UTC)
    n = -1
    while month in starts:
        n += 1
        month = datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=UTC)
    return n


def _log_fields(m: Maintenance) -> dict[str, Any]:
    return {"event": "partitions.maintained", "created": m.created, "months_ahead": m.months_ahead,
            "default_rows": m.default_rows, "partitions": len(m.partitions) - 1,
            "rolled_up_from": m.rolled_up_from.isoformat() if m.rolled_up_from else None,
            "rolled_up_to": m.rolled_up_to.isoformat() if m.rolled_up_to else None, "rollup_rows": m.rollup_rows}
