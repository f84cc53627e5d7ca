"""Payment events from Stripe applied by the account workflow: refunds made on Stripe directly and disputes take
back the credits the payment bought (``creditflow.payments.clawbacks``; once per refund or dispute id)."""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field
from temporalio import activity

from activities.errors import translating_errors
from creditflow.errors import CreditflowError
from creditflow.payments import clawbacks, topups
from creditflow.payments.clawbacks import ClawbackResult
from creditflow.payments.gateway import StripeGateway
from creditflow.payments.refunds import REFUND_METADATA_KEY


class PaymentEventInput(BaseModel):
    account_id: str
    kind: str
    payload: dict[str, Any] = Field(default_factory=dict)


class LateCreditResult(BaseModel):
    """An auto-recharge paid after its workflow gave up: credited now (or it was already, or Stripe disagrees)."""

    charge_id: str
    payment_intent_status: str | None = None
    credited: bool = False
    transaction_id: str | None = None
    credits: int = 0


class PaymentEventActivities:
    def __init__(self, pool: AsyncConnectionPool, gateway: StripeGateway) -> None:
        self._pool = pool
        self._gateway = gateway

    @activity.defn(name="apply_payment_event")
    @translating_errors
    async def apply_payment_event(self, input: PaymentEventInput) -> ClawbackResult:
        """Take back the credits of a refund made on Stripe or a disputed payment. For refunds, Stripe is asked for
        the PaymentIntent's refunds (the event may not list them)."""
        listed = None
        pi = input.payload.get("payment_intent_id")
        if input.kind == clawbacks.REFUNDED and isinstance(pi, str) and pi.startswith("pi_"):
            listed = [{"id": r.id, "amount": r.amount_cents,
                       "creditflow_refund_id": r.metadata.get(REFUND_METADATA_KEY)}
                      for r in await self._gateway.list_refunds(pi) if r.status == "succeeded"]
        return await clawbacks.apply(self._pool, input.account_id, input.kind, input.payload, listed)

    @activity.defn(name="credit_late_recharge")
    @translating_errors
    async def credit_late_recharge(self, input: PaymentEventInput) -> LateCreditResult:
        """Stripe says an auto-recharge succeeded after its workflow recorded it failed: check with Stripe (never
        trust the event alone) and credit it, once (ledger key ``sys:topup:{payment_intent_id}``)."""
        charge_id = str(input.payload.get("charge_id"))
        record = await topups.get_charge(self._pool, charge_id)
        if record.account_id != input.account_id or record.kind != topups.KIND_AUTO_RECHARGE:
            raise CreditflowError("not_found", f"no auto-recharge charge {charge_id} on this account")
        pi = await topups.refresh(self._pool, self._gateway, charge_id)
        if pi.status != "succeeded":
            return LateCreditResult(charge_id=charge_id, payment_intent_status=pi.status)
        credit = await topups.credit(self._pool, charge_id)
        return LateCreditResult(charge_id=charge_id, payment_intent_status=pi.status, credited=not credit.replayed,
                                transaction_id=credit.transaction_id, credits=credit.credits)
