"""Payment events from Stripe applied by the account workflow: refunds made on Stripe directly and disputes take
back the credits the payment bought (``creditflow.payments.clawbacks``; once per refund or dispute id)."""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field
from temporalio import activity

from activities.errors import translating_errors
from creditflow.payments import clawbacks
from creditflow.payments.clawbacks import ClawbackResult


class PaymentEventInput(BaseModel):
    account_id: str
    kind: str
    payload: dict[str, Any] = Field(default_factory=dict)


class PaymentEventActivities:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    @activity.defn(name="apply_payment_event")
    @translating_errors
    async def apply_payment_event(self, input: PaymentEventInput) -> ClawbackResult:
        """Take back the credits of a refund made on Stripe or a disputed payment."""
        return await clawbacks.apply(self._pool, input.account_id, input.kind, input.payload)
