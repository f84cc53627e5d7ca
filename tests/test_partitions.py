"""The journal partitioned by month (migration 0041, docs/partitioning.md): a month rollover, exactly-once across
partitions, the DEFAULT partition and the maintenance that creates months ahead, the daily usage rollups, the CLI.

The ledger clock (``creditflow.now``, the simulator's) dates entries at the end of one month and the start of the
next, months after today so that no partition exists for them until the test creates it.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client
from typer.testing import CliRunner

from creditflow.config import Settings
from creditflow.ledger import metering, partitions, queries
from creditflow.ledger.accounts import create_account
from creditflow.ledger.db import migrate
from creditflow.ledger.metering import UsageEvent
from creditflow.ledger.ratecard import ensure_default_ratecard
from creditflow.ledger.verify import verify
from creditflow.partitions_cli import partitions_app
from creditflow.temporal_setup import ensure_partitions_schedule
from tests.support.cli import cli_environment
from tests.support.ledger import clock_pool
from tests.support.migrations import apply_numbered, new_database
from workflows.contract import PartitionMaintenanceSummary

CREDIT = 1_000_000


def month_start(months_from_now: int) -> datetime:
    today = datetime.now(UTC)
    index = today.year * 12 + today.month - 1 + months_from_now
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


async def where(pool: AsyncConnectionPool, account_id: str) -> dict[str, str]:
    """Each of the account's journal keys -> the partition holding its row."""
    async with pool.connection() as conn:
        rows = await (await conn.execute("SELECT idempotency_key, tableoid::regclass::text AS p FROM journal"
                                         " WHERE account_id = %s", (account_id,))).fetchall()
    return {r["idempotency_key"]: r["p"] for r in rows}


def chat(account_id: str, key: str, messages: int = 1) -> UsageEvent:
    return UsageEvent.build(account_id, "chat_message", messages, key)


async def test_month_rollover_lands_entries_in_their_months_and_keys_stay_exactly_once(
        database_url: str, pool: AsyncConnectionPool) -> None:
    await ensure_default_ratecard(pool)
    account = await create_account(pool, name="Rollover", billing_email="r@example.com", welcome_bonus_credits=100)
    first, second = month_start(6), month_start(7)  # no partition for either yet
    first_name = f"journal_y{first.year}m{first.month:02d}"
    second_name = f"journal_y{second.year}m{second.month:02d}"
    made = await partitions.ensure_partitions(pool, 0, at=first + timedelta(days=3))
    assert [(p.name, p.created) for p in made] == [(first_name, True)]

    async with clock_pool(database_url, second - timedelta(seconds=10)) as end_of_month:
        a = await metering.track(end_of_month, chat(account.id, "evt-a"))
        b = await metering.track(end_of_month, chat(account.id, "evt-b", 2))
    async with clock_pool(database_url, second + timedelta(seconds=10)) as start_of_month:
        c = await metering.track(start_of_month, chat(account.id, "evt-c", 3))
        # The same keys across the boundary: the stored results come back, nothing is charged again.
        again_a = await metering.track(start_of_month, chat(account.id, "evt-a"))
        again_b = (await metering.track_batch(start_of_month, [chat(account.id, "evt-b", 2)]))[0]
        other = await metering.track(start_of_month, chat(account.id, "evt-a", 5))
    assert [r.code for r in (a, b, c)] == ["ok", "ok", "ok"]
    assert (again_a.replayed, again_a.transaction_id, again_a.charged_micros) == (True, a.transaction_id, CREDIT)
    assert (again_b.replayed, again_b.transaction_id, again_b.charged_micros) == (True, b.transaction_id, 2 * CREDIT)
    assert (other.allowed, other.code) == (False, "idempotency_conflict")

    placed = await where(pool, account.id)
    assert (placed["evt-a"], placed["evt-b"], placed["evt-c"]) == (first_name, first_name, "journal_default")

    # The maintenance creates the next month and moves its row out of DEFAULT; the key still finds it.
    done = await partitions.maintain(pool, 1, now=second + timedelta(hours=1))
    assert second_name in done.created
    assert done.default_rows == 0
    assert (await where(pool, account.id))["evt-c"] == second_name
    async with clock_pool(database_url, second + timedelta(days=2)) as later:
        again_c = await metering.track(later, chat(account.id, "evt-c", 3))
        again_a = await metering.track(later, chat(account.id, "evt-a"))
    assert (again_c.replayed, again_c.transaction_id) == (True, c.transaction_id)
    assert (again_a.replayed, again_a.transaction_id) == (True, a.transaction_id)

    async with pool.connection() as conn:
        usage = await (await conn.execute("SELECT count(*) AS n, -sum(amount_micros) AS s FROM journal"
                                          " WHERE account_id = %s AND type = 'usage'", (account.id,))).fetchone()
        keys = await (await conn.execute("SELECT count(*) AS n FROM journal_keys WHERE account_id = %s",
                                         (account.id,))).fetchone()
        balance = await (await conn.execute("SELECT balance_micros FROM balances WHERE account_id = %s",
                                            (account.id,))).fetchone()
        rollup = await (await conn.execute(
            "SELECT day, events, charged_micros FROM usage_daily WHERE account_id = %s ORDER BY day",
            (account.id,))).fetchall()
    assert (usage["n"], usage["s"]) == (3, 6 * CREDIT)
    assert keys["n"] == 4  # the welcome bonus and three events: one key each
    assert balance["balance_micros"] == 94 * CREDIT
    # The day before the rollover is over: rolled up; the new month's first day is not yet.
    assert [(r["day"], r["events"], r["charged_micros"]) for r in rollup] == [
        ((second - timedelta(days=1)).date(), 2, 3 * CREDIT)]
    # The daily usage report reads the rolled-up day from usage_daily and the rest from the journal: same figures.
    day_before, day_of = (second - timedelta(days=1)).date().isoformat(), second.date().isoformat()
    rollups = await queries.usage_rollups(pool, account.id)
    assert [(r.date, r.events, r.credits) for r in rollups] == [(day_of, 1, 3), (day_before, 2, 3)]
    partial = await queries.usage_rollups(pool, account.id, start=second - timedelta(seconds=5))
    assert [(r.date, r.events, r.credits) for r in partial] == [(day_of, 1, 3)]
    report = await verify(pool)
    assert report.ok, report.violations


