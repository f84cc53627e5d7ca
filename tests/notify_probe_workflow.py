"""A one-step workflow for the notification tests: sends one notification through the workflow helper.

In its own module, free of side effects at import, because the workflow sandbox re-imports it."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from creditflow.notify.log import Notification, NotificationRecord
    from workflows.notify import notify

@workflow.defn(name="NotifyProbeWorkflow")
class NotifyProbeWorkflow:
    @workflow.run
    async def run(self, notification: Notification) -> NotificationRecord | None:
        """Completes whatever happens to the notification: that is what billing flows rely on."""
        return await notify(notification, summary="probe")
