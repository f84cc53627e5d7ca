"""/api/v1/operator: the operator CLI's answers over HTTP (admin keys only), so on-call needs an admin API key
and no database credentials: ``CREDITFLOW_API_URL`` + ``CREDITFLOW_ADMIN_API_KEY`` for ``creditflow wallet
history|show``, ``agents list|events``, ``charges`` and ``payment-events failed|redrive``. Each answer is exactly
what the command prints with ``--json`` (creditflow/ledger/lookup.py computes both)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from psycopg_pool import AsyncConnectionPool

from creditflow.api.deps import get_pool, require
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import Principal, Scope
from creditflow.ids import check_id, check_token
from creditflow.ledger import lookup, payment_event_failures

router = APIRouter(prefix="/api/v1/operator", tags=["operations"], route_class=ExactRoute)
# The answers are the CLI's --json documents (creditflow/ledger/lookup.py): declared as JSON objects (arrays for the
# agents), not field by field; the customer-facing routes (transactions, agents, top-ups) are the typed ones.
CliAnswer = dict[str, Any]

Admin = Annotated[Principal, Depends(require(Scope.ADMIN))]
Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]


@router.get("/accounts/{account_id}/transactions", response_model=CliAnswer, response_class=ExactJSONResponse)
async def history(account_id: str, principal: Admin, pool: Pool, type: str | None = None,
                  feature: str | None = None, agent: str | None = None, since: datetime | None = None,
                  until: datetime | None = None, limit: Annotated[int, Query(ge=1, le=500)] = 20
                  ) -> ExactJSONResponse:
    """The history with quantity, rate, agent and key; unknown filter values are refused."""
    check_id(account_id, "acc", "account_id")
    return respond(await lookup.history(pool, account_id, type=type, feature=feature, agent=agent, since=since,
                                        until=until, limit=limit))


@router.get("/transactions/{txn}", response_model=CliAnswer, response_class=ExactJSONResponse)
async def transaction(txn: str, principal: Admin, pool: Pool, account_id: str | None = None) -> ExactJSONResponse:
    """One transaction in full, with its rate version and cause (usage rows need ``account_id``)."""
    if account_id is not None:
        check_id(account_id, "acc", "account_id")
    return respond(await lookup.transaction(pool, txn, account_id))


@router.get("/accounts/{account_id}/charges", response_model=CliAnswer, response_class=ExactJSONResponse)
async def charges(account_id: str, principal: Admin, pool: Pool, kind: str | None = None,
                  limit: Annotated[int, Query(ge=1, le=500)] = 20) -> ExactJSONResponse:
    check_id(account_id, "acc", "account_id")
    return respond(await lookup.charges(pool, account_id, kind, limit))


@router.get("/accounts/{account_id}/agents", response_model=list[CliAnswer], response_class=ExactJSONResponse)
async def agents(account_id: str, principal: Admin, pool: Pool) -> ExactJSONResponse:
    check_id(account_id, "acc", "account_id")
    return respond(await lookup.agents_of(pool, account_id))


@router.get("/accounts/{account_id}/agents/{agent_id}/events", response_model=CliAnswer,
            response_class=ExactJSONResponse)
async def agent_events(account_id: str, agent_id: str, principal: Admin, pool: Pool,
                       limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> ExactJSONResponse:
    check_id(account_id, "acc", "account_id")
    check_token(agent_id, "agent id")
    return respond(await lookup.agent_trail(pool, account_id, agent_id, limit))


@router.get("/payment-events/failed", response_model=list[CliAnswer], response_class=ExactJSONResponse)
async def payment_events_failed(principal: Admin, pool: Pool, account_id: str | None = None,
                                include_resolved: Annotated[bool, Query(alias="all")] = False) -> ExactJSONResponse:
    """Payment events the account workflow could not apply, oldest first, with their error."""
    if account_id is not None:
        check_id(account_id, "acc", "account_id")
    return respond(await payment_event_failures.list_failures(pool, account_id=account_id,
                                                              include_resolved=include_resolved))


@router.post("/payment-events/{failure_id}/redrive", response_model=CliAnswer, response_class=ExactJSONResponse)
async def payment_event_redrive(failure_id: int, principal: Admin, pool: Pool) -> ExactJSONResponse:
    """Deliver a failed event to its account workflow again (through the outbox): every effect is keyed by its
    Stripe object, so a second re-drive applies nothing twice."""
    return respond({"outbox_dedup_key": await payment_event_failures.redrive(pool, failure_id)})
