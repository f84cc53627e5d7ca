"""``AccountWorkflow``'s branches in seconds: the real workflow (and its real ``AutoRechargeWorkflow`` child) on
Temporal's time-skipping test server, with every activity replaced by a fake registered under the production
activity's name (Temporal's "mocking activities" pattern). No PostgreSQL, no Stripe: the fakes answer from memory
and record what the workflow asked, so each test asserts the exact inputs the workflow sent and the exact state it
reached. The real-stack tests (test_auto_recharge.py, test_billing_cycle.py, test_agents_workflow.py) prove the
money moves; these prove the workflow's decisions: back-off, daily cap, plan changes, agent pause and resume.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.accounts import AccountRebuild, AccountSnapshot, RebuildInput
from activities.agents import AgentChanges, LimitReachedInput, ResumeInput, SetAgentStatusInput
from activities.alerts import BalanceAlertInput, BalanceAlertsResult
from activities.auto_recharge import RechargeAccountInput, RechargePlan, RecordRechargeAttemptInput
from activities.billing_cycle import (
    ChangeNowInput,
    PendingPlanInput,
    RenewInput,
    RenewResult,
    StartSubscriptionInput,
)
from activities.topups import ChargeRef, ChargeSnapshot, RecordTopUpInput
from creditflow.domain.charges import PaymentIntentState
from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.domain.notifications import Notification, NotificationRecord
from creditflow.domain.recharge import RechargeConfig, RechargePolicy, RechargeState, next_utc_midnight
from creditflow.payments.topups import CreditResult
from tests.conftest import _temporal_cli
from tests.support.fake_workflows import EchoInvoiceWorkflow
from workflows.account import AccountWorkflow
from workflows.auto_recharge import AutoRechargeWorkflow
from workflows.contract import (
    OUTBOX_BELOW_THRESHOLD,
    OUTBOX_LIMIT_REACHED,
    AccountState,
    AccountWorkflowInput,
    AgentCommand,
    AgentStatus,
    InvoiceWorkflowInput,
    OutboxEvent,
    PlanChange,
    PlanProration,
    SubscriptionState,
    account_workflow_id,
    invoice_workflow_id,
)

pytestmark = pytest.mark.temporal

CREDIT = MICROS_PER_CREDIT
THRESHOLD = 1_000 * CREDIT  # recharge below 1,000 credits ...
RECHARGE_CREDITS = 2_000  # ... by 2,000 credits ($20.00)
PERIOD = timedelta(days=30)


@dataclass
class FakeActivities:
    """Every activity ``AccountWorkflow`` and ``AutoRechargeWorkflow`` call, answered from memory and recorded."""

    account_id: str
    available_micros: int = 500 * CREDIT
    config: RechargeConfig | None = None
    policy: RechargePolicy = field(default_factory=RechargePolicy)
    cards: list[str] = field(default_factory=list)  # the outcome of each charge in turn: "succeeded" / "declined"
    credit_raises_balance: bool = True  # False: the customer spends each recharge at once
    loads: list[RechargeAccountInput] = field(default_factory=list)
    charges: list[RecordTopUpInput] = field(default_factory=list)
    attempts: list[RecordRechargeAttemptInput] = field(default_factory=list)
    notifications: list[Notification] = field(default_factory=list)
    alerts: list[BalanceAlertInput] = field(default_factory=list)
    cycle: list[tuple[str, Any]] = field(default_factory=list)
    agents: dict[str, AgentStatus] = field(default_factory=dict)
    agent_calls: list[Any] = field(default_factory=list)
    events: int = 0
    rebuilt: AccountRebuild | None = None  # what the database holds for a new run (None: a new account)
    rebuilds: list[RebuildInput] = field(default_factory=list)

    def all(self) -> list[Callable[..., Any]]:
        return [self.rebuild_account_state, self.send_notification, self.fire_balance_alerts,
                self.load_auto_recharge, self.record_auto_recharge_attempt, self.record_topup_charge,
                self.charge_topup, self.credit_topup, self.mark_topup_charge, self.start_subscription,
                self.change_plan_now, self.set_pending_plan, self.renew_subscription, self.set_agent_status,
                self.pause_for_limit, self.resume_system_paused]

    def kinds(self) -> list[str]:
        return [n.kind for n in self.notifications]

    # --- account, notifications, alerts ------------------------------------------------------------------

    @activity.defn(name="rebuild_account_state")
    async def rebuild_account_state(self, input: RebuildInput) -> AccountRebuild:
        self.rebuilds.append(input)
        return self.rebuilt or AccountRebuild(
            account=AccountSnapshot(account_id=input.account_id, name="Acme", status="active"))

    @activity.defn(name="send_notification")
    async def send_notification(self, input: Notification) -> NotificationRecord:
        self.notifications.append(input)
        return NotificationRecord(id=len(self.notifications), created=True)

    @activity.defn(name="fire_balance_alerts")
    async def fire_balance_alerts(self, input: BalanceAlertInput) -> BalanceAlertsResult:
        self.alerts.append(input)
        return BalanceAlertsResult()

    # --- auto-recharge -------------------------------------------------------------------------------

    @activity.defn(name="load_auto_recharge")
    async def load_auto_recharge(self, input: RechargeAccountInput) -> RechargePlan:
        self.loads.append(input)
        return RechargePlan(config=self.config, available_micros=self.available_micros, policy=self.policy,
                            last_seq=len(self.charges))

    @activity.defn(name="record_auto_recharge_attempt")
    async def record_auto_recharge_attempt(self, input: RecordRechargeAttemptInput) -> bool:
        self.attempts.append(input)
        return True

    @activity.defn(name="record_topup_charge")
    async def record_topup_charge(self, input: RecordTopUpInput) -> ChargeSnapshot:
        self.charges.append(input)
        return ChargeSnapshot(charge_id=f"ch_{input.request_id}", status="pending",
                              payment_method_id=input.payment_method_id)

    @activity.defn(name="charge_topup")
    async def charge_topup(self, input: ChargeRef) -> PaymentIntentState:
        if self.cards.pop(0) == "declined":  # as the real activity reports a decline (recorded on the row)
            raise ApplicationError("Your card was declined.", {"decline_code": "insufficient_funds"},
                                   type="card_declined", non_retryable=True)
        return PaymentIntentState(id=f"pi_{input.charge_id}", status="succeeded", amount_cents=RECHARGE_CREDITS,
                                  currency="usd")

    @activity.defn(name="credit_topup")
    async def credit_topup(self, input: ChargeRef) -> CreditResult:
        if self.credit_raises_balance:
            self.available_micros += RECHARGE_CREDITS * CREDIT
        return CreditResult(transaction_id=f"tx_{input.charge_id}", credits=RECHARGE_CREDITS,
                            balance=Decimal(self.available_micros) / CREDIT, replayed=False)

    @activity.defn(name="mark_topup_charge")
    async def mark_topup_charge(self, input: Any) -> None:
        raise AssertionError(f"no charge is marked failed by hand here: {input}")

    # --- billing cycle -------------------------------------------------------------------------------

    @activity.defn(name="start_subscription")
    async def start_subscription(self, input: StartSubscriptionInput) -> SubscriptionState:
        self.cycle.append(("start", input))
        return SubscriptionState(plan_id=input.plan_id, anchor=input.anchor, period_index=0,
                                 period_start=input.anchor, period_end=input.anchor + PERIOD)

    @activity.defn(name="change_plan_now")
    async def change_plan_now(self, input: ChangeNowInput) -> SubscriptionState:
        self.cycle.append(("now", input))
        s = input.subscription
        return s.model_copy(update={
            "plan_id": input.new_plan_id, "fee_plan_id": s.fee_plan_id or s.plan_id, "changes": s.changes + 1,
            "proration": PlanProration(at=input.at, old_plan_id=s.plan_id, new_plan_id=input.new_plan_id,
                                       old_plan_credit_cents=2_450, new_plan_charge_cents=9_950, net_cents=7_500)})

    @activity.defn(name="set_pending_plan")
    async def set_pending_plan(self, input: PendingPlanInput) -> SubscriptionState:
        self.cycle.append(("pending", input))
        return input.subscription

    @activity.defn(name="renew_subscription")
    async def renew_subscription(self, input: RenewInput) -> RenewResult:
        self.cycle.append(("renew", input))
        s = input.subscription
        following = SubscriptionState(plan_id=s.pending_plan_id or s.plan_id, anchor=s.anchor,
                                      period_index=s.period_index + 1, period_start=s.period_end,
                                      period_end=s.period_end + PERIOD)
        invoice = InvoiceWorkflowInput(account_id=input.account_id, period_start=s.period_start,
                                       period_end=s.period_end, period_key=s.period_start.date().isoformat(),
                                       plan_id=s.fee_plan_id or s.plan_id, subscription_fee_cents=4_900)
        return RenewResult(invoice=invoice, subscription=following, expired_micros=0, granted_credits=22_000)

    # --- agents --------------------------------------------------------------------------------------

    def _set(self, agent_id: str, paused_by: str | None, reason: str | None,
             resume_at: datetime | None = None) -> AgentStatus:
        self.events += 1
        status = AgentStatus(agent_id=agent_id, name=f"Agent {agent_id}", status="paused" if paused_by else "active",
                             paused_by=paused_by, reason=reason, resume_at=resume_at, event_id=self.events)
        self.agents[agent_id] = status
        return status

    @activity.defn(name="set_agent_status")
    async def set_agent_status(self, input: SetAgentStatusInput) -> AgentStatus:
        self.agent_calls.append(input)
        current = self.agents.get(input.agent_id)
        if input.paused == (current is not None and current.status == "paused"):
            raise ApplicationError(f"agent {input.agent_id} is already {'paused' if input.paused else 'active'}",
                                   type="invalid_transition", non_retryable=True)
        return self._set(input.agent_id, input.actor if input.paused else None, input.reason)

    @activity.defn(name="pause_for_limit")
    async def pause_for_limit(self, input: LimitReachedInput) -> AgentChanges:
        self.agent_calls.append(input)
        assert input.agent_id is not None
        resume_at = input.now + timedelta(hours=1)
        return AgentChanges(changes=[self._set(input.agent_id, "system", "agent_monthly limit reached", resume_at)],
                            next_resume_at=resume_at)

    @activity.defn(name="resume_system_paused")
    async def resume_system_paused(self, input: ResumeInput) -> AgentChanges:
        self.agent_calls.append(input)
        due = [a for a in self.agents.values()
               if a.paused_by == "system" and a.resume_at is not None and a.resume_at <= input.now]
        return AgentChanges(changes=[self._set(a.agent_id, None, "new period") for a in due])


@pytest.fixture(scope="module")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    started = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(Path(_temporal_cli()).parent / "temporal-test-server"),
        data_converter=pydantic_data_converter)
    try:
        yield started
    finally:
        await started.shutdown()


@dataclass
class Running:
    handle: WorkflowHandle[Any, Any]
    fakes: FakeActivities
    client: Client
    queue: str

    async def state(self) -> AccountState:
        return await self.handle.query(AccountWorkflow.state)

    async def event(self, kind: str, payload: dict[str, Any]) -> str:
        key = f"{kind}:{uuid.uuid4().hex[:8]}"
        await self.handle.signal(AccountWorkflow.outbox_event,
                                 OutboxEvent(dedup_key=key, kind=kind, payload=payload, created_at=datetime.now(UTC)))
        return key


@pytest.fixture
async def account(env: WorkflowEnvironment) -> AsyncIterator[Running]:
    """A fresh account workflow on its own task queue, its activities the fakes; terminated at the end."""
    account_id = f"acct_{uuid.uuid4().hex[:12]}"
    fakes = FakeActivities(account_id=account_id)
    queue = f"branches-{uuid.uuid4().hex[:8]}"
    async with Worker(env.client, task_queue=queue, workflows=[AccountWorkflow, AutoRechargeWorkflow,
                                                               EchoInvoiceWorkflow], activities=fakes.all()):
        # The test server has no creditflow search attributes: the workflow publishes details only.
        handle = await env.client.start_workflow(
            AccountWorkflow.run, AccountWorkflowInput(account_id=account_id, publish_search_attributes=False),
            id=account_workflow_id(account_id), task_queue=queue)
        running = Running(handle=handle, fakes=fakes, client=env.client, queue=queue)
        await until(lambda: _loaded(running))
        yield running
        await handle.terminate("test over")


async def _loaded(running: Running) -> bool:
    return (await running.state()).name == "Acme"


async def until(check: Callable[[], Awaitable[bool]] | Callable[[], bool], timeout: float = 15.0) -> None:
    """Wait (in real time) until ``check`` holds: signals are applied asynchronously."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def crossing(fakes: FakeActivities) -> dict[str, Any]:
    return {"threshold_micros": THRESHOLD, "available_micros": fakes.available_micros}


