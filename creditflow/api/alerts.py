"""/api/v1/billing/alerts: low-balance alerts (several thresholds, each with its channels) and the daily-usage
notification threshold.

A PUT (or the documented POST) replaces the whole alert list; ``daily_usage_threshold`` is changed only when
given (``null`` turns it off). Thresholds are whole credits. An alert fires once each time the available
balance (balance minus pending holds) falls below its threshold, and re-arms when the balance goes back to or
above it; the notifications go out from the account workflow (``fire_balance_alerts``), never from here.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from creditflow.api.deps import get_pool, require, target_account
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import Principal, Scope
from creditflow.api.schemas import Amount, Strict
from creditflow.domain.money import micros_to_credits
from creditflow.errors import CreditflowError
from creditflow.ledger import alerts
from creditflow.ledger.alerts import MAX_ALERTS, AlertChannel, AlertSettings, AlertSpec

router = APIRouter(prefix="/api/v1/billing", tags=["alerts"], route_class=ExactRoute)

Reader = Annotated[Principal, Depends(require(Scope.BILLING_READ))]
Writer = Annotated[Principal, Depends(require(Scope.BILLING_WRITE))]
Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]
AccountQuery = Annotated[str | None, Query(description="Admin keys only.")]

_ERRORS: dict[int | str, dict[str, str]] = {
    404: {"description": "unknown_account"},
    422: {"description": "validation_error (unknown or repeated channel, repeated threshold, more than "
                         f"{MAX_ALERTS} alerts, unknown field) / invalid_amount (not whole credits) / "
                         "amount_out_of_range; `details.problems` names the field; nothing was changed"},
}


class AlertRequest(Strict):
    threshold: Amount = Field(description="Alert when the available balance falls below this many credits "
                                          "(whole credits).")
    channels: list[AlertChannel] = Field(min_length=1, description="Any of email, slack, sms, webhook "
                                                                   "(destinations: /billing/notification-channels).")
    enabled: bool = True


class AlertsRequest(Strict):
    """``alerts`` replaces the list (``[]`` removes every alert); fields left out keep their value."""

    account_id: str | None = Field(default=None, description="Required with an admin key; implied by an account key.")
    alerts: list[AlertRequest] | None = Field(default=None, description=f"At most {MAX_ALERTS}, distinct thresholds.")
    daily_usage_threshold: Amount | None = Field(
        default=None, description="Notify when a UTC day's usage reaches this many credits (whole credits); "
                                  "`null` turns it off, absent keeps it.")


class AlertView(BaseModel):
    threshold: Decimal
    channels: list[str]
    enabled: bool
    armed: bool = Field(description="Enabled and the available balance is at or above the threshold: the next "
                                    "fall below it fires the alert.")
    created_at: datetime
    updated_at: datetime


class AlertsView(BaseModel):
    account_id: str
    alerts: list[AlertView] = Field(description="Highest threshold first.")
    daily_usage_threshold: Decimal | None
    max_alerts: int


def _view(saved: AlertSettings) -> AlertsView:
    return AlertsView(
        account_id=saved.account_id,
        alerts=[AlertView(threshold=micros_to_credits(a.threshold_micros), channels=list(a.channels),
                          enabled=a.enabled, armed=a.enabled and saved.available_micros >= a.threshold_micros,
                          created_at=a.created_at, updated_at=a.updated_at) for a in saved.alerts],
        daily_usage_threshold=(micros_to_credits(saved.daily_usage_alert_micros)
                               if saved.daily_usage_alert_micros is not None else None),
        max_alerts=MAX_ALERTS)


async def _save(req: AlertsRequest, principal: Principal, pool: AsyncConnectionPool) -> ExactJSONResponse:
    account_id = target_account(principal, req.account_id)
    given = req.model_fields_set
    if "alerts" in given and req.alerts is None:
        raise CreditflowError("validation_error", "alerts must be a list ([] removes every alert)",
                              details={"problems": [{"field": "alerts", "message": "must be a list"}]})
    if not given & {"alerts", "daily_usage_threshold"}:
        raise CreditflowError("validation_error", "give alerts and/or daily_usage_threshold",
                              details={"problems": [{"field": "alerts", "message": "Field required"}]})
    specs = None if req.alerts is None else [
        AlertSpec(threshold=a.threshold, channels=list(a.channels), enabled=a.enabled) for a in req.alerts]
    saved = await alerts.put_alerts(pool, account_id, specs, set_daily="daily_usage_threshold" in given,
                                    daily_usage_threshold=req.daily_usage_threshold)
    return respond(_view(saved))


@router.get("/alerts", response_model=AlertsView, response_class=ExactJSONResponse, responses=_ERRORS)
async def get_alerts(principal: Reader, pool: Pool, account_id: AccountQuery = None) -> ExactJSONResponse:
    """The low-balance alerts (and whether each is armed) and the daily-usage notification threshold."""
    return respond(_view(await alerts.get_alerts(pool, target_account(principal, account_id))))


@router.put("/alerts", response_model=AlertsView, response_class=ExactJSONResponse, responses=_ERRORS)
async def put_alerts(req: AlertsRequest, principal: Writer, pool: Pool) -> ExactJSONResponse:
    """Replace the alert list and/or set the daily-usage threshold, atomically; answers the saved settings."""
    return await _save(req, principal, pool)


@router.post("/alerts", response_model=AlertsView, response_class=ExactJSONResponse, responses=_ERRORS,
             deprecated=True)
async def post_alerts(req: AlertsRequest, principal: Writer, pool: Pool) -> ExactJSONResponse:
    """Same as PUT (the documented ``POST /billing/alerts``)."""
    return await _save(req, principal, pool)
