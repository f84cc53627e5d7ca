"""``RentalWorkflow`` (id ``rental:{account_id}:{charge_id}``): a recurring charge (number rental) paid from the wallet
every month, for wallet-only accounts (seed 004). One month per run: charge it (``charge_rental``, once per month
whatever the retries), tell the customer if the wallet could not cover it (``recurring_charge.failed``), sleep until
the next month on a durable timer, continue as new. It ends when the charge is removed. Plan accounts have the charge
on their invoice: their months are recorded ``invoiced`` and not charged to the wallet."""

from __future__ import annotations

from datetime import datetime

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.rentals import RentalActivities, RentalResult
    from creditflow.domain.notifications import Notification
    from workflows.common import DB_TIMEOUT, db_retry
    from workflows.contract import RENTAL_WORKFLOW, RentalInput
    from workflows.notify import notify

RENTAL_RETRY = db_retry(["unknown_account", "validation_error"])
FAILED = "recurring_charge.failed"


@workflow.defn(name=RENTAL_WORKFLOW)
class RentalWorkflow:
    @workflow.run
    async def run(self, input: RentalInput) -> str:
        result: RentalResult = await workflow.execute_activity_method(
            RentalActivities.charge_rental, input, start_to_close_timeout=DB_TIMEOUT, retry_policy=RENTAL_RETRY,
            summary=f"Charge month {input.index} of rental {input.charge_id}")
        month = result.month
        if month.status == "removed":
            return "removed"
        if month.status == "unpaid":
            await notify(Notification(
                account_id=input.account_id, kind=FAILED, dedup_key=f"{FAILED}:{input.charge_id}:{month.period_key}",
                payload={"charge_id": input.charge_id, "description": month.description, "quantity": month.quantity,
                         "amount_micros": month.amount_micros, "period": month.period_key}),
                summary=f"Tell the customer: rental {month.period_key} unpaid")
        due = datetime.fromisoformat(result.next_due)
        if due > workflow.now():
            await workflow.sleep(due - workflow.now(), summary=f"Next month of rental {input.charge_id}")
        workflow.continue_as_new(input.model_copy(update={"index": input.index + 1}))
