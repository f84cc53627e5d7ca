"""Payment events from Stripe applied by the account workflow: refunds made on Stripe directly and disputes take
back the credits the payment bought (``creditflow.payments.clawbacks``; once per refund or dispute id)."""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field
from temporalio import activity

from activities.errors import translating_errors
from creditflow.errors import CreditflowError
from creditflow.payments import clawbacks, late, topups
from creditflow.payments.clawbacks import ClawbackResult
from creditflow.payments.gateway import StripeGateway
from creditflow.payments.late import PAYMENT_SUCCEEDED_LATE, LateSettlement  # noqa: F401 - re-exported for workflows
from creditflow.payments.refunds import REFUND_METADATA_KEY


class PaymentEventInput(BaseModel):
    account_id: str
    kind: str
    payload: dict[str, Any] = Field(default_factory=dict)


# A payment that succeeded after its workflow gave up: credited now (or it was already, or Stripe disagrees).
LateCreditResult = LateSettlement


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

    @activity.defn(name="credit_late_payment")
    @translating_errors
    async def credit_late_payment(self, input: PaymentEventInput) -> LateSettlement:
        """Stripe says a payment succeeded after its workflow recorded failure or gave up (a top-up, an
        auto-recharge, an invoice payment): check with Stripe (never trust the event alone) and credit it or settle
        its invoice, once (``creditflow.payments.late``; ledger key ``sys:topup:{payment_intent_id}``)."""
        pi = input.payload.get("payment_intent_id")
        return await late.settle_late(self._pool, self._gateway, input.account_id, str(input.payload.get("charge_id")),
                                      pi if isinstance(pi, str) and pi else None)

    @activity.defn(name="credit_late_recharge")
    @translating_errors
    async def credit_late_recharge(self, input: PaymentEventInput) -> LateCreditResult:
        """The same for outbox rows written when only auto-recharges took the late path (kept for those rows and
        for recorded histories)."""
        charge_id = str(input.payload.get("charge_id"))
        record = await topups.get_charge(self._pool, charge_id)
        if record.account_id != input.account_id or record.kind != topups.KIND_AUTO_RECHARGE:
            raise CreditflowError("not_found", f"no auto-recharge charge {charge_id} on this account")
        return await self.credit_late_payment(input)
