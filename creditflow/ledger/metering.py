"""The metering hot path: ``track``, ``track_batch``, ``check`` and holds.

Each call is one PostgreSQL round trip into a PL/pgSQL function (see migrations/0002) that runs
in one short transaction under the account's row lock: no Temporal on this path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from creditflow.domain.money import micros_to_credits, usage_charge_micros, validate_quantity
from creditflow.errors import CreditflowError
from creditflow.ids import check_token
from creditflow.ledger.db import with_retry
from creditflow.ledger.idempotency import request_hash
from creditflow.ledger.models import Balances, CheckResult, HoldResult, TrackResult

_TRACK_SQL = "SELECT cf_track(%s, %s, %s, %s, %s, %s, %s) AS r"


@dataclass(frozen=True)
class UsageEvent:
    """One usage event, validated at construction (bad input never reaches the database)."""

    account_id: str
    feature_id: str
    value: Decimal
    idempotency_key: str
    agent_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, account_id: str, feature_id: str, value: object, idempotency_key: str,
              agent_id: str | None = None, metadata: dict[str, Any] | None = None) -> UsageEvent:
        check_token(idempotency_key, "idempotency_key")
        if agent_id is not None:
            check_token(agent_id, "agent_id")
        try:
            quantity = validate_quantity(value, integer_only=False)
        except ValueError as exc:
            raise CreditflowError(getattr(exc, "code", "invalid_quantity"), str(exc)) from exc
        return cls(account_id, feature_id, quantity, idempotency_key, agent_id, metadata or {})

    def params(self) -> tuple[object, ...]:
        fingerprint = request_hash("track", feature=self.feature_id, value=self.value,
                                   agent=self.agent_id, metadata=self.metadata)
        return (self.account_id, self.feature_id, self.value, self.agent_id, self.idempotency_key,
                fingerprint, Jsonb(self.metadata))


async def track(pool: AsyncConnectionPool, event: UsageEvent) -> TrackResult:
    """Record one usage event exactly once; a denial writes nothing and carries a reason code."""

    async def run() -> TrackResult:
        async with pool.connection() as conn:
            row = await (await conn.execute(_TRACK_SQL, event.params())).fetchone()
        return TrackResult.from_db(row["r"])

    return await with_retry(run)


async def track_batch(pool: AsyncConnectionPool, events: list[UsageEvent]) -> list[TrackResult]:
    """Many events in one transaction and one commit (pipelined). Each event is decided on its
    own (a denied event writes nothing); results come back in input order. Accounts are locked
    in a stable order so concurrent batches cannot deadlock."""
    order = sorted(range(len(events)), key=lambda i: events[i].account_id)

    async def run() -> list[TrackResult]:
        results: list[TrackResult | None] = [None] * len(events)
        async with pool.connection() as conn, conn.transaction():
            async with conn.pipeline():
                cursors = [(i, await conn.execute(_TRACK_SQL, events[i].params())) for i in order]
            for i, cur in cursors:
                row = await cur.fetchone()
                results[i] = TrackResult.from_db(row["r"])
        return [r for r in results if r is not None]

    return await with_retry(run)


_CHECK_SQL = """
SELECT b.balance_micros, b.floor_micros, cf_live_held(b.account_id, b.held_micros) AS held_micros,
       f.id AS feature_id, f.integer_only, cf_rate(f.id, now()) AS rate
