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

# Agents: a signal (fire and forget) and an update of the same name (returns the agent's new
# ``AgentStatus``, or fails with ``invalid_transition`` / ``unknown_agent``), both taking ``AgentCommand``.
SIGNAL_PAUSE_AGENT = UPDATE_PAUSE_AGENT = "pause_agent"
SIGNAL_RESUME_AGENT = UPDATE_RESUME_AGENT = "resume_agent"

# Billing cycle: update ``change_plan`` (argument ``PlanChange``, result ``SubscriptionState``).
UPDATE_CHANGE_PLAN = "change_plan"

# Dedup keys the account workflow remembers (and carries across continue-as-new).
DEFAULT_DEDUP_CAPACITY = 1000

# Outbox kinds the account workflow applies after accepting their signal (in its main loop, through activities). A
# run terminated in between has accepted them without applying them: the next run re-applies those the database
# does not mark applied (``outbox.applied_at``, set by the activities that apply them; their effects are idempotent
# by key: a Stripe refund or dispute id, a notification key, an agent's status).
OUTBOX_BELOW_THRESHOLD = "balance.below_threshold"
OUTBOX_LIMIT_REACHED = "limit.reached"
OUTBOX_DAILY_USAGE_THRESHOLD = "usage.daily_threshold"
OUTBOX_STRIPE_REFUNDED = "stripe.charge.refunded"
OUTBOX_STRIPE_DISPUTED = "stripe.charge.dispute.created"
OUTBOX_STRIPE_DISPUTE_CLOSED = "stripe.charge.dispute.closed"
OUTBOX_RECHARGE_SUCCEEDED_LATE = "stripe.recharge.succeeded_late"
OUTBOX_PAYMENT_SUCCEEDED_LATE = "stripe.payment.succeeded_late"
OUTBOX_APPLIED_LATER = frozenset({
    OUTBOX_BELOW_THRESHOLD, OUTBOX_LIMIT_REACHED, OUTBOX_DAILY_USAGE_THRESHOLD, OUTBOX_STRIPE_REFUNDED,
    OUTBOX_STRIPE_DISPUTED, OUTBOX_STRIPE_DISPUTE_CLOSED, OUTBOX_RECHARGE_SUCCEEDED_LATE, OUTBOX_PAYMENT_SUCCEEDED_LATE,
})

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


class AgentCommand(BaseModel):
    """Pause or resume one agent. ``actor`` says who asked (kept in the audit trail)."""

    agent_id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:\-/]+$")
    actor: str = Field(default="operator", min_length=1, max_length=200)
    reason: str | None = Field(default=None, max_length=500)


class AgentStatus(BaseModel):
    """An agent after a pause or resume."""

    agent_id: str
    name: str = ""
    status: str
    paused_by: str | None = None
    reason: str | None = None
    resume_at: datetime | None = None
    event_id: int | None = None


class PlanProration(BaseModel):
    """What an immediate plan change did: money lines for this period's invoice, plan credits now."""

    at: datetime
    old_plan_id: str | None = None
    new_plan_id: str | None = None
    old_plan_credit_cents: int = 0
    new_plan_charge_cents: int = 0
    net_cents: int = 0
    plan_credits_granted: int = 0
    plan_credits_expired: int = 0


class SubscriptionState(BaseModel):
    """The account's plan and current billing period, as the account workflow (its only writer) keeps it."""

    plan_id: str
    anchor: datetime
    period_index: int
    period_start: datetime
    period_end: datetime
    # The plan from the next renewal on; "" ends the subscription then; None keeps the current plan.
    pending_plan_id: str | None = None
    status: str = "active"
    # The plan whose monthly fee this period's invoice starts from (None: ``plan_id``); immediate changes keep it
    # and add proration lines. ``changes`` counts immediate changes in this period (their idempotency keys).
    fee_plan_id: str | None = None
    changes: int = 0
    proration: PlanProration | None = None  # the last immediate change