def recharge_config() -> RechargeConfig:
    return RechargeConfig(enabled=True, threshold_micros=THRESHOLD, amount_credits=RECHARGE_CREDITS,
                          payment_method_id="pm_card_visa", generation=1)


# --- auto-recharge ---------------------------------------------------------------------------------------


async def test_declined_recharges_back_off_doubling_then_succeed(env: WorkflowEnvironment, account: Running) -> None:
    """Two declines wait 15 then 30 minutes (the policy's base, doubled); a crossing meanwhile charges nothing."""
    f = account.fakes
    f.config = recharge_config()
    f.policy = RechargePolicy(max_per_day=5, max_consecutive_failures=3, retry_base_seconds=900)
    f.cards = ["declined", "declined", "succeeded"]
    now = await env.get_current_time()  # start at 01:00 UTC: the three attempts fall on one UTC day
    await env.sleep(next_utc_midnight(now) + timedelta(hours=1) - now)
    first = await account.event(OUTBOX_BELOW_THRESHOLD, crossing(f))
    await until(lambda: len(f.notifications) == 1)
    await until(lambda: _settled(account))
    tried = f.attempts[0]
    assert (tried.status, tried.error, tried.consecutive_failures, tried.seq, tried.charge_id, tried.generation,
            tried.disable_reason) == ("failed", "card_declined", 1, 1, "ch_recharge-1", 1, None)
    state = await account.state()
    assert state.recharge_reason == "backing_off"
    assert state.recharge_wake_at == state.recharge.next_attempt_at == tried.attempted_at + timedelta(minutes=15)
    assert [c.request_id for c in f.charges] == ["recharge-1"]
    assert (f.charges[0].amount_cents, f.charges[0].credits, f.charges[0].payment_method_id, f.charges[0].kind,
            f.charges[0].require_card) == (2_000, 2_000, "pm_card_visa", "auto_recharge", True)
    assert [(a.dedup_key, a.threshold_micros, a.available_micros) for a in f.alerts] == [
        (first, THRESHOLD, 500 * CREDIT)]
    failed = f.notifications[0]
    assert (failed.kind, failed.dedup_key) == ("auto_recharge.failed", f"auto_recharge.failed:{f.account_id}:1")
    assert failed.payload == {
        "seq": 1, "workflow_id": f"recharge:{f.account_id}:1", "error_code": "card_declined",
        "error_message": "Your card was declined.", "decline_code": "insufficient_funds", "amount": "$20.00",
        "credits": 2_000, "consecutive_failures": 1, "threshold": "1000",
        "next_attempt_at": str(tried.attempted_at + timedelta(minutes=15))}

    # Another crossing while backing off: the decision waits, nothing is charged.
    await account.event(OUTBOX_BELOW_THRESHOLD, crossing(f))
    await until(lambda: len(f.loads) == 2)
    await until(lambda: _settled(account))
    assert len(f.charges) == 1 and len(f.attempts) == 1
    assert (await account.state()).recharge_wake_at == tried.attempted_at + timedelta(minutes=15)

    await env.sleep(timedelta(minutes=15))
    await until(lambda: len(f.attempts) == 2)
    second = f.attempts[1]
    assert (second.status, second.consecutive_failures, second.seq) == ("failed", 2, 2)
    assert second.attempted_at >= tried.attempted_at + timedelta(minutes=15)
    await until(lambda: _settled(account))
    assert (await account.state()).recharge_wake_at == second.attempted_at + timedelta(minutes=30)

    await env.sleep(timedelta(minutes=30))
    await until(lambda: len(f.attempts) == 3)
    third = f.attempts[2]
    assert (third.status, third.error, third.consecutive_failures, third.seq, third.charge_id) == (
        "succeeded", None, 0, 3, "ch_recharge-3")
    assert third.attempted_at >= second.attempted_at + timedelta(minutes=30)
    await until(lambda: _settled(account))
    state = await account.state()
    assert (state.recharge.seq, state.recharge.consecutive_failures, state.recharge.next_attempt_at,
            state.recharge.last_status, state.recharge.last_error, state.recharge.attempts_today,
            state.recharge.day) == (3, 0, None, "succeeded", None, 3, tried.attempted_at.date())
    assert (state.recharge_reason, state.recharge_wake_at, state.recharge_in_flight) == ("due", None, None)
    assert f.available_micros == 2_500 * CREDIT
    assert f.kinds() == ["auto_recharge.failed", "auto_recharge.failed", "auto_recharge.succeeded"]
    assert f.notifications[2].dedup_key == "receipt:ch_recharge-3"


