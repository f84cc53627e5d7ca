"""``ReconciliationWorkflow``: compare the ledger with Stripe, repair what is safely repairable, report the rest.

Started by the Temporal Schedule ``creditflow-reconcile`` (daily by default; the worker creates it) or by
``creditflow reconcile`` (id ``reconcile:manual:{uuid}``). Thin on purpose; each step is one activity:

1. ``open_reconciliation``: the run's row and window (``since``: the input, or the last completed run's end);
2. ``reconcile_with_stripe``: list Stripe's PaymentIntents, refunds and disputes of the window, re-check
   creditflow's unsettled charges and refunds, repair through the same idempotent paths the other workflows use,
   store every difference;
3. ``verify_and_complete_reconciliation``: ``creditflow verify`` over the ledger after the repairs;
4. ``notify_reconciliation``: when something is left to look at, an email to the operators.

The run id is the workflow id, so a retried or re-run step writes the same row.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.reconcile import OpenRunInput, ReconcileActivities, RunRef
    from workflows.common import DB_TIMEOUT, db_retry
    from workflows.contract import RECONCILIATION_WORKFLOW, ReconcileInput, ReconcileSummary

# Listing a day of Stripe objects and repairing them can take minutes; outages are retried a few times, then the
# run fails and the next one (whose window starts at the last *completed* run) covers the same objects again.
RECONCILE_TIMEOUT = timedelta(minutes=30)
RECONCILE_RETRY = RetryPolicy(initial_interval=timedelta(seconds=10), backoff_coefficient=2.0,
                              maximum_interval=timedelta(minutes=5), maximum_attempts=5)
DB_RETRY = db_retry(["not_found", "unknown_account"])


@workflow.defn(name=RECONCILIATION_WORKFLOW)
class ReconciliationWorkflow:
    @workflow.run
    async def run(self, input: ReconcileInput) -> ReconcileSummary:
        run_id = workflow.info().workflow_id
        trigger = "manual" if input.trigger == "manual" else "schedule"
        window = await workflow.execute_activity_method(
            ReconcileActivities.open_reconciliation, OpenRunInput(run_id=run_id, trigger=trigger, since=input.since),
            start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY, summary="open the run")
        try:
            await workflow.execute_activity_method(
                ReconcileActivities.reconcile_with_stripe, window, start_to_close_timeout=RECONCILE_TIMEOUT,
                retry_policy=RECONCILE_RETRY, summary="match Stripe with the ledger, repair")
            summary = await workflow.execute_activity_method(
                ReconcileActivities.verify_and_complete, RunRef(run_id=run_id),
                start_to_close_timeout=RECONCILE_TIMEOUT, retry_policy=DB_RETRY, summary="creditflow verify")
        except ActivityError:
            await workflow.execute_activity_method(
                ReconcileActivities.fail_reconciliation, RunRef(run_id=run_id), start_to_close_timeout=DB_TIMEOUT,
                retry_policy=DB_RETRY)
            raise
        workflow.logger.info("reconciliation %s: %d repaired, %d reported, %s violations", run_id,
                             summary.repaired, summary.reported, summary.violations)
        if summary.reported or summary.violations:
            await workflow.execute_activity_method(
                ReconcileActivities.notify_operators, summary, start_to_close_timeout=DB_TIMEOUT,
                retry_policy=RetryPolicy(maximum_attempts=5), summary="email the operators")
        return summary
