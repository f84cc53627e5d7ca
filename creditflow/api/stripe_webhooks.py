"""POST /api/v1/stripe/webhook: Stripe's events, authenticated by their signature (no API key).

The endpoint verifies the ``Stripe-Signature`` header with ``CREDITFLOW_STRIPE_WEBHOOK_SECRET``, stores the
event once and wakes the workflow concerned (``creditflow.payments.webhooks``). Stripe retries any non-2xx
answer, so every failure that a retry can fix (Temporal unreachable) is a 503 with the event kept
unprocessed, and every refusal that a retry cannot fix (bad signature, bad body) is a 400 that changes nothing.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from creditflow.api.deps import get_app_settings, get_pool
from creditflow.api.exact_json import ExactJSONResponse, respond
from creditflow.api.topups import get_temporal
from creditflow.config import Settings
from creditflow.errors import CreditflowError
from creditflow.payments import webhooks
from workflows.contract import PaymentEvent

router = APIRouter(prefix="/api/v1/stripe", tags=["stripe"])

Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]
AppSettings = Annotated[Settings, Depends(get_app_settings)]


class WebhookAck(BaseModel):
    received: bool = True
    duplicate: bool = Field(description="true: this event id was already processed; nothing was done again")
    event_id: str | None = None
    outcome: str | None = Field(default=None, description="signaled, workflow_closed, ignored or recorded")


@router.post("/webhook", response_model=WebhookAck, response_class=ExactJSONResponse,
             responses={400: {"description": "webhook_signature_missing / webhook_signature_invalid (wrong secret, "
                                             "tampered body, timestamp older than 300 s) / webhook_payload_invalid; "
                                             "nothing stored"},
                        503: {"description": "webhook_not_configured (no signing secret) / workflow_unavailable "
                                             "(Temporal unreachable: the event stays unprocessed, Stripe redelivers "
                                             "it) / webhook_in_progress"}})
async def stripe_webhook(request: Request, pool: Pool, settings: AppSettings,
                         stripe_signature: Annotated[str | None, Header(alias="Stripe-Signature")] = None
                         ) -> ExactJSONResponse:
    """Receive a Stripe event. Register this URL in Stripe's dashboard (Developers → Webhooks) with the events
    ``payment_intent.succeeded``, ``payment_intent.payment_failed``, ``payment_intent.canceled``,
    ``charge.refunded``, ``charge.dispute.created``, ``charge.dispute.closed``, ``charge.refund.updated``,
    ``refund.updated`` and ``refund.failed``; its signing secret goes in
    ``CREDITFLOW_STRIPE_WEBHOOK_SECRET``."""
    secret = settings.stripe_webhook_secret.get_secret_value()
    if not secret:
        raise CreditflowError("webhook_not_configured", "no Stripe webhook signing secret is configured")
    event = webhooks.verify_event(await request.body(), stripe_signature, secret)

    async def signal(account_id: str, request_id: str, payment_event: PaymentEvent) -> bool:
        client = await get_temporal(request)  # connected only when an event needs it
        return await client.signal_payment_event(account_id, request_id, payment_event)

    async def wake_refund(account_id: str, request_id: str) -> bool:
        client = await get_temporal(request)
        return await client.signal_refund_event(account_id, request_id)

    result = await webhooks.receive(pool, event, signal, wake_refund)
    if result.duplicate:
        return respond({"received": True, "duplicate": True})
    return respond(WebhookAck(duplicate=False, event_id=result.event_id, outcome=result.outcome))