async def test_too_many_declines_disable_auto_recharge(env: WorkflowEnvironment, account: Running) -> None:
    """The second decline in a row (policy: 2) disables it: recorded with the reason, the customer told once."""
    f = account.fakes
    f.config = recharge_config()
    f.policy = RechargePolicy(max_per_day=5, max_consecutive_failures=2, retry_base_seconds=60)
    f.cards = ["declined", "declined"]
    await account.event(OUTBOX_BELOW_THRESHOLD, crossing(f))
    await until(lambda: len(f.attempts) == 1)
    await env.sleep(timedelta(minutes=1))
    await until(lambda: len(f.notifications) == 3)
    await until(lambda: _settled(account))
    assert [(a.consecutive_failures, a.disable_reason) for a in f.attempts] == [(1, None), (2, "too_many_failures")]
    state = await account.state()
    assert (state.recharge_reason, state.recharge_wake_at) == ("disabled", None)
    assert f.kinds() == ["auto_recharge.failed", "auto_recharge.failed", "auto_recharge.disabled"]
    disabled = f.notifications[2]
    assert disabled.dedup_key == f"auto_recharge.disabled:{f.account_id}:2"
    assert (disabled.payload["reason"], disabled.payload["max_consecutive_failures"],
            disabled.payload["consecutive_failures"], disabled.payload["next_attempt_at"]) == (
        "too_many_failures", 2, 2, None)


