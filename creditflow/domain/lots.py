"""Credit lots and the order in which usage burns them.

Plan credits first (they expire at renewal), then promotional grants (welcome bonus, goodwill,
manual adjustments), then purchased credits (the only refundable ones); within a class, the
earliest expiry first (no expiry last), then the oldest. The SQL hot path orders by exactly
``(priority, expires_at NULLS LAST, created_at, id)`` with the priorities below.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class LotSource(StrEnum):
    PLAN = "plan"
    WELCOME_BONUS = "welcome_bonus"
    PROMOTIONAL = "promotional"
    GOODWILL = "goodwill"
    ADJUSTMENT = "adjustment"
    PURCHASE = "purchase"
    AUTO_RECHARGE = "auto_recharge"
    TRANSFER = "transfer"


PRIORITY: dict[LotSource, int] = {
    LotSource.PLAN: 0,
    LotSource.WELCOME_BONUS: 10,
    LotSource.PROMOTIONAL: 10,
    LotSource.GOODWILL: 10,
    LotSource.ADJUSTMENT: 10,
    LotSource.PURCHASE: 20,
    LotSource.AUTO_RECHARGE: 20,
    LotSource.TRANSFER: 20,
}

REFUNDABLE_SOURCES = frozenset({LotSource.PURCHASE, LotSource.AUTO_RECHARGE})


# --- a lot's price -------------------------------------------------------------------------------------
# A paid lot (purchase, auto-recharge) carries ``paid_cents``: the money paid for it, and ``original_micros``: the
# credits that money bought (a package's bonus included, so 1,200 credits for 1,000 cents is a price of 0.8333 cents
# per credit). Refunds, Stripe-side refunds and disputes move its credits and its money together, in that proportion,
# and every conversion rounds against the customer getting something back: money returned is rounded DOWN, credits
# taken back are rounded UP (to the micro). Neither direction can then mint value, however a purchase is split.


def cents_for_micros(micros: int, *, paid_cents: int, original_micros: int) -> int:
    """The money ``micros`` credits of the lot are worth, rounded down: floor(micros * paid / original)."""
    _check_price(paid_cents, original_micros)
    if micros < 0:
        raise ValueError("micros must be >= 0")
    return micros * paid_cents // original_micros


def micros_for_cents(cents: int, *, paid_cents: int, original_micros: int) -> int:
    """The credits (micros) of the lot that ``cents`` bought, rounded up: ceil(cents * original / paid)."""
    _check_price(paid_cents, original_micros)
    if cents < 0:
        raise ValueError("cents must be >= 0")
    return -(-cents * original_micros // paid_cents)


def _check_price(paid_cents: int, original_micros: int) -> None:
    if paid_cents <= 0 or original_micros <= 0:
        raise ValueError("a lot's price needs paid_cents > 0 and original_micros > 0")


def lot_priority(source: LotSource | str) -> int:
    return PRIORITY[LotSource(source)]


@dataclass(frozen=True)
class Lot:
    id: str
    source: LotSource
    remaining_micros: int
    created_at: datetime
    expires_at: datetime | None = None

    @property
    def priority(self) -> int:
        return lot_priority(self.source)


def burn_order_key(lot: Lot) -> tuple[int, int, datetime, datetime, str]:
    """Sort key: priority, then expiry (none last), then age, then id for a total order."""
    no_expiry = 1 if lot.expires_at is None else 0
    expiry = lot.expires_at or lot.created_at
    return (lot.priority, no_expiry, expiry, lot.created_at, lot.id)


def plan_burn(lots: list[Lot], amount_micros: int) -> tuple[list[tuple[str, int]], int]:
    """Which lots a debit takes from and how much; returns (takes, uncovered remainder).

    The remainder is drawn on the account's overage credit line (or refused by the floor check).
    """
    takes: list[tuple[str, int]] = []
    left = amount_micros
    for lot in sorted(lots, key=burn_order_key):
        if left == 0:
            break
        if lot.remaining_micros <= 0:
            continue
        take = min(lot.remaining_micros, left)
        takes.append((lot.id, take))
        left -= take
    return takes, left
