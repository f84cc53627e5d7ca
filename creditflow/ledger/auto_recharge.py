"""Auto-recharge settings in the ledger database, and the balance watch that triggers recharges.

The API writes the settings (``put_settings``); the account workflow reads them with the balance
(``snapshot``) and writes back what happened (``record_attempt``), disabling auto-recharge only for the
settings generation it judged. Every write refreshes the balances row's watch list in the same
transaction, so the hot path starts (or stops) emitting ``balance.below_threshold`` at the commit.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.domain.recharge import RechargeConfig
from creditflow.errors import CreditflowError

BELOW_THRESHOLD = "balance.below_threshold"  # the outbox kind written by the balance watch


class AutoRechargeRow(BaseModel):
    """A row of ``auto_recharge_settings``."""

    account_id: str
    enabled: bool
    threshold_micros: int
    amount_credits: int
    payment_method_id: str | None
    generation: int
    disabled_reason: str | None
    consecutive_failures: int
    last_attempt_at: datetime | None
    last_status: str | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime

    def config(self) -> RechargeConfig:
        return RechargeConfig(enabled=self.enabled, threshold_micros=self.threshold_micros,
                              amount_credits=self.amount_credits, payment_method_id=self.payment_method_id,
                              generation=self.generation)


class RechargeSnapshot(BaseModel):
    """What the workflow needs to decide: the settings (None: never configured) and the available balance."""

    config: RechargeConfig | None
    available_micros: int
    # The highest ``recharge-{seq}`` charge row: the next attempt's number is above it whatever a (reset, restarted)
    # workflow remembers, so an old row is never taken for a new recharge.
    last_seq: int = 0
    # A recharge whose charge row is still open (recorded or charging, touched in the last ``IN_FLIGHT_WINDOW``):
    # started by an earlier run of the account workflow (terminated or reset while its child ran), it may still
    # charge and credit, so no second one starts meanwhile.
    in_flight_seq: int | None = None


# A recharge child charges within minutes (its Stripe retries last about ten); a row open longer is abandoned.
IN_FLIGHT_WINDOW = "15 minutes"


async def _lock_balance(conn: AsyncConnection[Any], account_id: str) -> int:
    """Lock the account's balances row (the order every money writer follows); returns the available micros."""
    row = await (await conn.execute(
        "SELECT balance_micros - held_micros AS available FROM balances WHERE account_id = %s FOR UPDATE",
        (account_id,))).fetchone()
    if row is None:
        raise CreditflowError("unknown_account", f"no account {account_id}")
    return int(row["available"])


async def get_settings(pool: AsyncConnectionPool, account_id: str) -> AutoRechargeRow | None:
    """The account's settings, or None if auto-recharge was never configured (``unknown_account`` if no account)."""
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT s.*, a.id AS known FROM accounts a LEFT JOIN auto_recharge_settings s ON s.account_id = a.id"
            " WHERE a.id = %s", (account_id,))).fetchone()
    if row is None:
        raise CreditflowError("unknown_account", f"no account {account_id}")
    if row["account_id"] is None:
        return None
    row.pop("known")
    return AutoRechargeRow(**row)


async def put_settings(pool: AsyncConnectionPool, account_id: str, *, enabled: bool, threshold_micros: int,
                       amount_credits: int, payment_method_id: str | None) -> AutoRechargeRow:
    """Save the settings. A change (or re-enabling settings the workflow disabled) starts a new generation:
    failures are forgotten. Enabling below the threshold asks for a recharge at once (an outbox event)."""
    async with pool.connection() as conn, conn.transaction():
        available = await _lock_balance(conn, account_id)
        row = await (await conn.execute(
            "INSERT INTO auto_recharge_settings AS s (account_id, enabled, threshold_micros, amount_credits,"
            " payment_method_id) VALUES (%(a)s, %(e)s, %(t)s, %(c)s, %(p)s)"
            " ON CONFLICT (account_id) DO UPDATE SET enabled = %(e)s, threshold_micros = %(t)s,"
            " amount_credits = %(c)s, payment_method_id = %(p)s, updated_at = now(),"
            " generation = s.generation + CASE WHEN s.disabled_reason IS NOT NULL OR"
            "   (s.enabled, s.threshold_micros, s.amount_credits, s.payment_method_id)"
            "   IS DISTINCT FROM (%(e)s, %(t)s, %(c)s, %(p)s::text) THEN 1 ELSE 0 END,"
            " consecutive_failures = CASE WHEN s.disabled_reason IS NOT NULL OR"
            "   (s.enabled, s.threshold_micros, s.amount_credits, s.payment_method_id)"
            "   IS DISTINCT FROM (%(e)s, %(t)s, %(c)s, %(p)s::text) THEN 0 ELSE s.consecutive_failures END,"
            " disabled_reason = NULL"
            " RETURNING *",
            {"a": account_id, "e": enabled, "t": threshold_micros, "c": amount_credits, "p": payment_method_id},
        )).fetchone()
        assert row is not None
        await conn.execute("SELECT cf_refresh_watch(%s)", (account_id,))
        if enabled and available < threshold_micros:
            await conn.execute(
                "INSERT INTO outbox (account_id, kind, dedup_key, payload) VALUES (%s, %s,"
                " 'below:' || %s || ':' || %s || ':' || txid_current(),"
                " jsonb_build_object('threshold_micros', %s::bigint, 'available_micros', %s::bigint,"
                " 'source', 'settings'))"
                " ON CONFLICT (dedup_key) DO NOTHING",
                (account_id, BELOW_THRESHOLD, account_id, threshold_micros, threshold_micros, available))
    return AutoRechargeRow(**row)


