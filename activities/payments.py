"""Payment activities: the account workflow's Stripe side effects.

``ensure_stripe_customer`` is exactly-once by construction (``ensure_customer`` stores the customer under
a per-account lock and returns the stored one on every later call), so Temporal may retry it freely.
Transient provider failures are retryable; refusals that a retry cannot fix are non-retryable
``ApplicationError``s typed with the creditflow error code.
"""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel
from temporalio import activity

from activities.errors import RETRYABLE_CODES, translating_errors  # noqa: F401 - RETRYABLE_CODES re-exported
from creditflow.payments.customers import ensure_customer
from creditflow.payments.gateway import StripeGateway

# Listed in the workflow's retry policy too, so the policy documents what is never retried.
PERMANENT_CODES = ("unknown_account", "payment_provider_not_configured", "payment_provider_error",
                   "payment_request_invalid")


class EnsureStripeCustomerInput(BaseModel):
    account_id: str


class StripeCustomerResult(BaseModel):
    customer_id: str


class PaymentActivities:
    """Activities bound to the worker's database pool and Stripe gateway."""

    def __init__(self, pool: AsyncConnectionPool, gateway: StripeGateway) -> None:
        self._pool = pool
        self._gateway = gateway

    @activity.defn(name="ensure_stripe_customer")
    @translating_errors
    async def ensure_stripe_customer(self, input: EnsureStripeCustomerInput) -> StripeCustomerResult:
        """The account's Stripe customer, created on the first call."""
        return StripeCustomerResult(customer_id=await ensure_customer(self._pool, self._gateway, input.account_id))