async def test_daily_cap_waits_for_the_next_utc_day_and_tells_once(env: WorkflowEnvironment,
                                                                   account: Running) -> None:
    """Two recharges a day at most: the third crossing waits for midnight UTC (one notice that day), then charges."""
    f = account.fakes
    f.config = recharge_config()
    f.policy = RechargePolicy(max_per_day=2)
    f.cards = ["succeeded"] * 3
    f.credit_raises_balance = False  # spent as fast as it is bought: every crossing asks again
    now = await env.get_current_time()  # start at 01:00 UTC: the whole day's attempts fall on one UTC day
    await env.sleep(next_utc_midnight(now) + timedelta(hours=1) - now)
    for n in (1, 2):
        await account.event(OUTBOX_BELOW_THRESHOLD, crossing(f))
        await until(lambda n=n: len(f.attempts) == n)
        await until(lambda: _settled(account))
    day = f.attempts[1].attempted_at.date()
    assert f.attempts[0].attempted_at.date() == day and f.attempts[0].attempted_at.hour == 1
    await account.event(OUTBOX_BELOW_THRESHOLD, crossing(f))
    await until(lambda: len(f.loads) == 3)
    await until(lambda: _settled(account))
    midnight = next_utc_midnight(f.attempts[1].attempted_at)
    state = await account.state()
    assert (state.recharge_reason, state.recharge_wake_at, state.recharge.cap_notified_day,
            state.recharge.attempts_today) == ("daily_cap_reached", midnight, day, 2)
    assert len(f.charges) == 2
    capped = f.notifications[-1]
    assert (capped.kind, capped.dedup_key, capped.payload) == (
        "auto_recharge.daily_cap_reached", f"auto_recharge.daily_cap_reached:{f.account_id}:{day.isoformat()}",
        {"max_per_day": 2, "next_attempt_at": str(midnight)})

    await account.event(OUTBOX_BELOW_THRESHOLD, crossing(f))  # capped again the same day: no second notice
    await until(lambda: len(f.loads) == 4)
    await until(lambda: _settled(account))
    assert f.kinds().count("auto_recharge.daily_cap_reached") == 1 and len(f.charges) == 2

    await env.sleep(midnight - await env.get_current_time() + timedelta(seconds=1))
    await until(lambda: len(f.attempts) == 3)
    await until(lambda: _settled(account))
    third = f.attempts[2]
    assert third.attempted_at >= midnight and (third.status, third.seq) == ("succeeded", 3)
    state = await account.state()
    assert (state.recharge.day, state.recharge.attempts_today, state.recharge_reason) == (
        midnight.date(), 1, "due")


