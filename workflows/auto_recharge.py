"""``AutoRechargeWorkflow`` (id ``recharge:{account_id}:{seq}``): one off-session charge for auto-recharge.

Started (and awaited) by the account workflow, which keeps the single-flight, the daily cap, the back-off
and the "disable after N failures" rule; this workflow is one attempt:

1. Record the charge row (kind ``auto_recharge``, request id ``recharge-{seq}``) with the card resolved: the
   one configured, else the default. No saved card: ``no_payment_method``, nothing charged.
2. Charge it off-session (the top-up activities: the row guards retries, the PaymentIntent id is recorded).
3. ``succeeded``: credit the wallet (journal ``auto_recharge``, lot ``auto_recharge``, key
   ``sys:topup:{payment_intent_id}``) and send the receipt. A decline, or a card that needs the customer
   (3-D Secure), fails the attempt; an unconfirmed PaymentIntent is canceled so it cannot be paid later.
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.topups import ChargeRef, RecordTopUpInput, TopUpActivities
    from creditflow.domain.charges import KIND_AUTO_RECHARGE, PaymentIntentState
    from creditflow.domain.notifications import Notification
    from creditflow.domain.topups import format_usd
    from workflows.common import DB_TIMEOUT, STRIPE_TIMEOUT, error_details, error_of, publish_status
    from workflows.contract import (
        AUTO_RECHARGE_WORKFLOW,
        QUERY_RECHARGE_STATUS,
        RECHARGE_FAILED,
        RECHARGE_SUCCEEDED,
        AutoRechargeInput,
        AutoRechargeOutcome,
    )
    from workflows.notify import notify
    from workflows.topup import CREDIT_RETRY, STRIPE_RETRY, WAITING_STATUSES, mark_charge_failed


def recharge_request_id(seq: int) -> str:
    """The ``stripe_charges`` request id of attempt ``seq`` (scoped by kind, so no top-up can collide)."""
    return f"recharge-{seq}"


@workflow.defn(name=AUTO_RECHARGE_WORKFLOW)
class AutoRechargeWorkflow:
    @workflow.init
    def __init__(self, input: AutoRechargeInput) -> None:
        self._input = input
        self._outcome = AutoRechargeOutcome(account_id=input.account_id, seq=input.seq, credits=input.credits,
                                            amount_cents=input.amount_cents)

    @workflow.run
    async def run(self, input: AutoRechargeInput) -> AutoRechargeOutcome:
        self._publish()
        amount = format_usd(input.amount_cents)
        try:
            record = await workflow.execute_activity_method(
                TopUpActivities.record_topup_charge,
                RecordTopUpInput(account_id=input.account_id, request_id=recharge_request_id(input.seq),
                                 amount_cents=input.amount_cents, credits=input.credits,
                                 description=f"Auto-recharge: {input.credits:,} credits",
                                 payment_method_id=input.payment_method_id, kind=KIND_AUTO_RECHARGE,
                                 require_card=True),
                start_to_close_timeout=STRIPE_TIMEOUT, retry_policy=STRIPE_RETRY,
                summary=f"Record the {amount} auto-recharge")
        except ActivityError as err:
            return self._failed(error_of(err))
        self._outcome.charge_id = record.charge_id
        charge = ChargeRef(charge_id=record.charge_id)
        try:
            pi = await workflow.execute_activity_method(
                TopUpActivities.charge_topup, charge, start_to_close_timeout=STRIPE_TIMEOUT,
                retry_policy=STRIPE_RETRY, summary=f"Charge {amount} to card {record.payment_method_id} off-session")
        except ActivityError as err:
            error = error_of(err)
            if error.type != "card_declined":  # a decline is recorded on the row by the activity itself
                await mark_charge_failed(charge.charge_id, error)
            return self._failed(error)
        self._outcome.payment_intent_id = pi.id
        if pi.status == "succeeded":
            await self._credit(pi)
            return self._outcome
        if pi.status in WAITING_STATUSES and not pi.failure_code:
            # Off-session and the bank wants the customer (3-D Secure): nobody is there to confirm it.
            pi = await workflow.execute_activity_method(
                TopUpActivities.cancel_topup_payment, charge, start_to_close_timeout=STRIPE_TIMEOUT,
                retry_policy=STRIPE_RETRY, summary=f"Cancel PaymentIntent {pi.id} (needs the customer)")
            if pi.status == "succeeded":  # paid meanwhile after all
                await self._credit(pi)
                return self._outcome
            error = ApplicationError("the card needs the customer to authenticate; auto-recharge cannot",
                                     type="authentication_required")
        else:
            error = ApplicationError(pi.failure_message or "the card was declined", {"decline_code": pi.decline_code},
                                     type="card_declined")
        await mark_charge_failed(charge.charge_id, error)
        return self._failed(error)

    @workflow.query(name=QUERY_RECHARGE_STATUS)
    def status(self) -> AutoRechargeOutcome:
        return self._outcome

    async def _credit(self, pi: PaymentIntentState) -> None:
        o = self._outcome
        result = await workflow.execute_activity_method(
            TopUpActivities.credit_topup, ChargeRef(charge_id=o.charge_id or ""), start_to_close_timeout=DB_TIMEOUT,
            retry_policy=CREDIT_RETRY, summary=f"Credit {o.credits:,} credits for {pi.id}")
        o.transaction_id, o.balance = result.transaction_id, result.balance
        o.status = RECHARGE_SUCCEEDED
        self._publish()
        receipt = Notification(
            account_id=o.account_id, kind="auto_recharge.succeeded", dedup_key=f"receipt:{o.charge_id}",
            payload={"charge_id": o.charge_id, "seq": o.seq, "payment_intent_id": pi.id,
                     "transaction_id": result.transaction_id, "amount_cents": o.amount_cents,
                     "amount": format_usd(o.amount_cents), "credits": o.credits, "balance": str(result.balance)})
        await notify(receipt, summary=f"Send the auto-recharge receipt ({format_usd(o.amount_cents)})")

    def _failed(self, error: ApplicationError) -> AutoRechargeOutcome:
        details = error_details(error)
        o = self._outcome
        o.status = RECHARGE_FAILED
        o.error_code, o.error_message = error.type or "payment_failed", error.message
        o.decline_code = details.get("decline_code")
        self._publish()
        return o

    def _publish(self) -> None:
        o = self._outcome
        publish_status(o.account_id, o.status, enabled=self._input.publish_search_attributes)
        lines = [f"**Auto-recharge #{o.seq}** {format_usd(o.amount_cents)} for {o.credits:,} credits",
                 f"- account: `{o.account_id}`", f"- status: {o.status}"]
        if o.payment_intent_id:
            lines.append(f"- PaymentIntent: `{o.payment_intent_id}`")
        if o.transaction_id:
            lines.append(f"- ledger transaction: `{o.transaction_id}`")
        if o.error_code:
            lines.append(f"- error: {o.error_code}" + (f" ({o.decline_code})" if o.decline_code else ""))
        workflow.set_current_details("\n".join(lines))
