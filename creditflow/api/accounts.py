"""/api/v1/accounts: accounts (admin) and their API keys."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.api.deps import get_app_settings, get_pool, require, target_account
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import ApiKey, CreatedApiKey, Principal, Scope, create_key, list_keys, revoke_key
from creditflow.api.schemas import AccountCreate, ApiKeyCreate
from creditflow.api.scopes import ACCOUNT_KEY_SCOPES
from creditflow.config import Settings
from creditflow.domain.money import AmountError, validate_whole_credits
from creditflow.errors import CreditflowError
from creditflow.ids import check_id
from creditflow.ledger import accounts
from creditflow.ledger.models import Account

router = APIRouter(prefix="/api/v1/accounts", tags=["accounts"], route_class=ExactRoute)

Reader = Annotated[Principal, Depends(require(Scope.BILLING_READ))]
Admin = Annotated[Principal, Depends(require(Scope.ADMIN))]
Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]


@router.post("", response_model=Account, status_code=201, response_class=ExactJSONResponse,
             responses={409: {"description": "account_exists (external_id taken); details.account_id"}})
async def create_account(req: AccountCreate, principal: Admin, pool: Pool,
                         settings: Annotated[Settings, Depends(get_app_settings)]) -> ExactJSONResponse:
    """Create an account with its wallet and welcome bonus (admin). Its ``AccountWorkflow`` is
    started from the outbox, so this never waits on Temporal."""
    line = 0
    if req.overage_credit_line != 0:
        try:
            line = validate_whole_credits(req.overage_credit_line)
        except AmountError as exc:
            raise CreditflowError(exc.code, f"overage_credit_line: {exc}") from exc
    account = await accounts.create_account(
        pool, name=req.name, billing_email=req.billing_email, external_id=req.external_id,
        welcome_bonus_credits=settings.welcome_bonus_credits, overage_credit_line=line)
    return respond(account, 201)


@router.get("/{account_id}", response_model=Account, response_class=ExactJSONResponse)
async def get_account(account_id: str, principal: Reader, pool: Pool) -> ExactJSONResponse:
    return respond(await accounts.get_account(pool, target_account(principal, account_id)))


async def _existing(pool: AsyncConnectionPool, principal: Principal, account_id: str) -> str:
    account_id = target_account(principal, account_id)
    if not await accounts.account_exists(pool, account_id):
        raise CreditflowError("unknown_account", f"no account {account_id}")
    return account_id


@router.post("/{account_id}/api-keys", response_model=CreatedApiKey, status_code=201,
             response_class=ExactJSONResponse)
async def create_api_key(account_id: str, req: ApiKeyCreate, principal: Admin, pool: Pool) -> ExactJSONResponse:
    """Issue a key for the account. The ``secret`` is shown once; only its hash is stored."""
    account_id = await _existing(pool, principal, account_id)
    not_allowed = sorted(s.value for s in set(req.scopes) - ACCOUNT_KEY_SCOPES)
    if not_allowed:
        raise CreditflowError("validation_error", f"account keys do not take {', '.join(not_allowed)}; they take "
                              + ", ".join(sorted(s.value for s in ACCOUNT_KEY_SCOPES)))
    return respond(await create_key(pool, account_id=account_id, scopes=req.scopes, name=req.name), 201)


class ApiKeyList(BaseModel):
    items: list[ApiKey]


@router.get("/{account_id}/api-keys", response_model=ApiKeyList, response_class=ExactJSONResponse)
async def get_api_keys(account_id: str, principal: Admin, pool: Pool) -> ExactJSONResponse:
    account_id = await _existing(pool, principal, account_id)
    return respond({"items": await list_keys(pool, account_id)})


@router.delete("/{account_id}/api-keys/{key_id}", response_model=ApiKey, response_class=ExactJSONResponse)
async def delete_api_key(account_id: str, key_id: str, principal: Admin, pool: Pool) -> ExactJSONResponse:
    """Revoke a key; it stops working immediately."""
    account_id = await _existing(pool, principal, account_id)
    check_id(key_id, "key", "key_id")
    return respond(await revoke_key(pool, account_id, key_id))
