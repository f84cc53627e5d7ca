"""Reconciliation activities: thin adapters over ``creditflow.payments.reconcile`` and ``creditflow.ledger.verify``.

Each is safe to repeat: the run's window is fixed by its first call, every repair goes through an idempotent
ledger path, and the stored result is overwritten by the latest attempt's.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Literal

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel
from temporalio import activity

from activities.errors import translating_errors
from creditflow.config import Settings
from creditflow.domain.reconciliation import RunReport, RunWindow
from creditflow.ledger.verify import verify
from creditflow.notify.channels import NotConfigured, Outgoing, send_email
from creditflow.notify.destinations import Destinations
from creditflow.notify.templates import Rendered
from creditflow.payments import reconcile
from creditflow.payments.gateway import StripeGateway
from workflows.contract import ReconcileSummary


class OpenRunInput(BaseModel):
    run_id: str
    trigger: Literal["schedule", "manual"]
    since: datetime | None = None


class RunRef(BaseModel):
    run_id: str


def _summary(report: RunReport) -> ReconcileSummary:
    return ReconcileSummary(run_id=report.id, since=report.since, until=report.until, listed=report.listed,
                            matched=report.matched, repaired=report.repaired, reported=report.reported,
                            violations=report.violations, notes=report.notes)


class ReconcileActivities:
    def __init__(self, pool: AsyncConnectionPool, gateway: StripeGateway, settings: Settings) -> None:
        self._pool = pool
        self._gateway = gateway
        self._settings = settings

    @activity.defn(name="open_reconciliation")
    @translating_errors
    async def open_reconciliation(self, input: OpenRunInput) -> RunWindow:
        return await reconcile.open_run(self._pool, input.run_id, trigger=input.trigger, since=input.since,
                                        now=datetime.now(UTC))

    @activity.defn(name="reconcile_with_stripe")
    @translating_errors
    async def reconcile_with_stripe(self, window: RunWindow) -> ReconcileSummary:
        reconciler = reconcile.Reconciler(
            self._pool, self._gateway, window, now=datetime.now(UTC),
            server_filter=self._settings.stripe_lists_filtered(),
            grace=timedelta(seconds=self._settings.reconcile_grace_seconds))
        result = await reconciler.run()
        await reconcile.record_result(self._pool, result)
        return _summary(await reconcile.get_run(self._pool, window.run_id))

    @activity.defn(name="verify_and_complete_reconciliation")
    @translating_errors
    async def verify_and_complete(self, input: RunRef) -> ReconcileSummary:
        """``creditflow verify`` over every account after the repairs; its violation count completes the run."""
        report = await verify(self._pool)
        for violation in report.violations:
            activity.logger.warning("ledger violation %s on %s: %s %s", violation.check, violation.account_id,
                                    violation.message, violation.ids)
        return _summary(await reconcile.complete_run(self._pool, input.run_id, violations=len(report.violations)))

    @activity.defn(name="fail_reconciliation")
    async def fail_reconciliation(self, input: RunRef) -> None:
        await reconcile.fail_run(self._pool, input.run_id, "the workflow gave up; see its history")

    @activity.defn(name="notify_reconciliation")
    async def notify_operators(self, summary: ReconcileSummary) -> bool:
        """Email the operators (CREDITFLOW_OPERATOR_EMAIL) what the run reported; False when not configured."""
        if not self._settings.operator_email:
            return False
        report = await reconcile.get_run(self._pool, summary.run_id)
        lines = [f"{d.action} {d.kind} {d.stripe_id or ''} account {d.account_id or '-'}: {d.detail}"
                 for d in report.differences]
        body = (f"Reconciliation {report.id} ({report.since:%Y-%m-%d %H:%M} to {report.until:%Y-%m-%d %H:%M} UTC):"
                f" {report.repaired} repaired, {report.reported} reported, {report.violations} ledger violations."
                "\n\n" + "\n".join(lines or ["(no differences)"]) + "\n\nDetails: creditflow reconcile --show "
                f"{report.id}; creditflow verify\n")
        subject = f"[creditflow] reconciliation: {report.reported} to look at, {report.violations} violations"
        out = Outgoing(kind="reconciliation.report", event_id=report.id.replace(":", "-"), created=int(time.time()),
                       payload={}, rendered=Rendered(email_subject=subject, email_body=body, slack="", sms=""),
                       destinations=Destinations(account_id="operators", account_name="operators",
                                                 billing_email=self._settings.operator_email))
        try:
            await send_email(self._settings, out)
        except NotConfigured:
            activity.logger.warning("reconciliation %s: operator email not sent (SMTP not configured)", report.id)
            return False
        return True
