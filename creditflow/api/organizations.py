"""/api/v1/organizations: organizations own workspaces (accounts); their keys move credits between them.

The platform (admin key) creates organizations, attaches accounts and issues organization keys. An organization
key (``cf_org_...``) acts only on its own organization's workspaces: with ``transfers:write`` it moves credits
between them, with ``billing:read`` it reads them (every account route, naming ``account_id``).
docs/organizations-and-transfers.md.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field, StringConstraints

from creditflow.api.accounts import ApiKeyList
from creditflow.api.conventions import EndingBefore, IdempotencyKey, StartingAfter, idempotency_key, page_of
from creditflow.api.deps import get_key_cache, get_pool, require
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import (
    ApiKey,
    CreatedApiKey,
    KeyCache,
    Principal,
    Scope,
    create_key,
    list_organization_keys,
    revoke_organization_key,
)
from creditflow.api.schemas import Amount, Strict, Text, Token
from creditflow.api.scopes import ORGANIZATION_KEY_SCOPES
from creditflow.domain.money import AmountError, validate_whole_credits
from creditflow.errors import CreditflowError
from creditflow.ids import check_id
from creditflow.ledger import transfers
from creditflow.ledger.pagination import Cursor
from creditflow.ledger.transfers import Organization, Transfer

router = APIRouter(prefix="/api/v1/organizations", tags=["organizations"], route_class=ExactRoute)

Reader = Annotated[Principal, Depends(require(Scope.BILLING_READ))]
Mover = Annotated[Principal, Depends(require(Scope.TRANSFERS_WRITE))]
Admin = Annotated[Principal, Depends(require(Scope.ADMIN))]
Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]
Keys = Annotated[KeyCache, Depends(get_key_cache)]
Name = Annotated[Text, StringConstraints(min_length=1, max_length=200, strip_whitespace=True)]


class OrganizationCreate(Strict):
    name: Name
    external_id: Token | None = None


class AccountAttach(Strict):
    account_id: str


class OrganizationKeyCreate(Strict):
    name: Annotated[Text, StringConstraints(max_length=100)] = ""
    scopes: list[Scope] = Field(default_factory=lambda: sorted(ORGANIZATION_KEY_SCOPES), min_length=1,
                                description="billing:read and/or transfers:write (default: both)")


class TransferCreate(Strict):
    from_account_id: str
    to_account_id: str
    amount: Amount = Field(description="Whole credits to move (> 0).")
    idempotency_key: Token | None = Field(default=None, description="Or the Idempotency-Key header (one of them).")
    description: Annotated[Text, StringConstraints(max_length=500, strip_whitespace=True)] = ""


def _own(principal: Principal, organization_id: str) -> str:
    """The organization a call acts on: any for an admin key, its own for an organization key."""
    check_id(organization_id, "org", "organization_id")
    if principal.is_admin or principal.organization_id == organization_id:
        return organization_id
    raise CreditflowError("forbidden", "this API key does not belong to this organization")


@router.post("", response_model=Organization, status_code=201, response_class=ExactJSONResponse,
             responses={409: {"description": "organization_exists (external_id taken)"}})
async def create_organization(req: OrganizationCreate, principal: Admin, pool: Pool) -> ExactJSONResponse:
    """Create an organization (admin). Attach its workspaces with ``POST .../accounts``."""
    return respond(await transfers.create_organization(pool, name=req.name, external_id=req.external_id), 201)


@router.get("/{organization_id}", response_model=Organization, response_class=ExactJSONResponse)
async def get_organization(organization_id: str, principal: Reader, pool: Pool) -> ExactJSONResponse:
    return respond(await transfers.get_organization(pool, _own(principal, organization_id)))


@router.post("/{organization_id}/accounts", response_model=Organization, response_class=ExactJSONResponse)
async def attach_account(organization_id: str, req: AccountAttach, principal: Admin, pool: Pool,
                         cache: Keys) -> ExactJSONResponse:
    """Make an account a workspace of the organization (admin; idempotent). An account belongs to at most one."""
    organization_id = _own(principal, organization_id)
    account_id = check_id(req.account_id, "acc", "account_id")
    organization = await transfers.attach_account(pool, organization_id, account_id)
    cache.evict_organization(organization_id)  # its keys carry the workspace list
    return respond(organization)


@router.post("/{organization_id}/api-keys", response_model=CreatedApiKey, status_code=201,
             response_class=ExactJSONResponse)
async def create_organization_key(organization_id: str, req: OrganizationKeyCreate, principal: Admin,
                                  pool: Pool) -> ExactJSONResponse:
    """Issue an organization key (admin). The ``secret`` is shown once."""
    organization_id = _own(principal, organization_id)
    await transfers.get_organization(pool, organization_id)
    not_allowed = sorted(s.value for s in set(req.scopes) - ORGANIZATION_KEY_SCOPES)
    if not_allowed:
        raise CreditflowError("validation_error", f"organization keys do not take {', '.join(not_allowed)}; they "
                              "take billing:read and transfers:write")
    return respond(await create_key(pool, account_id=None, organization_id=organization_id, scopes=req.scopes,
                                    name=req.name), 201)


@router.get("/{organization_id}/api-keys", response_model=ApiKeyList, response_class=ExactJSONResponse)
async def get_organization_keys(organization_id: str, principal: Admin, pool: Pool,
                                limit: Annotated[int, Query(ge=1, le=500)] = 50, starting_after: StartingAfter = None,
                                ending_before: EndingBefore = None) -> ExactJSONResponse:
    """The organization's keys (revoked ones too), newest first; pages with ``starting_after`` / ``ending_before``."""
    organization_id = _own(principal, organization_id)
    await transfers.get_organization(pool, organization_id)
    cursor = Cursor(starting_after, ending_before)
    keys, has_more = page_of(await list_organization_keys(pool, organization_id, limit=limit + 1, cursor=cursor),
                             limit, cursor)
    return respond({"items": keys, "has_more": has_more})


