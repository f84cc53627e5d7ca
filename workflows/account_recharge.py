"""The account workflow's auto-recharge: decide (``creditflow.domain.recharge``), run at most one
``AutoRechargeWorkflow`` child at a time, back off on failures, stop at the daily cap, disable after too many
failures in a row, and tell the customer each time."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from activities.auto_recharge import AutoRechargeActivities, RechargeAccountInput, RecordRechargeAttemptInput
    from creditflow.domain.money import micros_to_credits
    from creditflow.domain.recharge import Action, Reason, after_attempt, decide, rebase
    from creditflow.domain.topups import format_usd
    from workflows.account_state import LOAD_RETRY, AccountRun
    from workflows.auto_recharge import AutoRechargeWorkflow
    from workflows.common import DB_TIMEOUT, db_retry, error_of
    from workflows.contract import (
        RECHARGE_SUCCEEDED,
        AutoRechargeInput,
        AutoRechargeOutcome,
        OutboxEvent,
        auto_recharge_workflow_id,
    )

# Reading the recharge settings: a failure is retried by the next decision (a minute later), not forever here.
RECHARGE_LOAD_RETRY = db_retry(["unknown_account"])
RECHARGE_RELOAD_AFTER = timedelta(minutes=1)
# ``recharge_reason`` while a recharge started by an earlier run may still be charging.
RECHARGE_IN_FLIGHT = "recharge_in_flight"


class AutoRecharge:
    """Auto-recharge of one account: single-flight, because the child is awaited before anything else."""

    def __init__(self, run: AccountRun) -> None:
        self.run = run

    def on_below_threshold(self, event: OutboxEvent) -> None:
        """The available balance crossed a watched threshold: low-balance alerts for it (if any), and a
        decision about a recharge (one in flight at most)."""
        self.run.input.pending_alert_events.append(event)
        self.run.input.recharge_requested = True

    async def decide_and_charge(self) -> None:
        """Decide, and if due run one ``AutoRechargeWorkflow`` to its end; record and report the outcome."""
        run = self.run
        i = run.input
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
        run.recharge_reason = decision.reason.value
        if decision.action == Action.WAIT:
            i.recharge_wake_at = decision.wake_at
            if decision.reason == Reason.DAILY_CAP_REACHED and state.cap_notified_day != now.date():
                i.recharge = state.model_copy(update={"cap_notified_day": now.date()})
                await run.notify_customer("auto_recharge.daily_cap_reached", f"{now.date().isoformat()}", {
                    "max_per_day": plan.policy.max_per_day, "next_attempt_at": str(decision.wake_at)})
        if decision.action == Action.CHARGE and plan.in_flight_seq is not None:
            # Started by an earlier run (terminated or reset while its child ran) and maybe still charging: no second
            # recharge meanwhile; look again shortly (the row is final, or abandoned, within minutes).
            i.recharge_wake_at = now + RECHARGE_RELOAD_AFTER
            run.recharge_reason = RECHARGE_IN_FLIGHT
            run.publish()
            return
        if decision.action != Action.CHARGE or plan.config is None:
            run.publish()
            return
        config = plan.config
        seq = max(state.seq, plan.last_seq) + 1  # never a number whose charge row exists (a reset run's is stale)
        i.recharge = state.model_copy(update={"seq": seq})
        child_id = auto_recharge_workflow_id(i.account_id, seq)
        run.recharge_in_flight = child_id
        run.publish()
        try:
            outcome: AutoRechargeOutcome = await workflow.execute_child_workflow(
                AutoRechargeWorkflow.run,
                AutoRechargeInput(account_id=i.account_id, seq=seq, credits=config.amount_credits,
                                  amount_cents=config.amount_cents, payment_method_id=config.payment_method_id,
                                  threshold_micros=config.threshold_micros, available_micros=plan.available_micros,
                                  publish_search_attributes=i.publish_search_attributes),
                id=child_id, parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                static_summary=f"Auto-recharge #{seq}: {format_usd(config.amount_cents)}")
        except ChildWorkflowError as err:
            outcome = AutoRechargeOutcome(status="failed", account_id=i.account_id, seq=seq,
                                          credits=config.amount_credits, amount_cents=config.amount_cents,
                                          error_code="recharge_workflow_failed", error_message=str(err.cause or err))
        run.recharge_in_flight = None
        succeeded = outcome.status == RECHARGE_SUCCEEDED
        i.recharge, disable = after_attempt(i.recharge, succeeded=succeeded, error=outcome.error_code,
                                            policy=plan.policy, now=workflow.now())
        if not succeeded and not disable:
            i.recharge_wake_at = i.recharge.next_attempt_at
            run.recharge_reason = Reason.BACKING_OFF.value
        current = await self._record(config.generation, outcome, "too_many_failures" if disable else None)
        if not succeeded:
            payload = {"seq": seq, "workflow_id": child_id, "error_code": outcome.error_code,
                       "error_message": outcome.error_message, "decline_code": outcome.decline_code,
                       "amount": format_usd(config.amount_cents), "credits": config.amount_credits,
                       "consecutive_failures": i.recharge.consecutive_failures,
                       "threshold": str(micros_to_credits(config.threshold_micros)),
                       "next_attempt_at": str(i.recharge.next_attempt_at) if not disable else None}
            await run.notify_customer("auto_recharge.failed", f"{seq}", payload)
            if disable and current:
                run.recharge_reason = Reason.DISABLED.value
                await run.notify_customer("auto_recharge.disabled", f"{seq}", {
                    **payload, "reason": "too_many_failures",
                    "max_consecutive_failures": plan.policy.max_consecutive_failures})
        run.publish()

    async def _record(self, generation: int, outcome: AutoRechargeOutcome, disable_reason: str | None) -> bool:
        """Mirror the attempt in the database (and disable there); False if the settings changed meanwhile."""
        i = self.run.input
        try:
            return await workflow.execute_activity_method(
                AutoRechargeActivities.record_auto_recharge_attempt,
                RecordRechargeAttemptInput(account_id=i.account_id, generation=generation,
                                           status=outcome.status, error=outcome.error_code,
                                           consecutive_failures=i.recharge.consecutive_failures,
                                           attempted_at=workflow.now(), disable_reason=disable_reason,
                                           seq=outcome.seq, charge_id=outcome.charge_id),
                start_to_close_timeout=DB_TIMEOUT, retry_policy=LOAD_RETRY,
                summary="Disable auto-recharge" if disable_reason else f"Record auto-recharge {outcome.status}")
        except ActivityError as err:  # unknown account: nothing to mirror
            workflow.logger.warning("auto-recharge attempt not recorded: %s", error_of(err).message)
            return False