async def test_a_replayed_key_is_refused_by_the_database_across_partitions(
        database_url: str, pool: AsyncConnectionPool) -> None:
    """Below the functions: a second journal row under a key fails on journal_keys whatever month it is dated."""
    first = month_start(6)
    await partitions.ensure_partitions(pool, 1, at=first)
    insert = ("INSERT INTO journal (account_id, type, amount_micros, counter_book, balance_after_micros,"
              " idempotency_key, created_at) VALUES ('acc_x', 'adjustment', 1, 'system:adjustments', 1, 'k', %s)")
    async with pool.connection() as conn:
        await conn.execute(insert, (first + timedelta(days=27),))
    async with pool.connection() as conn:
        with pytest.raises(psycopg.errors.UniqueViolation, match="journal_keys_pkey"):
            await conn.execute(insert, (first + timedelta(days=40),))


async def test_ensure_is_idempotent_and_rollups_can_be_rebuilt(pool: AsyncConnectionPool) -> None:
    at = month_start(9)
    once = await partitions.ensure_partitions(pool, 2, at=at)
    twice = await partitions.ensure_partitions(pool, 2, at=at)
    assert [p.created for p in once] == [True, True, True]
    assert [p.created for p in twice] == [False, False, False]
    assert [p.name for p in once] == [p.name for p in twice]
    listed = [p.name for p in await partitions.list_partitions(pool)]
    assert listed[-1] == "journal_default" and set(p.name for p in once) <= set(listed)
    day = date(2020, 1, 1)
    assert await partitions.rollup_usage(pool, day, day + timedelta(days=2)) == 0
    async with pool.connection() as conn:
        rolled = await (await conn.execute("SELECT day, rows FROM usage_rollup_days WHERE day < '2021-01-01'"
                                           " ORDER BY day")).fetchall()
    assert [(r["day"], r["rows"]) for r in rolled] == [(day, 0), (day + timedelta(days=1), 0)]


@pytest.fixture
def cli_env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with cli_environment(monkeypatch, database_url, {"CREDITFLOW_PARTITION_MONTHS_AHEAD": "4"}):
        yield


def test_partitions_cli_ensures_and_lists(cli_env: None) -> None:
    runner = CliRunner()
    ensured = runner.invoke(partitions_app, ["ensure", "--json"])
    assert ensured.exit_code == 0, ensured.output
    body = json.loads(ensured.output)
    assert body["months_ahead"] >= 4 and body["default_rows"] == 0
    listed = runner.invoke(partitions_app, ["list"])
    assert listed.exit_code == 0, listed.output
    this_month = month_start(0)
    assert f"journal_y{this_month.year}m{this_month.month:02d}" in listed.output
    assert "DEFAULT" in listed.output
    again = runner.invoke(partitions_app, ["ensure", "--json"])
    assert json.loads(again.output)["created"] == []
    assert "--months-ahead" in runner.invoke(partitions_app, ["ensure", "--help"]).output


