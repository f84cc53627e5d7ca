"""``InvoiceWorkflow`` (id ``invoice:{account_id}:{period_key}``): issue one period's invoice, collect it, email it.

Started by the account workflow's billing cycle for the period that just closed. Steps, each an activity that is
safe to repeat:

1. **Prepare**: collect the period's facts (usage per channel, top-ups paid, the billing profile), draft the
   invoice in pure domain code, render HTML and PDF, store it (``draft``). The period key is unique per account,
   so a retry or a second run returns the stored invoice: same id, number, totals and PDF.
2. **Open**: ``draft`` -> ``open``, due ``invoice_due_days`` after issue (default 0: due on issue).
3. **Collect**: nothing due -> ``paid`` at once, no charge. Otherwise the default card is charged off-session
   through the top-up machinery (``stripe_charges`` kind ``invoice``, request id = the invoice id, then
   ``{invoice id}:{n}`` for attempt ``n``). Before attempt ``n`` > 1 the earlier attempts' PaymentIntents are read
   back from Stripe (``check_earlier_invoice_charges``): one that succeeded late pays the invoice, one that could
   still succeed is canceled first, and none is created while one cannot be (an invoice is charged at most once).
   Success -> ``settle_invoice`` (checks the PaymentIntent, restores
   the billed overage to the wallet, marks ``paid``). No card, a decline or a card that needs the customer ->
   ``past_due`` and, on the first failure, an ``invoice.past_due`` notification; the charge is tried again after
   a durable timer (``invoice_retry_interval_seconds``, default 3 days, or at once on the ``retry_payment``
   signal), up to ``invoice_charge_attempts`` attempts in all (default 4). After the last one it stays
   ``past_due`` for an operator (dunning beyond that is not automated). A PaymentIntent Stripe answers
   ``processing`` is not a failure: the invoice stays as it is (not past due, no notice, the charge not marked
   failed) and the next attempt reads it back first; the webhook's late path settles it if it succeeds meanwhile.
4. **Email**: ``invoice.paid`` to the billing email with the PDF attached. The notification names the invoice
   (``attachments``) and the notification service reads the PDF from the ``invoices`` row, so the document never
   enters this workflow's history.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.invoices import (
        InvoiceActivities,
        InvoiceFailureInput,
        InvoiceRef,
        InvoiceSummary,
        PrepareInvoiceInput,
        SettleInvoiceInput,
    )
    from activities.topups import ChargeRef, RecordTopUpInput, TopUpActivities
    from creditflow.domain.charges import KIND_INVOICE, charge_request_id
    from creditflow.domain.notifications import Attachment, Notification
    from creditflow.domain.topups import format_usd
    from workflows.common import DB_TIMEOUT, STRIPE_TIMEOUT, db_retry, error_of, publish_status, until_done_retry
    from workflows.contract import (
        INVOICE_OPEN,
        INVOICE_PAID,
        INVOICE_PAST_DUE,
        INVOICE_WORKFLOW,
        QUERY_INVOICE_STATUS,
        SIGNAL_PAY_INVOICE_NOW,
        SIGNAL_RETRY_INVOICE_PAYMENT,
        InvoiceOutcome,
        InvoicePayNow,
        InvoiceWorkflowInput,
    )
    from workflows.notify import notify
    from workflows.topup import STRIPE_RETRY, WAITING_STATUSES, mark_charge_failed

_REFUSALS = ["unknown_account", "unknown_plan", "validation_error", "invalid_amount", "invalid_id", "not_found",
             "unknown_invoice", "invalid_transition", "payment_not_settled", "payment_required",
             "idempotency_conflict"]
# Drafting renders a PDF (a second or two): a generous timeout, database-style retries, refusals final.
PREPARE_TIMEOUT = timedelta(minutes=2)
PREPARE_RETRY = db_retry(_REFUSALS)
INVOICE_DB_RETRY = db_retry(_REFUSALS)
# Stripe said the money moved: the invoice must be marked paid (and the overage restored), whatever it takes.
SETTLE_RETRY = until_done_retry(_REFUSALS)
PDF_CONTENT_TYPE = "application/pdf"
# One payment per invoice even when an attempt's answer was lost: attempt 2+ first reads the earlier attempts'
# PaymentIntents back.
ONE_PAYMENT_PATCH = "invoice-one-payment-per-invoice"
# Histories recorded before it took a ``processing`` PaymentIntent for a decline (past due, notice, charge failed).
PROCESSING_PATCH = "invoice-processing-is-not-a-failure"
PAYMENT_PROCESSING = "payment_processing"
# Attempts are numbered after the stored invoice's earlier ones, so a run started again to pay it now
# (signal ``pay_now``) records attempt n+1 (charge ``{invoice id}:{n+1}``) after reading the earlier ones back.
PAY_NOW_PATCH = "invoice-pay-now"


@workflow.defn(name=INVOICE_WORKFLOW)
class InvoiceWorkflow:
    @workflow.init
    def __init__(self, input: InvoiceWorkflowInput) -> None:
        self._input = input
        self._outcome = InvoiceOutcome(account_id=input.account_id, period_key=input.key())
        self._retry_now = False
        self._card: str | None = None  # a card chosen with ``pay_now`` (None: the default card)
        self._attempts_allowed, self._retry_interval = 1, timedelta(0)

    @workflow.run
    async def run(self, input: InvoiceWorkflowInput) -> InvoiceOutcome:
        self._publish()
        inv: InvoiceSummary = await workflow.execute_activity_method(
            InvoiceActivities.prepare_invoice, PrepareInvoiceInput(request=input, issued_at=workflow.now()),
            start_to_close_timeout=PREPARE_TIMEOUT, retry_policy=PREPARE_RETRY,
            summary=f"Draft, render and store the invoice of {input.key()}")
        self._track(inv)
        # The charge policy is resolved by the prepare step (settings, unless the input names it); keep it.
        self._attempts_allowed = inv.charge_attempts
        self._retry_interval = timedelta(seconds=inv.retry_interval_seconds)
        if inv.status == "draft":
            inv = await workflow.execute_activity_method(
                InvoiceActivities.open_invoice, InvoiceRef(invoice_id=inv.invoice_id),
                start_to_close_timeout=DB_TIMEOUT, retry_policy=INVOICE_DB_RETRY,
                summary=f"Issue {inv.number} ({format_usd(inv.amount_due_cents)} due {inv.due_at:%Y-%m-%d})")
            self._track(inv)
        if inv.status in ("open", "past_due"):
            if not input.charge:
                await self._email(inv, "invoice.issued")
                return self._outcome
            if inv.amount_due_cents == 0:
                inv = await self._settle(inv, None, 0)
            else:
                inv = await self._collect(inv)
        if inv.status == INVOICE_PAID:
            await self._email(inv, "invoice.paid")
        return self._outcome

    @workflow.query(name=QUERY_INVOICE_STATUS)
    def status(self) -> InvoiceOutcome:
        return self._outcome

    @workflow.signal(name=SIGNAL_RETRY_INVOICE_PAYMENT)
    def retry_payment(self) -> None:
        """Try the charge again now rather than at the next scheduled retry (e.g. a new card was saved)."""
        self._retry_now = True

    @workflow.signal(name=SIGNAL_PAY_INVOICE_NOW)
    def pay_now(self, command: InvoicePayNow) -> None:
        """Charge now (the customer asked, or saved a card), with the card named (None: the default card)."""
        self._card = command.payment_method_id
        self._retry_now = True

    async def _collect(self, inv: InvoiceSummary) -> InvoiceSummary:
        """Charge attempts 1..N with a durable timer between them; returns the invoice as it ended. With the pay-now
        patch, attempts are numbered after the stored ones, and a ``pay_now`` (or ``retry_payment``) that arrives
        during an attempt asks for another one at once, even after the last scheduled attempt."""
        allowed, interval = self._attempts_allowed, self._retry_interval
        pay_now = workflow.patched(PAY_NOW_PATCH)
        first = inv.attempts + 1 if pay_now else 1
        attempt = first
        while True:
            if pay_now:
                self._retry_now = False  # a request arriving from here on asks for one more attempt
            self._outcome.attempts = attempt
            self._outcome.next_attempt_at = None
            self._publish()
            paid = await self._attempt(inv, attempt)
            if paid is not None:
                return paid
            error = self._outcome.error_code or "payment_failed"
            # Stripe still deciding (processing) is not a failure: the invoice stays as it is; look again later.
            if not (error == PAYMENT_PROCESSING and workflow.patched(PROCESSING_PATCH)):
                inv = await workflow.execute_activity_method(
                    InvoiceActivities.record_invoice_payment_failure,
                    InvoiceFailureInput(invoice_id=inv.invoice_id, attempts=attempt,
                                        error=f"{error}: {self._outcome.error_message or ''}".rstrip(": ")),
                    start_to_close_timeout=DB_TIMEOUT, retry_policy=INVOICE_DB_RETRY,
                    summary=f"Mark {inv.number} past due (attempt {attempt} failed: {error})")
                self._track(inv)
                if inv.status == INVOICE_PAID:  # paid by other means meanwhile (an operator, another run)
                    return inv
                if attempt == 1:
                    await self._notify_past_due(inv)
            if attempt < first + allowed - 1:
                await self._wait_for_retry(inv, interval, forget_requests=not pay_now)
            elif not (pay_now and self._retry_now):
                break
            attempt += 1
        self._outcome.next_attempt_at = None
        self._publish()
        return inv

    async def _wait_for_retry(self, inv: InvoiceSummary, interval: timedelta, *, forget_requests: bool) -> None:
        """The retry interval, cut short by ``retry_payment`` / ``pay_now``."""
        self._outcome.next_attempt_at = workflow.now() + interval
        self._publish()
        if forget_requests:
            self._retry_now = False
        with contextlib.suppress(TimeoutError):  # the retry interval passed without a signal
            await workflow.wait_condition(lambda: self._retry_now, timeout=interval,
                                          timeout_summary=f"Retry the charge of {inv.number}")

    async def _attempt(self, inv: InvoiceSummary, attempt: int) -> InvoiceSummary | None:
        """One off-session charge of the amount due; the paid invoice, or None (the error is on the outcome)."""
        amount = format_usd(inv.amount_due_cents)
        if attempt > 1 and workflow.patched(ONE_PAYMENT_PATCH):
            # One succeeded PaymentIntent per invoice: an earlier attempt recorded as failed may have been paid late.
            try:
                earlier = await workflow.execute_activity_method(
                    InvoiceActivities.check_earlier_invoice_charges, InvoiceRef(invoice_id=inv.invoice_id),
                    start_to_close_timeout=STRIPE_TIMEOUT, retry_policy=STRIPE_RETRY,
                    summary=f"Check the earlier charges of {inv.number} with Stripe")
            except ActivityError as err:
                return self._failed(error_of(err))
            if earlier.paid_charge_id is not None:
                return await self._settle(inv, earlier.paid_charge_id, attempt)
            if earlier.in_flight:
                return self._failed(ApplicationError("an earlier charge of this invoice is still processing",
                                                     type=PAYMENT_PROCESSING))
        try:
            record = await workflow.execute_activity_method(
                TopUpActivities.record_topup_charge,
                RecordTopUpInput(account_id=inv.account_id, request_id=charge_request_id(inv.invoice_id, attempt),
                                 amount_cents=inv.amount_due_cents, credits=0, description=f"Invoice {inv.number}",
                                 kind=KIND_INVOICE, require_card=True, payment_method_id=self._card),
                start_to_close_timeout=STRIPE_TIMEOUT, retry_policy=STRIPE_RETRY,
                summary=f"Record charge {attempt} of {amount} for {inv.number}")
        except ActivityError as err:
            return self._failed(error_of(err))
        self._outcome.charge_id = record.charge_id
        charge = ChargeRef(charge_id=record.charge_id)
        try:
            pi = await workflow.execute_activity_method(
                TopUpActivities.charge_topup, charge, start_to_close_timeout=STRIPE_TIMEOUT, retry_policy=STRIPE_RETRY,
                summary=f"Charge {amount} to card {record.payment_method_id} off-session ({inv.number})")
        except ActivityError as err:
            error = error_of(err)
            if error.type != "card_declined":  # a decline is recorded on the charge row by the activity itself
                await mark_charge_failed(charge.charge_id, error)
            return self._failed(error)
        self._outcome.payment_intent_id = pi.id
        if pi.status == "succeeded":
            return await self._settle(inv, record.charge_id, attempt)
        if pi.status == "processing" and workflow.patched(PROCESSING_PATCH):
            return self._failed(ApplicationError(f"PaymentIntent {pi.id} is processing", type=PAYMENT_PROCESSING))
        if pi.status in WAITING_STATUSES and not pi.failure_code:
            # Off-session and the bank wants the customer (3-D Secure): nobody is there to confirm it now.
            try:
                pi = await workflow.execute_activity_method(
                    TopUpActivities.cancel_topup_payment, charge, start_to_close_timeout=STRIPE_TIMEOUT,
                    retry_policy=STRIPE_RETRY, summary=f"Cancel PaymentIntent {pi.id} (needs the customer)")
            except ActivityError as err:
                if not workflow.patched(ONE_PAYMENT_PATCH):
                    raise
                # Stripe unreachable: the attempt ended unclear; the next one checks this PaymentIntent first.
                error = error_of(err)
                await mark_charge_failed(charge.charge_id, error)
                return self._failed(error)
            if pi.status == "succeeded":
                return await self._settle(inv, record.charge_id, attempt)
            error = ApplicationError("the card needs the customer to authenticate", type="authentication_required")
        else:
            error = ApplicationError(pi.failure_message or "the card was declined", {"decline_code": pi.decline_code},
                                     type="card_declined")
        await mark_charge_failed(charge.charge_id, error)
        return self._failed(error)

    async def _settle(self, inv: InvoiceSummary, charge_id: str | None, attempt: int) -> InvoiceSummary:
        paid = await workflow.execute_activity_method(
            InvoiceActivities.settle_invoice,
            SettleInvoiceInput(invoice_id=inv.invoice_id, charge_id=charge_id, attempts=attempt),
            start_to_close_timeout=STRIPE_TIMEOUT, retry_policy=SETTLE_RETRY,
            summary=f"Mark {inv.number} paid" + (f" (charge {charge_id})" if charge_id else " (nothing due)"))
        self._outcome.error_code = self._outcome.error_message = None
        self._track(paid)
        return paid

    def _failed(self, error: ApplicationError) -> None:
        self._outcome.error_code, self._outcome.error_message = error.type or "payment_failed", error.message
        self._publish()
        return None

    def _attachment(self, inv: InvoiceSummary) -> list[Attachment]:
        return [Attachment(filename=f"{inv.number}.pdf", content_type=PDF_CONTENT_TYPE, invoice_id=inv.invoice_id)]

    async def _notify_past_due(self, inv: InvoiceSummary) -> None:
        days = max(0, (workflow.now() - inv.due_at).days)
        await notify(Notification(
            account_id=inv.account_id, kind="invoice.past_due", dedup_key=f"invoice.past_due:{inv.invoice_id}",
            payload={"invoice_id": inv.invoice_id, "number": inv.number, "total_cents": inv.amount_due_cents,
                     "amount_due_cents": inv.amount_due_cents, "due_date": f"{inv.due_at:%Y-%m-%d}",
                     "days_past_due": days, "error_code": self._outcome.error_code or "payment_failed"},
            attachments=self._attachment(inv)), summary=f"Notify: {inv.number} is past due")

    async def _email(self, inv: InvoiceSummary, kind: str) -> None:
        if not self._input.send_email:
            return
        payload: dict[str, object] = {"invoice_id": inv.invoice_id, "number": inv.number, "period": inv.period_label,
                                      "total_cents": inv.amount_due_cents, "due_date": f"{inv.due_at:%Y-%m-%d}"}
        if inv.paid_at is not None:
            payload["paid_date"] = f"{inv.paid_at:%Y-%m-%d}"
        if inv.payment_intent_id:
            payload["payment_intent_id"] = inv.payment_intent_id
        record = await notify(Notification(account_id=inv.account_id, kind=kind, dedup_key=f"{kind}:{inv.invoice_id}",
                                           payload=payload, attachments=self._attachment(inv)),
                              summary=f"Email {inv.number} with its PDF ({kind})")
        email = record.delivery("email") if record else None
        self._outcome.emailed = bool(email and email.status == "sent")
        self._publish()

    def _track(self, inv: InvoiceSummary) -> None:
        o = self._outcome
        o.invoice_id, o.number, o.amount_due_cents, o.due_at = inv.invoice_id, inv.number, inv.amount_due_cents, \
            inv.due_at
        o.paid_at = inv.paid_at
        o.status = {"draft": INVOICE_OPEN, "open": INVOICE_OPEN, "paid": INVOICE_PAID,
                    "past_due": INVOICE_PAST_DUE}.get(inv.status, inv.status)
        if inv.charge_id:
            o.charge_id = inv.charge_id
        if inv.payment_intent_id:
            o.payment_intent_id = inv.payment_intent_id
        self._publish()

    def _publish(self) -> None:
        o = self._outcome
        publish_status(o.account_id, o.status, enabled=self._input.publish_search_attributes)
        title = f"**Invoice {o.number or '(drafting)'}** for period {o.period_key}"
        lines = [title, f"- account: `{o.account_id}`", f"- status: {o.status}"]
        if o.amount_due_cents is not None:
            lines.append(f"- amount due: {format_usd(o.amount_due_cents)}"
                         + (f", due {o.due_at:%Y-%m-%d}" if o.due_at else ""))
        if o.attempts:
            lines.append(f"- charge attempts: {o.attempts}")
        if o.payment_intent_id:
            lines.append(f"- PaymentIntent: `{o.payment_intent_id}`")
        if o.error_code and o.status != INVOICE_PAID:
            lines.append(f"- last error: {o.error_code}")
        if o.next_attempt_at:
            lines.append(f"- next attempt: {o.next_attempt_at:%Y-%m-%d %H:%M} UTC")
        workflow.set_current_details("\n".join(lines))

