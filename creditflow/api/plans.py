"""/api/v1/billing/plans: the plan catalog, read-only (the same for every account)."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from creditflow.api.deps import require
from creditflow.api.exact_json import ExactJSONResponse, ExactRoute, respond
from creditflow.api.keys import Principal, Scope
from creditflow.domain.plans import PlanCatalog

router = APIRouter(prefix="/api/v1/billing", tags=["billing"], route_class=ExactRoute)

Reader = Annotated[Principal, Depends(require(Scope.BILLING_READ))]


class PlanOut(BaseModel):
    """One plan; amounts are exact JSON numbers (``monthly_fee_usd`` in dollars, rates in credits per unit)."""

    id: str
    name: str
    description: str
    monthly_fee_usd: Decimal
    included_credits: int
    rates: dict[str, Decimal]
    overage_rates: dict[str, Decimal]


class PlanList(BaseModel):
    currency: str
    items: list[PlanOut]


async def get_plan_catalog(request: Request) -> PlanCatalog:
    """Loaded and validated once when the app is created, so a bad catalog file stops start-up."""
    return request.app.state.plan_catalog


@router.get("/plans", response_model=PlanList, response_class=ExactJSONResponse)
async def list_plans(principal: Reader,
                     catalog: Annotated[PlanCatalog, Depends(get_plan_catalog)]) -> ExactJSONResponse:
    """The plans on offer: monthly fee, plan credits per cycle, plan rates (while plan credits last) and
    overage rates (once they are spent); features not listed keep the rate card's rate (``GET /features``)."""
    items = [PlanOut(id=p.id, name=p.name, description=p.description, monthly_fee_usd=p.monthly_fee_usd,
                     included_credits=p.included_credits, rates=p.rates, overage_rates=p.overage_rates).model_dump()
             # credits in named credit systems (docs/credit-systems.md), listed by the plans that include some
             | ({"included_system_credits": p.included_system_credits} if p.included_system_credits else {})
             for p in catalog.plans]
    return respond({"currency": catalog.currency, "items": items})