async def snapshot(pool: AsyncConnectionPool, account_id: str) -> RechargeSnapshot:
    """The settings and the available balance, read together (for the workflow's decision)."""
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT b.balance_micros - b.held_micros AS available, (SELECT coalesce(max(substring(c.request_id"
            " FROM '^recharge-([0-9]+)$')::bigint), 0) FROM stripe_charges c WHERE c.account_id = b.account_id"
            " AND c.kind = 'auto_recharge') AS last_seq, (SELECT max(substring(c.request_id"
            " FROM '^recharge-([0-9]+)$')::bigint) FROM stripe_charges c WHERE c.account_id = b.account_id"
            " AND c.kind = 'auto_recharge' AND c.status IN ('pending', 'requires_action')"
            f" AND c.updated_at > now() - interval '{IN_FLIGHT_WINDOW}') AS in_flight_seq, s.* FROM balances b"
            " LEFT JOIN auto_recharge_settings s ON s.account_id = b.account_id WHERE b.account_id = %s",
            (account_id,))).fetchone()
    if row is None:
        raise CreditflowError("unknown_account", f"no account {account_id}")
    available = int(row.pop("available"))
    last_seq = int(row.pop("last_seq"))
    in_flight = row.pop("in_flight_seq")
    config = AutoRechargeRow(**row).config() if row["account_id"] is not None else None
    return RechargeSnapshot(config=config, available_micros=available, last_seq=last_seq,
                            in_flight_seq=None if in_flight is None else int(in_flight))


async def record_attempt(pool: AsyncConnectionPool, account_id: str, *, generation: int, status: str,
                         error: str | None, consecutive_failures: int, attempted_at: datetime,
                         disable_reason: str | None = None, seq: int | None = None,
                         charge_id: str | None = None) -> bool:
    """Mirror an attempt's outcome for GET and keep it in the attempts history; with ``disable_reason``, turn
    auto-recharge off (and its watch).

    Only the generation the workflow judged is touched: settings saved meanwhile win. Returns whether a
    row was updated."""
    async with pool.connection() as conn, conn.transaction():
        await _lock_balance(conn, account_id)
        if seq is not None:
            await conn.execute(
                "INSERT INTO auto_recharge_attempts (account_id, seq, attempted_at, generation, status, charge_id,"
                " error) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (account_id, seq, attempted_at, generation, status, charge_id, error))
        row = await (await conn.execute(
            "UPDATE auto_recharge_settings SET last_attempt_at = %s, last_status = %s, last_error = %s,"
            " consecutive_failures = %s,"
            " enabled = CASE WHEN %s::text IS NULL THEN enabled ELSE false END,"
            " disabled_reason = coalesce(%s, disabled_reason), updated_at = now()"
            " WHERE account_id = %s AND generation = %s RETURNING account_id",
            (attempted_at, status, error, consecutive_failures, disable_reason, disable_reason, account_id,
             generation))).fetchone()
        if row is not None and disable_reason is not None:
            await conn.execute("SELECT cf_refresh_watch(%s)", (account_id,))
    return row is not None


class RechargeHistory(BaseModel):
    """What the database remembers of auto-recharge attempts: what a new account workflow run starts from."""

    settings: AutoRechargeRow | None
    last_seq: int  # the highest ``recharge-{seq}`` charge row (0: none)
    attempts_on_day: int  # charge rows created on the UTC day asked for


async def history(pool: AsyncConnectionPool, account_id: str, day_start: datetime) -> RechargeHistory:
    """The settings with the policy state mirrored by ``record_attempt``, the last recharge sequence number used
    and the attempts of the UTC day starting at ``day_start`` (a new run must never reuse a sequence number: its
    ``recharge-{seq}`` row would be found and reported as a new recharge)."""
    settings = await get_settings(pool, account_id)
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT coalesce(max(substring(request_id FROM '^recharge-([0-9]+)$')::bigint), 0) AS last_seq,"
            " count(*) FILTER (WHERE created_at >= %s AND created_at < %s + interval '1 day') AS today"
            " FROM stripe_charges WHERE account_id = %s AND kind = 'auto_recharge'",
            (day_start, day_start, account_id))).fetchone()
    assert row is not None
    return RechargeHistory(settings=settings, last_seq=int(row["last_seq"]), attempts_on_day=int(row["today"]))
