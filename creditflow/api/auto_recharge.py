"""/api/v1/billing/auto-recharge (and the seeds' alias /api/v1/billing/wallet/auto-reload): settings of
automatic top-ups. The account workflow does the charging (``AutoRechargeWorkflow``); this only saves
what the customer wants and shows what happened last.

Amounts are given in credits (``threshold``, ``recharge_amount``) or in USD (``threshold_usd`` /
``thresholdUsd``, ``amount_usd`` / ``amountUsd``); both are answered. A saved card is needed when a recharge
runs (the named one, else the default); without one the attempt fails with ``no_payment_method`` and the
customer is notified.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from psycopg_pool import AsyncConnectionPool
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from creditflow.api.deps import get_app_settings, get_gateway, get_pool, require, target_account
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import Principal, Scope
from creditflow.api.schemas import Amount
from creditflow.config import Settings
from creditflow.domain.money import AmountError, micros_to_credits
from creditflow.domain.recharge import recharge_terms
from creditflow.domain.topups import cents_to_usd
from creditflow.errors import CreditflowError
from creditflow.ledger import auto_recharge
from creditflow.ledger.auto_recharge import AutoRechargeRow
from creditflow.payments.customers import stored_customer
from creditflow.payments.gateway import StripeGateway
from creditflow.payments.topups import resolve_card

router = APIRouter(prefix="/api/v1/billing", tags=["auto-recharge"], route_class=ExactRoute)

Reader = Annotated[Principal, Depends(require(Scope.BILLING_READ))]
Writer = Annotated[Principal, Depends(require(Scope.PAYMENTS_WRITE))]
Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]
Gateway = Annotated[StripeGateway, Depends(get_gateway)]
AppSettings = Annotated[Settings, Depends(get_app_settings)]
AccountQuery = Annotated[str | None, Query(description="Admin keys only.")]

_ERRORS: dict[int | str, dict[str, str]] = {
    404: {"description": "unknown_payment_method (malformed, unknown, or another account's) / unknown_account"},
    422: {"description": "validation_error / invalid_amount (not whole credits or cents) / amount_out_of_range"},
}


class AutoRechargeRequest(BaseModel):
    """``enabled`` plus the threshold and the amount, in credits or in USD. Disabling alone keeps the rest."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    account_id: str | None = Field(default=None, description="Required with an admin key; implied by an account key.")
    enabled: bool
    threshold: Amount | None = Field(default=None, description="Recharge when the available balance falls below "
                                                                "this many credits (whole credits).")
    recharge_amount: Amount | None = Field(default=None, description="Credits bought each time (1 credit = 1 cent).")
    threshold_usd: Amount | None = Field(default=None, validation_alias=AliasChoices("threshold_usd", "thresholdUsd"))
    amount_usd: Amount | None = Field(default=None, validation_alias=AliasChoices("amount_usd", "amountUsd"))
    payment_method_id: str | None = Field(
        default=None, validation_alias=AliasChoices("payment_method_id", "paymentMethodId"),
        description="A saved card of this account; default: the account's default card when a recharge runs.")


class AutoRechargeSettings(BaseModel):
    account_id: str
    enabled: bool
    status: str = Field(description="active, disabled (by the customer, or after repeated failures: see "
                                    "disabled_reason) or not_configured")
    threshold: Decimal | None = None
    recharge_amount: int | None = None
    threshold_usd: Decimal | None = None
    amount_usd: Decimal | None = None
    payment_method_id: str | None = None
    disabled_reason: str | None = None
    consecutive_failures: int = 0
    last_attempt_at: datetime | None = None
    last_status: str | None = None
    last_error: str | None = None
    max_recharges_per_day: int
    max_consecutive_failures: int
    updated_at: datetime | None = None


def _view(account_id: str, row: AutoRechargeRow | None, settings: Settings) -> AutoRechargeSettings:
    limits = {"max_recharges_per_day": settings.auto_recharge_max_per_day,
              "max_consecutive_failures": settings.auto_recharge_max_consecutive_failures}
    if row is None:
        return AutoRechargeSettings(account_id=account_id, enabled=False, status="not_configured", **limits)
    threshold = micros_to_credits(row.threshold_micros)
    return AutoRechargeSettings(
        account_id=account_id, enabled=row.enabled, status="active" if row.enabled else "disabled",
        threshold=threshold, recharge_amount=row.amount_credits, threshold_usd=threshold / 100,
        amount_usd=cents_to_usd(row.amount_credits), payment_method_id=row.payment_method_id,
        disabled_reason=row.disabled_reason, consecutive_failures=row.consecutive_failures,
        last_attempt_at=row.last_attempt_at, last_status=row.last_status, last_error=row.last_error,
        updated_at=row.updated_at, **limits)


