"""``RefundWorkflow`` (id ``refund:{account_id}:{request_id}``): a saga refunding unused purchased credits.

1. ``check_refund``: resolve the purchase and apply the eligibility rules (refusals end here, nothing written).
2. ``reserve_refund``: the refund row and the reservation (journal ``refund``) in one transaction; the credits
   stop being spendable at once. The ledger re-checks the lot under the account lock.
3. ``refund_payment``: the Stripe refund, once (the row guards retries; localstripe ignores idempotency keys).
   Outages are retried without limit: the credits stay reserved, and releasing them while Stripe might have
   refunded would pay twice. Only a refusal (or a refund Stripe reports ``failed``/``canceled``) compensates.
4. ``finalize_refund`` marks it succeeded; compensation is ``release_refund`` (journal ``refund_reversal``:
   the credits go back to the same lot) and the refund is reported ``failed``.
5. A refund Stripe answers ``pending`` / ``requires_action`` is not succeeded: ``mark_refund_pending`` keeps the
   row ``pending`` (credits reserved), the ``answer`` update returns ``pending``, and the workflow polls
   (``settle_pending_refund``, backing off to every 6 hours) until Stripe's final word, which a signed webhook
   event may already have applied (``creditflow.payments.refunds.apply_stripe_event``; the webhook then wakes
   the workflow with the signal ``refund_event``): succeeded finalizes, failed/canceled releases the credits
   once. Guarded by the patch ``refund-pending-waits`` (older histories finalized at once).

The ``answer`` update returns once the refund is decided, so the API (update-with-start) gives a clear result;
a repeated request id joins the running workflow or, after it closed, replays every step from the row.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.payments import PERMANENT_CODES
    from activities.refunds import (
        FinalizeRefundInput,
        PendingRefundInput,
        RefundActivities,
        RefundRef,
        RefundSnapshot,
        ReleaseRefundInput,
    )
    from creditflow.domain.notifications import Notification
    from creditflow.domain.topups import format_usd
    from workflows.common import DB_TIMEOUT, STRIPE_TIMEOUT, db_retry, error_of, publish_status, until_done_retry
    from workflows.contract import (
        QUERY_REFUND_STATUS,
        REFUND_FAILED,
        REFUND_PENDING,
        REFUND_SUCCEEDED,
        REFUND_WORKFLOW,
        SIGNAL_REFUND_EVENT,
        UPDATE_REFUND_ANSWER,
        RefundInput,
        RefundOutcome,
        RefundTerms,
    )
    from workflows.notify import notify

# Refusals: a retry cannot change them.
_REFUSALS = [*PERMANENT_CODES, "unknown_purchase", "not_refundable", "refund_window_expired",
             "refund_exceeds_remaining", "insufficient_credits", "invalid_amount", "invalid_id", "forbidden",
             "validation_error", "idempotency_conflict", "not_found", "refund_not_reserved"]
DB_RETRY = db_retry(_REFUSALS)
# Stripe refund: the gateway retried transient errors for seconds; the credits are reserved, so keep trying
# (capped interval) until Stripe answers. Refusals are final and trigger the compensation.
REFUND_STRIPE_RETRY = RetryPolicy(initial_interval=timedelta(seconds=2), backoff_coefficient=2.0,
                                  maximum_interval=timedelta(minutes=5), maximum_attempts=0,
                                  non_retryable_error_types=_REFUSALS)
# Finalize / release: the money side is decided, the ledger must follow, so retried until it lands.
SETTLE_RETRY = until_done_retry(["idempotency_conflict", "not_found", "refund_not_reserved"])
# Stripe's final refund statuses; anything else (pending, requires_action) waits for Stripe.
STRIPE_FINAL = ("succeeded", "failed", "canceled")
PENDING_PATCH = "refund-pending-waits"
NOTICE_PATCH = "refund-notices"  # older histories closed without telling the customer
PENDING_FIRST_POLL = timedelta(minutes=5)
PENDING_MAX_POLL = timedelta(hours=6)


@workflow.defn(name=REFUND_WORKFLOW)
class RefundWorkflow:
    @workflow.init
    def __init__(self, input: RefundInput) -> None:
        self._input = input
        self._outcome = RefundOutcome(account_id=input.account_id, request_id=input.request_id,
                                      credits=input.terms.credits, amount_cents=None,  # priced by the lot
                                      purchase_transaction_id=input.terms.purchase_transaction_id,
                                      payment_intent_id=input.terms.payment_intent_id)
        self._published: str | None = None
        self._stripe_pending = False  # Stripe accepted the refund and has not settled it: ``answer`` returns
        self._stripe_word = False  # a webhook applied Stripe's word to the row: read it now, not at the next poll

    @workflow.run
    async def run(self, input: RefundInput) -> RefundOutcome:
        self._publish()
        o = self._outcome
        try:
            plan = await workflow.execute_activity_method(
                RefundActivities.check_refund, input, start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY,
                summary="Check refund eligibility")
            o.credits, o.amount_cents = plan.credits, plan.amount_cents
            o.purchase_transaction_id, o.payment_intent_id = plan.purchase_txn_id, plan.payment_intent_id
            self._publish()
            reserved = await workflow.execute_activity_method(
                RefundActivities.reserve_refund, plan, start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY,
                summary=f"Reserve {plan.credits:,} credits of {plan.purchase_txn_id}")
        except ActivityError as err:
            return await self._finish_refused(error_of(err))
        self._take(reserved)
        if reserved.status == REFUND_SUCCEEDED:
            return await self._finish(REFUND_SUCCEEDED)
        if reserved.status == REFUND_FAILED:
            return await self._finish(REFUND_FAILED)
        try:
            refund = await workflow.execute_activity_method(
                RefundActivities.refund_payment, RefundRef(refund_id=reserved.refund_id),
                start_to_close_timeout=STRIPE_TIMEOUT, retry_policy=REFUND_STRIPE_RETRY,
                summary=f"Refund {format_usd(reserved.amount_cents)} on {o.payment_intent_id}")
        except ActivityError as err:
            error = error_of(err)
            return await self._release(reserved.refund_id, error.type or "refund_failed", error.message)
        o.stripe_refund_id = refund.id
        if refund.status not in STRIPE_FINAL and workflow.patched(PENDING_PATCH):
            return await self._wait_for_stripe(reserved.refund_id, refund.status)
        if refund.status in ("failed", "canceled"):
            return await self._release(reserved.refund_id, "refund_failed",
                                       f"Stripe reports the refund {refund.status}"
                                       + (f" ({refund.failure_reason})" if refund.failure_reason else ""))
        done = await workflow.execute_activity_method(
            RefundActivities.finalize_refund,
            FinalizeRefundInput(refund_id=reserved.refund_id, stripe_refund_id=refund.id, stripe_status=refund.status),
            start_to_close_timeout=DB_TIMEOUT, retry_policy=SETTLE_RETRY, summary=f"Finalize refund {refund.id}")
        self._take(done)
        # A Stripe event may have reported the refund failed meanwhile (its credits then went back): say so.
        return await self._finish(REFUND_FAILED if done.status == REFUND_FAILED else REFUND_SUCCEEDED)

    # --- public handlers -------------------------------------------------------------------------------

    @workflow.update(name=UPDATE_REFUND_ANSWER)
    async def answer(self, terms: RefundTerms) -> RefundOutcome:
        """Wait until the refund is decided, or Stripe has accepted it without settling it (``pending``)."""
        await workflow.wait_condition(lambda: self._outcome.status != REFUND_PENDING or self._stripe_pending)
        return self._outcome

    @answer.validator
    def _same_terms(self, terms: RefundTerms) -> None:
        if terms != self._input.terms:
            raise ApplicationError(f"request_id {self._input.request_id} was already used for another refund",
                                   type="idempotency_conflict", non_retryable=True)

    @workflow.signal(name=SIGNAL_REFUND_EVENT)
    def refund_event(self) -> None:
        """A Stripe event decided (or updated) the pending refund's row: check it now."""
        self._stripe_word = True

    @workflow.query(name=QUERY_REFUND_STATUS)
    def status(self) -> RefundOutcome:
        return self._outcome

    # --- steps -----------------------------------------------------------------------------------------

    def _take(self, snap: RefundSnapshot) -> None:
        o = self._outcome
        o.refund_id, o.credits, o.amount_cents = snap.refund_id, snap.credits, snap.amount_cents
        o.transaction_id, o.reversal_transaction_id = snap.transaction_id, snap.reversal_transaction_id
        o.stripe_refund_id = snap.stripe_refund_id or o.stripe_refund_id
        o.balance = snap.balance
        if snap.status == REFUND_FAILED:
            o.error_code, o.error_message = snap.failure_code or "refund_failed", snap.failure_message

    async def _wait_for_stripe(self, refund_id: str, stripe_status: str) -> RefundOutcome:
        """Stripe has not settled the refund: keep it pending (credits reserved) until Stripe's final word."""
        snap = await workflow.execute_activity_method(
            RefundActivities.mark_refund_pending, PendingRefundInput(refund_id=refund_id, stripe_status=stripe_status),
            start_to_close_timeout=DB_TIMEOUT, retry_policy=SETTLE_RETRY, summary=f"Stripe says {stripe_status}")
        self._take(snap)
        delay = PENDING_FIRST_POLL
        while snap.status not in (REFUND_SUCCEEDED, REFUND_FAILED):
            self._stripe_pending = True
            with contextlib.suppress(asyncio.TimeoutError):
                await workflow.wait_condition(lambda: self._stripe_word, timeout=delay)
            self._stripe_word = False
            delay = min(delay * 2, PENDING_MAX_POLL)
            try:
                snap = await workflow.execute_activity_method(
                    RefundActivities.settle_pending_refund, RefundRef(refund_id=refund_id),
                    start_to_close_timeout=STRIPE_TIMEOUT, retry_policy=REFUND_STRIPE_RETRY,
                    summary="Has Stripe settled the refund?")
            except ActivityError as err:  # Stripe refused to answer: the credits stay reserved, ask again later
                workflow.logger.warning("refund %s: could not ask Stripe (%s)", refund_id, error_of(err).message)
                continue
            self._take(snap)
        return await self._finish(snap.status)

    async def _release(self, refund_id: str, code: str, message: str | None) -> RefundOutcome:
        released = await workflow.execute_activity_method(
            RefundActivities.release_refund,
            ReleaseRefundInput(refund_id=refund_id, failure_code=code, failure_message=message),
            start_to_close_timeout=DB_TIMEOUT, retry_policy=SETTLE_RETRY,
            summary=f"Stripe refused ({code}): release the reserved credits")
        self._take(released)
        return await self._finish(REFUND_FAILED)

    async def _finish_refused(self, error: ApplicationError) -> RefundOutcome:
        self._outcome.error_code, self._outcome.error_message = error.type or "refund_failed", error.message
        return await self._finish(REFUND_FAILED)

    async def _finish(self, status: str) -> RefundOutcome:
        self._outcome.status = status
        self._publish()
        if self._outcome.refund_id is not None and workflow.patched(NOTICE_PATCH):
            await self._notify_customer()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._outcome

    async def _notify_customer(self) -> None:
        """``refund.succeeded`` / ``refund.failed`` once per refund (the dedup key), after the API has its answer.
        A refusal before anything was reserved (no refund row) tells the caller only: nothing happened."""
        o = self._outcome
        payload: dict[str, object] = {"refund_id": o.refund_id, "request_id": o.request_id, "credits": o.credits,
                                      "amount_cents": o.amount_cents, "payment_intent_id": o.payment_intent_id,
                                      "stripe_refund_id": o.stripe_refund_id, "reason": self._input.terms.reason}
        if o.status == REFUND_FAILED:
            payload["error_code"], payload["error_message"] = o.error_code, o.error_message
        kind = "refund.failed" if o.status == REFUND_FAILED else "refund.succeeded"
        await notify(Notification(account_id=o.account_id, kind=kind, dedup_key=f"{kind}:{o.refund_id}",
                                  payload=payload),
                     summary=f"Tell the customer: refund {o.status}")

    # --- Temporal UI -----------------------------------------------------------------------------------

    def _publish(self) -> None:
        o = self._outcome
        if self._published != o.status:
            publish_status(o.account_id, o.status, enabled=self._input.publish_search_attributes)
            self._published = o.status
        what = "all unused credits" if not o.credits else f"{o.credits:,} credits" + (
            f" ({format_usd(o.amount_cents)})" if o.amount_cents is not None else "")
        lines = [f"**Refund** of {what}", f"- account: `{o.account_id}`", f"- request: `{o.request_id}`",
                 f"- reason: {self._input.terms.reason}", f"- status: {o.status}"]
        if o.purchase_transaction_id:
            lines.append(f"- purchase: `{o.purchase_transaction_id}`")
        if o.payment_intent_id:
            lines.append(f"- PaymentIntent: `{o.payment_intent_id}`")
        if o.stripe_refund_id:
            lines.append(f"- Stripe refund: `{o.stripe_refund_id}`")
        if o.error_code:
            lines.append(f"- error: {o.error_code}")
        workflow.set_current_details("\n".join(lines))
