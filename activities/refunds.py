"""Refund activities: thin adapters over ``creditflow.payments.refunds`` (each step is safe to repeat).

Refusals (not eligible, already refunded, Stripe refusing the refund) are non-retryable ``ApplicationError``s
typed with the creditflow code; provider outages and database errors are retried by the workflow's policies.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel
from temporalio import activity

from activities.errors import translating_errors
from creditflow.domain.refunds import RefundError, RefundReason
from creditflow.errors import CreditflowError
from creditflow.payments import refunds
from creditflow.payments.gateway import RefundState, StripeGateway
from creditflow.payments.refunds import RefundPlan
from workflows.contract import RefundInput


class RefundRef(BaseModel):
    refund_id: str


class FinalizeRefundInput(BaseModel):
    refund_id: str
    stripe_refund_id: str
    stripe_status: str


class PendingRefundInput(BaseModel):
    refund_id: str
    stripe_status: str


class ReleaseRefundInput(BaseModel):
    refund_id: str
    failure_code: str
    failure_message: str | None = None


class RefundSnapshot(BaseModel):
    refund_id: str
    status: str
    credits: int
    amount_cents: int
    transaction_id: str | None = None
    reversal_transaction_id: str | None = None
    stripe_refund_id: str | None = None
    balance: Decimal
    failure_code: str | None = None
    failure_message: str | None = None


def _snapshot(result: refunds.RefundLedgerResult) -> RefundSnapshot:
    r = result.refund
    return RefundSnapshot(refund_id=r.id, status=r.status, credits=r.credits, amount_cents=r.amount_cents,
                          transaction_id=r.transaction_id,
                          reversal_transaction_id=f"txn_{r.release_txn_id.hex}" if r.release_txn_id else None,
                          stripe_refund_id=r.stripe_refund_id, balance=result.balance,
                          failure_code=r.failure_code, failure_message=r.failure_message)


class RefundActivities:
    """Activities bound to the worker's database pool and Stripe gateway."""

    def __init__(self, pool: AsyncConnectionPool, gateway: StripeGateway) -> None:
        self._pool = pool
        self._gateway = gateway

    @activity.defn(name="check_refund")
    @translating_errors
    async def check_refund(self, input: RefundInput) -> RefundPlan:
        """Resolve the purchase and apply the eligibility rules (30 days, purchased credits, what remains)."""
        t = input.terms
        try:
            reason = RefundReason(t.reason)
        except ValueError:
            raise CreditflowError("validation_error", f"unknown refund reason {t.reason}") from None
        try:
            return await refunds.plan(
                self._pool, account_id=input.account_id, request_id=input.request_id,
                purchase_transaction_id=t.purchase_transaction_id, payment_intent_id=t.payment_intent_id,
                credits=t.credits, reason=reason, requested_by=input.requested_by, now=datetime.now(UTC))
        except RefundError as exc:
            raise CreditflowError(exc.code, exc.message) from exc

    @activity.defn(name="reserve_refund")
    @translating_errors
    async def reserve_refund(self, input: RefundPlan) -> RefundSnapshot:
        """Write the refund row and reserve its credits (journal ``refund``): they stop being spendable."""
        return _snapshot(await refunds.reserve(self._pool, input))

    @activity.defn(name="refund_payment")
    @translating_errors
    async def refund_payment(self, input: RefundRef) -> RefundState:
        """Refund through Stripe once (the row guards retries), or retrieve the refund already created."""
        return await refunds.refund_payment(self._pool, self._gateway, input.refund_id)

    @activity.defn(name="finalize_refund")
    @translating_errors
    async def finalize_refund(self, input: FinalizeRefundInput) -> RefundSnapshot:
        """Stripe refunded the money: mark the refund succeeded (no wallet movement)."""
        return _snapshot(await refunds.finalize(self._pool, input.refund_id, input.stripe_refund_id,
                                                input.stripe_status))

    @activity.defn(name="release_refund")
    @translating_errors
    async def release_refund(self, input: ReleaseRefundInput) -> RefundSnapshot:
        """Compensation: put the reserved credits back into the purchase's lot and mark the refund failed."""
        return _snapshot(await refunds.release(self._pool, input.refund_id, failure_code=input.failure_code,
                                               failure_message=input.failure_message))

    @activity.defn(name="mark_refund_pending")
    @translating_errors
    async def mark_refund_pending(self, input: PendingRefundInput) -> RefundSnapshot:
        """Stripe accepted the refund without settling it: the row stays ``pending``, the credits reserved."""
        return _snapshot(await refunds.mark_pending(self._pool, input.refund_id, input.stripe_status))

    @activity.defn(name="settle_pending_refund")
    @translating_errors
    async def settle_pending_refund(self, input: RefundRef) -> RefundSnapshot:
        """A pending refund: decided already by a Stripe event, or ask Stripe and finalize / release on its answer."""
        return _snapshot(await refunds.settle_pending(self._pool, self._gateway, input.refund_id))
