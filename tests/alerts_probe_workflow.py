"""A one-step workflow for the alert tests: runs the alert activities through their workflow helpers.

In its own module, free of side effects at import, because the workflow sandbox re-imports it."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.alerts import BalanceAlertInput, BalanceAlertsResult
    from workflows.notify import fire_balance_alerts_from_workflow

@workflow.defn(name="AlertsProbeWorkflow")
class AlertsProbeWorkflow:
    @workflow.run
    async def run(self, event: BalanceAlertInput) -> BalanceAlertsResult | None:
        """Completes whatever happens to the alerts: that is what the account workflow relies on."""
        return await fire_balance_alerts_from_workflow(event)
