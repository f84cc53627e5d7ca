"""The activity of ``RentalWorkflow``: charge one month of a recurring charge (number rental) to the wallet."""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel
from temporalio import activity

from activities.errors import translating_errors
from creditflow.domain.periods import period_at
from creditflow.ledger import rentals
from creditflow.ledger.rentals import RentalMonth
from workflows.contract import RentalInput


class RentalResult(BaseModel):
    month: RentalMonth
    next_due: str  # ISO time the next month starts (the workflow's timer)


class RentalActivities:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    @activity.defn(name="charge_rental")
    @translating_errors
    async def charge_rental(self, input: RentalInput) -> RentalResult:
        """Month ``input.index`` of the rental: paid from the wallet, unpaid, invoiced (a plan account) or removed."""
        period = period_at(input.anchor, input.index)
        month = await rentals.charge(self._pool, input.account_id, input.charge_id, period.start)
        return RentalResult(month=month, next_due=period.end.isoformat())
