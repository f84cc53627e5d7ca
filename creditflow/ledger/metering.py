"""The metering hot path: ``track``, ``track_batch``, ``check`` and holds.

Each call is one PostgreSQL round trip into a PL/pgSQL function (migrations/0002) that runs in
one short transaction under the account's row lock: no Temporal on this path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

from creditflow.domain.money import AmountError, micros_to_credits, usage_charge_micros, validate_quantity
from creditflow.errors import CreditflowError
from creditflow.ids import check_token
from creditflow.ledger import credit_systems
from creditflow.ledger.coalescer import coalescer_for
from creditflow.ledger.db import RETRYABLE, to_jsonb, with_retry
from creditflow.ledger.idempotency import request_hash
from creditflow.ledger.models import Balances, CheckResult, HoldResult, TrackResult, balances_from, credits, exact
from creditflow.metadata import check_metadata
from creditflow.observability.metrics import record_usage

log = logging.getLogger(__name__)

# Keys the ledger writes itself (hold settlements, adjustments, system grants) live in the same
# per-account namespace as callers' keys, so callers may not use these prefixes.
RESERVED_KEY_PREFIXES = ("hold:", "adj:", "sys:")

# A concurrent duplicate of the same key hits the journal's unique index; the retry then replays it.
TRACK_RETRY_ON: tuple[type[Exception], ...] = (*RETRYABLE, psycopg.errors.UniqueViolation)

# Parameters travel in binary (%b): psycopg dumps arrays in text format element by element, quoting each
# with a regular expression (~40 us of client CPU per event in a group of four); in binary it is ~10.
_TRACK_SQL = "SELECT * FROM cf_track(%b, %b, %b, %b, %b, %b, %b, %b)"
_BATCH_SQL = "SELECT * FROM cf_track_batch(%b, %b, %b, %b, %b, %b, %b::jsonb[])"
_GROUP_SQL = "SELECT * FROM cf_track_group(%b, %b, %b, %b, %b, %b, %b::jsonb[], %b)"


def _quantity(value: object) -> Decimal:
    try:
        return validate_quantity(value, integer_only=False)
    except AmountError as exc:
        raise CreditflowError(exc.code, str(exc)) from exc


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
        if idempotency_key.startswith(RESERVED_KEY_PREFIXES):
            raise CreditflowError("validation_error",
                                  f"idempotency keys starting with {', '.join(RESERVED_KEY_PREFIXES)} are reserved")
        if agent_id is not None:
            check_token(agent_id, "agent_id")
        return cls(account_id, feature_id, _quantity(value), idempotency_key, agent_id,
                   check_metadata(metadata) if metadata else {})

    def fingerprint(self, operation: str = "track", *extra: object) -> bytes:
        return request_hash(operation, self.feature_id, self.value, self.agent_id, *extra, metadata=self.metadata)


async def _fetch_one(pool: AsyncConnectionPool, sql: str, params: Sequence[object],
                     retry_on: tuple[type[Exception], ...] = RETRYABLE,
                     retry_params: Sequence[object] | None = None) -> dict[str, Any]:
    """One statement in its own transaction; the retry machinery only starts after a failure
    (retries use ``retry_params`` when given)."""

    async def run(args: Sequence[object] = retry_params if retry_params is not None else params) -> dict[str, Any]:
        async with pool.connection() as conn:
            row = await (await conn.execute(sql, args)).fetchone()
        assert row is not None
        return row

    try:
        return await run(params)
    except retry_on:
        return await with_retry(run, retry_on=retry_on)


async def track(pool: AsyncConnectionPool, event: UsageEvent, *, coalesce: bool = True) -> TrackResult:
    """Record one usage event exactly once; a denial writes nothing and carries a reason code.

    Concurrent calls on the same pool share transactions (group commit, see ``coalescer``);
    ``coalesce=False`` forces one transaction for this event alone.

    A feature of another credit system than the default is charged to that system's balance (``credit_systems``);
    for the default system this costs one dict lookup (the feature's system, cached per process)."""
    if (credit_systems.cached_system(pool, event.feature_id)
            or await credit_systems.feature_system(pool, event.feature_id)) != credit_systems.DEFAULT_SYSTEM:
        return await _track_in_system(pool, event, coalesce)
    if coalesce:
        result = await coalescer_for(pool, track_one, track_grouped).track(event)  # type: ignore[arg-type]
    else:
        result = await track_alone(pool, event)
    record_usage(result.allowed, result.code, result.charged_micros, result.replayed)
    return result


async def _track_in_system(pool: AsyncConnectionPool, event: UsageEvent, coalesce: bool) -> TrackResult:
    """``track`` for a feature of a named credit system: the event goes to the account's sub-account there."""
    routed, system = await _routed(pool, event)
    if await _paused_new(pool, routed):
        return TrackResult(False, "agent_paused", credit_system=system)

    async def run() -> TrackResult:
        if coalesce:
            return await coalescer_for(pool, track_one, track_grouped).track(routed)  # type: ignore[arg-type]
        return await track_alone(pool, routed)

    result = await run()
    if result.code == "unknown_account":
        result = await _without_sub_account(pool, event, system) or await run()
    record_usage(result.allowed, result.code, result.charged_micros, result.replayed)
    return replace(result, credit_system=system)


async def _routed(pool: AsyncConnectionPool, event: UsageEvent) -> tuple[UsageEvent, str | None]:
    """The event as the ledger sees it: on the sub-account of the feature's system (None: the default)."""
    account, system = await credit_systems.ledger_account(pool, event.account_id, event.feature_id)
    return (event if system is None else replace(event, account_id=account)), system


_PRICE_SQL = "SELECT * FROM cf_price(%s, %s)"


async def _without_sub_account(pool: AsyncConnectionPool, event: UsageEvent, system: str | None
                               ) -> TrackResult | None:
    """An account never granted credits in ``system`` has no sub-account there: its balance is zero. The answer is
    the one an empty balance gives (nothing is created for a refusal); for a free event the sub-account is created
    and None says: run it again."""
    if system is None or not await credit_systems.parent_exists(pool, event.account_id):
        return TrackResult(False, "unknown_account")
    price = await _fetch_one(pool, _PRICE_SQL, (event.feature_id, event.value))
    if price["code"] != "ok":
        return TrackResult(False, price["code"])
    if price["charge_micros"] > 0:
        return TrackResult(False, "insufficient_credits", 0, price["charge_micros"], exact(price["credits_per_unit"]),
                           balance_micros=0, held_micros=0, floor_micros=0)
    async with pool.connection() as conn, conn.transaction():
        await credit_systems.ensure_sub_account(conn, event.account_id, system)
    return None


def configure_track(pool: AsyncConnectionPool, *, writers: int) -> None:
    """How many group writers ``track`` uses on this pool (``CREDITFLOW_TRACK_WRITERS``, default 2)."""
    coalescer_for(pool, track_one, track_grouped, writers=writers)  # type: ignore[arg-type]


def _track_params(event: UsageEvent, probe: bool) -> tuple[object, ...]:
    """``probe=False`` on a first attempt: a repeated key then fails on the journal's unique
    index and the retry (``probe=True``) replays it or reports the conflict."""
    return (event.account_id, event.feature_id, event.value, event.agent_id, event.idempotency_key,
            event.fingerprint(), to_jsonb(event.metadata), probe)


def _event_columns(events: Sequence[UsageEvent]) -> tuple[list[Any] | None, ...]:
    """Events as the array parameters of ``cf_track_group`` / ``cf_track_batch``, column by column.

    Agents and metadata are usually absent: a column of nothing but NULLs is sent as one NULL array (the functions
    read ``p_agents[i]`` of it as NULL), which spares the driver a scan and a dump of that list per call."""
    agents = [e.agent_id for e in events]
    metadata = [to_jsonb(e.metadata) for e in events]
    return (
        [e.account_id for e in events], [e.feature_id for e in events], [e.value for e in events],
        agents if any(a is not None for a in agents) else None, [e.idempotency_key for e in events],
        [e.fingerprint() for e in events], metadata if any(m is not None for m in metadata) else None,
    )


async def track_grouped(conn: AsyncConnection[Any], events: Sequence[UsageEvent]) -> list[TrackResult]:
    """A few events in one ``cf_track_group`` call and one transaction (the coalescer's groups):
    ``cf_track`` for each, server-side, so the balance watch (auto-recharge, alerts) sees every
    event's balance, as for single events (``cf_track_batch`` moves an account's balance once per
    batch). Accounts are locked in id order so concurrent groups cannot deadlock.

    The first attempt does not probe idempotency keys, so a denial may hide the replay of a key
    used while the balance was higher: callers decide denied events again with ``track_one``."""
    order = sorted(range(len(events)), key=lambda i: events[i].account_id)
    columns = _event_columns([events[i] for i in order])

    async def run(probe: bool = True) -> list[TrackResult]:
        cursor = conn.cursor(row_factory=tuple_row)
        await cursor.execute(_GROUP_SQL, (*columns, probe))
        row_of = dict(zip(order, await cursor.fetchall(), strict=True))  # back to the callers' order
        return [TrackResult.from_row(row_of[i]) for i in range(len(events))]

    try:
        return await run(probe=False)
    except TRACK_RETRY_ON:
        return await with_retry(run, retry_on=TRACK_RETRY_ON)


async def _track_row(conn: AsyncConnection[Any], params: Sequence[object]) -> tuple[Any, ...]:
    """The hot path's one statement, read as a plain tuple (cheaper than a dict per event)."""
    cursor = conn.cursor(row_factory=tuple_row)
    await cursor.execute(_TRACK_SQL, params)
    row = await cursor.fetchone()
    assert row is not None
    return row


async def track_one(conn: AsyncConnection[Any], event: UsageEvent) -> TrackResult:
    """One event, one ``cf_track`` call, one transaction, on ``conn`` (autocommit)."""
    first = _track_params(event, False)
    probing = (*first[:-1], True)
    try:
        row = await _track_row(conn, first)
    except TRACK_RETRY_ON:
        row = await with_retry(lambda: _track_row(conn, probing), retry_on=TRACK_RETRY_ON)
    if not row[0]:
        # A denial may hide a replay (the key was used while the balance was higher): ask again, probing.
        row = await with_retry(lambda: _track_row(conn, probing), retry_on=TRACK_RETRY_ON)
    return TrackResult.from_row(row)


async def track_alone(pool: AsyncConnectionPool, event: UsageEvent) -> TrackResult:
    """One event in a transaction of its own (``track(..., coalesce=False)``)."""
    async with pool.connection() as conn:
        return await track_one(conn, event)


async def track_batch(pool: AsyncConnectionPool, events: Sequence[UsageEvent]) -> list[TrackResult]:
    """Many events in one call and one commit. Each event is decided on its own, in order within
    its account (a denied event writes nothing); results come back in input order."""
    if not events:
        return []
    routes = [(e, None) if credit_systems.cached_system(pool, e.feature_id) == credit_systems.DEFAULT_SYSTEM
              else await _routed(pool, e) for e in events]
    # A paused agent's new events in a named credit system are refused before the batch (the wallet's own are
    # refused inside it, by cf_track); its replays still replay.
    refused = {i for i, (routed, system) in enumerate(routes) if system is not None and await _paused_new(pool, routed)}
    run_idx = [i for i in range(len(events)) if i not in refused]
    params = _event_columns([routes[i][0] for i in run_idx])

    async def run() -> list[TrackResult]:
        async with pool.connection() as conn:
            rows = await (await conn.execute(_BATCH_SQL, params)).fetchall()
        return [TrackResult.from_db(row) for row in rows]

    ran: list[TrackResult] = []
    if run_idx:
        try:
            ran = await run()
        except TRACK_RETRY_ON:
            ran = await with_retry(run, retry_on=TRACK_RETRY_ON)
    results = [TrackResult(False, "agent_paused")] * len(events)
    for i, result in zip(run_idx, ran, strict=True):
        results[i] = result
    for i, (routed, system) in enumerate(routes):
        if system is not None:  # a named credit system's event: say which, and answer for a missing sub-account
            if results[i].code == "unknown_account":
                results[i] = (await _without_sub_account(pool, events[i], system)
                              or await track_alone(pool, routed))
            results[i] = replace(results[i], credit_system=system)
    for r in results:
        record_usage(r.allowed, r.code, r.charged_micros, r.replayed)
    return results


async def _paused_new(pool: AsyncConnectionPool, routed: UsageEvent) -> bool:
    """A named credit system's event (``routed``: on its sub-account) of a paused agent that was not recorded
    before the pause: refused (``agent_paused``). One query, only for events that name an agent."""
    if routed.agent_id is None:
        return False
    parent = routed.account_id.split(".", 1)[0]
    if not await credit_systems.agent_paused(pool, parent, routed.agent_id):
        return False
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT 1 FROM journal_keys WHERE account_id = %s AND idempotency_key = %s",
                                        (routed.account_id, routed.idempotency_key))).fetchone()
    return row is None


