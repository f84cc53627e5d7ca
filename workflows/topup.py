"""``TopUpWorkflow`` (id ``topup:{account_id}:{request_id}``): charge, credit once, send a receipt.

1. Record the pending charge row (the card is resolved there: the one asked for, else the default).
2. Create the PaymentIntent: confirmed off-session with a saved card, or unconfirmed with a client secret.
3. ``succeeded``: credit the wallet (ledger key ``sys:topup:{payment_intent_id}``), then the receipt.
   Otherwise the customer has to pay (no card, or authentication needed): the answer is the client secret,
   and the workflow polls the PaymentIntent (woken early by the ``payment_event`` signal) until it succeeds,
   is canceled, or the payment window closes (then it is canceled, or credited if it was paid meanwhile).
4. A declined card ends the top-up: row ``failed`` with the decline code, nothing credited.

The ``answer`` update returns as soon as the charge is decided or the client secret is known, so the API
(update-with-start) gives its caller a clear result while the workflow keeps going if that caller leaves.
Every step is idempotent on its own (see ``creditflow.payments.topups``), so a new run for the same request
id (after this one closed) reaches the same outcome without charging again.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.payments import PERMANENT_CODES
    from activities.topups import ChargeRef, MarkChargeInput, RecordTopUpInput, TopUpActivities
    from creditflow.domain.charges import PaymentIntentState
    from creditflow.domain.notifications import Notification
    from creditflow.domain.topups import format_usd
    from workflows.common import (
        DB_TIMEOUT,
        STRIPE_TIMEOUT,
        db_retry,
        error_details,
        error_of,
        publish_status,
        until_done_retry,
    )
    from workflows.contract import (
        QUERY_TOPUP_STATUS,
        SIGNAL_PAYMENT_EVENT,
        TOPUP_CANCELED,
        TOPUP_FAILED,
        TOPUP_PENDING,
        TOPUP_REQUIRES_PAYMENT,
        TOPUP_SUCCEEDED,
        TOPUP_WORKFLOW,
        UPDATE_TOPUP_ANSWER,
        PaymentEvent,
        TopUpInput,
        TopUpOutcome,
        TopUpTerms,
    )
    from workflows.notify import notify

_REFUSALS = [*PERMANENT_CODES, "card_declined", "unknown_payment_method", "payment_method_invalid",
             "idempotency_conflict", "not_found", "invalid_amount", "no_payment_method"]
DB_RETRY = db_retry(_REFUSALS)
# Stripe: the gateway already retried transient errors for seconds; here about ten more minutes.
STRIPE_RETRY = RetryPolicy(initial_interval=timedelta(seconds=2), backoff_coefficient=2.0,
                           maximum_interval=timedelta(seconds=60), maximum_attempts=12,
                           non_retryable_error_types=_REFUSALS)
# A poll that fails is followed by the next poll: few attempts each.
POLL_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                         maximum_interval=timedelta(seconds=10), maximum_attempts=3,
                         non_retryable_error_types=_REFUSALS)
# The customer has paid: the credit must land, so it is retried until it does (capped interval).
CREDIT_RETRY = until_done_retry(["idempotency_conflict", "invalid_amount", "not_found"])
# PaymentIntent statuses that still need the customer (or Stripe) to act.
WAITING_STATUSES = frozenset({"requires_payment_method", "requires_confirmation", "requires_action", "processing"})
_WAITING = WAITING_STATUSES


async def mark_charge_failed(charge_id: str, error: ApplicationError) -> None:
    """Record an off-session charge's failure on its ``stripe_charges`` row (auto-recharge, invoices)."""
    details = error_details(error)
    await workflow.execute_activity_method(
        TopUpActivities.mark_topup_charge,
        MarkChargeInput(charge_id=charge_id, status="failed", failure_code=error.type,
                        decline_code=details.get("decline_code"), failure_message=error.message),
        start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY, summary="Mark the charge failed")