class PlanChange(BaseModel):
    """Subscribe, change plan or cancel (``plan_id`` None). ``effective``: ``next_renewal`` (default) or
    ``immediately`` (a new subscription always starts now, or at ``anchor`` when an operator backdates it)."""

    plan_id: str | None = None
    effective: str = "next_renewal"
    anchor: datetime | None = None


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
    # False where the server has no creditflow search attributes (Temporal's time-skipping test server, used
    # by tests and the billing simulator): the workflow then only sets its details.
    publish_search_attributes: bool = True
    # The billing simulator: invoices are issued but not charged or emailed (nothing leaves the machine).
    simulation: bool = False
    # Continue-as-new after this many new events in one run, on top of the server's suggestion.
    # None (production) relies on the suggestion only; tests set a small number.
    continue_as_new_after_events: int | None = Field(default=None, ge=1)
    # Stripe customer: requested by ``account.created``, created by an activity exactly once.
    stripe_customer_pending: bool = False
    stripe_customer_id: str | None = None
    # The error code when creating it failed for good (it is then created on first use by the API).
    stripe_customer_error: str | None = None
    # Auto-recharge: a crossing (or a timer) asked for a decision; the state of attempts so far.
    recharge_requested: bool = False
    recharge: RechargeState = Field(default_factory=RechargeState)
    # When to decide again by itself (back-off after a failure, the daily cap's next UTC day).
    recharge_wake_at: datetime | None = None
    # Spend control: limit events not yet applied, a re-check after limits changed, and when the next
    # system pause ends by itself.
    pending_limit_events: list[OutboxEvent] = Field(default_factory=list)
    # Low-balance and daily-usage alerts to send (outbox events, oldest first).
    pending_alert_events: list[OutboxEvent] = Field(default_factory=list)
    # Stripe refunds made outside creditflow and disputes, to apply to the ledger (outbox events, oldest first).
    pending_payment_events: list[OutboxEvent] = Field(default_factory=list)
    # Billing cycle: the subscription (None: wallet only) and the invoices started and not yet seen finished.
    subscription: SubscriptionState | None = None
    open_invoice_ids: list[str] = Field(default_factory=list)
    agents_recheck: bool = False
    agents_wake_at: datetime | None = None


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
    subscription: SubscriptionState | None = None


# --- TopUpWorkflow -----------------------------------------------------------------------------------

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
    # The named credit system the credits fund (docs/credit-systems.md); None: the default system, the wallet.
    credit_system: str | None = None


class TopUpInput(BaseModel):
    """Input of ``TopUpWorkflow``."""

    account_id: str
    request_id: str
    terms: TopUpTerms
    description: str
    # How long a client-secret payment may stay unpaid, and how often it is polled meanwhile.
    payment_expiry_seconds: int = 3600
    poll_interval_seconds: float = 5.0
    publish_search_attributes: bool = True  # False on servers without creditflow's search attributes


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


# --- RefundWorkflow ----------------------------------------------------------------------------------

REFUND_WORKFLOW = "RefundWorkflow"
REFUND_WORKFLOW_ID_PREFIX = "refund:"
# Update: waits until the refund is decided (succeeded/failed), returns ``RefundOutcome``. Its argument
# (``RefundTerms``) must match the workflow's: a request id reused for another refund is ``idempotency_conflict``.
UPDATE_REFUND_ANSWER = "answer"
# Query: the current ``RefundOutcome``.
QUERY_REFUND_STATUS = "status"
# Signal (no argument): Stripe's word on a pending refund was applied to its row (a webhook event); read it now.
SIGNAL_REFUND_EVENT = "refund_event"

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
    publish_search_attributes: bool = True  # False on servers without creditflow's search attributes


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


# --- AutoRechargeWorkflow ----------------------------------------------------------------------------

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
    publish_search_attributes: bool = True


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


# --- InvoiceWorkflow ---------------------------------------------------------------------------------

INVOICE_WORKFLOW = "InvoiceWorkflow"
INVOICE_WORKFLOW_ID_PREFIX = "invoice:"
# Query: the current ``InvoiceOutcome``.
QUERY_INVOICE_STATUS = "status"
# Signal: "try the charge again now" (e.g. the customer saved a new card) instead of waiting for the next retry.
SIGNAL_RETRY_INVOICE_PAYMENT = "retry_payment"
# Charge the invoice now (``POST /billing/invoices/{id}/pay``, a card added): ``InvoicePayNow``.
SIGNAL_PAY_INVOICE_NOW = "pay_now"

INVOICE_PENDING = "pending"
INVOICE_OPEN = "open"
INVOICE_PAID = "paid"
INVOICE_PAST_DUE = "past_due"


def invoice_workflow_id(account_id: str, period_key: str) -> str:
    """``invoice:{account_id}:{period_key}``: one invoice per account and period (key: the period's UTC start date).
    Start it with ``id_reuse_policy=REJECT_DUPLICATE``; a second run is harmless anyway (the invoice is stored
    once per period and charged once per attempt)."""
    return f"{INVOICE_WORKFLOW_ID_PREFIX}{account_id}:{period_key}"


class InvoiceChargeLine(BaseModel):
    """A recurring charge billed on the invoice, e.g. 3 phone numbers at 150 credits (1 credit = 1 cent)."""

    description: str
    quantity: int
    unit: str = ""
    unit_price_credits: Decimal


class InvoiceAdjustmentLine(BaseModel):
    """A stated amount in cents (negative: a credit, e.g. proration of a downgrade)."""

    description: str
    amount_cents: int


