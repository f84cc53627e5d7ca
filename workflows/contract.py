"""The public Temporal contract of creditflow: workflow names and ids, signal and query names, search
attributes and the payload models they carry.

Other services (through ``creditflow.client`` or a plain Temporal client) depend on these names, so they
change only with a migration plan. The models are pydantic (the pydantic data converter is used
everywhere) and every field added later must have a default so old histories and callers keep working.
This module is pure (no I/O at import) so workflows can pass it through the sandbox.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, Field
from temporalio.common import SearchAttributeKey

from creditflow.domain.recharge import RechargeState

# --- AccountWorkflow -------------------------------------------------------------------------------

ACCOUNT_WORKFLOW = "AccountWorkflow"
ACCOUNT_WORKFLOW_ID_PREFIX = "account:"
SIGNAL_OUTBOX_EVENT = "outbox_event"
QUERY_STATE = "state"

# Dedup keys the account workflow remembers (and carries across continue-as-new).
DEFAULT_DEDUP_CAPACITY = 1000

# Account status as seen by the workflow; "unknown" until the ledger has been read.
STATUS_UNKNOWN = "unknown"


def account_workflow_id(account_id: str) -> str:
    """``account:{account_id}``: one entity workflow per account."""
    return f"{ACCOUNT_WORKFLOW_ID_PREFIX}{account_id}"


# --- Search attributes (all Keyword) ---------------------------------------------------------------

SA_ACCOUNT_ID = SearchAttributeKey.for_keyword("CreditflowAccountId")
SA_STATUS = SearchAttributeKey.for_keyword("CreditflowStatus")
SA_PLAN = SearchAttributeKey.for_keyword("CreditflowPlan")
SEARCH_ATTRIBUTES: tuple[SearchAttributeKey[str], ...] = (SA_ACCOUNT_ID, SA_STATUS, SA_PLAN)


# --- Payloads --------------------------------------------------------------------------------------


class OutboxEvent(BaseModel):
    """One outbox row, delivered to the account workflow by the relay (signal ``outbox_event``).

    ``dedup_key`` is unique per row: the workflow ignores a key it has already seen, so the relay may
    deliver at least once and the effect still happens once."""

    dedup_key: str
    kind: str
    payload: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime


class AccountWorkflowInput(BaseModel):
    """Input of ``AccountWorkflow``; also the state carried across continue-as-new."""

    account_id: str
    name: str | None = None
    status: str = STATUS_UNKNOWN
    # True once the ledger has been read (first run); later runs skip the load.
    loaded: bool = False
    # Oldest first, at most ``dedup_capacity`` keys.
    recent_dedup_keys: list[str] = Field(default_factory=list)
    dedup_capacity: int = Field(default=DEFAULT_DEDUP_CAPACITY, ge=1)
    events_processed: int = 0
    duplicates_ignored: int = 0
    last_event_kind: str | None = None
    last_event_at: datetime | None = None
    continued_as_new: int = 0
    # Continue-as-new after this many new events in one run, on top of the server's suggestion.
    # None (production) relies on the suggestion only; tests set a small number.
    continue_as_new_after_events: int | None = Field(default=None, ge=1)
    # Stripe customer (issue 3): requested by ``account.created``, created by an activity exactly once.
    stripe_customer_pending: bool = False
    stripe_customer_id: str | None = None
    # The error code when creating it failed for good (it is then created on first use by the API).
    stripe_customer_error: str | None = None
    # Auto-recharge: a crossing (or a timer) asked for a decision; the state of attempts so far.
    recharge_requested: bool = False
    recharge: RechargeState = Field(default_factory=RechargeState)
    # When to decide again by itself (back-off after a failure, the daily cap's next UTC day).
    recharge_wake_at: datetime | None = None


class AccountState(BaseModel):
    """Answer of the ``state`` query."""

    account_id: str
    name: str | None = None
    status: str = STATUS_UNKNOWN
    events_processed: int = 0
    duplicates_ignored: int = 0
    last_event_kind: str | None = None
    last_event_at: datetime | None = None
    recent_dedup_keys: int = 0
    continued_as_new: int = 0
    stripe_customer_id: str | None = None
    recharge: RechargeState = Field(default_factory=RechargeState)
    # The running ``recharge:{account_id}:{seq}`` workflow, if any (at most one at a time).
    recharge_in_flight: str | None = None
    # Why no recharge is running: due, above_threshold, backing_off, daily_cap_reached, disabled, ...
    recharge_reason: str | None = None
    recharge_wake_at: datetime | None = None


# --- TopUpWorkflow (issue 3) -----------------------------------------------------------------------

TOPUP_WORKFLOW = "TopUpWorkflow"
TOPUP_WORKFLOW_ID_PREFIX = "topup:"
# Update: waits until the charge is decided (succeeded/failed) or the client secret is known, then
# returns ``TopUpOutcome``. Its argument (``TopUpTerms``) must match the workflow's: a request id reused
# for another top-up is rejected by the validator with ``idempotency_conflict``.
UPDATE_TOPUP_ANSWER = "answer"
# Query: the current ``TopUpOutcome`` (``status: pending`` until there is an answer).
QUERY_TOPUP_STATUS = "status"
# Signal: "the PaymentIntent changed, look now" (POST /api/v1/stripe/webhook sends it; polling is the fallback).
SIGNAL_PAYMENT_EVENT = "payment_event"

# Top-up outcome statuses.
TOPUP_PENDING = "pending"
TOPUP_SUCCEEDED = "succeeded"
TOPUP_REQUIRES_PAYMENT = "requires_payment"
TOPUP_FAILED = "failed"
TOPUP_CANCELED = "canceled"


def topup_workflow_id(account_id: str, request_id: str) -> str:
    """``topup:{account_id}:{request_id}``: one workflow per top-up request."""
    return f"{TOPUP_WORKFLOW_ID_PREFIX}{account_id}:{request_id}"


class TopUpTerms(BaseModel):
    """What was asked for; a repeated request must ask for the same thing."""

    amount_cents: int
    credits: int
    package_id: str | None = None
    # As requested: None means the default card, or the client-secret path when there is none.
    payment_method_id: str | None = None


class TopUpInput(BaseModel):
    """Input of ``TopUpWorkflow``."""

    account_id: str
    request_id: str
    terms: TopUpTerms
    description: str
    # How long a client-secret payment may stay unpaid, and how often it is polled meanwhile.
    payment_expiry_seconds: int = 3600
    poll_interval_seconds: float = 5.0


class PaymentEvent(BaseModel):
    """Signal ``payment_event``: the PaymentIntent may have changed (e.g. a Stripe webhook)."""

    payment_intent_id: str | None = None
    event_type: str | None = None


class TopUpOutcome(BaseModel):
    """Answer of the ``answer`` update, the ``status`` query and the workflow's result."""

    status: str = TOPUP_PENDING
    account_id: str
    request_id: str
    amount_cents: int
    credits: int
    package_id: str | None = None
    charge_id: str | None = None
    payment_intent_id: str | None = None
    client_secret: str | None = None
    transaction_id: str | None = None
    balance: Decimal | None = None
    error_code: str | None = None
    error_message: str | None = None
    decline_code: str | None = None


