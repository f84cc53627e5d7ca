"""The account workflow's billing cycle: subscribe, change plan (now, prorated, or at the next renewal), renew.

A renewal closes the period and opens the next (credits expired and granted once) and starts the period's
``InvoiceWorkflow`` as a child; the run continues as new once its invoices are done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError, WorkflowAlreadyStartedError

with workflow.unsafe.imports_passed_through():
    from activities.billing_cycle import (
        BillingCycleActivities,
        ChangeNowInput,
        PendingPlanInput,
        RenewInput,
        RenewResult,
        StartSubscriptionInput,
    )
    from workflows.account_rebuild import PATCH_REBUILD_STATE
    from workflows.account_state import LOAD_RETRY, AccountRun
    from workflows.common import DB_TIMEOUT, db_retry, error_of
    from workflows.contract import INVOICE_WORKFLOW, PlanChange, SubscriptionState, invoice_workflow_id

# Billing-cycle steps that write: retried for minutes on outages, refusals (an unknown plan) at once.
CYCLE_RETRY = db_retry(["unknown_plan", "unknown_account", "validation_error"])


def validate_plan_change(change: PlanChange) -> None:
    """Refuse an unknown ``effective`` before the update enters the history."""
    if change.effective not in ("next_renewal", "immediately"):
        raise ApplicationError("effective is next_renewal or immediately", type="validation_error",
                               non_retryable=True)


class BillingCycle:
    """Plan changes and renewals of one run, one at a time (``run.cycle_lock``)."""

    def __init__(self, run: AccountRun) -> None:
        self.run = run

    async def change_plan(self, change: PlanChange) -> SubscriptionState:
        """Subscribe (starts now, with the plan's credits), or change plan / cancel at the next renewal."""
        run = self.run
        if workflow.patched(PATCH_REBUILD_STATE):  # a new run first learns whether there is a subscription
            await workflow.wait_condition(lambda: run.input.loaded)
        async with run.cycle_lock:
            i = run.input
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
            run.rearm = True
            run.publish()
            return i.subscription

    async def _cycle_step(self, method: Callable[..., Any], arg: Any, summary: str) -> SubscriptionState:
        """Run a cycle activity; a refusal (unknown plan) becomes the update's typed error."""
        try:
            return await workflow.execute_activity_method(method, arg, start_to_close_timeout=DB_TIMEOUT,
                                                          retry_policy=CYCLE_RETRY, summary=summary)
        except ActivityError as err:
            error = error_of(err)
            raise ApplicationError(error.message, type=error.type, non_retryable=True) from None

    def renewal_due(self) -> bool:
        s = self.run.input.subscription
        return s is not None and s.status == "active" and workflow.now() >= s.period_end

    async def renew(self) -> None:
        """Close the period and open the next (credits expired and granted once), then start its invoice."""
        run = self.run
        async with run.cycle_lock:
            i = run.input
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
                run.publish()
                return
            i.subscription = result.subscription or s.model_copy(update={"status": "canceled",
                                                                          "pending_plan_id": None})
            result.invoice.publish_search_attributes = i.publish_search_attributes
            if i.simulation:
                result.invoice.charge = result.invoice.send_email = False
            invoice_id = invoice_workflow_id(i.account_id, result.invoice.period_key or "")
            run.invoices.append(asyncio.create_task(self._invoice(invoice_id, result)))
            run.period_turned = True
            run.publish()

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
