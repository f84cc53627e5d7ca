"""``AccountWorkflow``: the entity workflow of one account (id ``account:{account_id}``).

It receives the outbox events of its account (deduplicated by key), keeps a small state for the ``state``
query, and publishes the account in the Temporal UI (search attributes and details). It creates the Stripe
customer and runs auto-recharge: a ``balance.below_threshold`` event (written by the hot path at the
crossing) asks for a decision (``creditflow.domain.recharge``); a recharge is an ``AutoRechargeWorkflow``
child ``recharge:{account_id}:{seq}``, awaited before anything else, so at most one is in flight however many
events cross the threshold. Failures back off on a durable timer, a daily cap bounds attempts, and too
many failures in a row disable auto-recharge. It also runs the billing cycle and agent pause/resume.

The class keeps the workflow's interface (run, signals, updates, query) and the main loop; each concern lives in
a helper it delegates to, all sharing one ``AccountRun`` (workflows/account_state.py): the billing cycle
(account_cycle.py), agents (account_agents.py), auto-recharge (account_recharge.py), the Stripe customer and
payment events (account_payments.py), loading a new run's state (account_rebuild.py). Each new event kind gets
an entry in ``_effects``, each new piece of carried state a defaulted field in ``AccountWorkflowInput``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.alerts import BalanceAlertInput, DailyUsageAlertInput
    from workflows.account_agents import Agents
    from workflows.account_cycle import BillingCycle, validate_plan_change
    from workflows.account_payments import Payments
    from workflows.account_rebuild import PATCH_REBUILD_STATE, load_state
    from workflows.account_recharge import AutoRecharge
    from workflows.account_state import AccountRun
    from workflows.contract import (
        ACCOUNT_WORKFLOW,
        OUTBOX_BELOW_THRESHOLD,
        OUTBOX_DAILY_USAGE_THRESHOLD,
        OUTBOX_LIMIT_REACHED,
        OUTBOX_PAYMENT_SUCCEEDED_LATE,
        OUTBOX_RECHARGE_SUCCEEDED_LATE,
        OUTBOX_STRIPE_DISPUTE_CLOSED,
        OUTBOX_STRIPE_DISPUTED,
        OUTBOX_STRIPE_REFUNDED,
        QUERY_STATE,
        SIGNAL_OUTBOX_EVENT,
        SIGNAL_PAUSE_AGENT,
        SIGNAL_RESUME_AGENT,
        UPDATE_CHANGE_PLAN,
        UPDATE_PAUSE_AGENT,
        UPDATE_RESUME_AGENT,
        AccountState,
        AccountWorkflowInput,
        AgentCommand,
        AgentStatus,
        OutboxEvent,
        PlanChange,
        SubscriptionState,
    )
    from workflows.notify import fire_balance_alerts_from_workflow, send_daily_usage_alert_from_workflow

# The outbox kinds written by the hot path: the balance watch, limits reached, limits saved.
BELOW_THRESHOLD = OUTBOX_BELOW_THRESHOLD
LIMIT_REACHED = OUTBOX_LIMIT_REACHED
LIMITS_CHANGED = "limits.changed"
DAILY_USAGE_THRESHOLD = OUTBOX_DAILY_USAGE_THRESHOLD
# Histories recorded before alerts existed crossed thresholds without sending any: on replay none are sent.
PATCH_ALERTS = "balance-alerts"


@workflow.defn(name=ACCOUNT_WORKFLOW)
class AccountWorkflow:
    @workflow.init
    def __init__(self, input: AccountWorkflowInput) -> None:
        # ``init`` runs before the start signal of signal-with-start is handled.
        self._run = AccountRun(input)
        self._input = self._run.input
        self._cycle = BillingCycle(self._run)
        self._agents = Agents(self._run)
        self._recharge = AutoRecharge(self._run)
        self._payments = Payments(self._run)
        self._effects: dict[str, Callable[[OutboxEvent], None]] = {
            "account.created": self._payments.on_account_created,
            BELOW_THRESHOLD: self._recharge.on_below_threshold,
            LIMIT_REACHED: self._agents.on_limit_reached,
            LIMITS_CHANGED: self._agents.on_limits_changed,
            DAILY_USAGE_THRESHOLD: self._on_daily_usage,
            OUTBOX_STRIPE_REFUNDED: self._payments.on_payment_event,
            OUTBOX_STRIPE_DISPUTED: self._payments.on_payment_event,
            OUTBOX_STRIPE_DISPUTE_CLOSED: self._payments.on_payment_event,
            OUTBOX_RECHARGE_SUCCEEDED_LATE: self._payments.on_payment_event,
            OUTBOX_PAYMENT_SUCCEEDED_LATE: self._payments.on_payment_event,
        }

    @workflow.run
    async def run(self, input: AccountWorkflowInput) -> None:
        run = self._run
        if not self._input.loaded:
            await load_state(run)
            self._input.loaded = True
            early, run.early_events = run.early_events, []
            for event in early:  # left unapplied by an earlier run, or delivered while the state was being rebuilt
                self.outbox_event(event)
        run.publish()
        while True:
            run.wake_if_due()
            if self._input.stripe_customer_pending:
                await self._payments.ensure_stripe_customer()
            elif self._input.pending_payment_events:
                await self._payments.apply_payment_event(self._input.pending_payment_events[0])
                self._input.pending_payment_events.pop(0)
            elif self._input.pending_alert_events:
                await self._send_alert(self._input.pending_alert_events[0])
                self._input.pending_alert_events.pop(0)
            elif self._input.pending_limit_events:
                await self._agents.apply_limit(self._input.pending_limit_events[0])
                self._input.pending_limit_events.pop(0)
            elif self._input.agents_recheck:
                await self._agents.resume_system_paused("limits")
            elif self._cycle.renewal_due():
                await self._cycle.renew()
            elif self._input.recharge_requested:
                await self._recharge.decide_and_charge()
            elif run.should_continue_as_new():
                break
            else:
                run.rearm = False
                with contextlib.suppress(TimeoutError):  # a timer came due
                    await workflow.wait_condition(
                        lambda: run.has_work() or run.rearm or run.should_continue_as_new(),
                        timeout=run.until_wake())
        # Let running handlers finish so no signal is half-applied when this run closes.
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(run.carry_over())

    @workflow.signal(name=SIGNAL_OUTBOX_EVENT)
    def outbox_event(self, event: OutboxEvent) -> None:
        """Apply an outbox event once: a dedup key seen before is counted and ignored."""
        run = self._run
        if not self._input.loaded and workflow.patched(PATCH_REBUILD_STATE):
            run.early_events.append(event)  # applied once the dedup window is rebuilt from the database
            return
        if event.dedup_key in run.dedup:
            self._input.duplicates_ignored += 1
            return
        run.dedup.remember(event.dedup_key)
        effect = self._effects.get(event.kind)
        if effect is not None:
            effect(event)
        self._input.events_processed += 1
        self._input.last_event_kind = event.kind
        self._input.last_event_at = event.created_at
        run.events_this_run += 1
        run.publish()

    @workflow.query(name=QUERY_STATE)
    def state(self) -> AccountState:
        i, run = self._input, self._run
        return AccountState(
            account_id=i.account_id, name=i.name, status=i.status, events_processed=i.events_processed,
            duplicates_ignored=i.duplicates_ignored, last_event_kind=i.last_event_kind,
            last_event_at=i.last_event_at, recent_dedup_keys=len(run.dedup),
            continued_as_new=i.continued_as_new, stripe_customer_id=i.stripe_customer_id, recharge=i.recharge,
            recharge_in_flight=run.recharge_in_flight, recharge_reason=run.recharge_reason,
            recharge_wake_at=i.recharge_wake_at, subscription=i.subscription,
        )

    @workflow.update(name=UPDATE_CHANGE_PLAN)
    async def change_plan(self, change: PlanChange) -> SubscriptionState:
        """Subscribe (starts now, with the plan's credits), or change plan / cancel at the next renewal."""
        return await self._cycle.change_plan(change)

    @change_plan.validator
    def _valid_plan_change(self, change: PlanChange) -> None:
        validate_plan_change(change)

    @workflow.signal(name=SIGNAL_PAUSE_AGENT)
    async def pause_agent_signal(self, command: AgentCommand) -> None:
        """Pause an agent (fire and forget: a refused transition is only logged)."""
        await self._agents.command(command, paused=True, raise_refusal=False)

    @workflow.signal(name=SIGNAL_RESUME_AGENT)
    async def resume_agent_signal(self, command: AgentCommand) -> None:
        await self._agents.command(command, paused=False, raise_refusal=False)

    @workflow.update(name=UPDATE_PAUSE_AGENT)
    async def pause_agent(self, command: AgentCommand) -> AgentStatus:
        """Pause an agent and return its new status; ``invalid_transition`` if it is already paused."""
        status = await self._agents.command(command, paused=True, raise_refusal=True)
        assert status is not None
        return status

    @workflow.update(name=UPDATE_RESUME_AGENT)
    async def resume_agent(self, command: AgentCommand) -> AgentStatus:
        """Resume an agent and return its new status; ``invalid_transition`` if it is not paused."""
        status = await self._agents.command(command, paused=False, raise_refusal=True)
        assert status is not None
        return status

    # --- alerts --------------------------------------------------------------------------------------

    def _on_daily_usage(self, event: OutboxEvent) -> None:
        self._input.pending_alert_events.append(event)

    async def _send_alert(self, event: OutboxEvent) -> None:
        """Send the alerts an event calls for, once per channel (keyed by the event); never blocks billing."""
        if not workflow.patched(PATCH_ALERTS):
            return
        if event.kind == DAILY_USAGE_THRESHOLD:
            await send_daily_usage_alert_from_workflow(
                DailyUsageAlertInput(account_id=self._input.account_id, dedup_key=event.dedup_key, **event.payload))
        else:
            await fire_balance_alerts_from_workflow(
                BalanceAlertInput(account_id=self._input.account_id, dedup_key=event.dedup_key, **event.payload))
