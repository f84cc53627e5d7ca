"""``AccountWorkflow``: the entity workflow of one account (id ``account:{account_id}``).

Today it receives the outbox events of its account (deduplicated by key), keeps a small state for the
``state`` query, and publishes the account in the Temporal UI (search attributes and details). Later
issues add the billing cycle, agent pause/resume and auto-recharge; each new event kind gets a method in
``_EFFECTS`` and each new piece of state a defaulted field in ``AccountWorkflowInput``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.accounts import AccountActivities, AccountSnapshot, LoadAccountInput
    from activities.payments import PERMANENT_CODES, EnsureStripeCustomerInput, PaymentActivities
    from workflows.contract import (
        ACCOUNT_WORKFLOW,
        QUERY_STATE,
        SA_ACCOUNT_ID,
        SA_STATUS,
        SIGNAL_OUTBOX_EVENT,
        AccountState,
        AccountWorkflowInput,
        OutboxEvent,
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
        }

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
            await workflow.wait_condition(
                lambda: self._input.stripe_customer_pending or self._should_continue_as_new())
            if not self._input.stripe_customer_pending:
                break
            await self._ensure_stripe_customer()
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
            continued_as_new=i.continued_as_new, stripe_customer_id=i.stripe_customer_id,
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
        )

    def _should_continue_as_new(self) -> bool:
        limit = self._input.continue_as_new_after_events
        return workflow.info().is_continue_as_new_suggested() or (
            limit is not None and self._events_this_run >= limit)

    def _carry_over(self) -> AccountWorkflowInput:
        carried = self._input.model_copy(deep=True)
        carried.recent_dedup_keys = list(self._recent)
        carried.continued_as_new += 1
        return carried