async def _settled(account: Running) -> bool:
    """No recharge child running and no decision half-made (the wake-up time is set when waiting)."""
    state = await account.state()
    return state.recharge_in_flight is None and (
        state.recharge_reason in ("due", "disabled") or state.recharge_wake_at is not None)


# --- billing cycle ---------------------------------------------------------------------------------------


async def _change(account: Running, change: PlanChange) -> SubscriptionState:
    return await account.handle.execute_update(AccountWorkflow.change_plan, change)


async def _refused(account: Running, change: PlanChange) -> str | None:
    with pytest.raises(WorkflowUpdateFailedError) as failed:
        await _change(account, change)
    cause = failed.value.cause
    assert isinstance(cause, ApplicationError)
    return cause.type


async def test_plan_changes_now_and_at_renewal(env: WorkflowEnvironment, account: Running) -> None:
    """Subscribe; change now (prorated by the activity); schedule a change for the renewal, take it back, schedule
    another; at the period's end the renewal switches plan and starts the closed period's invoice."""
    f = account.fakes
    started = await _change(account, PlanChange(plan_id="starter"))
    kind, subscribed = f.cycle[0]
    assert kind == "start" and (subscribed.plan_id, subscribed.anchor) == ("starter", subscribed.now)
    assert (started.plan_id, started.period_index, started.period_start, started.period_end) == (
        "starter", 0, subscribed.now, subscribed.now + PERIOD)

    assert await _refused(account, PlanChange(plan_id="starter", effective="immediately")) == "validation_error"
    assert await _refused(account, PlanChange(plan_id="growth", effective="tomorrow")) == "validation_error"
    assert len(f.cycle) == 1  # refusals reach no activity

    now = await _change(account, PlanChange(plan_id="growth", effective="immediately"))
    kind, changed = f.cycle[1]
    assert kind == "now" and (changed.subscription, changed.new_plan_id) == (started, "growth")
    assert (now.plan_id, now.fee_plan_id, now.changes, now.period_end) == ("growth", "starter", 1, started.period_end)
    assert now.proration is not None and now.proration.net_cents == 7_500

    scheduled = await _change(account, PlanChange(plan_id="scale"))
    assert (scheduled.plan_id, scheduled.pending_plan_id) == ("growth", "scale")
    kept = await _change(account, PlanChange(plan_id="growth"))  # the current plan: nothing pending any more
    assert kept.pending_plan_id is None
    scheduled = await _change(account, PlanChange(plan_id="scale"))
    assert [k for k, _ in f.cycle] == ["start", "now", "pending", "pending", "pending"]
    assert [i.subscription.pending_plan_id for k, i in f.cycle if k == "pending"] == ["scale", None, "scale"]
    assert (await account.state()).subscription == scheduled

    await env.sleep(PERIOD)
    await until(lambda: any(k == "renew" for k, _ in f.cycle))
    kind, renewed = f.cycle[-1]
    assert kind == "renew" and renewed.subscription == scheduled
    invoice = await account.client.get_workflow_handle(
        invoice_workflow_id(f.account_id, started.period_start.date().isoformat()),
        result_type=InvoiceWorkflowInput).result()
    assert (invoice.period_start, invoice.period_end, invoice.plan_id, invoice.subscription_fee_cents,
            invoice.charge, invoice.send_email, invoice.publish_search_attributes) == (
        started.period_start, started.period_end, "starter", 4_900, True, True, False)

    async def continued() -> bool:
        return (await account.state()).continued_as_new == 1

    await until(continued)  # the period turned and its invoice is done: a new run carries the state
    state = await account.state()
    assert state.subscription is not None
    assert (state.subscription.plan_id, state.subscription.pending_plan_id, state.subscription.period_index,
            state.subscription.period_start, state.subscription.period_end) == (
        "scale", None, 1, started.period_end, started.period_end + PERIOD)


