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
