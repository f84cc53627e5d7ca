"""Payment events from Stripe applied by the account workflow: refunds made on Stripe directly and disputes take
back the credits the payment bought (``creditflow.payments.clawbacks``; once per refund or dispute id)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, Field
from temporalio import activity

from activities.errors import RETRYABLE_CODES, translating_errors
from creditflow.errors import CreditflowError
from creditflow.ledger import outbox, payment_event_failures
from creditflow.payments import clawbacks, late, topups
from creditflow.payments.clawbacks import ClawbackResult
from creditflow.payments.gateway import StripeGateway
from creditflow.payments.late import PAYMENT_SUCCEEDED_LATE, LateSettlement  # noqa: F401 - re-exported for workflows
from creditflow.payments.refunds import REFUND_METADATA_KEY

T = TypeVar("T")


class PaymentEventInput(BaseModel):
    account_id: str
    kind: str
    payload: dict[str, Any] = Field(default_factory=dict)
    # The outbox row's key: a refusal is kept under it (``payment_event_failures``), a success resolves it.
    dedup_key: str | None = None


# A payment that succeeded after its workflow gave up: credited now (or it was already, or Stripe disagrees).
LateCreditResult = LateSettlement


class PaymentEventActivities:
    def __init__(self, pool: AsyncConnectionPool, gateway: StripeGateway) -> None:
        self._pool = pool
        self._gateway = gateway

    async def _keeping_failures(self, input: PaymentEventInput, step: Awaitable[T]) -> T:
        """Run ``step``; a refusal a retry cannot fix is kept with its error before it fails the activity (the
        workflow then goes on with its next event, nothing is lost), a success resolves an earlier failure."""
        try:
            result = await step
        except CreditflowError as exc:
            if input.dedup_key and exc.code not in RETRYABLE_CODES:
                await payment_event_failures.record(self._pool, input.account_id, input.dedup_key, input.kind,
                                                    input.payload, exc.code, exc.message)
                await outbox.mark_applied(self._pool, input.account_id, input.dedup_key)  # kept for an operator
            raise
        if input.dedup_key:
            await payment_event_failures.resolve(self._pool, input.account_id, input.dedup_key)
            await outbox.mark_applied(self._pool, input.account_id, input.dedup_key)
        return result

    @activity.defn(name="apply_payment_event")
    @translating_errors
    async def apply_payment_event(self, input: PaymentEventInput) -> ClawbackResult:
        """Take back the credits of a refund made on Stripe or a disputed payment. For refunds, Stripe is asked for
        the PaymentIntent's refunds (the event may not list them)."""
        return await self._keeping_failures(input, self._apply(input))

    async def _apply(self, input: PaymentEventInput) -> ClawbackResult:
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
        return await self._keeping_failures(input, self._settle_late(input))

    async def _settle_late(self, input: PaymentEventInput, *, kind: str | None = None) -> LateSettlement:
        charge_id = str(input.payload.get("charge_id"))
        if kind is not None:
            record = await topups.get_charge(self._pool, charge_id)
            if record.account_id != input.account_id or record.kind != kind:
                raise CreditflowError("not_found", f"no {kind} charge {charge_id} on this account")
        pi = input.payload.get("payment_intent_id")
        return await late.settle_late(self._pool, self._gateway, input.account_id, charge_id,
                                      pi if isinstance(pi, str) and pi else None)

    @activity.defn(name="credit_late_recharge")
    @translating_errors
    async def credit_late_recharge(self, input: PaymentEventInput) -> LateCreditResult:
        """The same for outbox rows written when only auto-recharges took the late path (kept for those rows and
        for recorded histories)."""
        return await self._keeping_failures(input, self._settle_late(input, kind=topups.KIND_AUTO_RECHARGE))
