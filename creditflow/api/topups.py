"""/api/v1/billing/wallet/topup(s): buy credits through Stripe (the ``TopUpWorkflow`` does the work).

The API validates the request, then starts the workflow ``topup:{account_id}:{request_id}`` with
update-with-start (a running one is joined, so a repeated request never starts a second charge) and waits
a bounded time for its answer. The workflow keeps going if the caller leaves.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from creditflow.api.conventions import EndingBefore, IdempotencyKey, StartingAfter, idempotency_key, page_of
from creditflow.api.deps import get_app_settings, get_pool, require, target_account
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import Principal, Scope
from creditflow.api.schemas import Amount, Strict, Token
from creditflow.client import CreditflowClient, topup_input, topup_workflow_id
from creditflow.config import Settings
from creditflow.domain.topups import cents_to_usd
from creditflow.errors import CreditflowError
from creditflow.ledger import credit_systems
from creditflow.ledger.pagination import Cursor
from creditflow.payments import topups
from creditflow.payments.customers import stored_customer
from creditflow.payments.methods import PAYMENT_METHOD_ID
from workflows.contract import TOPUP_FAILED, TOPUP_PENDING, TopUpOutcome

router = APIRouter(prefix="/api/v1/billing/wallet", tags=["top-ups"], route_class=ExactRoute)

Reader = Annotated[Principal, Depends(require(Scope.BILLING_READ))]
Writer = Annotated[Principal, Depends(require(Scope.PAYMENTS_WRITE))]
Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]
AppSettings = Annotated[Settings, Depends(get_app_settings)]


class TemporalConnector:
    """Connects to Temporal on first use, so the API starts (and serves everything else) while Temporal is
    down; a failed connection is retried by the next request."""

    def __init__(self, settings: Settings, connect_timeout: float = 5.0) -> None:
        self._settings = settings
        self._timeout = connect_timeout
        self._client: CreditflowClient | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> CreditflowClient:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    try:
                        self._client = await asyncio.wait_for(CreditflowClient.connect(self._settings), self._timeout)
                    except (RuntimeError, OSError, TimeoutError) as exc:
                        raise CreditflowError("workflow_unavailable",
                                              "the workflow service is unavailable; try again later") from exc
        return self._client


async def get_temporal(request: Request) -> CreditflowClient:
    return await request.app.state.temporal.get()


class TopUpRequest(Strict):
    account_id: str | None = Field(default=None, description="Required with an admin key; implied by an account key.")
    amount_usd: Amount | None = Field(default=None, description="Whole cents, within the configured bounds.")
    package_id: Token | None = Field(default=None, description="A credit package (starter, growth, ...).")
    payment_method_id: str | None = Field(default=None, description="A saved card; default: the account's default "
                                                                     "card, else a client secret is returned.")
    request_id: Token | None = Field(default=None, description="Idempotency: the same request id never charges "
                                                               "twice. Or the Idempotency-Key header.")
    credit_system: Token | None = Field(default=None, description="A named credit system the credits fund "
                                        "(docs/credit-systems.md); default: the wallet (`credits`).")


class TopUpResponse(BaseModel):
    status: str = Field(description="succeeded, requires_payment, canceled, or pending (still deciding: ask again "
                                    "with the same request_id)")
    request_id: str
    amount_usd: Decimal
    credits: int
    package_id: str | None = None
    transaction_id: str | None = None
    balance: Decimal | None = None
    payment_intent_id: str | None = None
    client_secret: str | None = None
    client_secret_camel: str | None = Field(default=None, serialization_alias="clientSecret",
                                            description="`client_secret` again, under seed 004's name")
    error_code: str | None = None
    credit_system: str | None = Field(default=None, description="The named credit system funded; `balance` is "
                                                                "that system's. Absent for the wallet.")


class PendingTopUp(BaseModel):
    status: str = Field(description="pending: the workflow has the request and goes on; repeat it (same key)")
    request_id: str
    workflow_id: str


class TopUpItem(BaseModel):
    id: str
    request_id: str
    status: str
    amount_usd: Decimal
    credits: int
    package_id: str | None
    payment_method_id: str | None
    payment_intent_id: str | None
    transaction_id: str | None
    failure_code: str | None
    decline_code: str | None
    created_at: datetime
    updated_at: datetime
    credit_system: str | None = Field(default=None, description="The named credit system funded (absent: the wallet).")


class TopUpList(BaseModel):
    items: list[TopUpItem]
    has_more: bool = Field(default=False, description="More items beyond this page in the paging direction.")


def _body(outcome: TopUpOutcome, credit_system: str | None = None) -> dict[str, object]:
    if outcome.status == TOPUP_FAILED:
        details: dict[str, object] = {"request_id": outcome.request_id}
        if outcome.decline_code is not None or outcome.error_code == "card_declined":
            details["decline_code"] = outcome.decline_code
        if outcome.payment_intent_id:
            details["payment_intent_id"] = outcome.payment_intent_id
        raise CreditflowError(outcome.error_code or "payment_failed", outcome.error_message, details=details)
    return TopUpResponse(
        status=outcome.status, request_id=outcome.request_id, amount_usd=cents_to_usd(outcome.amount_cents),
        credits=outcome.credits, package_id=outcome.package_id, transaction_id=outcome.transaction_id,
        balance=outcome.balance, payment_intent_id=outcome.payment_intent_id, client_secret=outcome.client_secret,
        client_secret_camel=outcome.client_secret, error_code=outcome.error_code, credit_system=credit_system,
    ).model_dump(exclude_none=True, by_alias=True)


@router.post("/topup", response_model=TopUpResponse, response_class=ExactJSONResponse,
             responses={202: {"model": PendingTopUp,
                              "description": "not decided within the wait: `status: pending`; repeat the request"},
                        402: {"description": "card_declined (`details.decline_code`); nothing credited"},
                        404: {"description": "unknown_payment_method / unknown_account"},
                        409: {"description": "idempotency_conflict (request_id used for another top-up)"},
                        422: {"description": "amount_out_of_range / unknown_package / invalid_amount"},
                        503: {"description": "workflow_unavailable / payment_provider_unavailable"}})
async def topup(req: TopUpRequest, principal: Writer, pool: Pool, settings: AppSettings,
                request: Request, key: IdempotencyKey = None) -> ExactJSONResponse:
    """Buy credits: ``amount_usd`` (1 credit per cent) or a ``package_id``. With a saved card the charge is
    made off-session and the answer is the ledger transaction; without one the answer is a Stripe
    ``client_secret`` to confirm in the browser, and the credits land once the payment settles."""
    account_id = target_account(principal, req.account_id)
    request_id = idempotency_key(key, req.request_id, "request_id")
    if req.payment_method_id is not None and not PAYMENT_METHOD_ID.match(req.payment_method_id):
        raise CreditflowError("unknown_payment_method", "no such payment method")
    system = await funded_system(pool, req.credit_system)
    input = topup_input(settings, account_id, request_id, amount_usd=req.amount_usd, package_id=req.package_id,
                        payment_method_id=req.payment_method_id, credit_system=system)
    await stored_customer(pool, account_id)  # unknown_account before any workflow starts
    client = await get_temporal(request)
    outcome = await client.topup(input, wait=timedelta(seconds=settings.topup_answer_timeout_seconds))
    if outcome is None:
        return respond({"status": TOPUP_PENDING, "request_id": request_id,
                        "workflow_id": topup_workflow_id(account_id, request_id)}, 202)
    return respond(_body(outcome, system))


async def funded_system(pool: AsyncConnectionPool, credit_system: str | None) -> str | None:
    """The named credit system a purchase funds: None for the wallet (absent or the default ``credits``), else a
    system that exists (``unknown_credit_system`` before anything is charged)."""
    if credit_system is None or credit_system == credit_systems.DEFAULT_SYSTEM:
        return None
    return await credit_systems.require_system(pool, credit_system)


@router.get("/topups", response_model=TopUpList, response_class=ExactJSONResponse)
async def list_topups(principal: Reader, pool: Pool, limit: Annotated[int, Query(ge=1, le=500)] = 50,
                      account_id: Annotated[str | None, Query(description="Admin keys only.")] = None,
                      starting_after: StartingAfter = None, ending_before: EndingBefore = None
                      ) -> ExactJSONResponse:
    """The account's top-ups, newest first, with their status (pending, requires_action, succeeded, failed,
    canceled). Pages with ``limit`` and ``starting_after`` / ``ending_before`` (an item id); ``has_more``."""
    cursor = Cursor(starting_after, ending_before)
    charges, has_more = page_of(await topups.list_charges(pool, target_account(principal, account_id), limit + 1,
                                                          cursor), limit, cursor)
    items = [TopUpItem(id=c.id, request_id=c.request_id, status=c.status, amount_usd=c.amount_usd, credits=c.credits,
                       package_id=c.package_id, payment_method_id=c.payment_method_id,
                       payment_intent_id=c.payment_intent_id, transaction_id=c.ledger_txn_id,
                       failure_code=c.failure_code, decline_code=c.decline_code, created_at=c.created_at,
                       updated_at=c.updated_at, credit_system=c.credit_system_id) for c in charges]
    # ``credit_system`` only on a named system's top-ups: a wallet top-up is listed exactly as before.
    return respond({"items": [i.model_dump(exclude={"credit_system"} if i.credit_system is None else None)
                              for i in items], "has_more": has_more})
