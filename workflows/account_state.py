"""The state of one ``AccountWorkflow`` run (with its dedup window), shared by the helpers the workflow delegates to.

``AccountWorkflowInput`` is what a run carries over to the next (continue-as-new); ``AccountRun`` adds what
lives only in this run (locks, the invoices it started, the recharge child in flight) and the pieces every
concern uses: publishing to the Temporal UI, telling the customer, the main loop's wake-up times. Runs inside
the workflow sandbox: no I/O, only ``workflow.*`` calls, in the same order as before the split (recorded
histories replay against it).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from creditflow.domain.notifications import Notification
    from workflows.common import publish_status
    from workflows.contract import SA_PLAN, AccountWorkflowInput, OutboxEvent
    from workflows.notify import notify

# Reading our own database: outages are transient, so retry with a capped interval until it answers.
LOAD_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                         maximum_interval=timedelta(seconds=60), maximum_attempts=0)
# Histories recorded before the plan search attribute was upserted never upserted it.
PATCH_PLAN_ATTRIBUTE = "plan-search-attribute"


class DedupWindow:
    """The last ``capacity`` dedup keys, oldest first, with a set for lookups."""

    def __init__(self, keys: Iterable[str], capacity: int) -> None:
        self.capacity = capacity
        kept = list(keys)[-capacity:]
        self._recent: deque[str] = deque(kept)
        self._seen: set[str] = set(kept)

    def __contains__(self, key: str) -> bool:
        return key in self._seen

    def __len__(self) -> int:
        return len(self._recent)

    def keys(self) -> list[str]:
        return list(self._recent)

    def remember(self, key: str) -> None:
        self._recent.append(key)
        self._seen.add(key)
        while len(self._recent) > self.capacity:
            self._seen.discard(self._recent.popleft())

    def prepend(self, older: Iterable[str]) -> None:
        """Keys known from before this run go first, then the ones this run has seen; at most ``capacity``."""
        known = [k for k in older if k not in self._seen]
        self._recent = deque([*known, *self._recent][-self.capacity:])
        self._seen = set(self._recent)


class AccountRun:
    """One run's state: the carried-over input plus what only this run knows."""

    def __init__(self, input: AccountWorkflowInput) -> None:
        self.input = input.model_copy(deep=True)
        self.dedup = DedupWindow(input.recent_dedup_keys, input.dedup_capacity)
        self.events_this_run = 0
        self.published: tuple[str, str] | None = None
        # The plan search attribute (CreditflowPlan) as last upserted ("" = none); a new run upserts it once.
        self.published_plan = ""
        self.agents_lock = asyncio.Lock()  # one agent status change at a time, in arrival order
        self.cycle_lock = asyncio.Lock()  # plan changes and renewals, one at a time
        self.invoices: list[asyncio.Task[None]] = []  # invoice children started by this run
        self.period_turned = False
        self.rearm = False  # a wake-up time changed outside the loop (a new cycle): recompute the timer
        self.recharge_in_flight: str | None = None
        self.recharge_reason: str | None = None
        self.early_events: list[OutboxEvent] = []  # arrived before a new run rebuilt its state

    async def notify_customer(self, kind: str, key: str, payload: dict[str, object]) -> None:
        """Tell the customer (once per key); a notification that cannot be sent never stops billing."""
        await notify(Notification(account_id=self.input.account_id, kind=kind,
                                  dedup_key=f"{kind}:{self.input.account_id}:{key}", payload=payload))

    # --- the main loop's work and timers --------------------------------------------------------------

    def has_work(self) -> bool:
        i = self.input
        return (i.stripe_customer_pending or i.recharge_requested or bool(i.pending_limit_events)
                or bool(i.pending_alert_events) or bool(i.pending_payment_events) or i.agents_recheck)

    def wake_if_due(self) -> None:
        """Timers that came due become work: a recharge decision, resuming agents whose pause ended."""
        now = workflow.now()
        i = self.input
        if i.recharge_wake_at is not None and now >= i.recharge_wake_at:
            i.recharge_wake_at = None
            i.recharge_requested = True
        if i.agents_wake_at is not None and now >= i.agents_wake_at:
            i.agents_wake_at = None
            i.agents_recheck = True

    def until_wake(self) -> timedelta | None:
        s = self.input.subscription
        renew_at = s.period_end if s is not None and s.status == "active" else None
        times = [t for t in (self.input.recharge_wake_at, self.input.agents_wake_at, renew_at) if t is not None]
        return None if not times else max(min(times) - workflow.now(), timedelta(milliseconds=1))

    def should_continue_as_new(self) -> bool:
        """At a period boundary (and when the server suggests it), once this run's invoices are done."""
        limit = self.input.continue_as_new_after_events
        due = workflow.info().is_continue_as_new_suggested() or self.period_turned or (
            limit is not None and self.events_this_run >= limit)
        return due and all(task.done() for task in self.invoices)

    def carry_over(self) -> AccountWorkflowInput:
        carried = self.input.model_copy(deep=True)
        carried.recent_dedup_keys = self.dedup.keys()
        carried.continued_as_new += 1
        return carried

    # --- the Temporal UI -----------------------------------------------------------------------------

    def publish(self) -> None:
        """Search attributes (filterable) and current details (readable) for the Temporal UI.

        Attributes are upserted only when they change: each upsert is a history event."""
        i = self.input
        if self.published != (i.account_id, i.status):
            publish_status(i.account_id, i.status, enabled=i.publish_search_attributes)
            self.published = (i.account_id, i.status)
        plan = i.subscription.plan_id if i.subscription is not None and i.subscription.status == "active" else ""
        if plan != self.published_plan and i.publish_search_attributes and workflow.patched(PATCH_PLAN_ATTRIBUTE):
            workflow.upsert_search_attributes([SA_PLAN.value_set(plan) if plan else SA_PLAN.value_unset()])
        self.published_plan = plan
        last = f"{i.last_event_kind} at {i.last_event_at.isoformat()}" if i.last_event_at else "none"
        workflow.set_current_details(
            f"**{i.name or 'Unnamed account'}** (`{i.account_id}`)\n\n"
            f"- status: {i.status}\n- events processed: {i.events_processed}\n- last event: {last}"
            f"\n- Stripe customer: {i.stripe_customer_id or i.stripe_customer_error or 'none'}"
            + self._recharge_details()
        )

    def _recharge_details(self) -> str:
        r = self.input.recharge
        if self.recharge_in_flight:
            return f"\n- auto-recharge: running `{self.recharge_in_flight}`"
        if r.seq == 0 and self.recharge_reason is None:
            return ""
        line = f"\n- auto-recharge: {self.recharge_reason or r.last_status}, {r.seq} attempt(s)"
        if r.consecutive_failures:
            line += f", {r.consecutive_failures} failure(s) in a row ({r.last_error})"
        if self.input.recharge_wake_at:
            line += f", next look at {self.input.recharge_wake_at.isoformat()}"
        return line
