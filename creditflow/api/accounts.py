"""/api/v1/accounts: accounts (admin) and their API keys."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from creditflow.api.conventions import EndingBefore, StartingAfter, page_of
from creditflow.api.deps import get_app_settings, get_key_cache, get_pool, require, target_account
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import (
    ApiKey,
    CreatedApiKey,
    KeyCache,
    Principal,
    Scope,
    create_key,
    list_keys,
    revoke_key,
)
from creditflow.api.schemas import AccountCreate, ApiKeyCreate
from creditflow.api.scopes import ACCOUNT_KEY_SCOPES
from creditflow.config import Settings
from creditflow.domain.money import AmountError, validate_whole_credits
from creditflow.errors import CreditflowError
from creditflow.ids import check_id
from creditflow.ledger import accounts
from creditflow.ledger.models import Account
from creditflow.ledger.pagination import Cursor

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


class AccountList(BaseModel):
    items: list[Account]
    has_more: bool = Field(default=False, description="More items beyond this page in the paging direction.")


@router.get("", response_model=AccountList, response_class=ExactJSONResponse)
async def list_accounts(
        principal: Admin, pool: Pool, limit: Annotated[int, Query(ge=1, le=500)] = 50,
        q: Annotated[str | None, Query(min_length=1, max_length=200, description="A case-insensitive substring of "
                                       "the name, billing email or external id.")] = None,
        status: Annotated[str | None, Query(min_length=1, max_length=40, pattern=r"^[a-z_]+$")] = None,
        external_id: Annotated[str | None, Query(min_length=1, max_length=200, description="Exactly this external "
                                                 "id: the lookup by your own id (zero or one item).")] = None,
        starting_after: StartingAfter = None, ending_before: EndingBefore = None) -> ExactJSONResponse:
    """List and search accounts (admin), newest first; ``external_id`` looks one up by the platform's own id.
    Pages with ``limit`` and ``starting_after`` / ``ending_before`` (an account id); ``has_more``."""
    cursor = Cursor(starting_after, ending_before)
    rows, has_more = page_of(await accounts.list_accounts(pool, limit=limit + 1, cursor=cursor, q=q, status=status,
                                                          external_id=external_id), limit, cursor)
    return respond(AccountList(items=rows, has_more=has_more))


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
    has_more: bool = Field(default=False, description="More items beyond this page in the paging direction.")


@router.get("/{account_id}/api-keys", response_model=ApiKeyList, response_class=ExactJSONResponse)
async def get_api_keys(account_id: str, principal: Admin, pool: Pool, limit: Annotated[int, Query(ge=1, le=500)] = 50,
                       starting_after: StartingAfter = None, ending_before: EndingBefore = None) -> ExactJSONResponse:
    """The account's keys (revoked ones too), newest first; pages with ``starting_after`` / ``ending_before``."""
    account_id = await _existing(pool, principal, account_id)
    cursor = Cursor(starting_after, ending_before)
    keys, has_more = page_of(await list_keys(pool, account_id, limit=limit + 1, cursor=cursor), limit, cursor)
    return respond({"items": keys, "has_more": has_more})


@router.delete("/{account_id}/api-keys/{key_id}", response_model=ApiKey, response_class=ExactJSONResponse)
async def delete_api_key(account_id: str, key_id: str, principal: Admin, pool: Pool,
                         cache: Annotated[KeyCache, Depends(get_key_cache)]) -> ExactJSONResponse:
    """Revoke a key; it stops working immediately (other API processes: within ``api_key_cache_seconds``)."""
    account_id = await _existing(pool, principal, account_id)
    check_id(key_id, "key", "key_id")
    return respond(await revoke_key(pool, account_id, key_id, cache))