# A check without a value asks about one unit of the feature.
ONE_UNIT = Decimal(1)

_CHECK_SQL = """
SELECT b.balance_micros, b.floor_micros, cf_live_held(b.account_id, b.held_micros) AS held_micros, b.controlled,
       p.id AS feature_id, p.integer_only, p.credits_per_unit AS rate
FROM balances b LEFT JOIN feature_prices p ON p.id = %(feature)s
WHERE b.account_id = %(account)s
"""

# Controlled accounts only (a second statement, as the gate always was): the rate this account pays (migration 0013:
# the plan rate while plan credits are left, to this agent too (its plan_credit_limit, 0030_1), the overage rate once
# they are spent, else the card's, as
# cf_plan_price) and the spend-control verdict for the amount at that rate, read only (nothing is emitted).
_CONTROLLED_CHECK_SQL = """
SELECT r.rate, cf_spend_gate(%(account)s, %(agent)s, cf_charge_micros(%(quantity)s::numeric, r.rate), false) AS code
FROM (SELECT coalesce((SELECT CASE WHEN b.plan_left_micros > 0
                                        AND coalesce((cf_agent_plan(b.account_id, %(agent)s)).room, 1) > 0
                                   THEN x.credits_per_unit ELSE x.overage_credits_per_unit END
                       FROM plan_rates x WHERE x.plan_id = b.plan_id AND x.feature_id = %(feature)s),
                      %(card)s::numeric) AS rate
      FROM balances b WHERE b.account_id = %(account)s) r
"""