# --- agents ----------------------------------------------------------------------------------------------


async def test_agent_pause_resume_and_limit_pause_ending_by_itself(env: WorkflowEnvironment,
                                                                  account: Running) -> None:
    """An operator pauses and resumes an agent (a repeated pause is refused, and only logged from a signal); a limit
    reached with action ``pause`` pauses an agent until its period ends, then the workflow resumes it itself."""
    f = account.fakes
    a = f.account_id
    paused = await account.handle.execute_update(
        AccountWorkflow.pause_agent, AgentCommand(agent_id="a1", actor="ops@acme.test", reason="runaway loop"))
    assert (paused.agent_id, paused.status, paused.paused_by, paused.reason, paused.event_id) == (
        "a1", "paused", "ops@acme.test", "runaway loop", 1)
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await account.handle.execute_update(AccountWorkflow.pause_agent, AgentCommand(agent_id="a1"))
    assert isinstance(refused.value.cause, ApplicationError) and refused.value.cause.type == "invalid_transition"
    await account.handle.signal(AccountWorkflow.pause_agent_signal, AgentCommand(agent_id="a1"))
    await until(lambda: len(f.agent_calls) == 3)
    resumed = await account.handle.execute_update(AccountWorkflow.resume_agent, AgentCommand(agent_id="a1"))
    assert (resumed.status, resumed.paused_by, resumed.event_id) == ("active", None, 2)
    assert [(c.agent_id, c.paused, c.actor) for c in f.agent_calls] == [
        ("a1", True, "ops@acme.test"), ("a1", True, "operator"), ("a1", True, "operator"), ("a1", False, "operator")]
    assert [(n.kind, n.dedup_key) for n in f.notifications] == [
        ("agent.paused", f"agent.paused:{a}:a1:1"), ("agent.resumed", f"agent.resumed:{a}:a1:2")]
    assert f.notifications[0].payload == {"agent_id": "a1", "agent_name": "Agent a1", "paused_by": "ops@acme.test",
                                          "reason": "runaway loop", "resume_at": None, "status": "paused"}

    # A limit that only notifies: one notification, its outbox row marked by the send; no agent touched.
    notify_only = await account.event(OUTBOX_LIMIT_REACHED, {"action": "notify", "scope": "daily"})
    await until(lambda: len(f.notifications) == 3)
    told = f.notifications[2]
    assert (told.kind, told.dedup_key, told.outbox_key) == ("limit.reached", f"notify:{notify_only}", notify_only)
    assert len(f.agent_calls) == 4

    pause = await account.event(OUTBOX_LIMIT_REACHED, {"action": "pause", "scope": "agent_monthly",
                                                       "agent_id": "a2", "period": "2026-12-01"})
    await until(lambda: len(f.notifications) == 5)
    limit = f.agent_calls[4]
    assert isinstance(limit, LimitReachedInput)
    assert (limit.scope, limit.agent_id, limit.period, limit.dedup_key) == ("agent_monthly", "a2", "2026-12-01",
                                                                           pause)
    resume_at = limit.now + timedelta(hours=1)
    assert [(n.kind, n.outbox_key) for n in f.notifications[3:]] == [("limit.reached", None), ("agent.paused", None)]
    assert f.notifications[4].payload["paused_by"] == "system"
    assert f.notifications[4].payload["resume_at"] == resume_at.isoformat()

    await env.sleep(timedelta(hours=1))
    await until(lambda: len(f.notifications) == 6)
    woke = f.agent_calls[5]
    assert isinstance(woke, ResumeInput) and woke.now >= resume_at and woke.why == "limits"
    back = f.notifications[5]
    assert (back.kind, back.dedup_key, back.payload["status"], back.payload["agent_id"]) == (
        "agent.resumed", f"agent.resumed:{a}:a2:4", "active", "a2")
    assert {agent: s.status for agent, s in f.agents.items()} == {"a1": "active", "a2": "active"}


