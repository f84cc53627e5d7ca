"""``creditflow refund``: refund unused purchased credits of a top-up through the RefundWorkflow (same path as
the API, with operator rights: every reason is allowed). The same ``--request-id`` run again never refunds twice."""

from __future__ import annotations

import uuid
from typing import Annotated

import typer
from rich.console import Console

from creditflow.client import refund_workflow_id
from creditflow.config import get_settings
from creditflow.domain.refunds import RefundError, check_credits, parse_reason
from creditflow.domain.topups import format_usd
from creditflow.errors import CreditflowError
from creditflow.ids import check_id, check_token
from creditflow.ops_cli import JsonFlag, dumps
from creditflow.workflow_cli import ask_workflow, refuse
from workflows.contract import RefundInput, RefundTerms

console = Console()


def refund(
    account_id: Annotated[str, typer.Argument(help="The account (acc_...).")],
    purchase: Annotated[str, typer.Option("--purchase", help="The purchase transaction (txn_...).")],
    credits: Annotated[int | None, typer.Option("--credits", help="Whole credits (default: all that remain).")] = None,
    reason: Annotated[str | None, typer.Option(
        "--reason", help="requested_by_customer (default), duplicate_charge or billing_error.")] = None,
    request_id: Annotated[str | None, typer.Option("--request-id", help="Idempotency (default: a new one).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Refund unused credits of one top-up (within 30 days) to the card it was paid with."""
    settings = get_settings()
    request_id = request_id or f"cli-{uuid.uuid4().hex[:16]}"
    try:
        check_id(account_id, "acc", "account_id")
        check_id(purchase, "txn", "purchase")
        check_token(request_id, "request_id")
        parsed = parse_reason(reason, is_admin=True)
        input = RefundInput(account_id=account_id, request_id=request_id, requested_by="admin",
                            terms=RefundTerms(purchase_transaction_id=purchase, credits=check_credits(credits),
                                              reason=parsed.value))
    except (RefundError, CreditflowError) as exc:
        raise refuse(console, exc) from exc

    outcome = ask_workflow(settings, console, lambda client, wait: client.refund(input, wait=wait))
    if as_json:  # the workflow's outcome as is; the exit codes below hold either way
        print(dumps({"request_id": request_id, "workflow_id": refund_workflow_id(account_id, request_id),
                     "outcome": outcome}))
        raise typer.Exit(3 if outcome is None or outcome.status == "pending" else
                         0 if outcome.status == "succeeded" else 1)
    console.print(f"request id: {request_id}")
    if outcome is None:
        console.print(f"still pending; follow workflow {refund_workflow_id(account_id, request_id)}")
        raise typer.Exit(3)
    if outcome.status == "pending":  # Stripe accepted the refund and has not settled it: credits stay reserved
        console.print(f"pending: Stripe has not settled refund {outcome.stripe_refund_id} yet "
                      f"({outcome.credits:,} credits reserved, refund {outcome.refund_id}); follow workflow "
                      f"{refund_workflow_id(account_id, request_id)}")
        raise typer.Exit(3)
    if outcome.status != "succeeded":
        console.print(f"[red]{outcome.status}[/red]: {outcome.error_code}: {outcome.error_message}")
        raise typer.Exit(1)
    console.print(f"succeeded: {outcome.credits:,} credits ({format_usd(outcome.amount_cents or 0)}) refunded, "
                  f"refund {outcome.refund_id}, transaction {outcome.transaction_id}, balance {outcome.balance}, "
                  f"Stripe refund {outcome.stripe_refund_id}")
