"""``creditflow payment-events``: payment events the account workflow could not apply, and re-driving one.

A refund or dispute made on Stripe, or a payment that succeeded late, that hit a refusal (not an outage: outages are
retried by themselves) is kept in ``payment_event_failures`` with its error instead of being dropped. Fix the cause
(e.g. a charge row naming the wrong PaymentIntent), then ``redrive`` it: it goes back through the outbox to the
account workflow; every effect is keyed by its Stripe object, so nothing is applied twice. Without a database URL
both go through the API with an admin key (``/api/v1/operator/payment-events``).
"""

from __future__ import annotations

from typing import Annotated

import typer
from psycopg_pool import AsyncConnectionPool
from rich.console import Console
from rich.table import Table

from creditflow.ledger import payment_event_failures
from creditflow.ops_cli import JsonFlag, answer, emit

console = Console()
payment_events_app = typer.Typer(help="Payment events that could not be applied; re-drive one.", no_args_is_help=True)


@payment_events_app.command("failed")
def failed(account_id: Annotated[str | None, typer.Option(help="Only this account (acc_...).")] = None,
           all_: Annotated[bool, typer.Option("--all", help="Include resolved ones.")] = False,
           as_json: JsonFlag = False) -> None:
    """Failed payment events, oldest first, with their error."""
    found = answer(lambda pool: payment_event_failures.list_failures(pool, account_id=account_id,
                                                                     include_resolved=all_),
                   "/api/v1/operator/payment-events/failed", {"account_id": account_id, "all": all_}, as_json)
    rows = [payment_event_failures.PaymentEventFailure.model_validate(f) for f in found]
    if as_json:
        return emit(rows, True, lambda: None)
    table = Table("id", "account", "event", "kind", "error", "failures", "re-drives", "last failed", "resolved")
    for f in rows:
        table.add_row(str(f.id), f.account_id, f.dedup_key, f.kind, f"{f.error_code}: {f.error_message}",
                      str(f.failures), str(f.redrives), f.last_failed_at.isoformat(timespec="seconds"),
                      f.resolved_at.isoformat(timespec="seconds") if f.resolved_at else "")
    console.print(table)


@payment_events_app.command("redrive")
def redrive(failure_id: Annotated[int, typer.Argument(help="The id shown by `failed`.")],
            as_json: JsonFlag = False) -> None:
    """Deliver the event to its account workflow again (through the outbox)."""
    async def act(pool: AsyncConnectionPool) -> dict[str, str]:
        return {"outbox_dedup_key": await payment_event_failures.redrive(pool, failure_id)}

    done = answer(act, f"/api/v1/operator/payment-events/{failure_id}/redrive", None, as_json, body={})
    key = done["outbox_dedup_key"]
    emit(done, as_json, lambda: console.print(f"re-driven as outbox event [bold]{key}[/bold]"))