class InvoiceWorkflowInput(BaseModel):
    """Input of ``InvoiceWorkflow`` (started by the account workflow at each renewal for the closed period).

    ``subscription_fee_cents`` None bills the plan's fee; ``overage_micros`` is the credit-line draw to bill (it is
    restored to the wallet when the invoice is paid). The charge policy fields left None come from the worker's
    settings (``CREDITFLOW_INVOICE_DUE_DAYS``, ``_CHARGE_ATTEMPTS``, ``_RETRY_INTERVAL_SECONDS``)."""

    account_id: str
    period_start: datetime
    period_end: datetime
    period_key: str | None = None  # None: the period start's UTC date
    plan_id: str | None = None
    subscription_fee_cents: int | None = None
    recurring_charges: list[InvoiceChargeLine] = Field(default_factory=list)
    overage_micros: int = 0
    adjustments: list[InvoiceAdjustmentLine] = Field(default_factory=list)
    charge: bool = True  # False: issue it open and leave the payment to someone else
    publish_search_attributes: bool = True  # False on servers without creditflow's search attributes
    send_email: bool = True
    due_days: int | None = None
    charge_attempts: int | None = None
    retry_interval_seconds: int | None = None

    def key(self) -> str:
        return self.period_key or self.period_start.date().isoformat()


class InvoicePayNow(BaseModel):
    """Signal ``pay_now``: try the charge now, with this saved card (None: the default card)."""

    payment_method_id: str | None = None


class InvoiceOutcome(BaseModel):
    """The ``status`` query and the workflow's result. Never carries the HTML or PDF (fetch them by ``invoice_id``)."""

    status: str = INVOICE_PENDING
    account_id: str
    period_key: str
    invoice_id: str | None = None
    number: str | None = None
    amount_due_cents: int | None = None
    due_at: datetime | None = None
    paid_at: datetime | None = None
    attempts: int = 0
    charge_id: str | None = None
    payment_intent_id: str | None = None
    next_attempt_at: datetime | None = None
    error_code: str | None = None
    error_message: str | None = None
    emailed: bool = False


# --- ReconciliationWorkflow ------------------------------------------------------------------------

RECONCILIATION_WORKFLOW = "ReconciliationWorkflow"
# The Temporal Schedule that starts it (daily by default: CREDITFLOW_RECONCILE_INTERVAL_HOURS); its runs' ids
# start with this id. `creditflow reconcile` starts ``reconcile:manual:{uuid}`` instead.
RECONCILE_SCHEDULE_ID = "creditflow-reconcile"


class ReconcileInput(BaseModel):
    """Input of ``ReconciliationWorkflow``. ``since`` None: from the last completed run's end (the watermark)."""

    since: datetime | None = None
    trigger: str = "schedule"  # schedule / manual


class ReconcileSummary(BaseModel):
    """The workflow's result; the whole report is stored (``GET /api/v1/reconciliation/runs/{run_id}``)."""

    run_id: str
    since: datetime
    until: datetime
    listed: dict[str, int] = Field(default_factory=dict)
    matched: int = 0
    repaired: int = 0
    reported: int = 0
    violations: int | None = None
    notes: list[str] = Field(default_factory=list)


# --- PartitionMaintenanceWorkflow (docs/partitioning.md) -----------------------------------------------------------

PARTITION_MAINTENANCE_WORKFLOW = "PartitionMaintenanceWorkflow"
# The Temporal Schedule that starts it (daily by default: CREDITFLOW_PARTITION_INTERVAL_HOURS).
PARTITIONS_SCHEDULE_ID = "creditflow-partitions"


class PartitionMaintenanceInput(BaseModel):
    """Input of ``PartitionMaintenanceWorkflow``: how many months after the current one get their partition."""

    months_ahead: int = 3


class PartitionMaintenanceSummary(BaseModel):
    """What a maintenance run did: partitions created, coverage ahead, rows in DEFAULT, usage rollup rows."""

    created: list[str] = Field(default_factory=list)
    months_ahead: int = 0
    default_rows: int = 0
    rollup_rows: int = 0


# --- number rental in the wallet ------------------------------------------------------------------------------------

RENTAL_WORKFLOW = "RentalWorkflow"


def rental_workflow_id(account_id: str, charge_id: str) -> str:
    """``rental:{account_id}:{charge_id}``: one durable monthly schedule per recurring charge."""
    return f"rental:{account_id}:{charge_id}"


class RentalInput(BaseModel):
    """Month ``index`` (0: the month starting at ``anchor``, the charge's creation) of one recurring charge."""

    account_id: str
    charge_id: str
    anchor: datetime
    index: int = 0


# --- customer-webhook redelivery -------------------------------------------------------------------------------------

# Input: the redelivery's ``Notification`` (``creditflow.domain.notifications``; channels ``["webhook"]``,
# ``redelivery_of`` the event's first delivery); result: the webhook channel's final status.
WEBHOOK_REDELIVERY_WORKFLOW = "WebhookRedeliveryWorkflow"


def webhook_redelivery_workflow_id(account_id: str, key: str) -> str:
    """``webhook-redelivery:{account_id}:{idempotency key}``: one per redeliver request."""
    return f"webhook-redelivery:{account_id}:{key}"