@pytest.mark.temporal
async def test_the_schedule_creates_the_coming_months_on_the_worker(
        temporal_settings: Settings, temporal_worker: object, temporal_client: Client,
        pool: AsyncConnectionPool) -> None:
    """Who creates future partitions: the worker's Schedule starts PartitionMaintenanceWorkflow, whose activity
    creates the months ahead (here 5: more than the migration made) and reports them."""
    schedule_id = f"test-partitions-{uuid.uuid4().hex[:8]}"
    handle = await ensure_partitions_schedule(temporal_client, task_queue=temporal_settings.temporal_task_queue,
                                              interval_hours=24, months_ahead=5, schedule_id=schedule_id)
    assert handle is not None
    await handle.trigger()
    deadline = asyncio.get_running_loop().time() + 60
    while not (description := await handle.describe()).info.recent_actions:
        assert asyncio.get_running_loop().time() < deadline, "the schedule started nothing"
        await asyncio.sleep(0.5)
    run_id = description.info.recent_actions[0].action.workflow_id  # type: ignore[attr-defined]
    assert run_id.startswith(f"partitions:{schedule_id}")
    summary = await temporal_client.get_workflow_handle(run_id, result_type=PartitionMaintenanceSummary).result()
    fifth = month_start(5)
    assert f"journal_y{fifth.year}m{fifth.month:02d}" in summary.created
    assert (summary.months_ahead, summary.default_rows) == (5, 0)
    names = {p.name for p in await partitions.list_partitions(pool)}
    assert f"journal_y{fifth.year}m{fifth.month:02d}" in names
    assert await ensure_partitions_schedule(temporal_client, task_queue="q", interval_hours=0, months_ahead=5,
                                            schedule_id=schedule_id) is None


def test_an_upgraded_journal_moves_into_its_months_with_its_keys(pg_server_url: str) -> None:
    """0041 on a database that has entries (written by the release before it, on the ledger clock, either side of a
    month boundary): every row lands in its month's partition, every key is backfilled, balances and running sums
    stay exact, and a replayed key is still answered from the stored entry (refused as a new one)."""
    post = ("SELECT (cf_post(%s, 'adjustment', %s, 'system:adjustments', 'test', NULL, 'goodwill', 40, NULL, %s,"
            " '\\x01'::bytea)).balance_micros")
    with new_database(pg_server_url) as url:
        apply_numbered(url, "0040_credit_system_topups")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO accounts (id, name, billing_email) VALUES ('acc_up', 'Up', 'up@example.com')")
            conn.execute("INSERT INTO balances (account_id) VALUES ('acc_up')")
            for at, key, amount in (("2026-01-31T23:59:59Z", "k1", 5 * CREDIT),
                                    ("2026-02-01T00:00:01Z", "k2", -CREDIT)):
                conn.execute("SELECT set_config('creditflow.now', %s, false)", (at,))
                conn.execute(post, ("acc_up", amount, key))
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            placed = dict(conn.execute("SELECT idempotency_key, tableoid::regclass::text FROM journal"
                                       " WHERE account_id = 'acc_up'").fetchall())
            keys = conn.execute("SELECT count(*) FROM journal_keys WHERE account_id = 'acc_up'").fetchone()
            again = conn.execute("SELECT (r).replayed, (r).balance_micros FROM (SELECT cf_post('acc_up', 'adjustment',"
                                 " 5000000, 'system:adjustments', 'test', NULL, 'goodwill', 40, NULL, 'k1',"
                                 " '\\x01'::bytea) AS r) x").fetchone()
            balance = conn.execute("SELECT balance_micros FROM balances WHERE account_id = 'acc_up'").fetchone()
            running = conn.execute("SELECT count(*) FROM (SELECT balance_after_micros, sum(amount_micros) OVER"
                                   " (ORDER BY seq) AS s FROM journal WHERE account_id = 'acc_up') x"
                                   " WHERE balance_after_micros <> s").fetchone()
    assert placed == {"k1": "journal_y2026m01", "k2": "journal_y2026m02"}
    assert keys == (2,)
    assert again == (True, 5 * CREDIT)
    assert balance == (4 * CREDIT,)
    assert running == (0,)
