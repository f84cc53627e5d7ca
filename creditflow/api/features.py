"""/api/v1/features: the rate card (credits per unit of each metered feature)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, ValidationError

from creditflow.api.deps import get_pool, require
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import Principal, Scope
from creditflow.api.schemas import FeaturePut, Token
from creditflow.errors import CreditflowError
from creditflow.ledger import ratecard
from creditflow.ledger.models import Feature
from creditflow.ledger.plan_pricing import sync_plan_rates

router = APIRouter(prefix="/api/v1/features", tags=["features"], route_class=ExactRoute)

Pool = Annotated[AsyncConnectionPool, Depends(get_pool)]


class FeatureList(BaseModel):
    items: list[Feature]


@router.get("", response_model=FeatureList, response_class=ExactJSONResponse)
async def list_features(principal: Annotated[Principal, Depends(require(Scope.BILLING_READ))],
                        pool: Pool) -> ExactJSONResponse:
    """Every feature with the rate in force now and any scheduled rate versions."""
    return respond({"items": await ratecard.list_features(pool)})


@router.put("/{feature_id}", response_model=Feature, response_class=ExactJSONResponse)
async def put_feature(feature_id: Token, req: FeaturePut, request: Request,
                      principal: Annotated[Principal, Depends(require(Scope.ADMIN))],
                      pool: Pool) -> ExactJSONResponse:
    """Create or re-price a feature (admin): a new rate version from now or from ``effective_at``.
    Usage already recorded keeps the rate it was charged at."""
    try:
        spec = ratecard.FeatureSpec(id=feature_id, **req.model_dump(exclude={"effective_at"}))
    except ValidationError as exc:  # the rate (or another field) the domain refused: say which and why
        first = exc.errors()[0]
        messages = "; ".join(f"{'.'.join(map(str, e['loc']))}: {str(e['msg']).removeprefix('Value error, ')}"
                             for e in exc.errors())
        raise CreditflowError("invalid_rate", messages, param=".".join(map(str, first["loc"])) or None) from exc
    except ValueError as exc:
        raise CreditflowError("invalid_rate", str(exc).splitlines()[0].strip()) from exc
    feature = await ratecard.put_feature(pool, spec, req.effective_at)
    # Plan rates that follow the card (unlisted features, the toll-free surcharge) move with it.
    await sync_plan_rates(pool, request.app.state.plan_catalog)
    return respond(feature)
