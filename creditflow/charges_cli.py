"""``creditflow charges ACCOUNT``: the account's Stripe charges (top-ups, auto-recharges, invoices) with their
outcome and failure, and the auto-recharge state: the answer to "why does this recharge keep failing"."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from creditflow.ledger import lookup
from creditflow.ops_cli import JsonFlag, answer, emit

console = Console()
def charges(
    account_id: Annotated[str, typer.Argument(help="The account (acc_...).")],
    kind: Annotated[str | None, typer.Option(help="topup, auto_recharge or invoice.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
    as_json: JsonFlag = False,
) -> None:
    """The account's Stripe charges, newest first, with their outcome and decline, and the auto-recharge state
    (enabled, consecutive failures, why it was disabled)."""
    found = answer(lambda pool: lookup.charges(pool, account_id, kind, limit),
                   f"/api/v1/operator/accounts/{account_id}/charges", {"kind": kind, "limit": limit}, as_json)

    def render() -> None:
        state = found["auto_recharge"]
        if state is None:
            console.print("auto-recharge: not configured")
        else:
            why = f" ({state['disabled_reason']})" if state["disabled_reason"] else ""
            error = f": {state['last_error']}" if state["last_error"] else ""
            console.print(f"auto-recharge: {'enabled' if state['enabled'] else 'DISABLED'}{why}, below "
                          f"{state['threshold_credits']} credits add {state['amount_credits']}, consecutive failures "
                          f"{state['consecutive_failures']}, last {state['last_status'] or '-'} at "
                          f"{state['last_attempt_at'] or '-'}{error}", soft_wrap=True)
        table = Table("created", "kind", "request", "USD", "credits", "status", "failure", "decline", "message",
                      "payment intent", "ledger txn")
        for c in found["charges"]:
            table.add_row(str(c["created_at"]), c["kind"], c["request_id"], f"{Decimal(c['amount_cents']) / 100:.2f}",
                          str(c["credits"]), c["status"], c["failure_code"] or "", c["decline_code"] or "",
                          c["failure_message"] or "", c["payment_intent_id"] or "", c["ledger_txn_id"] or "")
        console.print(table)

    emit(found, as_json, render)