@router.delete("/{organization_id}/api-keys/{key_id}", response_model=ApiKey, response_class=ExactJSONResponse)
async def delete_organization_key(organization_id: str, key_id: str, principal: Admin, pool: Pool,
                                  cache: Keys) -> ExactJSONResponse:
    """Revoke an organization key; it stops working at once (other API processes: within ``api_key_cache_seconds``)."""
    organization_id = _own(principal, organization_id)
    check_id(key_id, "key", "key_id")
    return respond(await revoke_organization_key(pool, organization_id, key_id, cache))


@router.post("/{organization_id}/transfers", response_model=Transfer, status_code=201,
             response_class=ExactJSONResponse,
             responses={200: {"model": Transfer, "description": "a replay (same key, same request): the first "
                                                                 "transfer, `replayed: true`; nothing moved"},
                        402: {"description": "insufficient_credits (nothing moved)"},
                        403: {"description": "forbidden: an account outside this organization"},
                        409: {"description": "idempotency_conflict"}})
async def create_transfer(organization_id: str, req: TransferCreate, principal: Mover, pool: Pool,
                          key: IdempotencyKey = None) -> ExactJSONResponse:
    """Move credits from one workspace to another, both legs in one transaction, once per ``idempotency_key``
    (a repeat answers the first transfer with ``replayed: true``). The moved credits keep their source, price,
    expiry and refundability (one new lot per source lot, linked to it); plan credits do not move."""
    organization_id = _own(principal, organization_id)
    from_id = check_id(req.from_account_id, "acc", "from_account_id")
    to_id = check_id(req.to_account_id, "acc", "to_account_id")
    try:
        amount = validate_whole_credits(req.amount)
    except AmountError as exc:
        raise CreditflowError(exc.code, str(exc)) from exc
    result = await transfers.transfer(pool, organization_id=organization_id, from_account_id=from_id,
                                      to_account_id=to_id, amount_credits=amount,
                                      idempotency_key=idempotency_key(key, req.idempotency_key),
                                      description=req.description,
                                      requested_by=principal.key_id)
    return respond(result, 200 if result.replayed else 201)


class TransferList(BaseModel):
    items: list[Transfer]
    has_more: bool = Field(description="More items beyond this page in the paging direction.")


@router.get("/{organization_id}/transfers", response_model=TransferList, response_class=ExactJSONResponse)
async def list_transfers(organization_id: str, principal: Reader, pool: Pool,
                         account_id: str | None = None, limit: Annotated[int, Query(ge=1, le=500)] = 50,
                         starting_after: StartingAfter = None, ending_before: EndingBefore = None
                         ) -> ExactJSONResponse:
    """The organization's transfers, newest first; ``account_id``: those one workspace sent or received. Pages with
    ``starting_after`` / ``ending_before`` (a transfer id) and ``has_more``."""
    organization_id = _own(principal, organization_id)
    if account_id is not None:
        check_id(account_id, "acc", "account_id")
    cursor = Cursor(starting_after, ending_before)
    items, has_more = page_of(await transfers.list_transfers(pool, organization_id, account_id=account_id,
                                                             limit=limit + 1, cursor=cursor), limit, cursor)
    return respond({"items": items, "has_more": has_more})
