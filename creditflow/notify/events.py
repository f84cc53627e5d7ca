"""The customer-webhook events: the ``data`` each event kind carries, declared once (OpenAPI ``webhooks``).

Producers write their payloads with integer amounts named by unit (``*_micros`` micro-credits, ``*_cents`` US
cents: exact and what the templates render). A webhook is read by the customer's code, next to the API, so the
body also carries each amount as the API answers it: ``balance_micros`` adds ``balance`` in credits,
``amount_cents`` adds ``amount_usd`` in dollars (exact JSON numbers; an existing key is never overwritten).
``WEBHOOK_EVENTS`` maps every kind the code sends to its ``data`` model; ``tests/test_api_lists.py`` checks that
every kind with a template, a default channel or a producer in the source is declared here, and the producer
test validates every real payload against its model. Fields the models do not name may be added later
(``additionalProperties``), as with API answers.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from creditflow.domain.money import micros_to_credits
from creditflow.domain.topups import cents_to_usd

Credits = Decimal
Micros = int
Cents = int


def api_units(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload plus each integer ``*_micros`` as credits and each ``*_cents`` as USD, under the API's names."""
    out = dict(payload)
    for key, value in payload.items():
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if key.endswith("_micros"):
            out.setdefault(key.removesuffix("_micros"), micros_to_credits(value))
        elif key.endswith("_cents"):
            out.setdefault(key.removesuffix("_cents") + "_usd", cents_to_usd(value))
    return out


class _Data(BaseModel):
    model_config = ConfigDict(extra="allow")


class Receipt(_Data):
    """A top-up's money arrived and its credits are in the wallet (``late``: after the top-up had given up)."""
    charge_id: str
    request_id: str | None = None
    payment_intent_id: str | None = None
    transaction_id: str | None = None
    amount_cents: Cents
    amount_usd: Decimal
    amount: str = Field(description="Formatted, e.g. \"$25.00\".")
    credits: Credits
    package_id: str | None = None
    description: str | None = None
    late: bool | None = None


class AutoRechargeSucceeded(_Data):
    charge_id: str
    seq: int | None = None
    payment_intent_id: str | None = None
    transaction_id: str | None = None
    amount_cents: Cents | None = None
    amount_usd: Decimal | None = None
    amount: str | None = None
    credits: Credits
    balance: str | None = Field(default=None, description="Credits after the recharge, an exact decimal string.")
    late: bool | None = None


class AutoRechargeFailed(_Data):
    seq: int
    workflow_id: str
    error_code: str | None = None
    error_message: str | None = None
    decline_code: str | None = None
    amount: str
    credits: Credits
    consecutive_failures: int
    threshold: str = Field(description="Credits, an exact decimal string.")
    next_attempt_at: str | None = None


class AutoRechargeDisabled(AutoRechargeFailed):
    reason: str
    max_consecutive_failures: int


class AutoRechargeDailyCapReached(_Data):
    max_per_day: int
    next_attempt_at: str


class BalanceLow(_Data):
    threshold_micros: Micros
    threshold: Credits
    available_micros: Micros
    available: Credits
    balance_micros: Micros | None = None
    balance: Credits | None = None


class UsageDailyThreshold(_Data):
    limit_micros: Micros
    limit: Credits
    spent_micros: Micros
    spent: Credits
    period: str


class LimitReached(_Data):
    scope: str = Field(description="daily, monthly, agent_monthly, plan_credits, agent_plan_credits")
    agent_id: str | None = None
    period: str | None = None
    action: str | None = None
    limit_micros: Micros | None = None
    limit: Credits | None = None
    spent_micros: Micros | None = None
    spent: Credits | None = None
    available_micros: Micros | None = None
    available: Credits | None = None
    required_micros: Micros | None = None
    required: Credits | None = None


class InvoiceNotice(_Data):
    invoice_id: str
    number: str
    period: str | None = None
    total_cents: Cents
    total_usd: Decimal
    due_date: str
    paid_date: str | None = None
    payment_intent_id: str | None = None


class InvoicePastDue(InvoiceNotice):
    amount_due_cents: Cents
    amount_due_usd: Decimal
    days_past_due: int
    error_code: str


class AgentStatus(_Data):
    agent_id: str
    agent_name: str | None = None
    paused_by: str | None = None
    reason: str | None = None
    resume_at: str | None = None
    status: Literal["paused", "active"]


class RecurringChargeFailed(_Data):
    charge_id: str
    description: str
    quantity: Decimal
    amount_micros: Micros
    amount: Credits
    period: str


class PaymentDisputed(_Data):
    payment_intent_id: str | None = None
    dispute_id: str
    amount_cents: Cents
    amount_usd: Decimal
    credits_taken_micros: Micros
    credits_taken: Credits
    reason: str | None = None


class RefundNotice(_Data):
    """A refund Stripe decided (RefundWorkflow): ``refund.succeeded`` money on its way back, ``refund.failed`` the
    credits back in the wallet (``error_code`` / ``error_message`` say why)."""
    refund_id: str
    request_id: str
    amount_cents: Cents | None = None
    credits: Credits | None = None
    payment_intent_id: str | None = None
    stripe_refund_id: str | None = None
    reason: str | None = None
    error_code: str | None = None
    error_message: str | None = None


WEBHOOK_EVENTS: dict[str, type[BaseModel]] = {
    "topup.receipt": Receipt,
    "auto_recharge.succeeded": AutoRechargeSucceeded,
    "auto_recharge.failed": AutoRechargeFailed,
    "auto_recharge.disabled": AutoRechargeDisabled,
    "auto_recharge.daily_cap_reached": AutoRechargeDailyCapReached,
    "balance.low": BalanceLow,
    "usage.daily_threshold": UsageDailyThreshold,
    "limit.reached": LimitReached,
    "invoice.issued": InvoiceNotice,
    "invoice.paid": InvoiceNotice,
    "invoice.past_due": InvoicePastDue,
    "agent.paused": AgentStatus,
    "agent.resumed": AgentStatus,
    "recurring_charge.failed": RecurringChargeFailed,
    "payment.disputed": PaymentDisputed,
    "refund.succeeded": RefundNotice,
    "refund.failed": RefundNotice,
}


def _envelope_name(kind: str) -> str:
    return "WebhookEvent_" + "".join(part.title() for part in kind.replace(".", "_").split("_"))


def envelopes() -> dict[str, type[BaseModel]]:
    """Per kind, the whole body sent (``{id, type, created, account_id, data}``) as a model."""
    models: dict[str, type[BaseModel]] = {}
    for kind, data in WEBHOOK_EVENTS.items():
        models[kind] = create_model(
            _envelope_name(kind),
            id=(str, Field(description="The notification id; also the Creditflow-Event-Id header.")),
            type=(Literal[kind], ...),  # type: ignore[valid-type]
            created=(int, Field(description="Unix seconds.")),
            account_id=(str, ...),
            data=(data, ...),
        )
    return models
