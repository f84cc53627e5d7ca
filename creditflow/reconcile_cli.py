"""``creditflow reconcile``: reconcile the ledger with Stripe now and print what was repaired and reported.

It starts ``ReconciliationWorkflow`` (the same workflow the daily schedule starts) and waits for it, so a worker
must be running; ``--show`` and ``--list`` read stored reports from the database, or, without a database URL, from
the API with an admin key (``/api/v1/reconciliation/runs``: on-call needs no database credentials).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.table import Table

from creditflow.client import CreditflowClient
from creditflow.config import get_settings
from creditflow.domain.reconciliation import RunReport
from creditflow.ops_cli import answer, console, dumps
from creditflow.payments import reconcile as engine

LIST_LIMIT = 20


async def _latest_runs(pool: object) -> dict[str, object]:
    """The latest runs as ``GET /api/v1/reconciliation/runs`` answers them (one shape from either source)."""
    runs = await engine.list_runs(pool, LIST_LIMIT + 1)  # type: ignore[arg-type]
    return {"items": runs[:LIST_LIMIT], "has_more": len(runs) > LIST_LIMIT}


def _print(report: RunReport, json_output: bool) -> None:
    if json_output:
        console.print_json(report.model_dump_json())
        return
    console.print(f"run [bold]{report.id}[/bold] ({report.trigger}, {report.status}): "
                  f"{report.since:%Y-%m-%d %H:%M} to {report.until:%Y-%m-%d %H:%M} UTC")
    listed = ", ".join(f"{n} {k}" for k, n in report.listed.items()) or "nothing"
    console.print(f"listed from Stripe: {listed}; matched {report.matched}; repaired {report.repaired}; "
                  f"reported {report.reported}; ledger violations after: {report.violations}")
    for note in report.notes:
        console.print(f"note: {note}")
    if report.differences:
        table = Table("action", "kind", "account", "Stripe id", "what", "ids")
        for d in report.differences:
            table.add_row(d.action, d.kind, d.account_id or "", d.stripe_id or "", d.detail,
                          ", ".join(f"{k}={v}" for k, v in d.ids.items()))
        console.print(table)


def reconcile(
    since: Annotated[datetime | None, typer.Option(help="Cover Stripe objects created from this time (UTC); "
                                                        "default: the last completed run's end.")] = None,
    show: Annotated[str | None, typer.Option("--show", help="Print a stored run's report instead.")] = None,
    list_runs: Annotated[bool, typer.Option("--list", help="List the latest runs instead.")] = False,
    timeout_minutes: Annotated[int, typer.Option(min=1, help="How long to wait for the run.")] = 30,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Compare the ledger with Stripe (PaymentIntents, refunds, disputes), repair what is safely repairable
    through the same idempotent paths as the workflows, and report the rest. Exits 1 when something is left to
    look at (a reported difference or a ledger violation)."""
    if list_runs:
        page = answer(_latest_runs, "/api/v1/reconciliation/runs", {"limit": LIST_LIMIT}, json_output)
        if json_output:
            print(dumps(page))
            return
        table = Table("run", "trigger", "status", "since", "until", "repaired", "reported", "violations")
        for r in (RunReport.model_validate(item) for item in page["items"]):
            table.add_row(r.id, r.trigger, r.status, f"{r.since:%Y-%m-%d %H:%M}", f"{r.until:%Y-%m-%d %H:%M}",
                          str(r.repaired), str(r.reported), str(r.violations))
        console.print(table)
        return
    if show is None:
        settings = get_settings()
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)

        async def start_and_wait() -> str:
            client = await CreditflowClient.connect(settings)
            handle = await client.start_reconciliation(since)
            console.print(f"started {handle.id}; waiting (a worker must be running)...")
            summary = await asyncio.wait_for(handle.result(), timedelta(minutes=timeout_minutes).total_seconds())
            return summary.run_id

        show = asyncio.run(start_and_wait())
    run_id = show
    report = RunReport.model_validate(answer(lambda pool: engine.get_run(pool, run_id),
                                             f"/api/v1/reconciliation/runs/{run_id}", None, json_output))
    _print(report, json_output)
    if report.reported or report.violations:
        raise typer.Exit(1)
