"""Health of the API: ``/healthz`` (the process answers), ``/readyz`` (it can do its work: the database and
Temporal answer), ``/metrics`` (Prometheus).

Orchestrators restart a process whose liveness fails and stop routing to one that is not ready, so liveness
checks nothing outside the process (a database outage must not restart every API replica) and readiness checks
the dependencies with short timeouts (a probe must answer within its own timeout).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from creditflow.observability.metrics import api_registry, exposition

CHECK_TIMEOUT_SECONDS = 2.0

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Alive: the process serves requests (nothing else is checked)."""
    return {"status": "ok"}


async def _database(request: Request) -> None:
    async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
        async with request.app.state.pool.connection() as conn:
            await conn.execute("SELECT 1")


async def _temporal(request: Request) -> None:
    async with asyncio.timeout(CHECK_TIMEOUT_SECONDS * 2):
        client = await request.app.state.temporal.get()
        await client.temporal.service_client.check_health(timeout=timedelta(seconds=CHECK_TIMEOUT_SECONDS))


async def _check(name: str, probe: Any, request: Request) -> tuple[str, str]:
    try:
        await probe(request)
    except Exception as exc:  # any failure means not ready; say which and why, briefly
        return name, f"unavailable: {type(exc).__name__}: {str(exc)[:200] or 'timeout'}"
    return name, "ok"


class Readiness(BaseModel):
    status: str = Field(description="ok, or unavailable (503)")
    checks: dict[str, str] = Field(description="database and temporal: ok, or what failed")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "not ready"}})
async def readyz(request: Request) -> JSONResponse:
    """Ready: the database and Temporal answer (503 with what failed otherwise)."""
    results = dict(await asyncio.gather(_check("database", _database, request),
                                        _check("temporal", _temporal, request)))
    ok = all(v == "ok" for v in results.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": results}, status_code=200 if ok else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    """Prometheus exposition (all API processes' in multi-process mode)."""
    return Response(exposition(api_registry()), media_type=CONTENT_TYPE_LATEST)
