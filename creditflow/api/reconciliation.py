"""/api/v1/reconciliation: reconciliation runs with Stripe (admin): start one now, read the stored reports."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field

from creditflow.api.conventions import page_of
from creditflow.api.deps import get_pool, require
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import Principal, Scope
from creditflow.api.topups import get_temporal
from creditflow.client import CreditflowClient
from creditflow.domain.reconciliation import RunReport
from creditflow.ids import check_token
from creditflow.ledger.pagination import Cursor
from creditflow.payments import reconcile

router = APIRouter(prefix="/api/v1/reconciliation", tags=["operations"], route_class=ExactRoute)

Admin = Annotated[Principal, Depends(require(Scope.ADMIN))]
Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]


class RunList(BaseModel):
    items: list[RunReport]
    has_more: bool = Field(default=False, description="More items beyond this page in the paging direction.")


RunCursor = Annotated[str | None, Query(pattern=r"^[A-Za-z0-9._:\-/]{1,200}$", description="A run id.")]


class RunStarted(BaseModel):
    run_id: str
    status: str = "running"


class RunRequest(BaseModel):
    since: datetime | None = None


@router.post("/runs", response_model=RunStarted, status_code=202, response_class=ExactJSONResponse)
async def start_run(req: RunRequest, principal: Admin,
                    temporal: Annotated[CreditflowClient, Depends(get_temporal)]) -> ExactJSONResponse:
    """Start a reconciliation now (the same workflow as the daily schedule); poll ``GET /runs/{run_id}``."""
    handle = await temporal.start_reconciliation(req.since)
    return respond(RunStarted(run_id=handle.id), 202)


@router.get("/runs", response_model=RunList, response_class=ExactJSONResponse)
async def list_runs(principal: Admin, pool: Pool, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                    starting_after: RunCursor = None, ending_before: RunCursor = None) -> ExactJSONResponse:
    """The latest runs, newest first, with every difference they repaired or reported. Pages with
    ``starting_after`` / ``ending_before`` (a run id) and ``has_more``."""
    cursor = Cursor(starting_after, ending_before)
    runs, has_more = page_of(await reconcile.list_runs(pool, limit + 1, cursor), limit, cursor)
    return respond(RunList(items=runs, has_more=has_more))


@router.get("/runs/{run_id}", response_model=RunReport, response_class=ExactJSONResponse)
async def get_run(run_id: str, principal: Admin, pool: Pool) -> ExactJSONResponse:
    check_token(run_id, "run_id")
    return respond(await reconcile.get_run(pool, run_id))
