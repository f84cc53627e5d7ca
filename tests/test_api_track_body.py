"""The track answer is built without a model per event (the batch endpoint builds one per event): it must stay
exactly the documented ``TrackResponse``'s dump, key order included, for every kind of result."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from creditflow.api.billing import TrackResponse, _track_body
from creditflow.api.error_handling import error_object
from creditflow.ledger.models import TrackResult

RESULTS = [
    TrackResult(True, "ok", 1_500_000, None, Decimal("1.5"), "txn_1", False, None, None, 98_500_000, 0, 0),
    TrackResult(True, "ok", 100_000, None, Decimal("0.1"), "txn_2", True, None, None, 7, 3, -5_000_000),
    TrackResult(False, "insufficient_credits", 0, 2_000_000_000, Decimal(2000), None, False, None, None, 5, 0, 0),
    TrackResult(False, "unknown_feature"),
    TrackResult(True, "ok", 250_000, None, Decimal("0.25"), "txn_3", False, "hold_1", 750_000, 10_000_000, 0, 0),
    TrackResult(True, "ok", 0, None, Decimal(0), "txn_4", False, None, None, 10, 2, None),  # no floor: no figures
    TrackResult(True, "ok", 1_000_000, None, Decimal(1), "txn_5", False, None, None, 9_000_000, 0, 0, "minutes"),
]


def _model_dump(result: TrackResult) -> dict[str, Any]:
    balances = result.balances
    body: dict[str, Any] = TrackResponse(
        allowed=result.allowed, code=result.code, credits_charged=result.credits_charged,
        credits_per_unit=result.credits_per_unit, credits_required=result.credits_required,
        balance=balances.balance if balances else None,
        pending_charges=balances.pending_charges if balances else None,
        available=balances.available if balances else None,
        transaction_id=result.transaction_id, replayed=result.replayed, hold_id=result.hold_id,
        released=result.released,
    ).model_dump(exclude_none=True)
    if result.credit_system is not None:
        body["credit_system"] = result.credit_system
    if not result.allowed:
        body["error"] = error_object(result.code, result.code.replace("_", " "))
    return body


@pytest.mark.parametrize("result", RESULTS, ids=lambda r: f"{r.code}-{r.transaction_id}")
def test_track_body_is_the_track_response_dump(result: TrackResult) -> None:
    expected = _model_dump(result)
    body = _track_body(result)
    assert body == expected
    assert list(body) == list(expected)
    assert [type(v) for v in body.values()] == [type(v) for v in expected.values()]


def test_track_body_figures() -> None:
    body = _track_body(RESULTS[1])
    assert (body["balance"], body["pending_charges"], body["available"], body["credits_charged"]) == (
        Decimal("0.000007"), Decimal("0.000003"), Decimal("0.000004"), Decimal("0.1"))
