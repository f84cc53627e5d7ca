"""Pydantic models returned by the ledger (and served by the API). Credits are exact Decimals."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from pydantic import BaseModel, Field

from creditflow.domain.money import micros_to_credits


def credits(micros: int | None) -> Decimal | None:
    return None if micros is None else micros_to_credits(int(micros))


def exact(value: object) -> Decimal | None:
    """A decimal from the database or JSON, shown without trailing zeros (12.0 -> 12)."""
    if value is None:
        return None
    number = Decimal(str(value))
    return number.quantize(Decimal(1)) if number == number.to_integral_value() else number.normalize()


class Balances(BaseModel):
    """Wallet figures in credits. ``available`` = balance - pending_charges; ``available_to_use``
    adds what is left of the overage credit line."""

    balance: Decimal
    pending_charges: Decimal
    available: Decimal
    overage_credit_line: Decimal = Decimal(0)
    available_to_use: Decimal
    currency: str = "credits"

    @classmethod
    def from_micros(cls, balance: int, held: int, floor: int) -> Balances:
        # Built from trusted integers on the hot path: no re-validation.
        return cls.model_construct(
            balance=micros_to_credits(balance),
            pending_charges=micros_to_credits(held),
            available=micros_to_credits(balance - held),
            overage_credit_line=micros_to_credits(-floor),
            available_to_use=micros_to_credits(balance - held - floor),
            currency="credits",
        )


class Balance(Balances):
    account_id: str
    last_updated: datetime
    # With a plan: what is left of this cycle's plan credits (spent before the wallet) and when the
    # cycle renews. None without a subscription.
    plan_id: str | None = None
    plan_credits_remaining: Decimal | None = None
    # Seed 001's "Available balance in the wallet" beside the plan's remaining credits: the balance less the plan
    # credits (what was bought or granted; negative while the overage line is drawn). None without a subscription.
    wallet_balance: Decimal | None = None
    next_renewal_at: datetime | None = None
    # Seed 002's console ("Your Credit Balance") for the account's period (the billing period with a plan, else the
    # UTC calendar month): credits bought or granted in it (gross), usage in it, and what remains (the balance).
    period_start: datetime | None = None
    period_end: datetime | None = None
    total_credits: Decimal | None = None
    usage_this_period: Decimal | None = None
    remaining_credits: Decimal | None = None


class Account(BaseModel):
    id: str
    name: str
    billing_email: str
    external_id: str | None = None
    status: str
    overage_credit_line: Decimal
    created_at: datetime
    balance: Balances | None = None


def txn_id(value: UUID | None) -> str | None:
    """Transaction ids are ``txn_`` + the journal row's uuid in hex."""
    return None if value is None else f"txn_{value.hex}"


def balances_from(row: dict[str, Any]) -> Balances | None:
    if row.get("balance_micros") is None:
        return None
    return Balances.from_micros(row["balance_micros"], row["held_micros"], row["floor_micros"])


@dataclass(frozen=True, slots=True)
class TrackResult:
    """The outcome of one usage event. A plain slotted dataclass holding the database's integers:
    the hot path builds one per event, and the credit figures are derived only when read."""

    allowed: bool
    code: str
    charged_micros: int = 0
    required_micros: int | None = None
    credits_per_unit: Decimal | None = None
    transaction_id: str | None = None
    replayed: bool = False
    hold_id: str | None = None
    released_micros: int | None = None
    balance_micros: int | None = None
    held_micros: int | None = None
    floor_micros: int | None = None
    credit_system: str | None = None  # a named credit system's event (None: the default wallet)

    @property
    def credits_charged(self) -> Decimal:
        return micros_to_credits(self.charged_micros)

    @property
    def credits_required(self) -> Decimal | None:
        return credits(self.required_micros)

    @property
    def released(self) -> Decimal | None:
        return credits(self.released_micros)

    @property
    def balances(self) -> Balances | None:
        if self.balance_micros is None or self.held_micros is None or self.floor_micros is None:
            return None
        return Balances.from_micros(self.balance_micros, self.held_micros, self.floor_micros)

    @property
    def balance(self) -> Decimal | None:
        return credits(self.balance_micros)

    @classmethod
    def from_db(cls, row: dict[str, Any]) -> TrackResult:
        """From a ``cf_track_result`` row read as a dict."""
        return cls.from_row(tuple(row.values()))

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> TrackResult:
        """From a ``cf_track_result`` row as a tuple, in the type's column order: allowed, code, txn_id,
        charged, credits_per_unit, balance, held, floor, required, replayed, hold_id, released."""
        (allowed, code, txn, charged, rate, balance, held, floor, required, replayed, hold_id, released) = row
        return cls(allowed, code, charged or 0, required, None if rate is None else exact(rate), txn_id(txn),
                   bool(replayed), hold_id, released, balance, held, floor)


class CheckResult(BaseModel):
    allowed: bool
    code: str
    feature_id: str
    credits_required: Decimal | None = None
    credits_per_unit: Decimal | None = None
    balances: Balances | None = None
    # A feature of a named credit system: ``balances`` are that system's. Left out of answers about the default
    # system (added by the routes that answer with it), so those answers are as they were.
    credit_system: str | None = Field(default=None, exclude=True)


class HoldResult(BaseModel):
    allowed: bool
    code: str
    hold_id: str | None = None
    held_amount: Decimal | None = None
    status: str | None = None
    expires_at: datetime | None = None
    released: Decimal | None = None
    credits_required: Decimal | None = None
    replayed: bool = False
    balances: Balances | None = None
    credit_system: str | None = None  # a named credit system's hold (answers drop None fields)


class Transaction(BaseModel):
    id: str
    type: str
    amount: Decimal
    description: str
    balance_after: Decimal
    created_at: datetime
    metadata: dict[str, Any] = Field(default_factory=dict)


class TransactionPage(BaseModel):
    items: list[Transaction]
    total: int
    next_cursor: str | None = None
    has_more: bool = Field(default=False, description="More items beyond this page in the paging direction.")


class UsageItem(BaseModel):
    id: str = Field(description="The usage item's journal transaction id.")
    channel: str
    feature: str
    quantity: Decimal
    credits_per_unit: Decimal
    credits: Decimal
    agent_id: str | None
    created_at: datetime
    metadata: dict[str, Any] = Field(default_factory=dict)


class UsageRollup(BaseModel):
    date: str
    channel: str
    quantity: Decimal
    credits: Decimal
    events: int


class AgentUsage(BaseModel):
    agent_id: str | None = Field(description="null: usage reported without an agent")
    credits: Decimal
    events: int


class Feature(BaseModel):
    id: str
    name: str
    channel: str
    unit: str
    integer_only: bool
    base_feature_id: str | None = None
    credits_per_unit: Decimal | None = Field(
        default=None, description="Rate in force now (for a based feature: base rate + its own surcharge).")
    own_credits_per_unit: Decimal | None = None
    effective_at: datetime | None = None
    credit_system: str = Field(default="credits", description="The credit system whose balance it draws on.")
    scheduled: list[dict[str, Any]] = Field(default_factory=list, description="Future rate versions.")


class PostingResult(BaseModel):
    transaction_id: str
    amount: Decimal
    replayed: bool = False
    lot_id: str | None = None
    balances: Balances
