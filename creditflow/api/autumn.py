"""Autumn-compatible routes: apps written against Autumn's SDK (``autumn-python`` 0.2) run on
creditflow by changing only the base URL (``.../api/v1``) and the key. See docs/autumn-compatibility.md.

Why a separate module with its own paths: the SDK's paths and answer shapes are Autumn's, not creditflow's; the
work underneath is creditflow's own (``metering.check``/``metering.track`` for pricing, spend control and
idempotency, ``accounts.create_account`` for customers, ``queries.balance`` for the figures). Nothing is priced or
deduplicated twice.

Retries: the SDK retries 408/409/429/5xx and connection errors, and sends no idempotency key unless the app gives
one. A keyless track is recorded under a fresh random key (two identical calls are two events: deriving a key from
the body would silently drop real repeated usage), so every error answer to a keyless write carries
``x-should-retry: false`` (a retry could charge twice), and a keyless write the SDK retries on its own anyway (a
connection lost after the commit) is refused; with a key (``idempotency_key`` or the ``Idempotency-Key`` header),
retries replay the stored result and only final refusals say ``false``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from creditflow.api.conventions import IdempotencyKey, idempotency_key
from creditflow.api.deps import get_app_settings, get_pool, require
from creditflow.api.entitlements import CREDITS_FEATURE
from creditflow.api.entitlements import _account as account_for_customer
from creditflow.api.error_handling import error_object, infrastructure_fault
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import Principal, Scope
from creditflow.api.schemas import AccountCreate, Amount, Email, Metadata, Token
from creditflow.api.scopes import granted
from creditflow.config import Settings
from creditflow.errors import STATUS_BY_CODE, CreditflowError
from creditflow.ledger import accounts, credit_systems, metering, queries
from creditflow.ledger.models import Account, Balance, Balances

log = logging.getLogger("creditflow.api.autumn")

SUPPORTED_API_MAJOR = "2"  # autumn-python 0.2 sends x-api-version: 2.0.0
ANSWERED_VERSION = "2.0.0"
UNSAFE_RETRY = "autumn_unsafe_retry"  # request.state flag: a retry of this request could charge twice
RETRY_COUNT_HEADER = "x-stainless-retry-count"  # the SDK numbers its own retries of a request (0: the first)


def _autumn_error(status: int, code: str, message: str, *, retry: bool | None, details: object = None,
                  param: str | None = None) -> ExactJSONResponse:
    """Autumn's error shape (top-level ``code`` and ``message``) plus creditflow's ``error`` object."""
    response = respond({"code": code, "message": message,
                        "error": error_object(code, message, status=status, details=details, param=param)}, status)
    if retry is not None:
        response.headers["x-should-retry"] = "true" if retry else "false"
    if status == 503:
        response.headers["Retry-After"] = "1"
    response.headers["x-api-version"] = ANSWERED_VERSION
    return response


class AutumnRoute(ExactRoute):
    """Answers refusals and faults itself, so every answer says whether the SDK may retry it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def autumn_handler(request: Request) -> Response:
            try:
                response = await handler(request)
            except CreditflowError as exc:
                # A refusal is final: retrying it changes nothing (and a 409 would otherwise be retried).
                return _autumn_error(exc.status, exc.code, exc.message, retry=False, details=exc.details,
                                     param=exc.param)
            except (RequestValidationError, StarletteHTTPException):
                raise  # an unusable body: creditflow's 422 error object; the SDK does not retry a 422
            except Exception as exc:  # noqa: BLE001 - a fault: answer it here so the retry header is ours
                log.exception("autumn route failed")
                fault = infrastructure_fault(exc)
                unsafe = bool(getattr(request.state, UNSAFE_RETRY, False))
                if fault is None:
                    return _autumn_error(500, "internal_error", "internal error", retry=not unsafe)
                return _autumn_error(503, fault[0], fault[1], retry=not unsafe)
            response.headers["x-api-version"] = ANSWERED_VERSION
            return response

        return autumn_handler


async def api_version(x_api_version: Annotated[str | None, Header(alias="x-api-version")] = None) -> None:
    """Autumn's ``x-api-version``: 2.x is what these routes answer; another major is refused, not guessed."""
    if x_api_version is not None and x_api_version.split(".")[0] != SUPPORTED_API_MAJOR:
        raise CreditflowError("unsupported_version", f"x-api-version {x_api_version!r} is not supported; "
                              f"these routes answer Autumn's API {ANSWERED_VERSION}", param="x-api-version")


router = APIRouter(prefix="/api/v1", tags=["autumn"], route_class=AutumnRoute, dependencies=[Depends(api_version)])

Admin = Annotated[Principal, Depends(require(Scope.ADMIN))]
Reader = Annotated[Principal, Depends(require(Scope.BILLING_READ))]
Checker = Annotated[Principal, Depends(require(Scope.BILLING_READ))]
Writer = Annotated[Principal, Depends(require(Scope.USAGE_WRITE))]
Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]