# --- a new run -------------------------------------------------------------------------------------------


async def test_a_new_run_rebuilds_its_state_from_the_database(env: WorkflowEnvironment, account: Running) -> None:
    """A run started again (terminated, reset, or by the relay) takes its state from the database: the dedup window
    (a redelivered event is ignored), the events an earlier run accepted and never applied (applied first, once),
    the recharge sequence (never reused) and the subscription."""
    f = account.fakes
    now = await env.get_current_time()
    subscription = SubscriptionState(plan_id="growth", anchor=now, period_index=3, period_start=now,
                                     period_end=now + PERIOD)
    unapplied = OutboxEvent(dedup_key="limit:old", kind=OUTBOX_LIMIT_REACHED, created_at=now,
                            payload={"action": "notify", "scope": "monthly"})
    f.rebuilt = AccountRebuild(
        account=AccountSnapshot(account_id="acct_rebuilt", name="Rebuilt Co", status="active"),
        subscription=subscription, recharge=RechargeState(generation=1, seq=4), recharge_enabled=True,
        stripe_customer_id="cus_123", recent_dedup_keys=["seen:1", "seen:2"], unapplied=[unapplied])
    f.config = recharge_config()
    f.cards = ["succeeded"]
    handle = await account.client.start_workflow(
        AccountWorkflow.run, AccountWorkflowInput(account_id="acct_rebuilt", publish_search_attributes=False),
        id=account_workflow_id(f"rebuilt_{uuid.uuid4().hex[:8]}"), task_queue=account.queue)
    try:
        await until(lambda: len(f.attempts) == 1)
        assert [(r.account_id, r.dedup_capacity) for r in f.rebuilds[-1:]] == [("acct_rebuilt", 1_000)]
        assert (f.attempts[0].seq, f.attempts[0].charge_id) == (5, "ch_recharge-5")  # after the rebuilt 4
        assert [(n.kind, n.dedup_key, n.outbox_key) for n in f.notifications] == [
            ("limit.reached", "notify:limit:old", "limit:old"),  # the unapplied event first
            ("auto_recharge.succeeded", "receipt:ch_recharge-5", None)]
        await handle.signal(AccountWorkflow.outbox_event, OutboxEvent(
            dedup_key="seen:2", kind=OUTBOX_LIMIT_REACHED, created_at=now, payload={"action": "notify"}))

        async def ignored() -> bool:
            return (await handle.query(AccountWorkflow.state)).duplicates_ignored == 1

        await until(ignored)
        state = await handle.query(AccountWorkflow.state)
        assert (state.name, state.stripe_customer_id, state.subscription, state.events_processed,
                state.recent_dedup_keys, state.recharge.seq) == ("Rebuilt Co", "cus_123", subscription, 1, 3, 5)
        assert len(f.notifications) == 2  # the redelivered event sent nothing
    finally:
        await handle.terminate("test over")
