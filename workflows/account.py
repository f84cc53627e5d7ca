"""``AccountWorkflow``: the entity workflow of one account (id ``account:{account_id}``).

It receives the outbox events of its account (deduplicated by key), keeps a small state for the ``state``
query, and publishes the account in the Temporal UI (search attributes and details). It creates the Stripe
customer and runs auto-recharge: a ``balance.below_threshold`` event (written by the hot path at the
crossing) asks for a decision (``creditflow.domain.recharge``); a recharge is an ``AutoRechargeWorkflow``
child ``recharge:{account_id}:{seq}``, awaited before anything else, so at most one is in flight however many
events cross the threshold. Failures back off on a durable timer, a daily cap bounds attempts, and too
many failures in a row disable auto-recharge. Later issues add the billing cycle and agent pause/resume;
each new event kind gets a method in ``_effects`` and each new piece of state a defaulted field in
``AccountWorkflowInput``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError, WorkflowAlreadyStartedError

with workflow.unsafe.imports_passed_through():
    from activities.accounts import AccountActivities, AccountRebuild, AccountSnapshot, LoadAccountInput, RebuildInput
    from activities.agents import AgentActivities, LimitReachedInput, ResumeInput, SetAgentStatusInput
    from activities.alerts import (
        BalanceAlertInput,
        DailyUsageAlertInput,
        fire_balance_alerts_from_workflow,
        send_daily_usage_alert_from_workflow,
    )
    from activities.auto_recharge import AutoRechargeActivities, RechargeAccountInput, RecordRechargeAttemptInput
    from activities.billing_cycle import (
        BillingCycleActivities,
        ChangeNowInput,
        PendingPlanInput,
        RenewInput,
        RenewResult,
        StartSubscriptionInput,
    )
    from activities.notifications import notify
    from activities.payment_events import LateCreditResult, PaymentEventActivities, PaymentEventInput
    from activities.payments import PERMANENT_CODES, EnsureStripeCustomerInput, PaymentActivities
    from creditflow.domain.money import micros_to_credits
    from creditflow.domain.notifications import Notification
    from creditflow.domain.recharge import Action, Reason, after_attempt, decide, rebase
    from creditflow.domain.topups import format_usd
    from workflows.auto_recharge import AutoRechargeWorkflow
    from workflows.common import DB_TIMEOUT, STRIPE_TIMEOUT, db_retry, error_of, publish_status
    from workflows.contract import (
        ACCOUNT_WORKFLOW,
        INVOICE_WORKFLOW,
        OUTBOX_BELOW_THRESHOLD,
        OUTBOX_DAILY_USAGE_THRESHOLD,
        OUTBOX_LIMIT_REACHED,
        OUTBOX_PAYMENT_SUCCEEDED_LATE,
        OUTBOX_RECHARGE_SUCCEEDED_LATE,
        OUTBOX_STRIPE_DISPUTE_CLOSED,
        OUTBOX_STRIPE_DISPUTED,
        OUTBOX_STRIPE_REFUNDED,
        QUERY_STATE,
        RECHARGE_SUCCEEDED,
        SA_PLAN,
        SIGNAL_OUTBOX_EVENT,
        SIGNAL_PAUSE_AGENT,
        SIGNAL_RESUME_AGENT,
        UPDATE_CHANGE_PLAN,
        UPDATE_PAUSE_AGENT,
        UPDATE_RESUME_AGENT,
        AccountState,
        AccountWorkflowInput,
        AgentCommand,
        AgentStatus,
        AutoRechargeInput,
        AutoRechargeOutcome,
        OutboxEvent,
        PlanChange,
        SubscriptionState,
        auto_recharge_workflow_id,
        invoice_workflow_id,
    )

# Reading our own database: outages are transient, so retry with a capped interval until it answers.
LOAD_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                         maximum_interval=timedelta(seconds=60), maximum_attempts=0)
# Creating the Stripe customer: the gateway already retried transient errors for seconds; here we keep
# trying for about a day on outages, never on refusals a retry cannot fix. If it still fails, the API
# creates the customer on first use (``ensure_customer`` is exactly-once either way).
STRIPE_CUSTOMER_RETRY = RetryPolicy(initial_interval=timedelta(seconds=5), backoff_coefficient=2.0,
                                    maximum_interval=timedelta(minutes=30), maximum_attempts=60,
                                    non_retryable_error_types=list(PERMANENT_CODES))
# Histories recorded before the Stripe customer step have no marker: on replay the step is skipped there.
PATCH_STRIPE_CUSTOMER = "stripe-customer"
# Billing-cycle steps that write: retried for minutes on outages, refusals (an unknown plan) at once.
CYCLE_RETRY = db_retry(["unknown_plan", "unknown_account", "validation_error"])
# Reading the recharge settings: a failure is retried by the next decision (a minute later), not forever here.
RECHARGE_LOAD_RETRY = db_retry(["unknown_account"])
RECHARGE_RELOAD_AFTER = timedelta(minutes=1)
# ``recharge_reason`` while a recharge started by an earlier run may still be charging.
RECHARGE_IN_FLIGHT = "recharge_in_flight"
# The outbox kinds written by the hot path: the balance watch, limits reached, limits saved.
BELOW_THRESHOLD = OUTBOX_BELOW_THRESHOLD
LIMIT_REACHED = OUTBOX_LIMIT_REACHED
LIMITS_CHANGED = "limits.changed"
DAILY_USAGE_THRESHOLD = OUTBOX_DAILY_USAGE_THRESHOLD
STRIPE_REFUNDED = OUTBOX_STRIPE_REFUNDED
STRIPE_DISPUTED = OUTBOX_STRIPE_DISPUTED
STRIPE_DISPUTE_CLOSED = OUTBOX_STRIPE_DISPUTE_CLOSED
RECHARGE_SUCCEEDED_LATE = OUTBOX_RECHARGE_SUCCEEDED_LATE
PAYMENT_SUCCEEDED_LATE = OUTBOX_PAYMENT_SUCCEEDED_LATE
# Histories recorded before the plan search attribute was upserted never upserted it.
PATCH_PLAN_ATTRIBUTE = "plan-search-attribute"
# Histories recorded before alerts existed crossed thresholds without sending any: on replay none are sent.
PATCH_ALERTS = "balance-alerts"
# A new run (terminated, reset, started again by the relay) rebuilds its state from the database instead of
# reading only the name; histories recorded before it read the name only.
PATCH_REBUILD_STATE = "rebuild-state-from-db"
# Agent status writes: our database, retried for minutes; refusals (a pause of a paused agent) never.
AGENT_RETRY = db_retry(["invalid_transition", "unknown_agent", "unknown_account", "validation_error"])


@workflow.defn(name=ACCOUNT_WORKFLOW)
class AccountWorkflow:
    @workflow.init
    def __init__(self, input: AccountWorkflowInput) -> None:
        # ``init`` runs before the start signal of signal-with-start is handled.
        self._input = input.model_copy(deep=True)
        keys = input.recent_dedup_keys[-input.dedup_capacity:]
        self._recent: deque[str] = deque(keys)
        self._seen: set[str] = set(keys)
        self._events_this_run = 0
        self._published: tuple[str, str] | None = None
        # The plan search attribute (CreditflowPlan) as last upserted ("" = none); a new run upserts it once.
        self._published_plan = ""
        self._effects: dict[str, Callable[[OutboxEvent], None]] = {
            "account.created": self._on_account_created,
            BELOW_THRESHOLD: self._on_below_threshold,
            LIMIT_REACHED: self._on_limit_reached,
            LIMITS_CHANGED: self._on_limits_changed,
            DAILY_USAGE_THRESHOLD: self._on_daily_usage,
            STRIPE_REFUNDED: self._on_payment_event,
            STRIPE_DISPUTED: self._on_payment_event,
            STRIPE_DISPUTE_CLOSED: self._on_payment_event,
            RECHARGE_SUCCEEDED_LATE: self._on_payment_event,
            PAYMENT_SUCCEEDED_LATE: self._on_payment_event,
        }
        self._agents_lock = asyncio.Lock()  # one agent status change at a time, in arrival order
        self._cycle_lock = asyncio.Lock()  # plan changes and renewals, one at a time
        self._invoices: list[asyncio.Task[None]] = []  # invoice children started by this run
        self._period_turned = False
        self._rearm = False  # a wake-up time changed outside the loop (a new cycle): recompute the timer
        self._recharge_in_flight: str | None = None
        self._recharge_reason: str | None = None
        self._early_events: list[OutboxEvent] = []  # arrived before a new run rebuilt its state

    @workflow.run
    async def run(self, input: AccountWorkflowInput) -> None:
        if not self._input.loaded:
            if workflow.patched(PATCH_REBUILD_STATE):
                await self._rebuild_state()
            else:
                snapshot: AccountSnapshot | None = await workflow.execute_activity_method(
                    AccountActivities.load_account,
                    LoadAccountInput(account_id=input.account_id),
                    start_to_close_timeout=timedelta(seconds=10),
                    retry_policy=LOAD_RETRY,
                    summary="Read the account from the ledger",
                )
                if snapshot is not None:
                    self._input.name = snapshot.name
                    self._input.status = snapshot.status
            self._input.loaded = True
            early, self._early_events = self._early_events, []
            for event in early:  # left unapplied by an earlier run, or delivered while the state was being rebuilt
                self.outbox_event(event)
        self._publish()
        while True:
            self._wake_if_due()
            if self._input.stripe_customer_pending:
                await self._ensure_stripe_customer()
            elif self._input.pending_payment_events:
                await self._apply_payment_event(self._input.pending_payment_events[0])
                self._input.pending_payment_events.pop(0)
            elif self._input.pending_alert_events:
                await self._send_alert(self._input.pending_alert_events[0])
                self._input.pending_alert_events.pop(0)
            elif self._input.pending_limit_events:
                await self._apply_limit(self._input.pending_limit_events[0])
                self._input.pending_limit_events.pop(0)
            elif self._input.agents_recheck:
                await self._resume_agents("limits")
            elif self._renewal_due():
                await self._renew()
            elif self._input.recharge_requested:
                await self._auto_recharge()
            elif self._should_continue_as_new():
                break
            else:
                self._rearm = False
                with contextlib.suppress(TimeoutError):  # a timer came due
                    await workflow.wait_condition(
                        lambda: self._has_work() or self._rearm or self._should_continue_as_new(),
                        timeout=self._until_wake())
        # Let running handlers finish so no signal is half-applied when this run closes.
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(self._carry_over())

    async def _rebuild_state(self) -> None:
        """A new run (not a continue-as-new): the database is the source of truth, this run's state a cache of it.

        Reload the subscription (renewals, invoices and expiry go on; subscribing again is a plan change), the
        auto-recharge sequence and policy state (a sequence number is never reused), agents' next resume, the Stripe
        customer and the dedup window. Events that arrived with the start are kept (they are newer)."""
        i = self._input
        got: AccountRebuild = await workflow.execute_activity_method(
            AccountActivities.rebuild_account_state,
            RebuildInput(account_id=i.account_id, now=workflow.now(), dedup_capacity=i.dedup_capacity,
                         run_id=workflow.info().run_id),
            start_to_close_timeout=timedelta(seconds=30), retry_policy=LOAD_RETRY,
            summary="Rebuild the account's state from the ledger")
        if got.account is not None:
            i.name, i.status = got.account.name, got.account.status
        if i.subscription is None:
            i.subscription = got.subscription
        i.recharge = got.recharge.model_copy(update={"seq": max(got.recharge.seq, i.recharge.seq)})
        i.recharge_wake_at = i.recharge_wake_at or got.recharge_wake_at
        i.recharge_requested = i.recharge_requested or got.recharge_enabled
        i.agents_wake_at = i.agents_wake_at or got.agents_wake_at
        i.stripe_customer_id = i.stripe_customer_id or got.stripe_customer_id
        if i.stripe_customer_id is not None:
            i.stripe_customer_pending = False
        # Older keys first, then the ones this run has seen already; at most ``dedup_capacity``.
        known = [k for k in got.recent_dedup_keys if k not in self._seen]
        self._recent = deque([*known, *self._recent][-i.dedup_capacity:])
        self._seen = set(self._recent)
        # Accepted by an earlier run that ended before applying them: applied now, before newer events.
        self._early_events[:0] = [e for e in got.unapplied if e.dedup_key not in self._seen]

    @workflow.signal(name=SIGNAL_OUTBOX_EVENT)
    def outbox_event(self, event: OutboxEvent) -> None:
        """Apply an outbox event once: a dedup key seen before is counted and ignored."""
        if not self._input.loaded and workflow.patched(PATCH_REBUILD_STATE):
            self._early_events.append(event)  # applied once the dedup window is rebuilt from the database
            return
        if event.dedup_key in self._seen:
            self._input.duplicates_ignored += 1
            return
        self._remember(event.dedup_key)
        effect = self._effects.get(event.kind)
        if effect is not None:
            effect(event)
        self._input.events_processed += 1
        self._input.last_event_kind = event.kind
        self._input.last_event_at = event.created_at
        self._events_this_run += 1
        self._publish()

    @workflow.query(name=QUERY_STATE)
    def state(self) -> AccountState:
        i = self._input
        return AccountState(
            account_id=i.account_id, name=i.name, status=i.status, events_processed=i.events_processed,
            duplicates_ignored=i.duplicates_ignored, last_event_kind=i.last_event_kind,
            last_event_at=i.last_event_at, recent_dedup_keys=len(self._recent),
            continued_as_new=i.continued_as_new, stripe_customer_id=i.stripe_customer_id, recharge=i.recharge,
            recharge_in_flight=self._recharge_in_flight, recharge_reason=self._recharge_reason,
            recharge_wake_at=i.recharge_wake_at, subscription=i.subscription,
        )

    @workflow.update(name=UPDATE_CHANGE_PLAN)
    async def change_plan(self, change: PlanChange) -> SubscriptionState:
        """Subscribe (starts now, with the plan's credits), or change plan / cancel at the next renewal."""
        if workflow.patched(PATCH_REBUILD_STATE):  # a new run first learns whether there is a subscription
            await workflow.wait_condition(lambda: self._input.loaded)
        async with self._cycle_lock:
            i = self._input
            if i.subscription is None or i.subscription.status != "active":
                if change.plan_id is None:
                    raise ApplicationError("the account has no subscription", type="no_subscription",
                                           non_retryable=True)
                now = workflow.now()
                i.subscription = await self._cycle_step(
                    BillingCycleActivities.start_subscription,
                    StartSubscriptionInput(account_id=i.account_id, plan_id=change.plan_id,
                                           anchor=change.anchor or now, now=now),
                    f"Subscribe to {change.plan_id}")
            elif change.effective == "immediately":
                if change.plan_id is None or change.plan_id == i.subscription.plan_id:
                    raise ApplicationError("an immediate change needs another plan (cancelling takes effect at the "
                                           "next renewal)", type="validation_error", non_retryable=True)
                i.subscription = await self._cycle_step(
                    BillingCycleActivities.change_plan_now,
                    ChangeNowInput(account_id=i.account_id, subscription=i.subscription,
                                   new_plan_id=change.plan_id, at=workflow.now()),
                    f"Change plan now: {i.subscription.plan_id} -> {change.plan_id} (prorated)")
            else:
                pending = "" if change.plan_id is None else change.plan_id
                state = i.subscription.model_copy(update={
                    "pending_plan_id": None if pending == i.subscription.plan_id else pending})
                i.subscription = await self._cycle_step(
                    BillingCycleActivities.set_pending_plan, PendingPlanInput(account_id=i.account_id,
                                                                              subscription=state),
                    f"From the next renewal: {pending or 'no plan'}")
            self._rearm = True
            self._publish()
            return i.subscription

    @change_plan.validator
    def _valid_plan_change(self, change: PlanChange) -> None:
        if change.effective not in ("next_renewal", "immediately"):
            raise ApplicationError("effective is next_renewal or immediately", type="validation_error",
                                   non_retryable=True)

    @workflow.signal(name=SIGNAL_PAUSE_AGENT)
    async def pause_agent_signal(self, command: AgentCommand) -> None:
        """Pause an agent (fire and forget: a refused transition is only logged)."""
        await self._agent_command(command, paused=True, raise_refusal=False)

    @workflow.signal(name=SIGNAL_RESUME_AGENT)
    async def resume_agent_signal(self, command: AgentCommand) -> None:
        await self._agent_command(command, paused=False, raise_refusal=False)

    @workflow.update(name=UPDATE_PAUSE_AGENT)
    async def pause_agent(self, command: AgentCommand) -> AgentStatus:
        """Pause an agent and return its new status; ``invalid_transition`` if it is already paused."""
        status = await self._agent_command(command, paused=True, raise_refusal=True)
        assert status is not None
        return status

    @workflow.update(name=UPDATE_RESUME_AGENT)
    async def resume_agent(self, command: AgentCommand) -> AgentStatus:
        """Resume an agent and return its new status; ``invalid_transition`` if it is not paused."""
        status = await self._agent_command(command, paused=False, raise_refusal=True)
        assert status is not None
        return status

    # --- event effects -------------------------------------------------------------------------------

    def _on_account_created(self, event: OutboxEvent) -> None:
        name = event.payload.get("name")
        if self._input.name is None and isinstance(name, str):
            self._input.name = name
        if self._input.stripe_customer_id is None:
            self._input.stripe_customer_pending = True

    async def _ensure_stripe_customer(self) -> None:
        """Create the account's Stripe customer (once; the activity is idempotent)."""
        self._input.stripe_customer_pending = False
        if not workflow.patched(PATCH_STRIPE_CUSTOMER):
            return  # replaying a history from before this step: it did not run there
        try:
            result = await workflow.execute_activity_method(
                PaymentActivities.ensure_stripe_customer,
                EnsureStripeCustomerInput(account_id=self._input.account_id),
                start_to_close_timeout=timedelta(minutes=3),
                retry_policy=STRIPE_CUSTOMER_RETRY,
                summary="Create the Stripe customer",
            )
        except ActivityError as err:
            cause = err.cause
            code = cause.type if isinstance(cause, ApplicationError) and cause.type else type(cause).__name__
            workflow.logger.warning("Stripe customer not created for %s: %s", self._input.account_id, code)
            self._input.stripe_customer_error = code
        else:
            self._input.stripe_customer_id = result.customer_id
            self._input.stripe_customer_error = None
        self._publish()

    async def _cycle_step(self, method: Callable[..., Any], arg: Any, summary: str) -> SubscriptionState:
        """Run a cycle activity; a refusal (unknown plan) becomes the update's typed error."""
        try:
            return await workflow.execute_activity_method(method, arg, start_to_close_timeout=DB_TIMEOUT,
                                                          retry_policy=CYCLE_RETRY, summary=summary)
        except ActivityError as err:
            error = error_of(err)
            raise ApplicationError(error.message, type=error.type, non_retryable=True) from None

    def _renewal_due(self) -> bool:
        s = self._input.subscription
        return s is not None and s.status == "active" and workflow.now() >= s.period_end

    async def _renew(self) -> None:
        """Close the period and open the next (credits expired and granted once), then start its invoice."""
        async with self._cycle_lock:
            i = self._input
            s = i.subscription
            assert s is not None
            try:
                result = await workflow.execute_activity_method(
                    BillingCycleActivities.renew_subscription, RenewInput(account_id=i.account_id, subscription=s),
                    start_to_close_timeout=DB_TIMEOUT, retry_policy=LOAD_RETRY,
                    summary=f"Renew {s.plan_id}: close {s.period_start.date()} - {s.period_end.date()}")
            except ActivityError as err:  # a refusal (e.g. the plan left the catalog): park the cycle, keep the run
                error = error_of(err)
                workflow.logger.error("renewal of %s refused: %s (%s)", i.account_id, error.message, error.type)
                i.subscription = s.model_copy(update={"status": f"renewal_failed: {error.type}"})
                self._publish()
                return
            i.subscription = result.subscription or s.model_copy(update={"status": "canceled",
                                                                          "pending_plan_id": None})
            result.invoice.publish_search_attributes = i.publish_search_attributes
            if i.simulation:
                result.invoice.charge = result.invoice.send_email = False
            invoice_id = invoice_workflow_id(i.account_id, result.invoice.period_key or "")
            self._invoices.append(asyncio.create_task(self._invoice(invoice_id, result)))
            self._period_turned = True
            self._publish()

    async def _invoice(self, workflow_id: str, result: RenewResult) -> None:
        """The closed period's invoice, as a child (it outlives this run if it must: abandon, not terminate)."""
        try:
            await workflow.execute_child_workflow(
                INVOICE_WORKFLOW, result.invoice, id=workflow_id,
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                static_summary=f"Invoice {result.invoice.period_key}")
        except ChildWorkflowError as err:
            workflow.logger.error("invoice %s failed: %s", workflow_id, err.cause or err)
        except WorkflowAlreadyStartedError:
            workflow.logger.info("invoice %s was already started", workflow_id)

    def _on_limit_reached(self, event: OutboxEvent) -> None:
        """A limit was reached on the hot path: notify, and with action ``pause`` pause agents (main loop)."""
        self._input.pending_limit_events.append(event)

    def _on_limits_changed(self, event: OutboxEvent) -> None:
        """Limits were saved: agents the system paused for a limit that no longer holds are resumed."""
        self._input.agents_recheck = True

    async def _agent_command(self, command: AgentCommand, *, paused: bool, raise_refusal: bool) -> AgentStatus | None:
        """The single writer of agent status: record it (audit trail included), then tell the customer."""
        async with self._agents_lock:
            try:
                status = await workflow.execute_activity_method(
                    AgentActivities.set_agent_status,
                    SetAgentStatusInput(account_id=self._input.account_id, agent_id=command.agent_id, paused=paused,
                                        actor=command.actor, reason=command.reason),
                    start_to_close_timeout=DB_TIMEOUT, retry_policy=AGENT_RETRY,
                    summary=f"{'Pause' if paused else 'Resume'} agent {command.agent_id} ({command.actor})")
            except ActivityError as err:
                error = error_of(err)
                workflow.logger.warning("%s of agent %s refused: %s", "pause" if paused else "resume",
                                        command.agent_id, error.message)
                if raise_refusal:
                    raise ApplicationError(error.message, *error.details, type=error.type,
                                           non_retryable=True) from None
                return None
            await self._notify_agent(status)
            return status

    async def _notify_agent(self, status: AgentStatus) -> None:
        kind = "agent.paused" if status.status == "paused" else "agent.resumed"
        await notify(Notification(
            account_id=self._input.account_id, kind=kind,
            dedup_key=f"{kind}:{self._input.account_id}:{status.agent_id}:{status.event_id}",
            payload={"agent_id": status.agent_id, "agent_name": status.name, "paused_by": status.paused_by,
                     "reason": status.reason, "resume_at": status.resume_at.isoformat() if status.resume_at else None,
                     "status": status.status}),
            summary=f"Tell the customer: agent {status.agent_id} {status.status}")

    async def _apply_limit(self, event: OutboxEvent) -> None:
        """Notify that a limit was reached (once per event) and, for action ``pause``, pause its agents."""
        payload = event.payload
        pause = payload.get("action") == "pause"
        await notify(Notification(account_id=self._input.account_id, kind=LIMIT_REACHED,
                                  dedup_key=f"notify:{event.dedup_key}", payload=dict(payload),
                                  outbox_key=None if pause else event.dedup_key),
                     summary=f"Tell the customer: {payload.get('scope')} limit reached")
        if not pause:
            return
        async with self._agents_lock:
            try:
                result = await workflow.execute_activity_method(
                    AgentActivities.pause_for_limit,
                    LimitReachedInput(account_id=self._input.account_id, scope=str(payload.get("scope")),
                                      agent_id=payload.get("agent_id"), now=workflow.now(),
                                      period=payload.get("period"), dedup_key=event.dedup_key),
                    start_to_close_timeout=DB_TIMEOUT, retry_policy=LOAD_RETRY,
                    summary=f"Pause agents: {payload.get('scope')} limit reached")
            except ActivityError as err:
                workflow.logger.error("limit event %s not applied: %s", event.dedup_key, error_of(err).message)
                return
            for status in result.changes:
                await self._notify_agent(status)
            self._input.agents_wake_at = result.next_resume_at
        self._publish()

    async def _resume_agents(self, why: str) -> None:
        """Resume agents the system paused: their period is over (``due``) or their limit was lifted."""
        self._input.agents_recheck = False
        async with self._agents_lock:
            try:
                result = await workflow.execute_activity_method(
                    AgentActivities.resume_system_paused,
                    ResumeInput(account_id=self._input.account_id, now=workflow.now(), why=why),
                    start_to_close_timeout=DB_TIMEOUT, retry_policy=LOAD_RETRY,
                    summary="Resume agents paused for a limit" + (" (new period)" if why == "due"
                                                                  else " (limits changed)"))
            except ActivityError as err:
                workflow.logger.error("agents of %s not resumed: %s", self._input.account_id, error_of(err).message)
                return
            for status in result.changes:
                await self._notify_agent(status)
            self._input.agents_wake_at = result.next_resume_at
        self._publish()

    def _on_below_threshold(self, event: OutboxEvent) -> None:
        """The available balance crossed a watched threshold: low-balance alerts for it (if any), and a
        decision about a recharge (one in flight at most)."""
        self._input.pending_alert_events.append(event)
        self._input.recharge_requested = True

    def _on_payment_event(self, event: OutboxEvent) -> None:
        self._input.pending_payment_events.append(event)

    async def _apply_payment_event(self, event: OutboxEvent) -> None:
        """A refund made on Stripe or a dispute: take back the credits that payment bought, then tell the customer
        (a dispute) — once per refund or dispute id, whatever is redelivered."""
        if event.kind in (RECHARGE_SUCCEEDED_LATE, PAYMENT_SUCCEEDED_LATE):
            await self._credit_late_payment(event)
            return
        try:
            result = await workflow.execute_activity_method(
                PaymentEventActivities.apply_payment_event,
                PaymentEventInput(account_id=self._input.account_id, kind=event.kind, payload=event.payload,
                                  dedup_key=event.dedup_key),
                start_to_close_timeout=DB_TIMEOUT, retry_policy=LOAD_RETRY,
                summary=f"Take back credits: {event.kind.removeprefix('stripe.')}")
        except ActivityError as err:  # kept with its error in payment_event_failures, re-drivable
            workflow.logger.error("%s not applied: %s", event.dedup_key, error_of(err).message)
            return
        if event.kind == STRIPE_DISPUTED and result.applied:
            taken = result.applied[0]
            await self._notify("payment.disputed", taken.stripe_id, {
                "payment_intent_id": result.payment_intent_id, "dispute_id": taken.stripe_id,
                "amount_cents": taken.amount_cents, "credits_taken_micros": taken.taken_micros,
                "reason": event.payload.get("reason")})

    async def _credit_late_payment(self, event: OutboxEvent) -> None:
        """A payment that succeeded after its workflow recorded failure or gave up (top-up, auto-recharge, invoice):
        credit it or settle its invoice (checked with Stripe, once), then tell the customer as the normal path would."""
        pi = event.payload.get("payment_intent_id")
        recharge = event.kind == RECHARGE_SUCCEEDED_LATE  # rows written when only auto-recharges took this path
        try:
            late: LateCreditResult = await workflow.execute_activity_method(
                PaymentEventActivities.credit_late_recharge if recharge else PaymentEventActivities.credit_late_payment,
                PaymentEventInput(account_id=self._input.account_id, kind=event.kind, payload=event.payload,
                                  dedup_key=event.dedup_key),
                start_to_close_timeout=STRIPE_TIMEOUT, retry_policy=LOAD_RETRY,
                summary=f"Credit the late auto-recharge {pi}" if recharge else f"Settle the late payment {pi}")
        except ActivityError as err:
            workflow.logger.error("%s not applied: %s", event.dedup_key, error_of(err).message)
            return
        if not late.credited:
            return
        if late.kind == "auto_recharge":
            await self._notify("auto_recharge.succeeded", f"late:{late.charge_id}", {
                "charge_id": late.charge_id, "payment_intent_id": pi,
                "transaction_id": late.transaction_id, "credits": late.credits, "late": True})
        elif late.kind == "topup":  # the receipt TopUpWorkflow would have sent (same key: never two)
            await notify(Notification(
                account_id=self._input.account_id, kind="receipt", dedup_key=f"receipt:{late.charge_id}",
                payload={"charge_id": late.charge_id, "request_id": late.request_id, "payment_intent_id": pi,
                         "transaction_id": late.transaction_id, "amount_cents": late.amount_cents,
                         "amount": format_usd(late.amount_cents), "credits": late.credits, "late": True}),
                summary=f"Send the receipt ({format_usd(late.amount_cents)})")

    def _on_daily_usage(self, event: OutboxEvent) -> None:
        self._input.pending_alert_events.append(event)

    async def _send_alert(self, event: OutboxEvent) -> None:
        """Send the alerts an event calls for, once per channel (keyed by the event); never blocks billing."""
        if not workflow.patched(PATCH_ALERTS):
            return
        if event.kind == DAILY_USAGE_THRESHOLD:
            await send_daily_usage_alert_from_workflow(
                DailyUsageAlertInput(account_id=self._input.account_id, dedup_key=event.dedup_key, **event.payload))
        else:
            await fire_balance_alerts_from_workflow(
                BalanceAlertInput(account_id=self._input.account_id, dedup_key=event.dedup_key, **event.payload))

    async def _auto_recharge(self) -> None:
        """Decide, and if due run one ``AutoRechargeWorkflow`` to its end; record and report the outcome."""
        i = self._input
        i.recharge_requested = False
        i.recharge_wake_at = None
        try:
            plan = await workflow.execute_activity_method(
                AutoRechargeActivities.load_auto_recharge, RechargeAccountInput(account_id=i.account_id),
                start_to_close_timeout=DB_TIMEOUT, retry_policy=RECHARGE_LOAD_RETRY,
                summary="Read the auto-recharge settings and the balance")
        except ActivityError as err:
            workflow.logger.warning("auto-recharge settings of %s unreadable: %s", i.account_id,
                                    error_of(err).message)
            i.recharge_wake_at = workflow.now() + RECHARGE_RELOAD_AFTER
            return
        now = workflow.now()
        state = rebase(i.recharge, plan.config.generation) if plan.config is not None else i.recharge
        decision = decide(plan.config, state, plan.available_micros, plan.policy, now)
        i.recharge = state
        self._recharge_reason = decision.reason.value
        if decision.action == Action.WAIT:
            i.recharge_wake_at = decision.wake_at
            if decision.reason == Reason.DAILY_CAP_REACHED and state.cap_notified_day != now.date():
                i.recharge = state.model_copy(update={"cap_notified_day": now.date()})
                await self._notify("auto_recharge.daily_cap_reached", f"{now.date().isoformat()}", {
                    "max_per_day": plan.policy.max_per_day, "next_attempt_at": str(decision.wake_at)})
        if decision.action == Action.CHARGE and plan.in_flight_seq is not None:
            # Started by an earlier run (terminated or reset while its child ran) and maybe still charging: no second
            # recharge meanwhile; look again shortly (the row is final, or abandoned, within minutes).
            i.recharge_wake_at = now + RECHARGE_RELOAD_AFTER
            self._recharge_reason = RECHARGE_IN_FLIGHT
            self._publish()
            return
        if decision.action != Action.CHARGE or plan.config is None:
            self._publish()
            return
        config = plan.config
        seq = max(state.seq, plan.last_seq) + 1  # never a number whose charge row exists (a reset run's is stale)
        i.recharge = state.model_copy(update={"seq": seq})
        child_id = auto_recharge_workflow_id(i.account_id, seq)
        self._recharge_in_flight = child_id
        self._publish()
        try:
            outcome: AutoRechargeOutcome = await workflow.execute_child_workflow(
                AutoRechargeWorkflow.run,
                AutoRechargeInput(account_id=i.account_id, seq=seq, credits=config.amount_credits,
                                  amount_cents=config.amount_cents, payment_method_id=config.payment_method_id,
                                  threshold_micros=config.threshold_micros, available_micros=plan.available_micros,
                                  publish_search_attributes=i.publish_search_attributes),
                id=child_id, parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                static_summary=f"Auto-recharge #{seq}: {format_usd(config.amount_cents)}")
        except ChildWorkflowError as err:
            outcome = AutoRechargeOutcome(status="failed", account_id=i.account_id, seq=seq,
                                          credits=config.amount_credits, amount_cents=config.amount_cents,
                                          error_code="recharge_workflow_failed", error_message=str(err.cause or err))
        self._recharge_in_flight = None
        succeeded = outcome.status == RECHARGE_SUCCEEDED
        i.recharge, disable = after_attempt(i.recharge, succeeded=succeeded, error=outcome.error_code,
                                            policy=plan.policy, now=workflow.now())
        if not succeeded and not disable:
            i.recharge_wake_at = i.recharge.next_attempt_at
            self._recharge_reason = Reason.BACKING_OFF.value
        current = await self._record_recharge(config.generation, outcome, "too_many_failures" if disable else None)
        if not succeeded:
            payload = {"seq": seq, "workflow_id": child_id, "error_code": outcome.error_code,
                       "error_message": outcome.error_message, "decline_code": outcome.decline_code,
                       "amount": format_usd(config.amount_cents), "credits": config.amount_credits,
                       "consecutive_failures": i.recharge.consecutive_failures,
                       "threshold": str(micros_to_credits(config.threshold_micros)),
                       "next_attempt_at": str(i.recharge.next_attempt_at) if not disable else None}
            await self._notify("auto_recharge.failed", f"{seq}", payload)
            if disable and current:
                self._recharge_reason = Reason.DISABLED.value
                await self._notify("auto_recharge.disabled", f"{seq}", {
                    **payload, "reason": "too_many_failures",
                    "max_consecutive_failures": plan.policy.max_consecutive_failures})
        self._publish()

    async def _record_recharge(self, generation: int, outcome: AutoRechargeOutcome,
                               disable_reason: str | None) -> bool:
        """Mirror the attempt in the database (and disable there); False if the settings changed meanwhile."""
        try:
            return await workflow.execute_activity_method(
                AutoRechargeActivities.record_auto_recharge_attempt,
                RecordRechargeAttemptInput(account_id=self._input.account_id, generation=generation,
                                           status=outcome.status, error=outcome.error_code,
                                           consecutive_failures=self._input.recharge.consecutive_failures,
                                           attempted_at=workflow.now(), disable_reason=disable_reason,
                                           seq=outcome.seq, charge_id=outcome.charge_id),
                start_to_close_timeout=DB_TIMEOUT, retry_policy=LOAD_RETRY,
                summary="Disable auto-recharge" if disable_reason else f"Record auto-recharge {outcome.status}")
        except ActivityError as err:  # unknown account: nothing to mirror
            workflow.logger.warning("auto-recharge attempt not recorded: %s", error_of(err).message)
            return False

    async def _notify(self, kind: str, key: str, payload: dict[str, object]) -> None:
        """Tell the customer (once per key); a notification that cannot be sent never stops billing."""
        await notify(Notification(account_id=self._input.account_id, kind=kind,
                                  dedup_key=f"{kind}:{self._input.account_id}:{key}", payload=payload))

    def _has_work(self) -> bool:
        i = self._input
        return (i.stripe_customer_pending or i.recharge_requested or bool(i.pending_limit_events)
                or bool(i.pending_alert_events) or bool(i.pending_payment_events) or i.agents_recheck)

    def _wake_if_due(self) -> None:
        """Timers that came due become work: a recharge decision, resuming agents whose pause ended."""
        now = workflow.now()
        i = self._input
        if i.recharge_wake_at is not None and now >= i.recharge_wake_at:
            i.recharge_wake_at = None
            i.recharge_requested = True
        if i.agents_wake_at is not None and now >= i.agents_wake_at:
            i.agents_wake_at = None
            i.agents_recheck = True

    def _until_wake(self) -> timedelta | None:
        s = self._input.subscription
        renew_at = s.period_end if s is not None and s.status == "active" else None
        times = [t for t in (self._input.recharge_wake_at, self._input.agents_wake_at, renew_at) if t is not None]
        return None if not times else max(min(times) - workflow.now(), timedelta(milliseconds=1))

    # --- helpers -------------------------------------------------------------------------------------

    def _remember(self, key: str) -> None:
        self._recent.append(key)
        self._seen.add(key)
        while len(self._recent) > self._input.dedup_capacity:
            self._seen.discard(self._recent.popleft())

    def _publish(self) -> None:
        """Search attributes (filterable) and current details (readable) for the Temporal UI.

        Attributes are upserted only when they change: each upsert is a history event."""
        i = self._input
        if self._published != (i.account_id, i.status):
            publish_status(i.account_id, i.status, enabled=i.publish_search_attributes)
            self._published = (i.account_id, i.status)
        plan = i.subscription.plan_id if i.subscription is not None and i.subscription.status == "active" else ""
        if plan != self._published_plan and i.publish_search_attributes and workflow.patched(PATCH_PLAN_ATTRIBUTE):
            workflow.upsert_search_attributes([SA_PLAN.value_set(plan) if plan else SA_PLAN.value_unset()])
        self._published_plan = plan
        last = f"{i.last_event_kind} at {i.last_event_at.isoformat()}" if i.last_event_at else "none"
        workflow.set_current_details(
            f"**{i.name or 'Unnamed account'}** (`{i.account_id}`)\n\n"
            f"- status: {i.status}\n- events processed: {i.events_processed}\n- last event: {last}"
            f"\n- Stripe customer: {i.stripe_customer_id or i.stripe_customer_error or 'none'}"
            + self._recharge_details()
        )

    def _recharge_details(self) -> str:
        r = self._input.recharge
        if self._recharge_in_flight:
            return f"\n- auto-recharge: running `{self._recharge_in_flight}`"
        if r.seq == 0 and self._recharge_reason is None:
            return ""
        line = f"\n- auto-recharge: {self._recharge_reason or r.last_status}, {r.seq} attempt(s)"
        if r.consecutive_failures:
            line += f", {r.consecutive_failures} failure(s) in a row ({r.last_error})"
        if self._input.recharge_wake_at:
            line += f", next look at {self._input.recharge_wake_at.isoformat()}"
        return line

    def _should_continue_as_new(self) -> bool:
        """At a period boundary (and when the server suggests it), once this run's invoices are done."""
        limit = self._input.continue_as_new_after_events
        due = workflow.info().is_continue_as_new_suggested() or self._period_turned or (
            limit is not None and self._events_this_run >= limit)
        return due and all(task.done() for task in self._invoices)

    def _carry_over(self) -> AccountWorkflowInput:
        carried = self._input.model_copy(deep=True)
        carried.recent_dedup_keys = list(self._recent)
        carried.continued_as_new += 1
        return carried

