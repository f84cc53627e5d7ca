"""/api/v1/billing/notification-channels: where an account's notifications go (email, Slack, SMS, webhook)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from psycopg_pool import AsyncConnectionPool
from pydantic import AfterValidator, BaseModel, Field

from creditflow.api.deps import get_app_settings, get_pool, require, target_account
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import Principal, Scope
from creditflow.api.schemas import Strict
from creditflow.config import Settings
from creditflow.errors import CreditflowError
from creditflow.notify.destinations import (
    Destinations,
    DestinationsUpdate,
    check_email,
    check_phone,
    check_url,
    load_destinations,
    redact_url,
    update_destinations,
)

router = APIRouter(prefix="/api/v1/billing/notification-channels", tags=["notifications"], route_class=ExactRoute)

Reader = Annotated[Principal, Depends(require(Scope.BILLING_READ))]
Writer = Annotated[Principal, Depends(require(Scope.BILLING_WRITE))]
Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]
AppSettings = Annotated[Settings, Depends(get_app_settings)]
AccountQuery = Annotated[str | None, Query(description="Admin keys only.")]

_ERRORS: dict[int | str, dict[str, str]] = {
    404: {"description": "unknown_account"},
    422: {"description": "validation_error (`details.problems` names each bad field; nothing was changed)"},
}


class NotificationChannelsUpdate(Strict):
    """Fields left out keep their value; ``null`` removes a destination."""

    account_id: str | None = Field(default=None, description="Admin keys only.")
    email: Annotated[str, AfterValidator(check_email)] | None = Field(
        default=None, description="Send email here instead of the account's billing email.")
    slack_webhook_url: str | None = Field(default=None, description="A Slack incoming-webhook URL (https).")
    sms_phone: Annotated[str, AfterValidator(check_phone)] | None = Field(
        default=None, description="E.164, e.g. `+14155550100`.")
    webhook_url: str | None = Field(default=None, description="Your endpoint for signed webhooks (https).")
    rotate_webhook_secret: bool = Field(default=False, description="Replace the signing secret (shown once).")


class NotificationChannels(BaseModel):
    account_id: str
    billing_email: str
    email: str | None = Field(description="The override of the billing email, if any.")
    effective_email: str = Field(description="Where email notifications go.")
    slack_webhook_url: str | None = Field(description="Redacted: scheme and host only (the URL is a credential).")
    sms_phone: str | None
    webhook_url: str | None
    webhook_secret_set: bool
    webhook_secret: str | None = Field(
        default=None, description="Only in the response of the update that created or rotated it: store it now.")
    updated_at: datetime | None


def _view(dest: Destinations, secret: str | None = None) -> NotificationChannels:
    return NotificationChannels(
        account_id=dest.account_id, billing_email=dest.billing_email, email=dest.email,
        effective_email=dest.effective_email,
        slack_webhook_url=redact_url(dest.slack_webhook_url) if dest.slack_webhook_url else None,
        sms_phone=dest.sms_phone, webhook_url=dest.webhook_url, webhook_secret_set=dest.webhook_secret is not None,
        webhook_secret=secret, updated_at=dest.updated_at)


@router.get("", response_model=NotificationChannels, response_class=ExactJSONResponse, responses=_ERRORS)
async def get_notification_channels(principal: Reader, pool: Pool,
                                    account_id: AccountQuery = None) -> ExactJSONResponse:
    """The account's notification destinations (the webhook signing secret is never shown here)."""
    return respond(_view(await load_destinations(pool, target_account(principal, account_id))))


@router.put("", response_model=NotificationChannels, response_class=ExactJSONResponse, responses=_ERRORS)
async def put_notification_channels(req: NotificationChannelsUpdate, principal: Writer, pool: Pool,
                                    settings: AppSettings) -> ExactJSONResponse:
    """Set or remove destinations. Setting a webhook URL for the first time (or ``rotate_webhook_secret``)
    generates a signing secret, returned in ``webhook_secret`` by this response only; removing the webhook
    URL removes its secret. Repeating a body gives the same configuration (and no new secret)."""
    account_id = target_account(principal, req.account_id)
    problems = []
    for field in ("slack_webhook_url", "webhook_url"):
        value = getattr(req, field)
        if value is not None:
            try:
                check_url(value, allow_http=settings.notify_allow_http_urls,
                          allow_private=settings.notify_allow_private_urls)
            except ValueError as exc:
                problems.append({"field": field, "message": str(exc)})
    if problems:
        raise CreditflowError("validation_error", "the request is not valid", details={"problems": problems})
    fields = req.model_fields_set - {"account_id", "rotate_webhook_secret"}
    update = DestinationsUpdate(values={f: getattr(req, f) for f in fields},
                                rotate_webhook_secret=req.rotate_webhook_secret)
    dest, secret = await update_destinations(pool, account_id, update)
    return respond(_view(dest, secret))