# --- RefundWorkflow (issue 3) ----------------------------------------------------------------------

REFUND_WORKFLOW = "RefundWorkflow"
REFUND_WORKFLOW_ID_PREFIX = "refund:"
# Update: waits until the refund is decided (succeeded/failed), returns ``RefundOutcome``. Its argument
# (``RefundTerms``) must match the workflow's: a request id reused for another refund is ``idempotency_conflict``.
UPDATE_REFUND_ANSWER = "answer"
# Query: the current ``RefundOutcome``.
QUERY_REFUND_STATUS = "status"

REFUND_PENDING = "pending"
REFUND_SUCCEEDED = "succeeded"
REFUND_FAILED = "failed"


def refund_workflow_id(account_id: str, request_id: str) -> str:
    """``refund:{account_id}:{request_id}``: one workflow per refund request."""
    return f"{REFUND_WORKFLOW_ID_PREFIX}{account_id}:{request_id}"


class RefundTerms(BaseModel):
    """What was asked for: the purchase (transaction or PaymentIntent), credits (None: all that remains), reason."""

    purchase_transaction_id: str | None = None
    payment_intent_id: str | None = None
    credits: int | None = None
    reason: str = "requested_by_customer"


class RefundInput(BaseModel):
    """Input of ``RefundWorkflow``. ``requested_by``: ``admin`` or ``customer`` (an account key)."""

    account_id: str
    request_id: str
    terms: RefundTerms
    requested_by: str = "customer"


class RefundOutcome(BaseModel):
    """Answer of the ``answer`` update, the ``status`` query and the workflow's result."""

    status: str = REFUND_PENDING
    account_id: str
    request_id: str
    refund_id: str | None = None
    credits: int | None = None
    amount_cents: int | None = None
    purchase_transaction_id: str | None = None
    payment_intent_id: str | None = None
    transaction_id: str | None = None
    reversal_transaction_id: str | None = None
    stripe_refund_id: str | None = None
    balance: Decimal | None = None
    error_code: str | None = None
    error_message: str | None = None


# --- AutoRechargeWorkflow (issue 3) ----------------------------------------------------------------

AUTO_RECHARGE_WORKFLOW = "AutoRechargeWorkflow"
AUTO_RECHARGE_WORKFLOW_ID_PREFIX = "recharge:"
# Query: the current ``AutoRechargeOutcome``.
QUERY_RECHARGE_STATUS = "status"

RECHARGE_PENDING = "pending"
RECHARGE_SUCCEEDED = "succeeded"
RECHARGE_FAILED = "failed"


def auto_recharge_workflow_id(account_id: str, seq: int) -> str:
    """``recharge:{account_id}:{seq}``: the account workflow starts them one at a time, ``seq`` counting up."""
    return f"{AUTO_RECHARGE_WORKFLOW_ID_PREFIX}{account_id}:{seq}"


class AutoRechargeInput(BaseModel):
    """Input of ``AutoRechargeWorkflow`` (a child of the account workflow)."""

    account_id: str
    seq: int
    credits: int
    amount_cents: int
    # None: the customer's default card. Never the client-secret path: no card means ``no_payment_method``.
    payment_method_id: str | None = None
    threshold_micros: int = 0
    available_micros: int = 0


class AutoRechargeOutcome(BaseModel):
    """The ``status`` query and the workflow's result."""

    status: str = RECHARGE_PENDING
    account_id: str
    seq: int
    credits: int
    amount_cents: int
    charge_id: str | None = None
    payment_intent_id: str | None = None
    transaction_id: str | None = None
    balance: Decimal | None = None
    error_code: str | None = None
    error_message: str | None = None
    decline_code: str | None = None