FROM balances b LEFT JOIN features f ON f.id = %(feature)s
WHERE b.account_id = %(account)s
"""


async def check(pool: AsyncConnectionPool, account_id: str, feature_id: str,
                value: object | None = None, agent_id: str | None = None) -> CheckResult:
    """May this account (agent) use this feature now, and what is left? Writes nothing.

    With ``value``, allowed means the whole quantity is affordable; without, that something is
    left to spend. A feature with no rate is ``allowed: false``."""
    quantity = None
    if value is not None:
        try:
            quantity = validate_quantity(value, integer_only=False)
        except ValueError as exc:
            raise CreditflowError(getattr(exc, "code", "invalid_quantity"), str(exc)) from exc
    async with pool.connection() as conn:
        row = await (await conn.execute(_CHECK_SQL, {"account": account_id, "feature": feature_id})).fetchone()
    if row is None:
        raise CreditflowError("unknown_account", f"no account {account_id}")
    balances = Balances.from_micros(row["balance_micros"], row["held_micros"], row["floor_micros"])
    result = CheckResult(allowed=False, code="ok", feature_id=feature_id, balances=balances)
    if row["feature_id"] is None:
        result.code = "unknown_feature"
        return result
    if row["rate"] is None:
        result.code = "feature_not_priced"
        return result
    rate = Decimal(row["rate"])
    result.credits_per_unit = rate.normalize() if rate != rate.to_integral_value() else rate.quantize(Decimal(1))
    spendable = row["balance_micros"] - row["held_micros"] - row["floor_micros"]
    if quantity is not None:
        if row["integer_only"] and quantity != quantity.to_integral_value():
            result.code = "invalid_quantity"
            return result
        required = usage_charge_micros(quantity, rate)
        result.credits_required = micros_to_credits(required)
        result.allowed = spendable >= required
    else:
        result.allowed = spendable > 0
    if not result.allowed:
        result.code = "insufficient_credits"
    return result


def _hold_result(row: dict[str, Any]) -> HoldResult:
    balances = None
    if "balance_micros" in row:
        balances = Balances.from_micros(row["balance_micros"], row["held_micros"], row["floor_micros"])
    return HoldResult(
        allowed=row["allowed"], code=row["code"], hold_id=row.get("hold_id"),
        held_amount=micros_to_credits(row["held_amount_micros"]) if "held_amount_micros" in row else None,
        status=row.get("status"), expires_at=row.get("expires_at"),
        released=micros_to_credits(row["released_micros"]) if "released_micros" in row else None,
        credits_required=micros_to_credits(row["credits_required_micros"])
        if "credits_required_micros" in row else None,
        replayed=bool(row.get("replayed", False)), balances=balances,
    )


async def create_hold(pool: AsyncConnectionPool, event: UsageEvent, ttl_seconds: int) -> HoldResult:
    """Reserve the price of ``event.value`` units (e.g. the expected call minutes)."""
    fingerprint = request_hash("hold", feature=event.feature_id, value=event.value, agent=event.agent_id,
                               ttl=ttl_seconds, metadata=event.metadata)

    async def run() -> HoldResult:
        async with pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT cf_hold(%s, %s, %s, %s, %s, %s, %s, %s) AS r",
                (event.account_id, event.feature_id, event.value, event.agent_id, ttl_seconds,
                 event.idempotency_key, fingerprint, Jsonb(event.metadata)))).fetchone()
        return _hold_result(row["r"])

    return await with_retry(run)


async def settle_hold(pool: AsyncConnectionPool, account_id: str, hold_id: str, value: object,
                      metadata: dict[str, Any] | None = None) -> TrackResult:
    """Charge the actual quantity and release the rest of the hold, atomically (idempotent)."""
    try:
        quantity = validate_quantity(value, integer_only=False)
    except ValueError as exc:
        raise CreditflowError(getattr(exc, "code", "invalid_quantity"), str(exc)) from exc

    async def run() -> TrackResult:
        async with pool.connection() as conn:
            row = await (await conn.execute("SELECT cf_hold_settle(%s, %s, %s, %s) AS r",
                                            (account_id, hold_id, quantity, Jsonb(metadata or {})))).fetchone()
        return TrackResult.from_db(row["r"])

    return await with_retry(run)


async def release_hold(pool: AsyncConnectionPool, account_id: str, hold_id: str) -> HoldResult:
    async def run() -> HoldResult:
        async with pool.connection() as conn:
            row = await (await conn.execute("SELECT cf_hold_release(%s, %s) AS r",
                                            (account_id, hold_id))).fetchone()
        return _hold_result(row["r"])

    return await with_retry(run)


async def expire_overdue_holds(pool: AsyncConnectionPool) -> Decimal:
    """Sweep every account's overdue holds; returns the credits released."""
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT cf_expire_all_holds() AS released")).fetchone()
    return micros_to_credits(row["released"])