class Lenient(BaseModel):
    """The SDK's bodies: fields creditflow has no use for are accepted and ignored only where ignoring them
    cannot change an amount (see docs); the ones that would are refused in the handlers."""

    model_config = ConfigDict(extra="ignore")


class CustomerCreate(Lenient):
    id: Token | None
    name: str | None = Field(default=None, max_length=200)  # checked as AccountCreate.name when creating
    email: Email | None = None


class CheckBody(Lenient):
    customer_id: Token
    feature_id: Token
    required_balance: Amount | None = None
    send_event: bool = False
    entity_id: str | None = None
    properties: Metadata


class TrackBody(Lenient):
    customer_id: Token
    feature_id: Token | None = None
    event_name: str | None = None
    value: Amount = Decimal(1)
    idempotency_key: Token | None = None
    properties: Metadata
    entity_id: str | None = None


def _unsupported(param: str, why: str) -> CreditflowError:
    return CreditflowError("validation_error", f"{param} is not supported by creditflow: {why}", param=param)


def _balance(figures: Balance) -> dict[str, Any]:
    """The shared credit wallet as one Autumn balance (a credit system every feature draws on).

    ``current_balance`` is what can be spent now; ``usage`` is this period's usage; ``granted_balance`` is
    ``current_balance + usage`` so Autumn's identity (current = granted + purchased - usage) holds exactly."""
    usage = figures.usage_this_period or Decimal(0)
    return {"feature_id": CREDITS_FEATURE, "current_balance": figures.available,
            "granted_balance": figures.available + usage, "purchased_balance": Decimal(0), "usage": usage,
            "unlimited": False, "overage_allowed": figures.overage_credit_line > 0, "max_purchase": None,
            "reset": None}


async def _feature_balance(pool: AsyncConnectionPool, account_id: str, feature_id: str) -> dict[str, Any]:
    """The balance the feature draws on: the wallet, or its named credit system's (docs/credit-systems.md), reported
    under that system's id as seed 003 does."""
    ledger_account, system = await credit_systems.ledger_account(pool, account_id, feature_id)
    if system is None:
        return _balance(await queries.balance(pool, account_id))
    try:
        figures = _balance(await queries.balance(pool, ledger_account))
    except CreditflowError:  # never granted credits in that system: an empty balance there
        figures = _balance(Balance(account_id=account_id, last_updated=datetime.now(UTC),
                                   **Balances.from_micros(0, 0, 0).model_dump()))
    return figures | {"feature_id": system}


def _customer(account: Account, figures: Balance) -> dict[str, Any]:
    return {"id": account.external_id or account.id, "autumn_id": account.id, "name": account.name,
            "email": account.billing_email, "created_at": int(account.created_at.timestamp() * 1000),
            "env": "live", "fingerprint": None, "stripe_id": None, "metadata": {},
            "subscriptions": [], "balances": {CREDITS_FEATURE: _balance(figures)}}


async def _customer_answer(pool: AsyncConnectionPool, account_id: str) -> dict[str, Any]:
    customer = _customer(await accounts.get_account(pool, account_id), await queries.balance(pool, account_id))
    for sub in await credit_systems.sub_accounts(pool, account_id):  # named credit systems, under their ids
        system = sub.split(".", 1)[1]
        customer["balances"][system] = _balance(await queries.balance(pool, sub)) | {"feature_id": system}
    return customer


@router.post("/customers", response_class=ExactJSONResponse)
async def create_customer(req: CustomerCreate, principal: Admin, pool: Pool,
                          settings: Annotated[Settings, Depends(get_app_settings)]) -> ExactJSONResponse:
    """Get or create the customer whose id is the app's own (creditflow's ``external_id``). Creating needs an
    ``email`` (creditflow's billing email); getting an existing customer does not."""
    if req.id is None:
        raise _unsupported("id", "customers are identified by the app's own id (external_id); send id")
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT id FROM accounts WHERE external_id = %s", (req.id,))).fetchone()
    if row is not None:
        return respond(await _customer_answer(pool, row["id"]))
    if req.email is None:
        raise CreditflowError("validation_error", "email is required to create a customer (its billing email)",
                              param="email")
    try:  # the native route's own validation of name, email and external id
        new = AccountCreate(name=req.name or req.id, billing_email=req.email, external_id=req.id)
    except ValidationError as exc:
        first = exc.errors()[0]
        field_name = {"billing_email": "email"}.get(str(first["loc"][0]), str(first["loc"][0]))
        raise CreditflowError("validation_error", f"{field_name}: {first['msg']}", param=field_name) from exc
    try:
        account = await accounts.create_account(pool, name=new.name, billing_email=new.billing_email,
                                                external_id=new.external_id,
                                                welcome_bonus_credits=settings.welcome_bonus_credits)
    except CreditflowError as exc:
        if exc.code != "account_exists" or not exc.details.get("account_id"):
            raise
        account_id = str(exc.details["account_id"])  # created concurrently: get
    else:
        account_id = account.id
    return respond(await _customer_answer(pool, account_id))