_EMPTY_CHECK_SQL = """
SELECT 0::bigint AS balance_micros, 0::bigint AS floor_micros, 0::bigint AS held_micros, false AS controlled,
       p.id AS feature_id, p.integer_only, p.credits_per_unit AS rate
FROM feature_prices p WHERE p.id = %(feature)s
"""


async def check(pool: AsyncConnectionPool, account_id: str, feature_id: str,
                value: object | None = None, agent_id: str | None = None) -> CheckResult:
    """May this account (agent) use this feature now, and what is left? Writes nothing.

    With ``value``, allowed means the whole quantity is affordable now; without, one unit (seed 003: "may I use it
    at all?" means "may I use one unit"; ``credits_required`` is then not reported). A feature that is unknown or
    has no rate is ``allowed: false``."""
    implicit = value is None
    quantity = ONE_UNIT if implicit else _quantity(value)
    # A feature of a named credit system is checked against that system's balance (its sub-account).
    parent = account_id
    account_id, system = await credit_systems.ledger_account(pool, account_id, feature_id)
    async with pool.connection() as conn:
        row = await (await conn.execute(_CHECK_SQL, {"account": account_id, "feature": feature_id})).fetchone()
        if row is None and system is not None and await credit_systems.parent_exists(pool, parent):
            # Never granted credits in this system: an empty balance there.
            row = await (await conn.execute(_EMPTY_CHECK_SQL, {"feature": feature_id})).fetchone()
    if row is None:
        raise CreditflowError("unknown_account", f"no account {parent}")
    balances = Balances.from_micros(row["balance_micros"], row["held_micros"], row["floor_micros"])
    result = CheckResult(allowed=False, code="ok", feature_id=feature_id, balances=balances, credit_system=system)
    if row["feature_id"] is None:
        result.code = "unknown_feature"
        return result
    if row["rate"] is None:
        result.code = "feature_not_priced"
        return result
    rate = Decimal(row["rate"])
    if row["integer_only"] and quantity != quantity.to_integral_value():
        result.credits_per_unit = exact(rate)
        result.code = "invalid_quantity"
        return result
    gate = "ok"
    if system is not None and await credit_systems.agent_paused(pool, parent, agent_id):
        gate = "agent_paused"  # a paused agent spends nothing, in any credit system
    if row["controlled"]:
        # Spend control (a paused agent, plan credits exhausted for a 'stop' agent, a limit this would exceed) and
        # the plan's rate. The verdict comes before affordability, in cf_track's order, so both give one code.
        async with pool.connection() as conn:
            controlled = await (await conn.execute(_CONTROLLED_CHECK_SQL, {
                "account": account_id, "agent": agent_id, "quantity": quantity, "feature": feature_id,
                "card": rate})).fetchone()
        if controlled is None:  # the account went away in between: as if unknown from the start
            raise CreditflowError("unknown_account", f"no account {account_id}")
        rate, gate = Decimal(controlled["rate"]), controlled["code"]
    result.credits_per_unit = exact(rate)
    spendable = row["balance_micros"] - row["held_micros"] - row["floor_micros"]
    required = usage_charge_micros(quantity, rate)
    if not implicit:
        result.credits_required = micros_to_credits(required)
    result.allowed = spendable >= required
    if gate != "ok":
        result.allowed, result.code = False, gate
    elif not result.allowed:
        result.code = "insufficient_credits"
    return result