@workflow.defn(name=TOPUP_WORKFLOW)
class TopUpWorkflow:
    @workflow.init
    def __init__(self, input: TopUpInput) -> None:
        self._input = input
        t = input.terms
        self._outcome = TopUpOutcome(account_id=input.account_id, request_id=input.request_id,
                                     amount_cents=t.amount_cents, credits=t.credits, package_id=t.package_id)
        self._wake = False
        self._published: str | None = None

    @workflow.run
    async def run(self, input: TopUpInput) -> TopUpOutcome:
        self._publish()
        t = input.terms
        how = f"card {t.payment_method_id}" if t.payment_method_id else "the default card, if any"
        try:
            record = await workflow.execute_activity_method(
                TopUpActivities.record_topup_charge,
                RecordTopUpInput(account_id=input.account_id, request_id=input.request_id,
                                 amount_cents=t.amount_cents, credits=t.credits, package_id=t.package_id,
                                 description=input.description, payment_method_id=t.payment_method_id,
                                 credit_system=t.credit_system),
                start_to_close_timeout=STRIPE_TIMEOUT, retry_policy=STRIPE_RETRY,
                summary=f"Record the {format_usd(t.amount_cents)} top-up ({how})")
        except ActivityError as err:
            return await self._finish_failed(error_of(err), mark=False)
        self._outcome.charge_id = record.charge_id
        saved_card = record.payment_method_id is not None
        try:
            pi = await workflow.execute_activity_method(
                TopUpActivities.charge_topup, ChargeRef(charge_id=record.charge_id),
                start_to_close_timeout=STRIPE_TIMEOUT, retry_policy=STRIPE_RETRY,
                summary=(f"Charge {format_usd(t.amount_cents)} to card {record.payment_method_id} off-session"
                         if saved_card else f"Create a {format_usd(t.amount_cents)} PaymentIntent (client secret)"))
        except ActivityError as err:
            error = error_of(err)
            # A decline is recorded by the activity itself (with Stripe's codes).
            return await self._finish_failed(error, mark=error.type != "card_declined")
        self._outcome.payment_intent_id = pi.id
        if pi.status in _WAITING:
            if saved_card and pi.status == "requires_payment_method" and pi.failure_code:
                return await self._finish_failed(ApplicationError(
                    pi.failure_message or "the card was declined", {"decline_code": pi.decline_code},
                    type="card_declined"), mark=True)
            pi = await self._wait_for_payment(pi)
        if pi.status == "succeeded":
            await self._credit(pi)
        elif pi.status == "canceled":
            await self._finish_canceled()
        else:  # unreachable with Stripe's statuses; keep the row honest
            await self._finish_failed(ApplicationError(f"unexpected PaymentIntent status {pi.status}",
                                                       type="payment_provider_error"), mark=True)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._outcome

    # --- public handlers -------------------------------------------------------------------------------

    @workflow.update(name=UPDATE_TOPUP_ANSWER)
    async def answer(self, terms: TopUpTerms) -> TopUpOutcome:
        """Wait until the charge is decided or the client secret is known."""
        await workflow.wait_condition(lambda: self._outcome.status != TOPUP_PENDING)
        return self._outcome

    @answer.validator
    def _same_terms(self, terms: TopUpTerms) -> None:
        if terms != self._input.terms:
            raise ApplicationError(f"request_id {self._input.request_id} was already used for another top-up",
                                   type="idempotency_conflict", non_retryable=True)

    @workflow.query(name=QUERY_TOPUP_STATUS)
    def status(self) -> TopUpOutcome:
        return self._outcome

    @workflow.signal(name=SIGNAL_PAYMENT_EVENT)
    def payment_event(self, event: PaymentEvent) -> None:
        """Look at the PaymentIntent now instead of at the next poll."""
        self._wake = True

    # --- steps -----------------------------------------------------------------------------------------

    async def _wait_for_payment(self, pi: PaymentIntentState) -> PaymentIntentState:
        """Hand out the client secret, then poll until paid, canceled or expired (then cancel it)."""
        charge = ChargeRef(charge_id=self._outcome.charge_id or "")
        self._outcome.client_secret = pi.client_secret
        self._set_status(TOPUP_REQUIRES_PAYMENT)
        deadline = workflow.now() + timedelta(seconds=self._input.payment_expiry_seconds)
        interval = timedelta(seconds=self._input.poll_interval_seconds)
        while (remaining := deadline - workflow.now()) > timedelta(0):
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(lambda: self._wake, timeout=min(interval, remaining))
            # Reset before polling, not before waiting: a payment event that arrives while the poll
            # runs then wakes the next wait at once instead of being lost for a whole interval.
            self._wake = False
            try:
                pi = await workflow.execute_activity_method(
                    TopUpActivities.poll_topup_payment, charge, start_to_close_timeout=STRIPE_TIMEOUT,
                    retry_policy=POLL_RETRY, summary=f"Check PaymentIntent {pi.id}")
            except ActivityError as err:
                workflow.logger.warning("polling %s failed: %s", pi.id, error_of(err).message)
                continue
            if pi.status not in _WAITING:
                return pi
        self._outcome.error_code = "payment_expired"
        return await workflow.execute_activity_method(
            TopUpActivities.cancel_topup_payment, charge, start_to_close_timeout=STRIPE_TIMEOUT,
            retry_policy=STRIPE_RETRY, summary=f"Payment window closed: cancel PaymentIntent {pi.id}")

    async def _credit(self, pi: PaymentIntentState) -> None:
        charge_id = self._outcome.charge_id or ""
        result = await workflow.execute_activity_method(
            TopUpActivities.credit_topup, ChargeRef(charge_id=charge_id), start_to_close_timeout=DB_TIMEOUT,
            retry_policy=CREDIT_RETRY, summary=f"Credit {self._outcome.credits:,} credits for {pi.id}")
        o = self._outcome
        o.transaction_id, o.balance, o.client_secret = result.transaction_id, result.balance, None
        o.error_code = o.error_message = None  # paid just as the window closed: a success after all
        self._set_status(TOPUP_SUCCEEDED)
        receipt = Notification(
            account_id=o.account_id, kind="receipt", dedup_key=f"receipt:{charge_id}",
            payload={"charge_id": charge_id, "request_id": o.request_id, "payment_intent_id": pi.id,
                     "transaction_id": result.transaction_id, "amount_cents": o.amount_cents,
                     "amount": format_usd(o.amount_cents), "credits": o.credits, "package_id": o.package_id,
                     "description": self._input.description})
        if self._input.terms.credit_system is not None:  # a named credit system's top-up (the wallet's: unchanged)
            receipt.payload["credit_system"] = self._input.terms.credit_system
        await notify(receipt, summary=f"Send the receipt ({format_usd(o.amount_cents)})")

    async def _finish_failed(self, error: ApplicationError, *, mark: bool) -> TopUpOutcome:
        details = error_details(error)
        o = self._outcome
        o.error_code, o.error_message = error.type or "payment_failed", error.message
        o.decline_code = details.get("decline_code")
        o.client_secret = None
        if mark and o.charge_id is not None:
            await self._mark(MarkChargeInput(charge_id=o.charge_id, status="failed", failure_code=o.error_code,
                                             decline_code=o.decline_code, failure_message=o.error_message))
        self._set_status(TOPUP_FAILED)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return o

    async def _finish_canceled(self) -> None:
        o = self._outcome
        o.client_secret = None
        o.error_code = o.error_code or "payment_canceled"
        o.error_message = ("the payment was not completed in time" if o.error_code == "payment_expired"
                           else "the payment was canceled")
        if o.charge_id is not None:
            await self._mark(MarkChargeInput(charge_id=o.charge_id, status="canceled", failure_code=o.error_code,
                                             failure_message=o.error_message))
        self._set_status(TOPUP_CANCELED)

    async def _mark(self, input: MarkChargeInput) -> None:
        await workflow.execute_activity_method(
            TopUpActivities.mark_topup_charge, input, start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY,
            summary=f"Mark the charge {input.status}")

    # --- Temporal UI -----------------------------------------------------------------------------------

    def _set_status(self, status: str) -> None:
        self._outcome.status = status
        self._publish()

    def _publish(self) -> None:
        o = self._outcome
        if self._published != o.status:
            publish_status(o.account_id, o.status, enabled=self._input.publish_search_attributes)
            self._published = o.status
        what = f"{format_usd(o.amount_cents)} for {o.credits:,} credits"
        if o.package_id:
            what += f" (package {o.package_id})"
        lines = [f"**Top-up** {what}", f"- account: `{o.account_id}`", f"- request: `{o.request_id}`",
                 f"- status: {o.status}"]
        if o.payment_intent_id:
            lines.append(f"- PaymentIntent: `{o.payment_intent_id}`")
        if o.transaction_id:
            lines.append(f"- ledger transaction: `{o.transaction_id}`")
        if o.error_code:
            lines.append(f"- error: {o.error_code}" + (f" ({o.decline_code})" if o.decline_code else ""))
        workflow.set_current_details("\n".join(lines))
