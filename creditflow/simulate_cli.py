"""``creditflow simulate``: preview a plan on a usage trace (see ``creditflow.simulate``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from creditflow.errors import CreditflowError
from creditflow.simulate import SimulationReport, read_usage, run_simulation

console = Console()


def simulate(
    plan: Annotated[str, typer.Option(help="A plan of the catalog (starter, growth, scale, ...).")],
    usage: Annotated[Path, typer.Option(exists=True, dir_okay=False, readable=True,
                                        help="CSV trace: day, feature_id, value[, agent_id]; day 0 = the start.")],
    months: Annotated[int, typer.Option(min=1, max=36, help="Billing periods to simulate.")] = 3,
    welcome_bonus: Annotated[int, typer.Option(min=0, help="Wallet credits at the start.")] = 0,
    database_url: Annotated[str | None, typer.Option(
        help="Run on this PostgreSQL (its rows stay) instead of a throwaway embedded one.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Replay a usage trace through the real billing workflows on Temporal's time-skipping server and print the
    invoices and balances it produced (months in seconds; nothing is charged or emailed)."""
    try:
        rows = read_usage(usage)
        report = asyncio.run(run_simulation(plan, rows, months, database_url=database_url,
                                            welcome_bonus_credits=welcome_bonus,
                                            progress=None if as_json else lambda m: console.print(f"[dim]{m}[/dim]")))
    except CreditflowError as exc:
        console.print(f"[red]{exc.code}[/red]: {exc.message}")
        raise typer.Exit(1) from exc
    except LookupError as exc:  # an unknown plan
        console.print(f"[red]unknown_plan[/red]: {exc}")
        raise typer.Exit(1) from exc
    if as_json:
        print(json.dumps(_as_dict(report), indent=2))
        return
    _print(report)


def _as_dict(report: SimulationReport) -> dict[str, object]:
    return {
        "plan_id": report.plan_id, "account_id": report.account_id, "seconds": round(report.seconds, 2),
        "final_balance": str(report.final_balance), "plan_credits_remaining": str(report.plan_credits_remaining),
        "periods": [{
            "period": p.period_key, "start": p.start.isoformat(), "end": p.end.isoformat(), "plan_id": p.plan_id,
            "usage_events": p.usage_events, "denied_events": p.denied_events, "usage_credits": str(p.usage_credits),
            "invoice_number": p.invoice_number,
            "invoice_total_usd": None if p.invoice_total_usd is None else str(p.invoice_total_usd),
            "invoice_lines": [{"description": d, "amount_usd": str(a)} for d, a in p.invoice_lines],
            "balance_after": str(p.balance_after)} for p in report.periods],
    }


def _print(report: SimulationReport) -> None:
    table = Table("period", "plan", "events", "denied", "usage (credits)", "invoice", "total (USD)",
                  "balance after", title=f"{report.plan_id}: {len(report.periods)} period(s)")
    for p in report.periods:
        table.add_row(f"{p.start:%Y-%m-%d} → {p.end:%Y-%m-%d}", p.plan_id, str(p.usage_events), str(p.denied_events),
                      f"{p.usage_credits:,}", p.invoice_number or "-",
                      "-" if p.invoice_total_usd is None else f"{p.invoice_total_usd:,.2f}", f"{p.balance_after:,}")
    console.print(table)
    for p in report.periods:
        lines = "; ".join(f"{d}: ${a:,.2f}" for d, a in p.invoice_lines)
        console.print(f"[bold]{p.invoice_number}[/bold] {lines}")
    console.print(f"final balance {report.final_balance:,} credits, plan credits left "
                  f"{report.plan_credits_remaining:,}; simulated in {report.seconds:.1f} s")
