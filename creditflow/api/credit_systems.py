"""/api/v1/credit-systems: named credit systems (seed 003), each a balance of its own beside the default wallet.

A feature names its system when it is created (``PUT /features/{id}`` with ``credit_system``); credits are granted
into a system with ``POST /billing/wallet/credit`` naming ``credit_system``; usage, holds and checks of its features
draw on that balance only. See docs/credit-systems.md.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field, StringConstraints

from creditflow.api.deps import get_pool, require
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import Principal, Scope
from creditflow.api.schemas import Strict, Text
from creditflow.ledger import credit_systems
from creditflow.ledger.credit_systems import CreditSystem

router = APIRouter(prefix="/api/v1/credit-systems", tags=["credit systems"], route_class=ExactRoute)

Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]
SystemId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_\-]{0,62}$")]


class CreditSystemCreate(Strict):
    id: SystemId = Field(description="e.g. `transcription-credits`: what balances report.")
    name: Annotated[Text, StringConstraints(min_length=1, max_length=200, strip_whitespace=True)] | None = None


class CreditSystemList(BaseModel):
    items: list[CreditSystem]


@router.get("", response_model=CreditSystemList, response_class=ExactJSONResponse)
async def list_systems(principal: Annotated[Principal, Depends(require(Scope.BILLING_READ))],
                       pool: Pool) -> ExactJSONResponse:
    """Every credit system (the default ``credits`` first) with the features that draw on it."""
    return respond({"items": await credit_systems.list_systems(pool)})


@router.post("", response_model=CreditSystem, response_class=ExactJSONResponse, status_code=201)
async def create_system(req: CreditSystemCreate, principal: Annotated[Principal, Depends(require(Scope.ADMIN))],
                        pool: Pool) -> ExactJSONResponse:
    """Create a credit system (admin). Creating it again with the same name answers it (200); with another name,
    ``credit_system_exists`` (409)."""
    system, created = await credit_systems.create_system(pool, req.id, req.name)
    return respond(system, 201 if created else 200)


@router.get("/{credit_system_id}", response_model=CreditSystem, response_class=ExactJSONResponse)
async def get_system(credit_system_id: str, principal: Annotated[Principal, Depends(require(Scope.BILLING_READ))],
                     pool: Pool) -> ExactJSONResponse:
    return respond(await credit_systems.get_system(pool, credit_systems.check_system_id(credit_system_id)))
