"""/api/v1/billing/packages and /api/v1/checkout/sessions: what can be bought, and hosted checkout links.

A platform creates a checkout session for a package or an amount with its own ``success_url`` / ``cancel_url``
and sends its customer to the session's ``url``: creditflow's hosted page (``creditflow/web/checkout.py``) takes the
card with Stripe.js, charges it through the top-up workflow, and redirects. The logic lives in
``creditflow.payments.checkout`` (the customer portal uses it too). docs/checkout.md.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field, StringConstraints

from creditflow.api.conventions import IdempotencyKey, idempotency_key
from creditflow.api.deps import get_app_settings, get_pool, require, target_account
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import Principal, Scope
from creditflow.api.schemas import Amount, Strict, Token
from creditflow.api.scopes import granted
from creditflow.config import Settings
from creditflow.domain.topups import cents_to_usd
from creditflow.errors import CreditflowError
from creditflow.payments import checkout

router = APIRouter(prefix="/api/v1", tags=["checkout"], route_class=ExactRoute)

Reader = Annotated[Principal, Depends(require(Scope.BILLING_READ))]
# Creating a checkout link charges nothing: the buyer pays on the page, so billing:write is enough.
Creator = Annotated[Principal, Depends(require(Scope.BILLING_WRITE))]
Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]
AppSettings = Annotated[Settings, Depends(get_app_settings)]
ReturnUrl = Annotated[str, StringConstraints(min_length=1, max_length=checkout.MAX_URL_LENGTH)]


def public_base_url(settings: Settings, request: Request) -> str:
    """Where the hosted pages are served: ``checkout_public_url`` when set (behind a proxy), else the base URL the
    API was called on."""
    return (settings.public_url or str(request.base_url)).rstrip("/") + "/"


# --- packages ------------------------------------------------------------------------------------------------


class PackageOut(BaseModel):
    id: str
    object: Literal["credit_package"] = "credit_package"
    name: str
    credits: int = Field(description="Credits bought, bonus included.")
    price_usd: Decimal = Field(description="Exact, in dollars (whole cents).")
    price_cents: int
    currency: str = "usd"
    bonus_credits: int = Field(description="Credits beyond 1 per cent paid (0: no bonus).")


class CustomAmount(BaseModel):
    min_usd: Decimal
    max_usd: Decimal
    credits_per_usd: int = Field(description="A custom amount buys 1 credit per cent.")


class PackageList(BaseModel):
    items: list[PackageOut]
    custom_amount: CustomAmount


@router.get("/billing/packages", response_model=PackageList, response_class=ExactJSONResponse)
async def list_packages(principal: Reader, settings: AppSettings) -> ExactJSONResponse:
    """The credit packages on offer (price exact, bonus shown) and the bounds of a custom amount: what a top-up or a
    checkout session may buy."""
    policy = settings.topup_policy()
    items = [PackageOut(id=p.id, name=p.name, credits=p.credits, price_usd=p.price_usd, price_cents=p.amount_cents,
                        bonus_credits=max(p.credits - p.amount_cents, 0)) for p in policy.packages]
    return respond(PackageList(items=items, custom_amount=CustomAmount(min_usd=policy.min_usd,
                                                                       max_usd=policy.max_usd, credits_per_usd=100)))


# --- checkout sessions ---------------------------------------------------------------------------------------


class CheckoutSessionCreate(Strict):
    account_id: str | None = Field(default=None, description="Required with an admin key; implied by an account key.")
    package_id: Token | None = Field(default=None, description="A credit package (GET /billing/packages).")
    amount: Amount | None = Field(default=None, description="Or a custom amount in US dollars (whole cents, within "
                                                            "the top-up bounds): 1 credit per cent.")
    amount_usd: Amount | None = Field(default=None, description="Alias of amount.")
    success_url: ReturnUrl = Field(description="http(s); the buyer lands here after paying, with ?session_id=cs_... "
                                               "appended (or in place of {CHECKOUT_SESSION_ID}).")
    cancel_url: ReturnUrl = Field(description="http(s); the page's cancel link.")
    idempotency_key: Token | None = Field(default=None, description="Or the Idempotency-Key header (optional).")
    mode: Literal["payment", "setup"] = Field(default="payment", description="setup: the page saves a card and "
                                              "charges nothing (no package or amount; needs payments:write).")
    set_default: bool = Field(default=False, description="setup mode: make the saved card the default (without "
                                                         "it, only if the account has no default card).")


class CheckoutSessionOut(BaseModel):
    id: str
    object: Literal["checkout.session"] = "checkout.session"
    url: str = Field(description="The hosted page to send the buyer to (no API key: the id is the capability).")
    status: str = Field(description="open, complete (paid and credited) or expired")
    payment_status: str = Field(description="unpaid or paid")
    account_id: str
    amount: Decimal = Field(description="The price in US dollars, exact.")
    amount_usd: Decimal
    currency: str = "usd"
    credits: int
    package_id: str | None
    description: str
    success_url: str
    cancel_url: str
    created_at: datetime
    expires_at: datetime
    completed_at: datetime | None
    transaction_id: str | None = Field(description="The ledger purchase, once complete.")
    session_id: str = Field(description="Same as id (seed 000's name).")
    checkout_url: str = Field(description="Same as url (seed 000's name).")
    mode: str = Field(description="payment (buys credits) or setup (saves a card).")
    payment_method_id: str | None = Field(default=None, description="setup mode: the card saved, once complete.")


def _view(session: checkout.CheckoutSession, base_url: str) -> CheckoutSessionOut:
    url = checkout.checkout_page_url(base_url, session.id)
    amount = cents_to_usd(session.amount_cents)
    return CheckoutSessionOut(
        id=session.id, url=url, status=session.status, payment_status=session.payment_status,
        account_id=session.account_id, amount=amount, amount_usd=amount, credits=session.credits,
        package_id=session.package_id, description=session.description, success_url=session.success_url,
        cancel_url=session.cancel_url, created_at=session.created_at, expires_at=session.expires_at,
        completed_at=session.completed_at, transaction_id=session.transaction_id, session_id=session.id,
        checkout_url=url, mode=session.mode, payment_method_id=session.payment_method_id)


_CREATE_RESPONSES: dict[int | str, dict[str, object]] = {
    404: {"description": "unknown_account"},
    409: {"description": "idempotency_conflict (the key was used for another checkout session)"},
    403: {"description": "insufficient_scope (mode setup without payments:write)"},
    422: {"description": "amount_out_of_range / unknown_package / invalid_amount (also a package or amount in mode "
                         "setup) / validation_error (a URL)"}}


async def _create(req: CheckoutSessionCreate, principal: Principal, pool: AsyncConnectionPool, settings: Settings,
                  request: Request, key: str | None) -> ExactJSONResponse:
    account_id = target_account(principal, req.account_id)
    if req.mode == checkout.SETUP and not principal.is_admin and Scope.PAYMENTS_WRITE not in granted(principal.scopes):
        # The page may make the card the default: what PUT /billing/payment-methods needs (payments:write).
        raise CreditflowError("insufficient_scope", "a setup session needs the payments:write scope")
    given = key is not None or req.idempotency_key is not None
    idem = idempotency_key(key, req.idempotency_key) if given else None
    if req.amount is not None and req.amount_usd is not None and req.amount != req.amount_usd:
        raise CreditflowError("validation_error", "amount and amount_usd differ; send one", param="amount_usd")
    amount = req.amount if req.amount is not None else req.amount_usd
    session, _ = await checkout.create_checkout_session(
        pool, settings.topup_policy(), account_id=account_id, package_id=req.package_id, amount_usd=amount,
        success_url=req.success_url, cancel_url=req.cancel_url, idempotency_key=idem,
        expires_in=timedelta(seconds=settings.checkout_session_expiry_seconds), mode=req.mode,
        set_default=req.set_default)
    return respond(_view(session, public_base_url(settings, request)), 201)


@router.post("/checkout/sessions", response_model=CheckoutSessionOut, status_code=201,
             response_class=ExactJSONResponse, responses=_CREATE_RESPONSES)
async def create_checkout_session(req: CheckoutSessionCreate, principal: Creator, pool: Pool, settings: AppSettings,
                                  request: Request, key: IdempotencyKey = None) -> ExactJSONResponse:
    """A hosted checkout link for a ``package_id`` or an ``amount`` (US dollars): send the buyer to ``url``. Nothing
    is charged until the buyer pays there; the credits land once, and the buyer is redirected to ``success_url``.
    With an ``Idempotency-Key`` a repeated request returns the same session."""
    return await _create(req, principal, pool, settings, request, key)


@router.post("/billing/checkout", response_model=CheckoutSessionOut, status_code=201,
             response_class=ExactJSONResponse, responses=_CREATE_RESPONSES, deprecated=True)
async def create_billing_checkout(req: CheckoutSessionCreate, principal: Creator, pool: Pool, settings: AppSettings,
                                  request: Request, key: IdempotencyKey = None) -> ExactJSONResponse:
    """Seed 000's name for ``POST /checkout/sessions`` (the same operation; ``session_id`` and ``checkout_url`` in
    the answer): kept working, deprecated (one path per thing)."""
    return await _create(req, principal, pool, settings, request, key)


SessionId = Annotated[str, Path(max_length=100)]


@router.get("/checkout/sessions/{session_id}", response_model=CheckoutSessionOut, response_class=ExactJSONResponse,
            responses={404: {"description": "unknown_checkout_session (also another account's)"}})
async def get_checkout_session(session_id: SessionId, principal: Reader, pool: Pool, settings: AppSettings,
                               request: Request,
                               account_id: Annotated[str | None, Query(description="Admin keys only.")] = None
                               ) -> ExactJSONResponse:
    """A checkout session and its status (``open``, ``complete`` once paid and credited, ``expired``)."""
    owner = None if principal.is_admin and account_id is None else target_account(principal, account_id)
    session = await checkout.get_checkout_session(pool, session_id, account_id=owner)
    return respond(_view(session, public_base_url(settings, request)))
