"""Top-up rules, pure: how much a top-up may be, what a credit package costs, and what it buys.

A top-up is paid in whole US cents and buys ``credits`` at 1 credit = 1 cent, or a named package whose
price and credits come from configuration (a package may carry a bonus: more credits than cents). The
bounds apply to custom amounts; packages are priced by the operator and are accepted as configured.
Nothing here rounds: a fraction of a cent is refused, never rounded.
"""

from __future__ import annotations

import re
from decimal import Decimal

from pydantic import BaseModel, Field, field_validator

from creditflow.domain.money import AmountError, to_decimal, usd_to_credits

DEFAULT_MIN_USD = Decimal(5)
DEFAULT_MAX_USD = Decimal(5000)
PACKAGE_ID = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,49}$")


class TopUpError(AmountError):
    """A top-up request refused by the rules (``amount_out_of_range``, ``unknown_package``, ``invalid_amount``)."""


class CreditPackage(BaseModel):
    """A named bundle: pay ``price_usd``, receive ``credits``."""

    id: str
    name: str
    price_usd: Decimal = Field(gt=0)
    credits: int = Field(gt=0)

    @field_validator("price_usd", mode="before")
    @classmethod
    def _exact(cls, value: object) -> Decimal:
        return to_decimal(value)

    @field_validator("price_usd")
    @classmethod
    def _whole_cents(cls, value: Decimal) -> Decimal:
        usd_to_credits(value)  # refuses fractions of a cent
        return value

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not PACKAGE_ID.match(value):
            raise ValueError("package ids are lowercase letters, digits, _ and -")
        return value

    @property
    def amount_cents(self) -> int:
        return usd_to_credits(self.price_usd)


DEFAULT_PACKAGES: tuple[CreditPackage, ...] = (
    CreditPackage(id="starter", name="Starter", price_usd=Decimal(10), credits=1_000),
    CreditPackage(id="growth", name="Growth", price_usd=Decimal(50), credits=5_000),
    CreditPackage(id="scale", name="Scale", price_usd=Decimal(200), credits=20_000),
)


class TopUpPolicy(BaseModel):
    """Bounds and packages, built from settings."""

    min_usd: Decimal = DEFAULT_MIN_USD
    max_usd: Decimal = DEFAULT_MAX_USD
    packages: tuple[CreditPackage, ...] = DEFAULT_PACKAGES


class TopUpQuote(BaseModel):
    """What a valid request charges and credits."""

    amount_cents: int
    credits: int
    package_id: str | None = None
    description: str

    @property
    def amount_usd(self) -> Decimal:
        return cents_to_usd(self.amount_cents)


def cents_to_usd(cents: int) -> Decimal:
    """Exact: 2500 -> 25, 2550 -> 25.5, 2501 -> 25.01."""
    return Decimal(cents) / Decimal(100)


def format_usd(cents: int) -> str:
    """For people: 2550 -> "$25.50"."""
    return f"${cents // 100:,}.{cents % 100:02d}"


def quote(policy: TopUpPolicy, *, amount_usd: object = None, package_id: str | None = None) -> TopUpQuote:
    """Validate a request naming exactly one of ``amount_usd`` and ``package_id``."""
    if (amount_usd is None) == (package_id is None):
        raise TopUpError("invalid_amount", "give exactly one of amount_usd and package_id")
    if package_id is not None:
        package = next((p for p in policy.packages if p.id == package_id), None)
        if package is None:
            raise TopUpError("unknown_package", f"no credit package {package_id!r}")
        return TopUpQuote(amount_cents=package.amount_cents, credits=package.credits, package_id=package.id,
                          description=f"{package.name} package purchase")
    try:
        amount = to_decimal(amount_usd)
        cents = usd_to_credits(amount)
    except AmountError as exc:
        raise TopUpError("invalid_amount", str(exc)) from exc
    if amount < policy.min_usd or amount > policy.max_usd:
        raise TopUpError("amount_out_of_range",
                         f"a top-up is between ${policy.min_usd} and ${policy.max_usd}; got ${amount}")
    return TopUpQuote(amount_cents=cents, credits=cents, description=f"Top-up of {format_usd(cents)}")
