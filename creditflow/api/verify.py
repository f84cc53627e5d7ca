"""/api/v1/verify: the ledger's invariants checked on demand (admin), as ``creditflow verify`` prints them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from psycopg_pool import AsyncConnectionPool

from creditflow.api.deps import get_pool, require
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import Principal, Scope
from creditflow.ids import check_id
from creditflow.ledger.verify import VerifyReport, verify

router = APIRouter(prefix="/api/v1/verify", tags=["operations"], route_class=ExactRoute)


@router.get("", response_model=VerifyReport, response_class=ExactJSONResponse)
async def verify_ledger(principal: Annotated[Principal, Depends(require(Scope.ADMIN))],
                        pool: Annotated[AsyncConnectionPool, Depends(get_pool)],
                        account_id: Annotated[str | None, Query(description="One account (default: all).")] = None,
                        ) -> ExactJSONResponse:
    """Every structural and economic invariant of the ledger; ``ok`` is false and ``violations`` lists what is
    broken (with the ids to investigate). Read-only apart from applying deferred burns."""
    if account_id is not None:
        check_id(account_id, "acc", "account_id")
    return respond(await verify(pool, account_id))
