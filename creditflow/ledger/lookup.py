"""Operator answers from the ledger: one transaction in full, and the history filtered by what on-call asks.

"Why was this account charged X" needs the whole row (quantity, rate and the rate version in force, feature,
agent, idempotency key, metadata) and what caused it (the workflow, Stripe charge or refund behind it); the
history's filters refuse values that cannot match (a typo'd ``--type usge`` must not print "0 of 0").
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool

from creditflow.domain.money import micros_to_credits
from creditflow.errors import CreditflowError
from creditflow.ledger.models import exact, txn_id
from workflows.contract import account_workflow_id, refund_workflow_id, topup_workflow_id

# Journal row types written by the ledger (migrations and postings); an account's own types are accepted too.
KNOWN_TYPES = frozenset({
    "usage", "purchase", "auto_recharge", "welcome_bonus", "adjustment", "plan_grant", "plan_expiry", "refund",
    "refund_reversal", "dispute", "dispute_reversal", "dispute_won", "dispute_lost", "overage_repayment",
    "overage_repayment_reversal", "expiry", "invoice"})
# Types the account workflow's billing cycle writes.
_CYCLE_TYPES = frozenset({"plan_grant", "plan_expiry", "overage_repayment", "overage_repayment_reversal", "expiry"})
_TXN = re.compile(r"^txn_([0-9a-f]{32})$")


def parse_txn_id(value: str) -> uuid.UUID:
    match = _TXN.match(value or "")
    if not match:
        raise CreditflowError("invalid_id", "malformed transaction id: expected txn_<32 hex digits>")
    return uuid.UUID(match.group(1))


def _row_view(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": txn_id(r["id"]), "account_id": r["account_id"], "type": r["type"],
        "amount": micros_to_credits(r["amount_micros"]), "balance_after": micros_to_credits(r["balance_after_micros"]),
        "description": r["description"], "feature_id": r["feature_id"], "channel": r["channel"],
        "quantity": exact(r["quantity"]) if r["quantity"] is not None else None,
        "credits_per_unit": exact(r["credits_per_unit"]) if r["credits_per_unit"] is not None else None,
        "agent_id": r["agent_id"], "idempotency_key": r["idempotency_key"], "counter_book": r["counter_book"],
        "metadata": dict(r["metadata"] or {}), "created_at": r["created_at"],
    }


async def transaction(pool: AsyncConnectionPool, txn: str, account_id: str | None = None) -> dict[str, Any]:
    """One journal row with its rate version and cause. Usage rows are found through their account (the hot
    path keeps no index on usage transaction ids), so ``account_id`` is required for them."""
    key = parse_txn_id(txn)
    async with pool.connection() as conn:
        if account_id:
            row = await (await conn.execute("SELECT * FROM journal WHERE account_id = %s AND id = %s",
                                            (account_id, key))).fetchone()
        else:
            row = await (await conn.execute("SELECT * FROM journal WHERE id = %s AND type <> 'usage'",
                                            (key,))).fetchone()
        if row is None:
            hint = "" if account_id else " (a usage transaction: pass --account)"
            raise CreditflowError("not_found", f"no transaction {txn}{hint}")
        view = _row_view(row)
        view["rate_version"] = await _rate_version(conn, row)
        view["caused_by"] = await _cause(conn, row)
    return view


async def _rate_version(conn: Any, row: dict[str, Any]) -> dict[str, Any] | None:
    """The rate card rows in force when the event was charged (the feature's and its base feature's)."""
    if not row["feature_id"]:
        return None
    found = await (await conn.execute(
        "SELECT r.id, r.feature_id, r.credits_per_unit, r.effective_at FROM features f"
        " JOIN LATERAL (SELECT * FROM feature_rates x WHERE x.feature_id IN (f.id, f.base_feature_id)"
        "               AND x.effective_at <= %s ORDER BY x.feature_id = f.id DESC, x.effective_at DESC) r ON true"
        " WHERE f.id = %s", (row["created_at"], row["feature_id"]))).fetchall()
    versions: dict[str, dict[str, Any]] = {}
    for r in found:
        versions.setdefault(r["feature_id"], {"rate_id": r["id"], "feature_id": r["feature_id"],
                                              "credits_per_unit": exact(r["credits_per_unit"]),
                                              "effective_at": r["effective_at"]})
    plan = await (await conn.execute(
        "SELECT b.plan_id FROM balances b WHERE b.account_id = %s", (row["account_id"],))).fetchone()
    card = sum((v["credits_per_unit"] for v in versions.values()), start=exact(0))
    return {"rate_card": list(versions.values()), "rate_card_total": card,
            "plan_rate": bool(plan and plan["plan_id"] and row["credits_per_unit"] is not None
                              and exact(row["credits_per_unit"]) != card),
            "plan_id": plan["plan_id"] if plan else None}


async def _cause(conn: Any, row: dict[str, Any]) -> dict[str, Any]:
    """What wrote this row: a workflow id where one did, else the kind of call."""
    account, key, kind = row["account_id"], row["idempotency_key"], row["type"]
    charge = await (await conn.execute(
        "SELECT id, kind, request_id, payment_intent_id, status FROM stripe_charges WHERE account_id = %s"
        " AND ledger_txn_id = %s", (account, txn_id(row["id"])))).fetchone()
    if charge is not None:
        if charge["kind"] == "auto_recharge":
            seq = charge["request_id"].removeprefix("recharge-")
            workflow = f"recharge:{account}:{seq}"
        else:
            workflow = topup_workflow_id(account, charge["request_id"])
        return {"kind": charge["kind"], "workflow_id": workflow, "charge_id": charge["id"],
                "payment_intent_id": charge["payment_intent_id"], "request_id": charge["request_id"]}
    refund = await (await conn.execute(
        "SELECT id, request_id FROM refunds WHERE account_id = %s AND %s IN (reserve_txn_id, release_txn_id)",
        (account, row["id"]))).fetchone()
    if refund is not None:
        return {"kind": "refund", "workflow_id": refund_workflow_id(account, refund["request_id"]),
                "refund_id": refund["id"], "request_id": refund["request_id"]}
    if kind == "usage":
        via = "hold settlement" if key.startswith("hold:") else "metering call (POST /api/v1/billing/track)"
        return {"kind": "usage", "workflow_id": None, "via": via}
    if kind in _CYCLE_TYPES:
        return {"kind": "billing_cycle", "workflow_id": account_workflow_id(account)}
    if kind == "welcome_bonus":
        return {"kind": "account_created", "workflow_id": None}
    if kind == "adjustment":
        return {"kind": "manual_adjustment", "workflow_id": None, "actor": (row["metadata"] or {}).get("actor")}
    return {"kind": kind, "workflow_id": account_workflow_id(account) if kind.startswith("dispute") else None}


async def history(pool: AsyncConnectionPool, account_id: str, *, type: str | None = None,
                  feature: str | None = None, agent: str | None = None, since: datetime | None = None,
                  until: datetime | None = None, limit: int = 20) -> dict[str, Any]:
    """The account's transactions, newest first, filtered; a filter value that names nothing is refused."""
    async with pool.connection() as conn:
        if await (await conn.execute("SELECT 1 FROM accounts WHERE id = %s", (account_id,))).fetchone() is None:
            raise CreditflowError("unknown_account", f"no account {account_id}")
        if type is not None and type not in KNOWN_TYPES:
            own = {r["type"] for r in await (await conn.execute(
                "SELECT DISTINCT type FROM journal WHERE account_id = %s", (account_id,))).fetchall()}
            if type not in own:
                raise CreditflowError("validation_error", f"unknown transaction type {type!r}; types: "
                                      + ", ".join(sorted(KNOWN_TYPES | own)))
        if feature is not None and await (await conn.execute(
                "SELECT 1 FROM features WHERE id = %s", (feature,))).fetchone() is None:
            raise CreditflowError("unknown_feature", f"unknown feature {feature!r} (see `creditflow ratecard show`)")
        if agent is not None and await (await conn.execute(
                "SELECT 1 FROM agents WHERE account_id = %(a)s AND id = %(g)s UNION ALL"
                " (SELECT 1 FROM journal WHERE account_id = %(a)s AND agent_id = %(g)s LIMIT 1)",
                {"a": account_id, "g": agent})).fetchone() is None:
            raise CreditflowError("unknown_agent", f"no agent {agent!r} in account {account_id} "
                                  "(see `creditflow agents list`)")
        if since is not None and until is not None and since >= until:
            raise CreditflowError("validation_error", "--since must be before --until")
        where = ("account_id = %(a)s AND (%(t)s::text IS NULL OR type = %(t)s)"
                 " AND (%(f)s::text IS NULL OR feature_id = %(f)s) AND (%(g)s::text IS NULL OR agent_id = %(g)s)"
                 " AND (%(s)s::timestamptz IS NULL OR created_at >= %(s)s)"
                 " AND (%(u)s::timestamptz IS NULL OR created_at < %(u)s)")
        params = {"a": account_id, "t": type, "f": feature, "g": agent, "s": since, "u": until, "l": limit}
        rows = await (await conn.execute(f"SELECT * FROM journal WHERE {where} ORDER BY created_at DESC, seq DESC"
                                         " LIMIT %(l)s", params)).fetchall()
        total = await (await conn.execute(
            f"SELECT count(*) AS n, coalesce(sum(amount_micros), 0) AS s FROM journal WHERE {where}",
            params)).fetchone()
    assert total is not None
    return {"items": [_row_view(r) for r in rows], "total": total["n"], "sum": micros_to_credits(total["s"])}