def _hold_result(row: dict[str, Any]) -> HoldResult:
    return HoldResult(
        allowed=row["allowed"], code=row["code"], hold_id=row["hold_id"], held_amount=credits(row["amount_micros"]),
        status=row["status"], expires_at=row["expires_at"], released=credits(row["released_micros"]),
        credits_required=credits(row["required_micros"]), replayed=bool(row["replayed"]),
        balances=balances_from(row),
    )


async def create_hold(pool: AsyncConnectionPool, event: UsageEvent, ttl_seconds: int) -> HoldResult:
    """Reserve the price of ``event.value`` units (e.g. the expected call minutes)."""
    routed, system = await _routed(pool, event)
    if system is not None and await credit_systems.agent_paused(pool, event.account_id, event.agent_id):
        async with pool.connection() as conn:
            known = await (await conn.execute("SELECT 1 FROM holds WHERE account_id = %s AND idempotency_key = %s",
                                              (routed.account_id, event.idempotency_key))).fetchone()
        if known is None:  # a paused agent reserves nothing new (a retry of an earlier hold still replays)
            return HoldResult(allowed=False, code="agent_paused", credit_system=system)

    async def run() -> HoldResult:
        row = await _fetch_one(pool, "SELECT * FROM cf_hold(%s, %s, %s, %s, %s, %s, %s, %s)", (
            routed.account_id, event.feature_id, event.value, event.agent_id, ttl_seconds, event.idempotency_key,
            event.fingerprint("hold", ttl_seconds), to_jsonb(event.metadata)), TRACK_RETRY_ON)
        return _hold_result(row)

    result = await run()
    if system is None:
        return result
    if result.code == "unknown_account":
        empty = await _without_sub_account(pool, event, system)
        result = await run() if empty is None else HoldResult(
            allowed=False, code=empty.code, credits_required=empty.credits_required, balances=empty.balances)
    result.credit_system = system
    return result