async def _read(pool: AsyncConnectionPool, settings: Settings, account_id: str) -> ExactJSONResponse:
    return respond(_view(account_id, await auto_recharge.get_settings(pool, account_id), settings))


async def _save(req: AutoRechargeRequest, principal: Principal, pool: AsyncConnectionPool,
                gateway: StripeGateway, settings: Settings) -> ExactJSONResponse:
    account_id = target_account(principal, req.account_id)
    current = await auto_recharge.get_settings(pool, account_id)
    amounts = (req.threshold, req.recharge_amount, req.threshold_usd, req.amount_usd)
    if not req.enabled and all(a is None for a in amounts) and req.payment_method_id is None:
        if current is None:  # nothing to turn off
            return respond(_view(account_id, None, settings))
        row = await auto_recharge.put_settings(pool, account_id, enabled=False,
                                               threshold_micros=current.threshold_micros,
                                               amount_credits=current.amount_credits,
                                               payment_method_id=current.payment_method_id)
        return respond(_view(account_id, row, settings))
    given_threshold = req.threshold is not None or req.threshold_usd is not None
    given_amount = req.recharge_amount is not None or req.amount_usd is not None
    try:
        terms = recharge_terms(
            settings.topup_policy(),
            threshold=req.threshold if given_threshold or current is None else micros_to_credits(
                current.threshold_micros),
            threshold_usd=req.threshold_usd,
            recharge_amount=req.recharge_amount if given_amount or current is None else current.amount_credits,
            amount_usd=req.amount_usd)
    except AmountError as exc:
        raise CreditflowError(exc.code, str(exc)) from exc
    card = req.payment_method_id
    if card is not None:
        customer = await stored_customer(pool, account_id)
        if customer is None:
            raise CreditflowError("unknown_payment_method", "no such payment method")
        card = await resolve_card(gateway, customer, card)
    row = await auto_recharge.put_settings(pool, account_id, enabled=req.enabled,
                                           threshold_micros=terms.threshold_micros,
                                           amount_credits=terms.amount_credits, payment_method_id=card)
    return respond(_view(account_id, row, settings))


@router.get("/auto-recharge", response_model=AutoRechargeSettings, response_class=ExactJSONResponse)
async def get_auto_recharge(principal: Reader, pool: Pool, settings: AppSettings,
                            account_id: AccountQuery = None) -> ExactJSONResponse:
    """The auto-recharge settings, whether it is active, and what happened at the last attempt."""
    return await _read(pool, settings, target_account(principal, account_id))


@router.put("/auto-recharge", response_model=AutoRechargeSettings, response_class=ExactJSONResponse,
            responses=_ERRORS)
async def put_auto_recharge(req: AutoRechargeRequest, principal: Writer, pool: Pool, gateway: Gateway,
                            settings: AppSettings) -> ExactJSONResponse:
    """Save the settings. Enabling while the balance is already below the threshold recharges at once; saving
    again after auto-recharge was disabled by failures re-enables it with a clean slate."""
    return await _save(req, principal, pool, gateway, settings)


@router.post("/auto-recharge", response_model=AutoRechargeSettings, response_class=ExactJSONResponse, deprecated=True,
             responses=_ERRORS)
async def post_auto_recharge(req: AutoRechargeRequest, principal: Writer, pool: Pool, gateway: Gateway,
                             settings: AppSettings) -> ExactJSONResponse:
    """Same as PUT (the documented ``POST /billing/auto-recharge``)."""
    return await _save(req, principal, pool, gateway, settings)


@router.get("/wallet/auto-reload", response_model=AutoRechargeSettings, response_class=ExactJSONResponse,
            deprecated=True)
async def get_auto_reload(principal: Reader, pool: Pool, settings: AppSettings,
                          account_id: AccountQuery = None) -> ExactJSONResponse:
    """Alias of ``GET /billing/auto-recharge``."""
    return await _read(pool, settings, target_account(principal, account_id))


@router.put("/wallet/auto-reload", response_model=AutoRechargeSettings, response_class=ExactJSONResponse,
            responses=_ERRORS, deprecated=True)
async def put_auto_reload(req: AutoRechargeRequest, principal: Writer, pool: Pool, gateway: Gateway,
                          settings: AppSettings) -> ExactJSONResponse:
    """Alias of ``PUT /billing/auto-recharge`` (``{"enabled": true, "thresholdUsd": 20, "amountUsd": 50}``)."""
    return await _save(req, principal, pool, gateway, settings)
