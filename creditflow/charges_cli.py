"""``creditflow charges ACCOUNT``: the account's Stripe charges (top-ups, auto-recharges, invoices) with their
outcome and failure, and the auto-recharge state: the answer to "why does this recharge keep failing"."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from psycopg_pool import AsyncConnectionPool
from rich.console import Console
from rich.table import Table

from creditflow.errors import CreditflowError
from creditflow.ops_cli import JsonFlag, emit, run

console = Console()
KINDS = ("topup", "auto_recharge", "invoice")


async def charges_of(pool: AsyncConnectionPool, account_id: str, kind: str | None, limit: int) -> dict[str, Any]:
    if kind is not None and kind not in KINDS:
        raise CreditflowError("validation_error", f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    async with pool.connection() as conn:
        if await (await conn.execute("SELECT 1 FROM accounts WHERE id = %s", (account_id,))).fetchone() is None:
            raise CreditflowError("unknown_account", f"no account {account_id}")
        rows = await (await conn.execute(
            "SELECT id, kind, request_id, amount_cents, credits, status, failure_code, decline_code, failure_message,"
            " payment_method_id, payment_intent_id, ledger_txn_id, created_at, updated_at FROM stripe_charges"
            " WHERE account_id = %s AND (%s::text IS NULL OR kind = %s) ORDER BY created_at DESC LIMIT %s",
            (account_id, kind, kind, limit))).fetchall()
        recharge = await (await conn.execute(
            "SELECT enabled, threshold_micros / 1000000 AS threshold_credits, amount_credits, payment_method_id,"
            " disabled_reason, consecutive_failures, last_attempt_at, last_status, last_error"
            " FROM auto_recharge_settings WHERE account_id = %s", (account_id,))).fetchone()
    return {"auto_recharge": recharge, "charges": rows}


def charges(
    account_id: Annotated[str, typer.Argument(help="The account (acc_...).")],
    kind: Annotated[str | None, typer.Option(help="topup, auto_recharge or invoice.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
    as_json: JsonFlag = False,
) -> None:
    """The account's Stripe charges, newest first, with their outcome and decline, and the auto-recharge state
    (enabled, consecutive failures, why it was disabled)."""
    found = run(lambda pool: charges_of(pool, account_id, kind, limit), as_json)

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
            table.add_row(str(c["created_at"]), c["kind"], c["request_id"], f"{c['amount_cents'] / 100:.2f}",
                          str(c["credits"]), c["status"], c["failure_code"] or "", c["decline_code"] or "",
                          c["failure_message"] or "", c["payment_intent_id"] or "", c["ledger_txn_id"] or "")
        console.print(table)

    emit(found, as_json, render)
