"""Account activities: what the account workflow reads from the ledger.

The workflow is (re)started by events that may not carry the account's name or status (e.g. after an
operator terminated it), so it reads them from the ledger, the source of truth, once per workflow chain.
A new run (not a continue-as-new, which carries its state) rebuilds all of its state here
(``rebuild_account_state``): the workflow's state is a cache of the database.
"""

from __future__ import annotations

from datetime import UTC, datetime, time

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field
from temporalio import activity

from activities.billing_cycle import state_of
from activities.errors import translating_errors
from creditflow.domain.periods import period_at
from creditflow.domain.recharge import RechargePolicy, RechargeState
from creditflow.ledger import agents, auto_recharge, outbox, subscriptions
from creditflow.payments.customers import stored_customer
from workflows.contract import DEFAULT_DEDUP_CAPACITY, OUTBOX_APPLIED_LATER, OutboxEvent, SubscriptionState


class LoadAccountInput(BaseModel):
    account_id: str


class AccountSnapshot(BaseModel):
    """What the workflow shows in its details and search attributes."""

    account_id: str
    name: str
    status: str


class RebuildInput(BaseModel):
    account_id: str
    now: datetime  # the workflow's time: the UTC day whose recharge attempts count against the daily cap
    dedup_capacity: int = DEFAULT_DEDUP_CAPACITY
    run_id: str | None = None  # this run: rows the relay delivered to it are not in the rebuilt dedup window


class AccountRebuild(BaseModel):
    """Everything a new run of the account workflow needs from the database (None/empty: nothing there)."""

    account: AccountSnapshot | None = None
    subscription: SubscriptionState | None = None
    recharge: RechargeState = Field(default_factory=RechargeState)
    # Auto-recharge is on: the new run decides once at its start (a crossing may have happened meanwhile).
    recharge_enabled: bool = False
    recharge_wake_at: datetime | None = None
    agents_wake_at: datetime | None = None
    stripe_customer_id: str | None = None
    recent_dedup_keys: list[str] = Field(default_factory=list)
    # Delivered to an earlier run that ended before applying them (``outbox.applied_at`` unset): apply them again.
    unapplied: list[OutboxEvent] = Field(default_factory=list)


class AccountActivities:
    """Activities bound to the worker's database pool."""

    def __init__(self, pool: AsyncConnectionPool, policy: RechargePolicy | None = None) -> None:
        self._pool = pool
        self._policy = policy or RechargePolicy()

    @activity.defn(name="load_account")
    async def load_account(self, input: LoadAccountInput) -> AccountSnapshot | None:
        """The account's name and status, or None when the ledger has no such account."""
        async with self._pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT id, name, status FROM accounts WHERE id = %s", (input.account_id,))).fetchone()
        if row is None:
            return None
        return AccountSnapshot(account_id=row["id"], name=row["name"], status=row["status"])

    @activity.defn(name="rebuild_account_state")
    @translating_errors
    async def rebuild_account_state(self, input: RebuildInput) -> AccountRebuild:
        """The account's state as the database knows it: subscription (with its pending plan and this period's
        immediate changes), auto-recharge sequence and policy state, system-paused agents' next resume, the Stripe
        customer, the dedup keys of the last delivered outbox rows and those of them an earlier run left unapplied."""
        account = await self.load_account(LoadAccountInput(account_id=input.account_id))
        if account is None:
            return AccountRebuild()
        async with self._pool.connection() as conn:
            window = await outbox.recent_dispatched(conn, input.account_id, input.dedup_capacity, input.run_id,
                                                    OUTBOX_APPLIED_LATER)
        resume = [a.resume_at for a in await agents.system_paused(self._pool, input.account_id) if a.resume_at]
        recharge, wake, enabled = await self._recharge(input.account_id, input.now)
        return AccountRebuild(
            account=account, subscription=await self._subscription(input.account_id), recharge=recharge,
            recharge_enabled=enabled, recharge_wake_at=wake, agents_wake_at=min(resume) if resume else None,
            stripe_customer_id=await stored_customer(self._pool, input.account_id),
            recent_dedup_keys=window.seen_keys, unapplied=[
                OutboxEvent(dedup_key=r.dedup_key, kind=r.kind, payload=r.payload, created_at=r.created_at)
                for r in window.unapplied])

    async def _subscription(self, account_id: str) -> SubscriptionState | None:
        row = await subscriptions.get_subscription(self._pool, account_id)
        if row is None:
            return None
        state = state_of(row)
        # Immediate changes of this period: their count keys the next one (billing_adjustments), and the invoice
        # starts from the fee of the plan the period was granted with (its grant's metadata).
        key = period_at(row.anchor_at, row.period_index).key
        async with self._pool.connection() as conn:
            found = await (await conn.execute(
                "SELECT (SELECT max(change_seq) FROM billing_adjustments WHERE account_id = %(a)s"
                " AND period_key = %(k)s) AS changes, (SELECT metadata->>'plan_id' FROM journal"
                " WHERE account_id = %(a)s AND idempotency_key = 'sys:plan_grant:' || %(k)s) AS granted_plan",
                {"a": account_id, "k": key})).fetchone()
        assert found is not None
        if found["changes"]:
            state = state.model_copy(update={"changes": int(found["changes"]),
                                             "fee_plan_id": found["granted_plan"] or None})
        return state

    async def _recharge(self, account_id: str, now: datetime) -> tuple[RechargeState, datetime | None, bool]:
        """The recharge state mirrored in the database: sequence from the charge rows, failures from the settings."""
        day = now.astimezone(UTC).date()
        h = await auto_recharge.history(self._pool, account_id, datetime.combine(day, time(0), tzinfo=UTC))
        s = h.settings
        state = RechargeState(seq=h.last_seq, day=day if h.attempts_on_day else None, attempts_today=h.attempts_on_day)
        if s is None:
            return state, None, False
        next_at: datetime | None = None
        if s.consecutive_failures and s.last_status == "failed" and s.last_attempt_at is not None:
            next_at = s.last_attempt_at + self._policy.backoff(s.consecutive_failures)
        state = state.model_copy(update={
            "generation": s.generation, "consecutive_failures": s.consecutive_failures, "next_attempt_at": next_at,
            "last_status": s.last_status, "last_error": s.last_error})
        enabled = s.enabled and s.disabled_reason is None
        return state, next_at if enabled and next_at is not None and next_at > now else None, enabled