@router.get("/customers/{customer_id}", response_class=ExactJSONResponse)
async def get_customer(customer_id: str, principal: Reader, pool: Pool) -> ExactJSONResponse:
    """The customer by the app's id (or its creditflow account id), with the credit balance."""
    if not customer_id or len(customer_id) > 200:
        raise CreditflowError("validation_error", "customer_id must be 1-200 characters", param="customer_id")
    account_id = await account_for_customer(pool, principal, customer_id)
    return respond(await _customer_answer(pool, account_id))


def _may_write(principal: Principal) -> bool:
    return principal.is_admin or Scope.USAGE_WRITE in granted(principal.scopes)


@router.post("/check", response_class=ExactJSONResponse)
async def check(req: CheckBody, principal: Checker, pool: Pool, request: Request,
                header_key: IdempotencyKey = None) -> ExactJSONResponse:
    """May the customer use the feature for ``required_balance`` units (default one)? Writes nothing, unless
    ``send_event`` records that usage too (through ``metering.track``, which decides affordability atomically)."""
    if req.entity_id is not None:
        raise _unsupported("entity_id", "entity balances (seats) have no creditflow counterpart")
    account_id = await account_for_customer(pool, principal, req.customer_id)
    body: dict[str, Any] = {"customer_id": req.customer_id, "feature_id": req.feature_id, "entity_id": None,
                            "required_balance": req.required_balance}
    if req.send_event:
        if not _may_write(principal):
            raise CreditflowError("insufficient_scope", "send_event records usage: this API key lacks usage:write",
                                  details={"required_scopes": [Scope.USAGE_WRITE.value]})
        value = req.required_balance if req.required_balance is not None else Decimal(1)
        key = _key(request, header_key, None)
        result = await metering.track(pool, metering.UsageEvent.build(account_id, req.feature_id, value, key,
                                                                      None, req.properties))
        body.update(allowed=result.allowed, code=result.code, credits_charged=result.credits_charged,
                    event_id=result.transaction_id, replayed=result.replayed)
    else:
        verdict = await metering.check(pool, account_id, req.feature_id, req.required_balance)
        body.update(allowed=verdict.allowed, code=verdict.code, credits_required=verdict.credits_required)
    body["balance"] = await _feature_balance(pool, account_id, req.feature_id)
    return respond(body)


def _key(request: Request, header: str | None, body: str | None) -> str:
    """The caller's key, or a fresh one (then a retry could charge twice: errors say so, see module doc).

    A keyless write the SDK sends again on its own (``x-stainless-retry-count`` above 0: the connection dropped, or
    the answer timed out, after the first attempt may have committed) cannot be told from a new event: it is refused,
    so a retried track is never charged twice (the app learns its call's outcome is unknown)."""
    if header is None and body is None:
        setattr(request.state, UNSAFE_RETRY, True)
        if request.headers.get(RETRY_COUNT_HEADER, "0").strip() not in ("", "0"):
            raise CreditflowError(
                "retry_without_idempotency_key",
                "this is the SDK's retry of a usage event sent without an idempotency key: the first attempt may "
                "already be recorded, so it is not recorded again; pass idempotency_key to make retries safe")
        return f"autumn:{uuid.uuid4().hex}"
    return idempotency_key(header, body)


@router.post("/track", response_class=ExactJSONResponse,
             responses={402: {"description": "insufficient_credits (nothing recorded)"},
                        404: {"description": "unknown_feature / unknown_account"},
                        409: {"description": "idempotency_conflict"}})
async def track(req: TrackBody, principal: Writer, pool: Pool, request: Request,
                header_key: IdempotencyKey = None) -> ExactJSONResponse:
    """Record ``value`` units of usage once per ``idempotency_key``; ``properties`` are kept as the event's
    metadata. A denial records nothing and is an error (creditflow never lets usage overdraw the wallet)."""
    key = _key(request, header_key, req.idempotency_key)
    if req.feature_id is None:
        raise _unsupported("event_name", "track by feature_id (event names mapping to features are not modelled)")
    if req.entity_id is not None:
        raise _unsupported("entity_id", "entity balances (seats) have no creditflow counterpart")
    account_id = await account_for_customer(pool, principal, req.customer_id)
    result = await metering.track(pool, metering.UsageEvent.build(account_id, req.feature_id, req.value, key,
                                                                  None, req.properties))
    if not result.allowed:
        raise CreditflowError(result.code, result.code.replace("_", " "),
                              status=STATUS_BY_CODE.get(result.code, 400))
    return respond({"id": result.transaction_id, "code": "event_received", "customer_id": req.customer_id,
                    "feature_id": req.feature_id, "event_name": None, "entity_id": None, "value": req.value,
                    "credits_charged": result.credits_charged, "replayed": result.replayed,
                    "balance": await _feature_balance(pool, account_id, req.feature_id)})
