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

import contextlib
from collections import deque
from collections.abc import Callable
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from activities.accounts import AccountActivities, AccountSnapshot, LoadAccountInput
    from activities.auto_recharge import AutoRechargeActivities, RechargeAccountInput, RecordRechargeAttemptInput
    from activities.notifications import NotificationActivities
    from activities.payments import PERMANENT_CODES, EnsureStripeCustomerInput, PaymentActivities
    from creditflow.domain.money import micros_to_credits
    from creditflow.domain.recharge import Action, Reason, after_attempt, decide, rebase
    from creditflow.domain.topups import format_usd
    from creditflow.notify.log import Notification
    from workflows.auto_recharge import AutoRechargeWorkflow
    from workflows.common import DB_TIMEOUT, NOTIFY_RETRY, db_retry, error_of
    from workflows.contract import (
        ACCOUNT_WORKFLOW,
        QUERY_STATE,
        RECHARGE_SUCCEEDED,
        SA_ACCOUNT_ID,
        SA_STATUS,
        SIGNAL_OUTBOX_EVENT,
        AccountState,
        AccountWorkflowInput,
        AutoRechargeInput,
        AutoRechargeOutcome,
        OutboxEvent,
        auto_recharge_workflow_id,
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
# Reading the recharge settings: a failure is retried by the next decision (a minute later), not forever here.
RECHARGE_LOAD_RETRY = db_retry(["unknown_account"])
RECHARGE_RELOAD_AFTER = timedelta(minutes=1)
# The outbox kind written by the balance watch on the hot path.
BELOW_THRESHOLD = "balance.below_threshold"


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
        self._effects: dict[str, Callable[[OutboxEvent], None]] = {
            "account.created": self._on_account_created,
            BELOW_THRESHOLD: self._on_below_threshold,
        }
        self._recharge_in_flight: str | None = None
        self._recharge_reason: str | None = None

    @workflow.run
    async def run(self, input: AccountWorkflowInput) -> None:
        if not self._input.loaded:
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
        self._publish()
        while True:
            self._wake_if_due()
            if self._input.stripe_customer_pending:
                await self._ensure_stripe_customer()
            elif self._input.recharge_requested:
                await self._auto_recharge()
            elif self._should_continue_as_new():
                break
            else:
                with contextlib.suppress(TimeoutError):  # a recharge timer came due
                    await workflow.wait_condition(
                        lambda: self._input.stripe_customer_pending or self._input.recharge_requested
                        or self._should_continue_as_new(), timeout=self._until_wake())
        # Let running handlers finish so no signal is half-applied when this run closes.
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(self._carry_over())

    @workflow.signal(name=SIGNAL_OUTBOX_EVENT)
    def outbox_event(self, event: OutboxEvent) -> None:
        """Apply an outbox event once: a dedup key seen before is counted and ignored."""
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
            recharge_wake_at=i.recharge_wake_at,
        )

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

    def _on_below_threshold(self, event: OutboxEvent) -> None:
        """The available balance crossed a watched threshold: decide about a recharge (once in flight)."""
        self._input.recharge_requested = True

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
        if decision.action != Action.CHARGE or plan.config is None:
            self._publish()
            return
        config = plan.config
        seq = state.seq + 1
        i.recharge = state.model_copy(update={"seq": seq})
        child_id = auto_recharge_workflow_id(i.account_id, seq)
        self._recharge_in_flight = child_id
        self._publish()
        try:
            outcome: AutoRechargeOutcome = await workflow.execute_child_workflow(
                AutoRechargeWorkflow.run,
                AutoRechargeInput(account_id=i.account_id, seq=seq, credits=config.amount_credits,
                                  amount_cents=config.amount_cents, payment_method_id=config.payment_method_id,
                                  threshold_micros=config.threshold_micros, available_micros=plan.available_micros),
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
                                           attempted_at=workflow.now(), disable_reason=disable_reason),
                start_to_close_timeout=DB_TIMEOUT, retry_policy=LOAD_RETRY,
                summary="Disable auto-recharge" if disable_reason else f"Record auto-recharge {outcome.status}")
        except ActivityError as err:  # unknown account: nothing to mirror
            workflow.logger.warning("auto-recharge attempt not recorded: %s", error_of(err).message)
            return False

    async def _notify(self, kind: str, key: str, payload: dict[str, object]) -> None:
        """Tell the customer (once per key); a notification that cannot be sent never stops billing."""
        note = Notification(account_id=self._input.account_id, kind=kind,
                            dedup_key=f"{kind}:{self._input.account_id}:{key}", payload=payload)
        try:
            await workflow.execute_activity_method(
                NotificationActivities.send_notification, note, start_to_close_timeout=DB_TIMEOUT,
                retry_policy=NOTIFY_RETRY, summary=f"Notify {kind}")
        except ActivityError as err:
            workflow.logger.error("%s not sent for %s: %s", kind, self._input.account_id, error_of(err).message)

    def _wake_if_due(self) -> None:
        at = self._input.recharge_wake_at
        if at is not None and workflow.now() >= at:
            self._input.recharge_wake_at = None
            self._input.recharge_requested = True

    def _until_wake(self) -> timedelta | None:
        at = self._input.recharge_wake_at
        return None if at is None else max(at - workflow.now(), timedelta(milliseconds=1))

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
            workflow.upsert_search_attributes([SA_ACCOUNT_ID.value_set(i.account_id),
                                               SA_STATUS.value_set(i.status)])
            self._published = (i.account_id, i.status)
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
        limit = self._input.continue_as_new_after_events
        return workflow.info().is_continue_as_new_suggested() or (
            limit is not None and self._events_this_run >= limit)

    def _carry_over(self) -> AccountWorkflowInput:
        carried = self._input.model_copy(deep=True)
        carried.recent_dedup_keys = list(self._recent)
        carried.continued_as_new += 1
        return carried

