"""The account workflow's payment side: the account's Stripe customer, and payment events from Stripe (refunds and
disputes take back the credits a payment bought; a payment that succeeded late is credited once)."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.payment_events import LateCreditResult, PaymentEventActivities, PaymentEventInput
    from activities.payments import PERMANENT_CODES, EnsureStripeCustomerInput, PaymentActivities
    from creditflow.domain.notifications import Notification
    from creditflow.domain.topups import format_usd
    from workflows.account_state import LOAD_RETRY, AccountRun
    from workflows.common import DB_TIMEOUT, STRIPE_TIMEOUT, error_of
    from workflows.contract import (
        OUTBOX_PAYMENT_SUCCEEDED_LATE,
        OUTBOX_RECHARGE_SUCCEEDED_LATE,
        OUTBOX_STRIPE_DISPUTED,
        OutboxEvent,
    )
    from workflows.notify import notify

# Creating the Stripe customer: the gateway already retried transient errors for seconds; here we keep
# trying for about a day on outages, never on refusals a retry cannot fix. If it still fails, the API
# creates the customer on first use (``ensure_customer`` is exactly-once either way).
STRIPE_CUSTOMER_RETRY = RetryPolicy(initial_interval=timedelta(seconds=5), backoff_coefficient=2.0,
                                    maximum_interval=timedelta(minutes=30), maximum_attempts=60,
                                    non_retryable_error_types=list(PERMANENT_CODES))
# Histories recorded before the Stripe customer step have no marker: on replay the step is skipped there.
PATCH_STRIPE_CUSTOMER = "stripe-customer"
STRIPE_DISPUTED = OUTBOX_STRIPE_DISPUTED
RECHARGE_SUCCEEDED_LATE = OUTBOX_RECHARGE_SUCCEEDED_LATE
PAYMENT_SUCCEEDED_LATE = OUTBOX_PAYMENT_SUCCEEDED_LATE


class Payments:
    """The account's Stripe customer and the payment events of its account, applied in arrival order."""

    def __init__(self, run: AccountRun) -> None:
        self.run = run

    def on_account_created(self, event: OutboxEvent) -> None:
        i = self.run.input
        name = event.payload.get("name")
        if i.name is None and isinstance(name, str):
            i.name = name
        if i.stripe_customer_id is None:
            i.stripe_customer_pending = True

    def on_payment_event(self, event: OutboxEvent) -> None:
        self.run.input.pending_payment_events.append(event)

    async def ensure_stripe_customer(self) -> None:
        """Create the account's Stripe customer (once; the activity is idempotent)."""
        i = self.run.input
        i.stripe_customer_pending = False
        if not workflow.patched(PATCH_STRIPE_CUSTOMER):
            return  # replaying a history from before this step: it did not run there
        try:
            result = await workflow.execute_activity_method(
                PaymentActivities.ensure_stripe_customer,
                EnsureStripeCustomerInput(account_id=i.account_id),
                start_to_close_timeout=timedelta(minutes=3),
                retry_policy=STRIPE_CUSTOMER_RETRY,
                summary="Create the Stripe customer",
            )
        except ActivityError as err:
            cause = err.cause
            code = cause.type if isinstance(cause, ApplicationError) and cause.type else type(cause).__name__
            workflow.logger.warning("Stripe customer not created for %s: %s", i.account_id, code)
            i.stripe_customer_error = code
        else:
            i.stripe_customer_id = result.customer_id
            i.stripe_customer_error = None
        self.run.publish()

    async def apply_payment_event(self, event: OutboxEvent) -> None:
        """A refund made on Stripe or a dispute: take back the credits that payment bought, then tell the customer
        (a dispute) — once per refund or dispute id, whatever is redelivered."""
        if event.kind in (RECHARGE_SUCCEEDED_LATE, PAYMENT_SUCCEEDED_LATE):
            await self._credit_late_payment(event)
            return
        try:
            result = await workflow.execute_activity_method(
                PaymentEventActivities.apply_payment_event,
                PaymentEventInput(account_id=self.run.input.account_id, kind=event.kind, payload=event.payload,
                                  dedup_key=event.dedup_key),
                start_to_close_timeout=DB_TIMEOUT, retry_policy=LOAD_RETRY,
                summary=f"Take back credits: {event.kind.removeprefix('stripe.')}")
        except ActivityError as err:  # kept with its error in payment_event_failures, re-drivable
            workflow.logger.error("%s not applied: %s", event.dedup_key, error_of(err).message)
            return
        if event.kind == STRIPE_DISPUTED and result.applied:
            taken = result.applied[0]
            await self.run.notify_customer("payment.disputed", taken.stripe_id, {
                "payment_intent_id": result.payment_intent_id, "dispute_id": taken.stripe_id,
                "amount_cents": taken.amount_cents, "credits_taken_micros": taken.taken_micros,
                "reason": event.payload.get("reason")})

    async def _credit_late_payment(self, event: OutboxEvent) -> None:
        """A payment that succeeded after its workflow recorded failure or gave up (top-up, auto-recharge, invoice):
        credit it or settle its invoice (checked with Stripe, once), then tell the customer as the normal path would."""
        account_id = self.run.input.account_id
        pi = event.payload.get("payment_intent_id")
        recharge = event.kind == RECHARGE_SUCCEEDED_LATE  # rows written when only auto-recharges took this path
        try:
            late: LateCreditResult = await workflow.execute_activity_method(
                PaymentEventActivities.credit_late_recharge if recharge else PaymentEventActivities.credit_late_payment,
                PaymentEventInput(account_id=account_id, kind=event.kind, payload=event.payload,
                                  dedup_key=event.dedup_key),
                start_to_close_timeout=STRIPE_TIMEOUT, retry_policy=LOAD_RETRY,
                summary=f"Credit the late auto-recharge {pi}" if recharge else f"Settle the late payment {pi}")
        except ActivityError as err:
            workflow.logger.error("%s not applied: %s", event.dedup_key, error_of(err).message)
            return
        if not late.credited:
            return
        if late.kind == "auto_recharge":
            await self.run.notify_customer("auto_recharge.succeeded", f"late:{late.charge_id}", {
                "charge_id": late.charge_id, "payment_intent_id": pi,
                "transaction_id": late.transaction_id, "credits": late.credits, "late": True})
        elif late.kind == "topup":  # the receipt TopUpWorkflow would have sent (same key: never two)
            await notify(Notification(
                account_id=account_id, kind="receipt", dedup_key=f"receipt:{late.charge_id}",
                payload={"charge_id": late.charge_id, "request_id": late.request_id, "payment_intent_id": pi,
                         "transaction_id": late.transaction_id, "amount_cents": late.amount_cents,
                         "amount": format_usd(late.amount_cents), "credits": late.credits, "late": True}),
                summary=f"Send the receipt ({format_usd(late.amount_cents)})")
