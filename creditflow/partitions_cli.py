"""``creditflow partitions``: the journal's monthly partitions for operators (docs/partitioning.md).

``ensure`` runs the same maintenance as the scheduled ``PartitionMaintenanceWorkflow`` (idempotent): the coming
months' partitions, then the daily usage rollups of the days that are over. ``list`` shows every partition.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer
from rich.table import Table

from creditflow.config import get_settings
from creditflow.ledger import partitions
from creditflow.ops_cli import JsonFlag, console, emit, run

partitions_app = typer.Typer(help="The journal's monthly partitions: create the coming months, list them.",
                             no_args_is_help=True)


def _table(rows: list[partitions.Partition], title: str) -> Table:
    table = Table("partition", "from (UTC)", "to (UTC)", "rows", "created now", title=title)
    for p in rows:
        table.add_row(p.name, p.range_from.date().isoformat() if p.range_from else "DEFAULT",
                      p.range_to.date().isoformat() if p.range_to else "", f"{p.rows:,}", "yes" if p.created else "")
    return table


@partitions_app.command("ensure")
def ensure(
    months_ahead: Annotated[int | None, typer.Option(
        "--months-ahead", min=0, max=24,
        help="Months after the current one to create (default: CREDITFLOW_PARTITION_MONTHS_AHEAD).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create the journal partitions of this month and the next ones (idempotent: existing months are left as they
    are; rows that fell into the DEFAULT partition move into their new month), then roll up the daily usage of
    the days that are over. Exits 1 when rows are still in the DEFAULT partition."""
    ahead = get_settings().partition_months_ahead if months_ahead is None else months_ahead
    done = run(lambda pool: partitions.maintain(pool, ahead), as_json)
    emit({"created": done.created, "months_ahead": done.months_ahead, "default_rows": done.default_rows,
          "rollup_rows": done.rollup_rows, "partitions": [asdict(p) for p in done.partitions]}, as_json,
         lambda: (console.print(_table(done.partitions, "journal partitions")),
                  console.print(f"created: {', '.join(done.created) or 'none'}; {done.months_ahead} month(s) ahead;"
                                f" {done.default_rows} row(s) in DEFAULT; {done.rollup_rows} usage rollup row(s)")))
    if done.default_rows:
        raise typer.Exit(1)


@partitions_app.command("list")
def list_command(as_json: JsonFlag = False) -> None:
    """Every partition of the journal in month order (rows: the statistics' estimate; exact for DEFAULT)."""
    rows = run(partitions.list_partitions, as_json)
    emit([asdict(p) for p in rows], as_json, lambda: console.print(_table(rows, "journal partitions")))
