"""/api/v1/webhooks/deliveries: the account's customer-webhook deliveries, and sending an event again.

A delivery is one event sent to the account's ``webhook_url``: its status (``pending`` while it may still go,
``succeeded``, ``failed``), attempts, the last answer's HTTP status and error. ``redeliver`` sends the same event
(same id, type, created time and data; freshly signed) once more, through the worker's ``send_notification`` path
with its retries and send-time SSRF checks (``WebhookRedeliveryWorkflow``). A notification moves no money, so a
redelivery cannot either. Store-then-send (``creditflow.notify.deliveries``) makes it idempotent by
``Idempotency-Key``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from creditflow.api.conventions import EndingBefore, IdempotencyKey, StartingAfter, idempotency_key, page_of
from creditflow.api.deps import get_pool, require, target_account
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import Principal, Scope
from creditflow.api.topups import get_temporal
from creditflow.ledger.pagination import Cursor
from creditflow.notify import deliveries
from creditflow.notify.deliveries import Delivery

router = APIRouter(prefix="/api/v1/webhooks", tags=["webhooks"], route_class=ExactRoute)

Reader = Annotated[Principal, Depends(require(Scope.BILLING_READ))]
Writer = Annotated[Principal, Depends(require(Scope.BILLING_WRITE))]
Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]
DeliveryId = Annotated[str, Path(pattern=r"^whd_[0-9a-f]{32}$", description="A delivery id (whd_...).")]


class WebhookDelivery(BaseModel):
    id: str = Field(description="whd_...; also the list's cursor.")
    event_id: str = Field(description="The event's id (ntf_...): the body's `id` and the Creditflow-Event-Id "
                                      "header; a redelivery carries its event's id.")
    type: str = Field(description="The event's type (topup.receipt, balance.low, ...).")
    url: str | None = Field(description="Where it was sent: the account's webhook_url at the time.")
    status: str = Field(description="pending (not sent yet, or retrying), succeeded (answered 2xx), failed "
                                    "(refused destination, or every attempt failed).")
    attempts: int
    response_code: int | None = Field(description="The HTTP status of the last attempt; null: no answer "
                                                  "(connection failed, destination refused) or not tried yet.")
    error: str | None = Field(description="The last failure (e.g. `HTTP 500: ...`, `destination refused: ...`).")
    redelivery_of: str | None = Field(description="For a redelivery: the event's first delivery.")
    event_created_at: datetime = Field(description="When the event happened (the body's `created`).")
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None = Field(description="When a 2xx answer was received.")


class WebhookDeliveryList(BaseModel):
    items: list[WebhookDelivery]
    total: int = Field(description="All the account's webhook deliveries, not only this page.")
    has_more: bool = Field(default=False, description="More items beyond this page in the paging direction.")


def _item(d: Delivery) -> WebhookDelivery:
    return WebhookDelivery(**d.__dict__)


@router.get("/deliveries", response_model=WebhookDeliveryList, response_class=ExactJSONResponse)
async def list_deliveries(principal: Reader, pool: Pool, limit: Annotated[int, Query(ge=1, le=500)] = 50,
                          account_id: Annotated[str | None, Query(description="Admin keys only.")] = None,
                          starting_after: StartingAfter = None, ending_before: EndingBefore = None,
                          ) -> ExactJSONResponse:
    """The account's webhook deliveries (redeliveries included), newest first. Pages with ``limit`` and
    ``starting_after`` / ``ending_before`` (a delivery id); ``has_more``; ``total`` counts them all."""
    cursor = Cursor(starting_after, ending_before)
    rows, total = await deliveries.list_deliveries(pool, target_account(principal, account_id), limit + 1, cursor)
    page, has_more = page_of(rows, limit, cursor)
    return respond(WebhookDeliveryList(items=[_item(d) for d in page], total=total, has_more=has_more))


@router.post("/deliveries/{delivery_id}/redeliver", response_model=WebhookDelivery, status_code=202,
             response_class=ExactJSONResponse,
             responses={404: {"description": "not_found (no such delivery of this account) / unknown_account"},
                        409: {"description": "idempotency_conflict (the key redelivered another delivery) / "
                                             "no_webhook_url (the account has no webhook_url now)"},
                        503: {"description": "workflow_unavailable: recorded, not started; repeat with the same key"}})
async def redeliver(delivery_id: DeliveryId, principal: Writer, pool: Pool, request: Request,
                    key: IdempotencyKey = None,
                    account_id: Annotated[str | None, Query(description="Admin keys only.")] = None,
                    ) -> ExactJSONResponse:
    """Send the delivery's event again to the account's current ``webhook_url``: the same event (id, type, created,
    data), signed now. Answers the new delivery (``pending``; watch it in the list). The same ``Idempotency-Key``
    answers the same redelivery and sends nothing more."""
    account = target_account(principal, account_id)
    request_key = idempotency_key(key, None, "Idempotency-Key")
    delivery, notification = await deliveries.record_redelivery(pool, account, delivery_id, request_key)
    if delivery.status == "pending":
        client = await get_temporal(request)
        await client.redeliver_webhook(notification, request_key)
    return respond(_item(await deliveries.get_delivery(pool, account, delivery.id)), 202)