async def _hold_account(pool: AsyncConnectionPool, account_id: str, hold_id: str) -> str | None:
    """The sub-account (named credit system) of ``account_id`` holding ``hold_id``, if one does."""
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT h.account_id FROM holds h JOIN accounts a ON a.id = h.account_id"
            " WHERE h.id = %s AND a.parent_account_id = %s", (hold_id, account_id))).fetchone()
    return None if row is None else row["account_id"]


async def settle_hold(pool: AsyncConnectionPool, account_id: str, hold_id: str, value: object,
                      metadata: dict[str, Any] | None = None) -> TrackResult:
    """Charge the actual quantity and release the rest of the hold, atomically (idempotent)."""
    params = (account_id, hold_id, _quantity(value), to_jsonb(metadata))
    row = await _fetch_one(pool, "SELECT * FROM cf_hold_settle(%s, %s, %s, %s)", params, TRACK_RETRY_ON)
    result = TrackResult.from_db(row)
    if result.code == "unknown_hold" and (sub := await _hold_account(pool, account_id, hold_id)) is not None:
        row = await _fetch_one(pool, "SELECT * FROM cf_hold_settle(%s, %s, %s, %s)", (sub, *params[1:]),
                               TRACK_RETRY_ON)
        result = replace(TrackResult.from_db(row), credit_system=sub.split(".", 1)[1])
    record_usage(result.allowed, result.code, result.charged_micros, result.replayed)
    return result


async def release_hold(pool: AsyncConnectionPool, account_id: str, hold_id: str) -> HoldResult:
    row = await _fetch_one(pool, "SELECT * FROM cf_hold_release(%s, %s)", (account_id, hold_id))
    result = _hold_result(row)
    if result.code == "unknown_hold" and (sub := await _hold_account(pool, account_id, hold_id)) is not None:
        result = _hold_result(await _fetch_one(pool, "SELECT * FROM cf_hold_release(%s, %s)", (sub, hold_id)))
        result.credit_system = sub.split(".", 1)[1]
    return result


async def expire_overdue_holds(pool: AsyncConnectionPool) -> Decimal:
    """Sweep overdue holds, one short transaction per account (in id order); an account that
    fails is logged and skipped so the others still expire. Returns the credits released."""
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT DISTINCT account_id FROM holds WHERE status = 'active' AND expires_at <= now()"
            " ORDER BY account_id")).fetchall()
    released = 0
    for row in rows:
        try:
            result = await _fetch_one(pool, "SELECT cf_expire_account_holds(%s) AS released", (row["account_id"],))
        except psycopg.Error:
            log.exception("could not expire the overdue holds of %s", row["account_id"])
            continue
        released += result["released"]
    return micros_to_credits(released)
