"""``creditflow verify``: check the ledger's structural and economic invariants and print every violation."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from creditflow.ledger.verify import CHECKS, VerifyReport, verify
from creditflow.ops_cli import answer, console


def verify_command(
    account: Annotated[str | None, typer.Option("--account", help="Check one account (default: every account).")
                       ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    list_checks: Annotated[bool, typer.Option("--list-checks", help="List the invariants checked, then exit.")
                           ] = False,
) -> None:
    """Check every invariant of the ledger (entries sum to zero, balance = journal = lots, floors, holds, each
    purchase's credits and money moving together, plan credits dying with their period, one ledger effect per
    Stripe object, overage repaid once). Exits 1 when anything is violated, printing the ids to investigate."""
    if list_checks:
        for check in CHECKS:
            console.print(f"[bold]{check.name}[/bold]: {check.doc}")
        return
    # From the database, or without a database URL from the API (admin key): the same report.
    report = VerifyReport.model_validate(answer(lambda pool: verify(pool, account), "/api/v1/verify",
                                                {"account_id": account}, json_output))
    if json_output:
        console.print_json(report.model_dump_json())
    elif report.ok:
        console.print(f"[green]ok[/green]: {len(report.checks)} checks over {report.accounts_checked} account(s),"
                      " no violation")
    else:
        table = Table("check", "account", "what", "ids")
        for v in report.violations:
            table.add_row(v.check, v.account_id or "", v.message, ", ".join(f"{k}={x}" for k, x in v.ids.items()))
        console.print(table)
        console.print(f"[red]{len(report.violations)} violation(s)[/red] in {len(report.checks)} checks over "
                      f"{report.accounts_checked} account(s)")
    if not report.ok:
        raise typer.Exit(1)