CHARGE_KINDS = ("topup", "auto_recharge", "invoice")


async def _account_exists(conn: Any, account_id: str) -> None:
    if await (await conn.execute("SELECT 1 FROM accounts WHERE id = %s", (account_id,))).fetchone() is None:
        raise CreditflowError("unknown_account", f"no account {account_id}")


async def charges(pool: AsyncConnectionPool, account_id: str, kind: str | None = None,
                  limit: int = 20) -> dict[str, Any]:
    """The account's Stripe charges (newest first) with their failure and decline codes, and the auto-recharge
    state: why a recharge keeps failing."""
    if kind is not None and kind not in CHARGE_KINDS:
        raise CreditflowError("validation_error", f"unknown kind {kind!r}; kinds: {', '.join(CHARGE_KINDS)}")
    async with pool.connection() as conn:
        await _account_exists(conn, account_id)
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


def _agent_view(agent: Any) -> dict[str, Any]:
    return agent.model_dump() | {
        "month_spent": micros_to_credits(agent.month_spent_micros),
        "monthly_limit": None if agent.monthly_limit_micros is None else micros_to_credits(agent.monthly_limit_micros)}


async def agents_of(pool: AsyncConnectionPool, account_id: str) -> list[dict[str, Any]]:
    """The account's agents: status, who paused them, when, and when they resume; spend in credits."""
    from creditflow.ledger import agents

    return [_agent_view(a) for a in await agents.list_agents(pool, account_id)]


async def agent_trail(pool: AsyncConnectionPool, account_id: str, agent_id: str, limit: int = 100) -> dict[str, Any]:
    """The agent now and its audit trail (every pause and resume with time, actor and reason), oldest first."""
    from creditflow.ledger import agents

    agent = await agents.get_agent(pool, account_id, agent_id)
    events = await agents.agent_events(pool, account_id, agent_id, limit)
    return {"agent": _agent_view(agent), "events": [e.model_dump() for e in events]}
