"""Operator commands of the ``creditflow`` CLI: accounts, API keys, wallet adjustments, history.

They talk to the ledger database directly (CREDITFLOW_DATABASE_URL), so they work even when the
API is down; every write goes through the same ledger functions as the API."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import simplejson
import typer
from psycopg_pool import AsyncConnectionPool
from rich.console import Console
from rich.table import Table

from creditflow.api.exact_json import _normalize
from creditflow.api.keys import Scope, create_key, list_keys, revoke_key
from creditflow.api.scopes import ACCOUNT_KEY_SCOPES
from creditflow.config import get_settings
from creditflow.errors import CreditflowError
from creditflow.ledger import accounts, lookup, postings, queries
from creditflow.ledger.db import open_pool
from creditflow.ledger.models import PostingResult

console = Console()
T = TypeVar("T")

accounts_app = typer.Typer(help="Create, list and inspect accounts.", no_args_is_help=True)
keys_app = typer.Typer(help="Issue, list and revoke API keys.", no_args_is_help=True)
wallet_app = typer.Typer(help="Manual wallet credits/debits and the balance history.", no_args_is_help=True)


# ``--json`` on operator commands: exact numbers (credits as JSON numbers with their exact digits), ISO times.
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON (exact numbers) instead of a table.")]


def dumps(value: Any) -> str:
    return simplejson.dumps(_normalize(value), use_decimal=True, ensure_ascii=False, indent=2, default=str)


def emit(value: Any, as_json: bool, render: Callable[[], None]) -> None:
    """Print ``value`` as JSON, or call ``render`` for the human view."""
    if as_json:
        print(dumps(value))
    else:
        render()


def run(action: Callable[[AsyncConnectionPool], Awaitable[T]], as_json: bool = False) -> T:
    """Run one ledger action with a short-lived pool; ledger refusals exit 1 with their code (as JSON with
    ``as_json``: ``{"error": {"code", "message"}}``)."""
    url = get_settings().database_url
    if not url:
        console.print("[red]CREDITFLOW_DATABASE_URL is not set[/red] (see `creditflow dev` for the embedded stack).")
        raise typer.Exit(2)

    async def main() -> T:
        pool = open_pool(url, 1, 2)
        await pool.open()
        try:
            return await action(pool)
        finally:
            await pool.close()

    try:
        return asyncio.run(main())
    except CreditflowError as exc:
        raise_refusal(exc, as_json)
        raise  # unreachable: raise_refusal exits


def answer(action: Callable[[AsyncConnectionPool], Awaitable[Any]], path: str, params: dict[str, Any] | None,
           as_json: bool, body: dict[str, Any] | None = None) -> Any:
    """An answer from the database (CREDITFLOW_DATABASE_URL) or, without one, from the API (CREDITFLOW_API_URL
    with CREDITFLOW_ADMIN_API_KEY: on-call needs no database credentials); with ``body``, a write POSTed to
    ``path`` that runs the same ledger function as ``action``. Either way it comes back as JSON values (exact
    decimals), the same for both."""
    settings = get_settings()
    if settings.database_url or not settings.api_url:
        return simplejson.loads(dumps(run(action, as_json)), use_decimal=True)
    if settings.admin_api_key is None:
        console.print("[red]CREDITFLOW_API_URL needs CREDITFLOW_ADMIN_API_KEY[/red] (an admin API key).")
        raise typer.Exit(2)
    import httpx

    query = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in (params or {}).items() if v is not None}
    try:
        resp = httpx.request("GET" if body is None else "POST", settings.api_url.rstrip("/") + path, params=query,
                             json=body, timeout=30.0,
                             headers={"Authorization": f"Bearer {settings.admin_api_key.get_secret_value()}"})
    except httpx.HTTPError as exc:
        console.print(f"[red]the API at {settings.api_url} is not reachable[/red]: {type(exc).__name__}")
        raise typer.Exit(2) from exc
    body = simplejson.loads(resp.text, use_decimal=True) if resp.text else {}
    if resp.status_code >= 400:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise_refusal(CreditflowError(error.get("code", f"http_{resp.status_code}"), error.get("message") or None,
                                      details=error.get("details")), as_json)
    return body


def raise_refusal(exc: CreditflowError, as_json: bool) -> None:
    if as_json:
        print(dumps({"error": {"code": exc.code, "message": exc.message, "details": exc.details or {}}}))
    else:
        console.print(f"[red]{exc.code}[/red]: {exc.message}", soft_wrap=True)
    raise typer.Exit(1) from exc


@accounts_app.command("create")
def accounts_create(
    name: Annotated[str, typer.Option(help="Customer or company name.")],
    email: Annotated[str, typer.Option(help="Billing email (invoices and notifications).")],
    external_id: Annotated[str | None, typer.Option(help="Your id for this customer (unique).")] = None,
    overage_line: Annotated[int, typer.Option(min=0, help="Overage credit line in whole credits.")] = 0,
    as_json: JsonFlag = False,
) -> None:
    """Create an account with its welcome bonus (CREDITFLOW_WELCOME_BONUS_CREDITS)."""
    bonus = get_settings().welcome_bonus_credits
    account = run(lambda pool: accounts.create_account(pool, name=name, billing_email=email, external_id=external_id,
                                                       welcome_bonus_credits=bonus, overage_credit_line=overage_line),
                  as_json)
    emit(account, as_json, lambda: console.print(
        f"created [bold]{account.id}[/bold] balance {account.balance.balance if account.balance else 0}"))


@accounts_app.command("show")
def accounts_show(account_id: str, as_json: JsonFlag = False) -> None:
    """Show an account and its balances."""
    account = run(lambda pool: accounts.get_account(pool, account_id), as_json)
    emit(account, as_json, lambda: console.print_json(account.model_dump_json()))


@accounts_app.command("list")
def accounts_list(limit: Annotated[int, typer.Option(min=1, max=1000)] = 50, as_json: JsonFlag = False) -> None:
    """The newest accounts with their balances."""

    async def fetch(pool: AsyncConnectionPool) -> list[dict[str, object]]:
        async with pool.connection() as conn:
            return await (await conn.execute(
                "SELECT a.id, a.name, a.billing_email, a.created_at,"
                " trim_scale(b.balance_micros::numeric / 1000000) AS balance"
                " FROM accounts a JOIN balances b ON b.account_id = a.id WHERE a.parent_account_id IS NULL"
                " ORDER BY a.created_at DESC LIMIT %s",
                (limit,))).fetchall()

    rows = run(fetch, as_json)
    if as_json:
        return emit(rows, True, lambda: None)
    table = Table("id", "name", "billing email", "balance (credits)", "created")
    for row in rows:
        table.add_row(str(row["id"]), str(row["name"]), str(row["billing_email"]), str(row["balance"]),
                      str(row["created_at"]))
    console.print(table)


@keys_app.command("create")
def keys_create(
    account_id: str,
    scope: Annotated[list[Scope], typer.Option(
        help="billing:read, usage:write, billing:write, payments:write, wallet:credit (repeat).")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Issue an API key for an account; the secret is printed once."""
    if not set(scope) <= ACCOUNT_KEY_SCOPES:
        console.print("[red]account keys take billing:read, usage:write, billing:write, payments:write, "
                      "wallet:credit[/red]")
        raise typer.Exit(2)
    key = run(lambda pool: create_key(pool, account_id=account_id, scopes=scope, name=name), as_json)
    emit(key, as_json, lambda: console.print(
        f"key [bold]{key.id}[/bold] scopes {', '.join(key.scopes)}\nsecret (shown once): {key.secret}"))


