"""Request bodies of the HTTP API. Amounts are exact (Decimal from JSON numbers or strings)."""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from creditflow.api.keys import Scope
from creditflow.errors import CreditflowError
from creditflow.metadata import check_metadata, check_text

_DECIMAL_TEXT = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _exact_amount(value: Any) -> Any:
    """JSON numbers (parsed as Decimal) or plain decimal strings; no booleans, floats (NaN,
    Infinity), underscores or padding."""
    if isinstance(value, bool):
        raise ValueError("booleans are not amounts")
    if isinstance(value, float):
        raise ValueError("amounts must be exact finite numbers")
    if isinstance(value, str) and not _DECIMAL_TEXT.match(value):
        raise ValueError("not a decimal number")
    return value


MAX_AMOUNT_EXPONENT = 30  # |adjusted exponent|: 1e-30 .. 1e30 is wider than any amount or quantity


def _sane_amount(value: Decimal) -> Decimal:
    """Refuse what is a number but no amount: ``1e-999999999`` (the database cannot hold it, and rounded it
    would be free usage), ``1e999999``, NaN."""
    if not value.is_finite() or (value != 0 and abs(value.adjusted()) > MAX_AMOUNT_EXPONENT):
        raise ValueError(f"amounts must be finite, between 1e-{MAX_AMOUNT_EXPONENT} and 1e{MAX_AMOUNT_EXPONENT}")
    return value


def _name(value: str) -> str:
    if not value.strip() or not any(c.isprintable() and not c.isspace() for c in value):
        raise ValueError("must contain a visible character")
    return value


def _metadata(value: dict[str, Any]) -> dict[str, Any]:
    try:
        return check_metadata(value)
    except CreditflowError as exc:
        raise ValueError(exc.message) from exc


def _text(value: str) -> str:
    try:
        return check_text(value)
    except CreditflowError as exc:
        raise ValueError(exc.message) from exc


Amount = Annotated[Decimal, BeforeValidator(_exact_amount), AfterValidator(_sane_amount)]
Token = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:\-/]{1,200}$")]
Email = Annotated[str, StringConstraints(pattern=r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]{2,}$", max_length=254)]
Text = Annotated[str, AfterValidator(_text)]
PaymentIntentId = Annotated[str, StringConstraints(pattern=r"^pi_[A-Za-z0-9_]{1,250}$")]
Metadata = Annotated[dict[str, Any], Field(default_factory=dict, max_length=50), AfterValidator(_metadata)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AccountCreate(Strict):
    name: Annotated[Text, StringConstraints(min_length=1, max_length=200, strip_whitespace=True),
                    AfterValidator(_name)]
    billing_email: Email
    external_id: Token | None = None
    overage_credit_line: Amount = Field(default=Decimal(0), description="Whole credits the account may go negative.")


class ApiKeyCreate(Strict):
    name: Annotated[Text, StringConstraints(max_length=100)] = ""
    scopes: list[Scope] = Field(min_length=1, description="any of billing:read, usage:write, billing:write, "
                                "payments:write, wallet:credit (docs/scopes.md)")


class TrackRequest(Strict):
    account_id: str | None = Field(default=None, description="Required with an admin key; implied by an account key.")
    feature_id: Token
    value: Amount = Field(description="Units used (messages, minutes, tokens). Exact; up to 6 decimals.")
    agent_id: Token | None = None
    idempotency_key: Token | None = Field(default=None, description="Or the Idempotency-Key header (one of them).")
    metadata: Metadata


class TrackBatchRequest(Strict):
    events: list[TrackRequest] = Field(min_length=1, max_length=1000)


class CheckRequest(Strict):
    account_id: str | None = None
    feature_id: Token
    value: Amount | None = None
    agent_id: Token | None = None


class HoldCreate(Strict):
    account_id: str | None = None
    feature_id: Token
    value: Amount = Field(description="Expected units to reserve (e.g. the expected call minutes).")
    agent_id: Token | None = None
    ttl_seconds: int | None = Field(default=None, ge=1, le=7 * 24 * 3600)
    idempotency_key: Token | None = Field(default=None, description="Or the Idempotency-Key header (one of them).")
    metadata: Metadata


class HoldSettle(Strict):
    account_id: str | None = None
    value: Amount = Field(description="Actual units used; the rest of the hold is released.")
    metadata: Metadata


class HoldRelease(Strict):
    account_id: str | None = None


class WalletCredit(Strict):
    account_id: str
    amount: Amount = Field(description="Whole credits; positive credits the wallet, negative debits it.")
    reason: Annotated[Text, StringConstraints(min_length=1, max_length=500, strip_whitespace=True)]
    idempotency_key: Token | None = Field(default=None, description="Or the Idempotency-Key header (one of them).")
    credit_system: Token | None = Field(default=None, description="A named credit system to credit or debit"
                                        " (default: the wallet, `credits`).")


class FeaturePut(Strict):
    name: Annotated[Text, StringConstraints(min_length=1, max_length=200)] | None = None
    channel: Token
    unit: Token
    integer_only: bool = True
    base_feature_id: Token | None = None
    credits_per_unit: Amount
    effective_at: datetime | None = Field(default=None, description="Default: now.")
    credit_system: Token | None = Field(default=None, description="The credit system it draws on, set when the"
                                        " feature is created (default `credits`); it cannot change afterwards.")


class PaymentMethodAttach(Strict):
    account_id: str | None = Field(default=None, description="Required with an admin key; implied by an account key.")
    payment_method_id: Annotated[str, StringConstraints(pattern=r"^pm_[A-Za-z0-9]{1,200}$")] = Field(
        description="A PaymentMethod created client-side (Stripe.js), e.g. `pm_1Q...`.")
    set_default: bool | None = Field(
        default=None, description="Make it the default card. Absent: only if the account has no default yet.")
