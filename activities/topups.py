"""Top-up activities: thin adapters over ``creditflow.payments.topups`` (each step is safe to repeat).

Refusals a retry cannot fix (a declined card, an unknown card, a reused request id) are non-retryable
``ApplicationError``s typed with the creditflow code and carrying its details; provider outages and
database errors are retried by the workflow's policies.
"""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel
from temporalio import activity

from activities.errors import application_error, translating_errors  # noqa: F401 - re-exported
from activities.faults import FAULT_INJECT_ENV, fault_point  # noqa: F401 - FAULT_INJECT_ENV re-exported
from creditflow.payments import topups
from creditflow.payments.gateway import PaymentIntentState, StripeGateway
from creditflow.payments.topups import CreditResult


class RecordTopUpInput(BaseModel):
    account_id: str
    request_id: str
    amount_cents: int
    credits: int
    package_id: str | None = None
    description: str
    payment_method_id: str | None = None
    # ``auto_recharge`` charges are credited as such and must have a saved card (``no_payment_method``).
    kind: str = topups.KIND_TOPUP
    require_card: bool = False
    credit_system: str | None = None  # a named credit system's top-up (None: the wallet)


class ChargeSnapshot(BaseModel):
    charge_id: str
    status: str
    payment_method_id: str | None = None
    payment_intent_id: str | None = None


class ChargeRef(BaseModel):
    charge_id: str


class MarkChargeInput(BaseModel):
    charge_id: str
    status: str
    failure_code: str | None = None
    decline_code: str | None = None
    failure_message: str | None = None


class TopUpActivities:
    """Activities bound to the worker's database pool and Stripe gateway."""

    def __init__(self, pool: AsyncConnectionPool, gateway: StripeGateway) -> None:
        self._pool = pool
        self._gateway = gateway

    @activity.defn(name="record_topup_charge")
    @translating_errors
    async def record_topup_charge(self, input: RecordTopUpInput) -> ChargeSnapshot:
        """Write the pending charge row (before any charge); later calls read it."""
        record = await topups.record_charge(
            self._pool, self._gateway, account_id=input.account_id, request_id=input.request_id,
            amount_cents=input.amount_cents, credits=input.credits, package_id=input.package_id,
            description=input.description, payment_method_id=input.payment_method_id, kind=input.kind,
            require_card=input.require_card, credit_system=input.credit_system)
        return ChargeSnapshot(charge_id=record.id, status=record.status, payment_method_id=record.payment_method_id,
                              payment_intent_id=record.payment_intent_id)

    @activity.defn(name="charge_topup")
    @translating_errors
    async def charge_topup(self, input: ChargeRef) -> PaymentIntentState:
        """Create (and confirm with a saved card) the PaymentIntent, or retrieve the one recorded."""
        pi = await topups.charge(self._pool, self._gateway, input.charge_id)
        fault_point("after_charge")  # test-only: Stripe answered, the PaymentIntent id is committed
        return pi

    @activity.defn(name="poll_topup_payment")
    @translating_errors
    async def poll_topup_payment(self, input: ChargeRef) -> PaymentIntentState:
        """The PaymentIntent's current status (the customer is paying with the client secret)."""
        return await topups.refresh(self._pool, self._gateway, input.charge_id)

    @activity.defn(name="cancel_topup_payment")
    @translating_errors
    async def cancel_topup_payment(self, input: ChargeRef) -> PaymentIntentState:
        """Cancel the unpaid PaymentIntent when the payment window closes (returns it as it is if paid)."""
        return await topups.cancel(self._pool, self._gateway, input.charge_id)

    @activity.defn(name="credit_topup")
    @translating_errors
    async def credit_topup(self, input: ChargeRef) -> CreditResult:
        """Credit the wallet for the succeeded PaymentIntent, once (ledger key ``sys:topup:{payment_intent_id}``)."""
        result = await topups.credit(self._pool, input.charge_id)
        fault_point("after_credit")  # test-only: the ledger credit is committed
        return result

    @activity.defn(name="mark_topup_charge")
    async def mark_topup_charge(self, input: MarkChargeInput) -> None:
        """Record a final status that is not a credit (failed, canceled, waiting for the customer)."""
        await topups.set_status(self._pool, input.charge_id, input.status, failure_code=input.failure_code,
                                decline_code=input.decline_code, failure_message=input.failure_message)