@keys_app.command("list")
def keys_list(account_id: str, as_json: JsonFlag = False) -> None:
    keys = run(lambda pool: list_keys(pool, account_id), as_json)
    if as_json:
        return emit(keys, True, lambda: None)
    table = Table("id", "name", "prefix", "scopes", "created", "revoked")
    for key in keys:
        table.add_row(key.id, key.name, key.prefix, ", ".join(key.scopes), str(key.created_at),
                      str(key.revoked_at or ""))
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(account_id: str, key_id: str, as_json: JsonFlag = False) -> None:
    key = run(lambda pool: revoke_key(pool, account_id, key_id), as_json)
    emit(key, as_json, lambda: console.print(f"revoked {key.id} at {key.revoked_at}"))


@wallet_app.command("credit")
def wallet_credit(
    account_id: str,
    amount: Annotated[int, typer.Option(help="Whole credits; negative debits the wallet (--amount -500).")],
    reason: Annotated[str, typer.Option(help="Why (shown in the balance history).")],
    idempotency_key: Annotated[str | None, typer.Option(help="Retry-safe key (default: a new one).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Manual credit or debit, recorded as an `adjustment` journal entry."""
    key = idempotency_key or f"cli-{uuid.uuid4().hex}"
    result = PostingResult.model_validate(answer(
        lambda pool: postings.adjust(pool, account_id=account_id, amount_credits=amount, reason=reason,
                                     idempotency_key=key, actor="cli"), "/api/v1/billing/wallet/credit", None, as_json,
        body={"account_id": account_id, "amount": amount, "reason": reason, "idempotency_key": key}))
    emit(result, as_json, lambda: console.print(
        f"{result.transaction_id}: {result.amount:+} credits, balance {result.balances.balance}"
        f"{' (replayed)' if result.replayed else ''}"))


@wallet_app.command("balance")
def wallet_balance(account_id: str, as_json: JsonFlag = False) -> None:
    balance = answer(lambda pool: queries.balance(pool, account_id), "/api/v1/billing/balance",
                     {"account_id": account_id}, as_json)
    emit(balance, as_json, lambda: console.print_json(dumps(balance)))


@wallet_app.command("history")
def wallet_history(
    account_id: str,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
    type: Annotated[str | None, typer.Option(help="Only this transaction type (usage, purchase, ...).")] = None,
    feature: Annotated[str | None, typer.Option(help="Only this feature (usage rows).")] = None,
    agent: Annotated[str | None, typer.Option(help="Only this agent's rows.")] = None,
    since: Annotated[datetime | None, typer.Option(help="From this time (inclusive, UTC unless given).")] = None,
    until: Annotated[datetime | None, typer.Option(help="Before this time (exclusive).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """The balance history (newest first) with quantity, rate, agent and key; filters that match nothing by
    construction (an unknown type, feature or agent) are refused."""
    since, until = _utc(since), _utc(until)
    page = answer(lambda pool: lookup.history(pool, account_id, type=type, feature=feature, agent=agent, since=since,
                                              until=until, limit=limit),
                  f"/api/v1/operator/accounts/{account_id}/transactions",
                  {"type": type, "feature": feature, "agent": agent, "since": since, "until": until, "limit": limit},
                  as_json)

    def render() -> None:
        table = Table("id", "type", "amount", "balance after", "feature", "quantity", "rate", "agent",
                      "idempotency key", "description", "created")
        for t in page["items"]:
            table.add_row(t["id"], t["type"], f"{t['amount']:+}", str(t["balance_after"]), t["feature_id"] or "",
                          "" if t["quantity"] is None else str(t["quantity"]),
                          "" if t["credits_per_unit"] is None else str(t["credits_per_unit"]), t["agent_id"] or "",
                          t["idempotency_key"], t["description"], str(t["created_at"]))
        console.print(table)
        console.print(f"{len(page['items'])} of {page['total']} (credits; sum of all {page['total']}: "
                      f"{page['sum']:+})")

    emit(page, as_json, render)


def _utc(moment: datetime | None) -> datetime | None:
    """A time without a zone is UTC (the ledger's and the API's zone)."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


@wallet_app.command("show")
def wallet_show(
    txn: Annotated[str, typer.Argument(help="The transaction id (txn_...).")],
    account: Annotated[str | None, typer.Option(help="Its account (required for usage transactions).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """One transaction in full: amount, quantity, rate and the rate version in force, feature, agent,
    idempotency key, metadata, and what caused it (workflow id, Stripe charge or refund)."""
    view = answer(lambda pool: lookup.transaction(pool, txn, account), f"/api/v1/operator/transactions/{txn}",
                  {"account_id": account}, as_json)

    def render() -> None:
        table = Table("field", "value", show_header=False)
        for key, value in view.items():
            if isinstance(value, dict | list):
                value = dumps(value)
            table.add_row(key, "" if value is None else str(value))
        console.print(table)

    emit(view, as_json, render)
