"""Exact money: the ledger's minor unit and the one place where rounding happens.

The ledger stores amounts as integers of **micro-credits** (1 credit = 1,000,000 µcr; 1 credit =
1 US cent). That is fine enough for sub-credit rates such as 0.1 credit per LLM token and small
enough for 64-bit columns (9.2e12 credits). A usage charge is ``quantity x credits_per_unit``
rounded half-up to the micro-credit in :func:`usage_charge_micros` (the SQL hot path uses the
same rule: ``round(quantity * rate * 1e6)``; a property test keeps the two in step). Billing
adds two conversions that must round, with the same rule (half-up, i.e. halves away from
zero, Decimal's ``ROUND_HALF_UP``): micro-credits to whole cents on an invoice line
(:func:`micros_to_cents`) and a share of a whole-cent or whole-credit amount for proration
(:func:`prorate`). Nothing else rounds: every other conversion is exact or refused.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

MICROS_PER_CREDIT = 1_000_000
CREDITS_PER_USD = 100
MAX_RATE_DECIMALS = 6
MAX_QUANTITY_DECIMALS = 6
MAX_CREDITS = Decimal(1_000_000_000)  # any single amount above 1e9 credits ($10M) is refused


class AmountError(ValueError):
    """An amount that cannot be represented exactly or is out of bounds."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def to_decimal(value: object) -> Decimal:
    """Parse an int, Decimal or numeric string exactly. Floats and booleans are refused."""
    if isinstance(value, bool | float):
        raise AmountError("invalid_amount", "amounts must be integers or decimal strings, not floats/booleans")
    try:
        result = Decimal(value) if not isinstance(value, Decimal) else value
    except (InvalidOperation, TypeError, ValueError) as exc:
        raise AmountError("invalid_amount", f"not a number: {value!r}") from exc
    if not result.is_finite():
        raise AmountError("invalid_amount", "amount must be finite")
    return result


def decimals_of(value: Decimal) -> int:
    exponent = value.normalize().as_tuple().exponent
    assert isinstance(exponent, int)
    return max(0, -exponent)


def credits_to_micros(credits: Decimal | int) -> int:
    """Exact conversion; refuses anything finer than one micro-credit."""
    value = to_decimal(credits)
    micros = value * MICROS_PER_CREDIT
    if micros != micros.to_integral_value():
        raise AmountError("invalid_amount", f"{value} credits is finer than one micro-credit")
    return int(micros)


def micros_to_credits(micros: int) -> Decimal:
    """Exact conversion for display: whole credits come back as integral Decimals."""
    whole, rest = divmod(micros, MICROS_PER_CREDIT)
    if rest == 0:
        return Decimal(whole)
    return Decimal(micros).scaleb(-6).normalize()


def usd_to_credits(usd: Decimal | int) -> int:
    """$1 = 100 credits; only whole cents are valid money."""
    value = to_decimal(usd)
    credits = value * CREDITS_PER_USD
    if credits != credits.to_integral_value():
        raise AmountError("invalid_amount", f"${value} is not a whole number of cents")
    return int(credits)


def usage_charge_micros(quantity: Decimal, credits_per_unit: Decimal) -> int:
    """The single rounding rule of the ledger: half-up to the micro-credit."""
    raw = quantity * credits_per_unit * MICROS_PER_CREDIT
    return int(raw.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def micros_to_cents(micros: int) -> int:
    """Micro-credits to whole cents (1 credit = 1 cent), half-up: an invoice bills whole cents."""
    return prorate(micros, 1, MICROS_PER_CREDIT)


def prorate(amount: int, numerator: int, denominator: int) -> int:
    """``amount x numerator / denominator`` rounded half-up (halves away from zero) to a whole unit.

    Integer arithmetic only, so it is exact at any size: ``floor((2|a·n| + d) / 2d)`` with a's sign."""
    if denominator <= 0 or numerator < 0:
        raise ValueError(f"a share needs a positive denominator and a non-negative numerator; "
                         f"got {numerator}/{denominator}")
    magnitude = (2 * abs(amount) * numerator + denominator) // (2 * denominator)
    return magnitude if amount >= 0 else -magnitude


def validate_quantity(value: object, *, integer_only: bool) -> Decimal:
    """A usage quantity: positive, bounded, at most 6 decimals, whole where the unit is whole."""
    quantity = to_decimal(value)
    if quantity <= 0:
        raise AmountError("invalid_quantity", "value must be greater than zero")
    if quantity > MAX_CREDITS:
        raise AmountError("invalid_quantity", "value is too large")
    if decimals_of(quantity) > MAX_QUANTITY_DECIMALS:
        raise AmountError("invalid_quantity", f"value has more than {MAX_QUANTITY_DECIMALS} decimals")
    if integer_only and quantity != quantity.to_integral_value():
        raise AmountError("invalid_quantity", "this feature is metered in whole units")
    return quantity


def validate_rate(value: object) -> Decimal:
    rate = to_decimal(value)
    if rate < 0:
        raise AmountError("invalid_rate", "credits_per_unit cannot be negative")
    if rate > 1_000_000:
        raise AmountError("invalid_rate", "credits_per_unit is too large")
    if decimals_of(rate) > MAX_RATE_DECIMALS:
        raise AmountError("invalid_rate", f"credits_per_unit has more than {MAX_RATE_DECIMALS} decimals")
    return rate


def validate_whole_credits(value: object, *, allow_negative: bool = False) -> int:
    """A manual amount in whole credits: non-zero, bounded, integral."""
    amount = to_decimal(value)
    if amount != amount.to_integral_value():
        raise AmountError("invalid_amount", "amount must be a whole number of credits")
    if amount == 0 or (amount < 0 and not allow_negative):
        raise AmountError("invalid_amount", "amount must be greater than zero")
    if abs(amount) > MAX_CREDITS:
        raise AmountError("invalid_amount", "amount is too large")
    return int(amount)
