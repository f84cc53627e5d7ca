"""``WebhookRedeliveryWorkflow`` (id ``webhook-redelivery:{account_id}:{key}``): send one customer-webhook event again.

Started by ``POST /api/v1/webhooks/deliveries/{id}/redeliver`` after it recorded the redelivery's row. It runs the one
``send_notification`` activity every notification goes through (the same retries, signing and send-time SSRF checks);
a notification moves no money, so a redelivery never can.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from creditflow.domain.notifications import Notification
    from workflows.contract import WEBHOOK_REDELIVERY_WORKFLOW
    from workflows.notify import notify


@workflow.defn(name=WEBHOOK_REDELIVERY_WORKFLOW)
class WebhookRedeliveryWorkflow:
    @workflow.run
    async def run(self, notification: Notification) -> str:
        """The webhook delivery's final status (``sent``, ``failed``, ``skipped``), or ``failed`` if never recorded."""
        record = await notify(notification, summary=f"Redeliver {notification.kind} (delivery "
                                                    f"{notification.redelivery_of})")
        delivery = record.delivery("webhook") if record is not None else None
        return delivery.status if delivery is not None else "failed"
