"""The account workflow's agents: the single writer of agent status (pause, resume), limits reached on the hot
path (notify, and pause for action ``pause``), and resuming agents the system paused once the limit is over."""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.agents import AgentActivities, LimitReachedInput, ResumeInput, SetAgentStatusInput
    from creditflow.domain.notifications import Notification
    from workflows.account_state import LOAD_RETRY, AccountRun
    from workflows.common import DB_TIMEOUT, db_retry, error_of
    from workflows.contract import OUTBOX_LIMIT_REACHED, AgentCommand, AgentStatus, OutboxEvent
    from workflows.notify import notify

# Agent status writes: our database, retried for minutes; refusals (a pause of a paused agent) never.
AGENT_RETRY = db_retry(["invalid_transition", "unknown_agent", "unknown_account", "validation_error"])
LIMIT_REACHED = OUTBOX_LIMIT_REACHED


class Agents:
    """Agent status changes of one account, one at a time in arrival order (``run.agents_lock``)."""

    def __init__(self, run: AccountRun) -> None:
        self.run = run

    def on_limit_reached(self, event: OutboxEvent) -> None:
        """A limit was reached on the hot path: notify, and with action ``pause`` pause agents (main loop)."""
        self.run.input.pending_limit_events.append(event)

    def on_limits_changed(self, event: OutboxEvent) -> None:
        """Limits were saved: agents the system paused for a limit that no longer holds are resumed."""
        self.run.input.agents_recheck = True

    async def command(self, command: AgentCommand, *, paused: bool, raise_refusal: bool) -> AgentStatus | None:
        """The single writer of agent status: record it (audit trail included), then tell the customer."""
        async with self.run.agents_lock:
            try:
                status = await workflow.execute_activity_method(
                    AgentActivities.set_agent_status,
                    SetAgentStatusInput(account_id=self.run.input.account_id, agent_id=command.agent_id,
                                        paused=paused, actor=command.actor, reason=command.reason),
                    start_to_close_timeout=DB_TIMEOUT, retry_policy=AGENT_RETRY,
                    summary=f"{'Pause' if paused else 'Resume'} agent {command.agent_id} ({command.actor})")
            except ActivityError as err:
                error = error_of(err)
                workflow.logger.warning("%s of agent %s refused: %s", "pause" if paused else "resume",
                                        command.agent_id, error.message)
                if raise_refusal:
                    raise ApplicationError(error.message, *error.details, type=error.type,
                                           non_retryable=True) from None
                return None
            await self._notify_agent(status)
            return status

    async def _notify_agent(self, status: AgentStatus) -> None:
        account_id = self.run.input.account_id
        kind = "agent.paused" if status.status == "paused" else "agent.resumed"
        await notify(Notification(
            account_id=account_id, kind=kind,
            dedup_key=f"{kind}:{account_id}:{status.agent_id}:{status.event_id}",
            payload={"agent_id": status.agent_id, "agent_name": status.name, "paused_by": status.paused_by,
                     "reason": status.reason, "resume_at": status.resume_at.isoformat() if status.resume_at else None,
                     "status": status.status}),
            summary=f"Tell the customer: agent {status.agent_id} {status.status}")

    async def apply_limit(self, event: OutboxEvent) -> None:
        """Notify that a limit was reached (once per event) and, for action ``pause``, pause its agents."""
        run = self.run
        payload = event.payload
        pause = payload.get("action") == "pause"
        await notify(Notification(account_id=run.input.account_id, kind=LIMIT_REACHED,
                                  dedup_key=f"notify:{event.dedup_key}", payload=dict(payload),
                                  outbox_key=None if pause else event.dedup_key),
                     summary=f"Tell the customer: {payload.get('scope')} limit reached")
        if not pause:
            return
        async with run.agents_lock:
            try:
                result = await workflow.execute_activity_method(
                    AgentActivities.pause_for_limit,
                    LimitReachedInput(account_id=run.input.account_id, scope=str(payload.get("scope")),
                                      agent_id=payload.get("agent_id"), now=workflow.now(),
                                      period=payload.get("period"), dedup_key=event.dedup_key),
                    start_to_close_timeout=DB_TIMEOUT, retry_policy=LOAD_RETRY,
                    summary=f"Pause agents: {payload.get('scope')} limit reached")
            except ActivityError as err:
                workflow.logger.error("limit event %s not applied: %s", event.dedup_key, error_of(err).message)
                return
            for status in result.changes:
                await self._notify_agent(status)
            run.input.agents_wake_at = result.next_resume_at
        run.publish()

    async def resume_system_paused(self, why: str) -> None:
        """Resume agents the system paused: their period is over (``due``) or their limit was lifted."""
        run = self.run
        run.input.agents_recheck = False
        async with run.agents_lock:
            try:
                result = await workflow.execute_activity_method(
                    AgentActivities.resume_system_paused,
                    ResumeInput(account_id=run.input.account_id, now=workflow.now(), why=why),
                    start_to_close_timeout=DB_TIMEOUT, retry_policy=LOAD_RETRY,
                    summary="Resume agents paused for a limit" + (" (new period)" if why == "due"
                                                                  else " (limits changed)"))
            except ActivityError as err:
                workflow.logger.error("agents of %s not resumed: %s", run.input.account_id, error_of(err).message)
                return
            for status in result.changes:
                await self._notify_agent(status)
            run.input.agents_wake_at = result.next_resume_at
        run.publish()
