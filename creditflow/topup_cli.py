"""``creditflow topup``: buy credits for an account through the TopUpWorkflow (same path as the API).

It needs Temporal and a running worker (``creditflow dev`` or ``creditflow worker``); the charge, the
ledger credit and the receipt happen in the workflow, so a CLI interrupted mid-way loses nothing and the
same ``--request-id`` run again never charges twice.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Annotated

import typer
from rich.console import Console

from creditflow.client import topup_input, topup_workflow_id
from creditflow.config import get_settings
from creditflow.domain.topups import format_usd
from creditflow.errors import CreditflowError
from creditflow.ids import check_id, check_token
from creditflow.ops_cli import JsonFlag, dumps
from creditflow.workflow_cli import ask_workflow, refuse

console = Console()


def topup(
    account_id: Annotated[str, typer.Argument(help="The account (acc_...).")],
    amount_usd: Annotated[Decimal | None, typer.Option("--amount-usd", help="Amount in USD (whole cents).")] = None,
    package: Annotated[str | None, typer.Option(
        "--package", help="A credit package id (starter, growth, ...).")] = None,
    payment_method: Annotated[str | None, typer.Option(
        "--payment-method", help="A saved card (default: the account's default card).")] = None,
    request_id: Annotated[str | None, typer.Option("--request-id",
                                                   help="Idempotency: the same id never charges twice "
                                                        "(default: a new one, printed).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Top up an account's wallet through Stripe: charges its card and credits the wallet once."""
    settings = get_settings()
    request_id = request_id or f"cli-{uuid.uuid4().hex[:16]}"
    try:
        check_id(account_id, "acc", "account_id")
        check_token(request_id, "request_id")
        input = topup_input(settings, account_id, request_id, amount_usd=amount_usd, package_id=package,
                            payment_method_id=payment_method)
    except CreditflowError as exc:
        raise refuse(console, exc) from exc

    outcome = ask_workflow(settings, console, lambda client, wait: client.topup(input, wait=wait))
    if as_json:  # the workflow's outcome as is; the exit codes below hold either way
        print(dumps({"request_id": request_id, "workflow_id": topup_workflow_id(account_id, request_id),
                     "outcome": outcome}))
        raise typer.Exit(3 if outcome is None else {"succeeded": 0, "requires_payment": 2}.get(outcome.status, 1))
    console.print(f"request id: {request_id}")
    if outcome is None:
        console.print(f"still pending; follow workflow {topup_workflow_id(account_id, request_id)} "
                      "or run again with the same --request-id")
        raise typer.Exit(3)
    what = f"{format_usd(outcome.amount_cents)} for {outcome.credits:,} credits"
    if outcome.status == "succeeded":
        console.print(f"succeeded: {what}, transaction {outcome.transaction_id}, balance {outcome.balance}, "
                      f"PaymentIntent {outcome.payment_intent_id}")
    elif outcome.status == "requires_payment":
        console.print(f"requires payment: {what}; PaymentIntent {outcome.payment_intent_id}, "
                      f"client secret {outcome.client_secret}")
        raise typer.Exit(2)
    else:
        detail = f" ({outcome.decline_code})" if outcome.decline_code else ""
        console.print(f"[red]{outcome.status}[/red]: {outcome.error_code}{detail}: {outcome.error_message}")
        raise typer.Exit(1)
